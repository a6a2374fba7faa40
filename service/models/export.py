"""A version as other serving stacks load it: a Triton model repository, an MLflow model, a
Hugging Face folder (text). Each is built once from the version's artifacts, as a zip kept
beside them (`exports/<format>.zip`), and streamed from there on every later download.

- `triton`: `<name>/config.pbtxt` (ONNX Runtime backend, dynamic batching, the inputs and
  output `model.onnx` declares, the labels file), `<name>/labels.txt`, `<name>/1/model.onnx`.
  The output is the logits; the version's calibration temperature is kept in the config's
  `parameters`.
- `mlflow`: an MLflow model folder (`MLmodel`) with the `onnx` flavor and a `python_function`
  flavor whose loader (`code/thaw_pyfunc.py`) preprocesses as predict does, with thaw's own
  preprocessing modules shipped beside it (`code/thaw_engine/`: numpy, PIL, tokenizers only).
  Written by hand, so serving it needs no MLflow here.
- `hf` (a modality that `exports_hf`: text): the `save_pretrained` layout that
  `AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` loads,
  written by the modality (`worker/engine/modalities/text/hf_folder.py`).
"""

import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from service.errors import ApiError
from service.storage import ArtifactStore, ObjectNotFoundError
from service.tables import ModelVersion
from worker import engine
from worker.engine.artifacts import (
    ONNX_FILE,
    ONNX_OUTPUT,
    WEIGHTS_FILE,
    ModelConfig,
    read_model_config,
)
from worker.engine.modalities import MODALITIES, modality_for

FORMATS = ("triton", "mlflow", "hf")
TRITON_LABELS = "labels.txt"
TRITON_MAX_BATCH = 64
TRITON_QUEUE_DELAY_US = 2000
"""Triton's dynamic batcher waits at most this long for more requests (thaw's default too)."""
PYFUNC_MODULE = "thaw_pyfunc"
SHIPPED_ENGINE = "thaw_engine"
"""The package name thaw's preprocessing modules take inside an MLflow model's `code/`."""
SHIPPED_MODULES = (
    "artifacts.py",
    "preset_defaults.py",
    "recipe.py",
    "spec.py",
    "stages.py",
    "modalities/base.py",
)
"""What every modality's `serving.py` imports: standard library only. Beside them ship each
modality's `served_modules` (the registry is not shipped)."""
ENGINE_DIR = Path(engine.__file__).parent
"""The shipped modules are copied from here by path (the pyfunc imports them as `thaw_engine`)."""


def export_key(version: ModelVersion, fmt: str) -> str:
    return f"{version.artifact_prefix}/exports/{fmt}.zip"


def ensure_export(store: ArtifactStore, *, version: ModelVersion, fmt: str) -> str:
    """The key of the version's export in `fmt`, built and stored first if it is not yet."""
    key = export_key(version, fmt)
    try:
        store.stat(key)
        return key
    except ObjectNotFoundError:
        pass
    folder = store.local_path(version.artifact_prefix)
    config = read_model_config(folder)
    _check_exportable(config, has_onnx=(folder / ONNX_FILE).is_file(), fmt=fmt)
    name = version.model.name
    with tempfile.TemporaryDirectory(prefix="thaw-export-") as scratch:
        out = Path(scratch) / "out"
        if fmt == "triton":
            write_triton(folder, config, out / _safe(name))
        elif fmt == "mlflow":
            write_mlflow(folder, config, out)
        else:
            modality_for(config.modality).write_hf_folder(folder, config, out)
        archive = Path(scratch) / f"{fmt}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    zipped.write(path, path.relative_to(out).as_posix())
        # Two first downloads racing both build it; either's identical zip stays.
        store.put_file(key, archive)
    return key


def _check_exportable(config: ModelConfig, *, has_onnx: bool, fmt: str) -> None:
    """409 when the version cannot be exported in `fmt`, saying why."""
    modality = modality_for(config.modality)
    if fmt == "hf" and not modality.exports_hf:
        raise ApiError(
            409,
            "export_unavailable",
            f"A Hugging Face folder holds a text model; this version classifies {modality.items}.",
            param="format",
        )
    if fmt in ("triton", "mlflow") and not has_onnx:
        raise ApiError(
            409,
            "export_unavailable",
            f"A {fmt} export runs model.onnx, which this version does not have (its ONNX "
            "export was off or did not pass its parity check).",
            param="format",
        )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def write_triton(folder: Path, config: ModelConfig, out: Path) -> None:
    """A Triton model repository entry for the version's `model.onnx`."""
    (out / "1").mkdir(parents=True)
    shutil.copyfile(folder / ONNX_FILE, out / "1" / ONNX_FILE)
    (out / TRITON_LABELS).write_text("".join(f"{label}\n" for label in config.labels))
    inputs = modality_for(config.modality).onnx_inputs(config)
    output_dims = [len(config.labels)]
    input_blocks = ",\n".join(
        f'  {{\n    name: "{name}"\n    data_type: TYPE_{datatype}\n    dims: {dims}\n  }}'
        for name, datatype, dims in inputs
    )
    text = (
        f'name: "{out.name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {TRITON_MAX_BATCH}\n"
        f"input [\n{input_blocks}\n]\n"
        "output [\n"
        f'  {{\n    name: "{ONNX_OUTPUT}"\n    data_type: TYPE_FP32\n    dims: {output_dims}\n'
        f'    label_filename: "{TRITON_LABELS}"\n  }}\n'
        "]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {TRITON_QUEUE_DELAY_US}\n}}\n"
        'parameters {\n  key: "thaw_calibration_temperature"\n'
        f'  value {{ string_value: "{config.temperature!r}" }}\n}}\n'
    )
    (out / "config.pbtxt").write_text(text)


