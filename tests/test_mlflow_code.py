"""An MLflow export's `code/thaw_engine/` (`service.models.export`): every modality's serving
modules and what they import, loadable where neither torch nor thaw is installed."""

import subprocess
import sys
from pathlib import Path

from service.models.export import write_shipped_engine
from worker.engine.modalities import MODALITIES

BLOCKED = ("torch", "torchvision", "transformers", "peft", "worker", "service", "sqlalchemy")


def test_the_shipped_modules_import_without_torch_or_thaw(tmp_path: Path) -> None:
    write_shipped_engine(tmp_path)
    names = [modality.name for modality in MODALITIES]
    script = (
        "import importlib, sys\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
        f"for name in {names!r}:\n"
        "    serving = importlib.import_module(f'thaw_engine.modalities.{name}.serving')\n"
        "    assert callable(serving.served_inputs), name\n"
        "    print(name, serving.PREPROCESSING.modality)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split("\n")[:-1] == [f"{name} {name}" for name in names]