_MLMODEL = """\
artifact_path: model
flavors:
  onnx:
    code: null
    data: {onnx}
    onnx_version: {onnx_version}
    providers:
    - CPUExecutionProvider
  python_function:
    code: code
    data: .
    env:
      virtualenv: python_env.yaml
    loader_module: {loader}
    python_version: "3.11"
"""

_PYFUNC = '''\
"""A thaw model behind MLflow's `python_function` flavor: items read as thaw's predict reads
them (thaw's own modules, shipped in `thaw_engine/`), then `model.onnx` in ONNX Runtime.

`predict` takes what the model classifies: encoded images (bytes) or texts (str), as a list,
a pandas Series, or a DataFrame whose first column holds them; it answers a DataFrame of
calibrated probabilities, one column per label, a row per input."""

import importlib
from pathlib import Path

import numpy as np

from thaw_engine.artifacts import ONNX_FILE, ONNX_OUTPUT, read_model_config
from thaw_engine.modalities.base import average_views

MODALITIES = {modalities}
"""thaw's modalities, each shipped with its `serving.py` (the same in every export, so one
process can load models of several)."""


class ThawModel:
    def __init__(self, folder):
        import onnxruntime

        servings = [
            importlib.import_module(f"thaw_engine.modalities.{{name}}.serving")
            for name in MODALITIES
        ]
        kinds = [serving.PREPROCESSING for serving in servings]
        self.config = read_model_config(Path(folder), kinds=kinds)
        prep = self.config.preprocessing
        (serving,) = [s for s in servings if isinstance(prep, s.PREPROCESSING)]
        self.served = serving.served_inputs(self.config, Path(folder))
        self.session = onnxruntime.InferenceSession(
            str(Path(folder) / ONNX_FILE), providers=["CPUExecutionProvider"]
        )

    def predict(self, model_input, params=None):
        import pandas

        if isinstance(model_input, pandas.DataFrame):
            model_input = model_input.iloc[:, 0]
        block, _notes = self.served.read(list(model_input))
        feeds = self.served.onnx_feed(self.served.batch_input([block]))
        (logits,) = self.session.run([ONNX_OUTPUT], feeds)
        scaled = logits / self.config.temperature
        exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        probabilities = average_views(exp / exp.sum(axis=1, keepdims=True), self.served.views)
        return pandas.DataFrame(probabilities, columns=list(self.config.labels))


def _load_pyfunc(data_path):
    return ThawModel(data_path)
'''


def write_shipped_engine(code: Path) -> None:
    """thaw's modules the pyfunc reads items with, as the package `code/thaw_engine/`."""
    engine = code / SHIPPED_ENGINE
    engine.mkdir(parents=True)
    (engine / "__init__.py").write_text('"""thaw\'s preprocessing, as predict runs it."""\n')
    served = [
        f"modalities/{modality.name}/{module}"
        for modality in MODALITIES
        for module in modality.served_modules
    ]
    for module in (*SHIPPED_MODULES, *served):
        target = engine / module
        # A modality's package ships without its registry: only the modules predict reads.
        for package in target.relative_to(engine).parents[:-1]:
            (engine / package).mkdir(parents=True, exist_ok=True)
            (engine / package / "__init__.py").touch()
        shutil.copyfile(ENGINE_DIR / module, target)


def write_mlflow(folder: Path, config: ModelConfig, out: Path) -> None:
    """An MLflow model folder: `MLmodel`, the model's files, the pyfunc loader and thaw's
    preprocessing modules as its code."""
    import onnx

    out.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file() and path.name != WEIGHTS_FILE:
            shutil.copyfile(path, out / path.name)
    code = out / "code"
    write_shipped_engine(code)
    names = tuple(modality.name for modality in MODALITIES)
    (code / f"{PYFUNC_MODULE}.py").write_text(_PYFUNC.format(modalities=names))
    (out / "MLmodel").write_text(
        _MLMODEL.format(onnx=ONNX_FILE, onnx_version=onnx.__version__, loader=PYFUNC_MODULE)
    )
    modality = modality_for(config.modality)
    requirements = ["numpy", "pillow", "onnxruntime", "pandas", *modality.pyfunc_requirements]
    (out / "requirements.txt").write_text("".join(f"{r}\n" for r in requirements))
    (out / "python_env.yaml").write_text(
        'python: "3.11"\nbuild_dependencies:\n- pip\ndependencies:\n- -r requirements.txt\n'
    )
