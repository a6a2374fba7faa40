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
- `hf` (text only): the `save_pretrained` layout: `config.json` (with `auto_map`),
  `model.safetensors`, the tokenizer files and `modeling_thaw.py`
  (`worker/engine/modalities/text/hf.py`), loaded with
  `AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`; the
  logits come calibrated (the head's last layer divided by the temperature).
"""

import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from service.errors import ApiError
from service.storage import ArtifactStore, ObjectNotFoundError
from service.tables import ModelVersion
from worker import engine
from worker.engine.artifacts import (
    CONFIG_FILE,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    ONNX_TEXT_INPUTS,
    WEIGHTS_FILE,
    ModelConfig,
    read_model_config,
)
from worker.engine.modalities import modality_for

FORMATS = ("triton", "mlflow", "hf")
TRITON_LABELS = "labels.txt"
TRITON_MAX_BATCH = 64
TRITON_QUEUE_DELAY_US = 2000
"""Triton's dynamic batcher waits at most this long for more requests (thaw's default too)."""
HF_MODELING = "modeling_thaw.py"
PYFUNC_MODULE = "thaw_pyfunc"
SHIPPED_ENGINE = "thaw_engine"
"""The package name thaw's preprocessing modules take inside an MLflow model's `code/`."""
SHIPPED_MODULES = (
    "artifacts.py",
    "recipe.py",
    "spec.py",
    "modalities/image/pixels.py",
    "modalities/text/tokens.py",
)
"""Preprocessing as predict runs it; standard library, numpy, PIL and tokenizers only."""
ENGINE_DIR = Path(engine.__file__).parent
"""Engine files are copied into exports by path: importing `text.hf` would load torch."""
HF_MODEL_TYPE = "thaw_text"
"""`modalities.text.hf.ThawTextConfig.model_type`."""


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
            write_hf(folder, config, out)
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


def _onnx_dims(config: ModelConfig) -> tuple[list[tuple[str, str, list[int]]], list[int]]:
    """The ONNX graph's inputs (name, Triton type, dims without the batch) and output dims."""
    if config.text is not None:
        inputs = [(name, "TYPE_INT64", [-1]) for name in ONNX_TEXT_INPUTS]
    else:
        size = config.image.image_size
        inputs = [(ONNX_INPUT, "TYPE_FP32", [3, size, size])]
    return inputs, [len(config.labels)]


def write_triton(folder: Path, config: ModelConfig, out: Path) -> None:
    """A Triton model repository entry for the version's `model.onnx`."""
    (out / "1").mkdir(parents=True)
    shutil.copyfile(folder / ONNX_FILE, out / "1" / ONNX_FILE)
    (out / TRITON_LABELS).write_text("".join(f"{label}\n" for label in config.labels))
    inputs, output_dims = _onnx_dims(config)
    input_blocks = ",\n".join(
        f'  {{\n    name: "{name}"\n    data_type: {kind}\n    dims: {dims}\n  }}'
        for name, kind, dims in inputs
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
"""A thaw model behind MLflow's `python_function` flavor: preprocessing as thaw's predict
does it (thaw's own modules, shipped in `thaw_engine/`), then `model.onnx` in ONNX Runtime.

`predict` takes encoded images (bytes) or texts (str): a list, a pandas Series, or a
DataFrame whose first column holds them; it answers a DataFrame of calibrated probabilities,
one column per label, a row per input."""

import io
import json
from pathlib import Path

import numpy as np

from thaw_engine.artifacts import ONNX_FILE, ONNX_INPUT, ONNX_OUTPUT, ONNX_TEXT_INPUTS
from thaw_engine.artifacts import read_model_config
from thaw_engine.modalities.image.pixels import average_views, normalise, view_pixels
from thaw_engine.modalities.text.tokens import SpecialTokens, encode, load_backend, pad


class ThawModel:
    def __init__(self, folder):
        import onnxruntime

        self.config = read_model_config(Path(folder))
        self.session = onnxruntime.InferenceSession(
            str(Path(folder) / ONNX_FILE), providers=["CPUExecutionProvider"]
        )
        self.tokenizer = load_backend(Path(folder)) if self.config.text else None

    def predict(self, model_input, params=None):
        import pandas

        if isinstance(model_input, pandas.DataFrame):
            model_input = model_input.iloc[:, 0]
        items = list(model_input)
        views = 1
        if self.config.text is not None:
            text = self.config.text
            encoded = encode(
                self.tokenizer,
                items,
                SpecialTokens.from_dict(text.special_tokens),
                max_length=text.max_length,
                truncation=text.truncation,
            )
            feeds = dict(zip(ONNX_TEXT_INPUTS, pad(encoded.ids, text.special_tokens["pad_id"])))
        else:
            from PIL import Image

            prep = self.config.image
            views = len(prep.tta)
            pixels = np.concatenate(
                [view_pixels(Image.open(io.BytesIO(item)), prep.image_size, prep.tta)
                 for item in items]
            )
            feeds = {ONNX_INPUT: normalise(pixels, prep)}
        (logits,) = self.session.run([ONNX_OUTPUT], feeds)
        scaled = logits / self.config.temperature
        exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        probabilities = average_views(exp / exp.sum(axis=1, keepdims=True), views)
        return pandas.DataFrame(probabilities, columns=list(self.config.labels))


def _load_pyfunc(data_path):
    return ThawModel(data_path)
'''


def write_mlflow(folder: Path, config: ModelConfig, out: Path) -> None:
    """An MLflow model folder: `MLmodel`, the model's files, the pyfunc loader and thaw's
    preprocessing modules as its code."""
    import onnx

    out.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file() and path.name != WEIGHTS_FILE:
            shutil.copyfile(path, out / path.name)
    code = out / "code"
    engine = code / SHIPPED_ENGINE
    engine.mkdir(parents=True)
    (engine / "__init__.py").write_text('"""thaw\'s preprocessing, as predict runs it."""\n')
    for module in SHIPPED_MODULES:
        target = engine / module
        # A modality's package ships without its registry: only the module predict reads.
        for package in target.relative_to(engine).parents[:-1]:
            (engine / package).mkdir(parents=True, exist_ok=True)
            (engine / package / "__init__.py").touch()
        shutil.copyfile(ENGINE_DIR / module, target)
    (code / f"{PYFUNC_MODULE}.py").write_text(_PYFUNC)
    (out / "MLmodel").write_text(
        _MLMODEL.format(onnx=ONNX_FILE, onnx_version=onnx.__version__, loader=PYFUNC_MODULE)
    )
    requirements = ["numpy", "pillow", "onnxruntime", "pandas"]
    if config.text is not None:
        requirements.append("tokenizers")
    (out / "requirements.txt").write_text("".join(f"{r}\n" for r in requirements))
    (out / "python_env.yaml").write_text(
        'python: "3.11"\nbuild_dependencies:\n- pip\ndependencies:\n- -r requirements.txt\n'
    )


def write_hf(folder: Path, config: ModelConfig, out: Path) -> None:
    """A Hugging Face folder for a text version (see the module's docstring)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    assert config.text is not None
    assert config.encoder is not None
    out.mkdir(parents=True)
    state = load_file(str(folder / WEIGHTS_FILE))
    weights: dict[str, np.ndarray] = {}
    encoder_prefix = "backbone.net."
    for key, value in state.items():
        if key.startswith(encoder_prefix):
            weights["encoder." + key.removeprefix(encoder_prefix)] = value
    # The head's Linear layers, in order, whatever Dropout layers sat between them.
    linear = sorted(
        {int(key.split(".")[1]) for key in state if re.fullmatch(r"head\.\d+\.weight", key)}
    )
    for position, index in enumerate(linear):
        last = position == len(linear) - 1
        for part in ("weight", "bias"):
            value = state[f"head.{index}.{part}"]
            # The calibration in the last layer: softmax(logits) is predict's answer.
            weights[f"head.{2 * position}.{part}"] = (
                value / np.float32(config.temperature) if last else value
            )
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    labels = list(config.labels)
    hidden = list(config.newest.head.get("hidden") or [])
    hf_config: dict[str, Any] = {
        "architectures": ["ThawTextClassifier"],
        "auto_map": {
            "AutoConfig": "modeling_thaw.ThawTextConfig",
            "AutoModelForSequenceClassification": "modeling_thaw.ThawTextClassifier",
        },
        "model_type": HF_MODEL_TYPE,
        "encoder": config.encoder,
        "hidden": hidden,
        "id2label": dict(enumerate(labels)),
        "label2id": {label: index for index, label in enumerate(labels)},
        "thaw": {
            "max_length": config.text.max_length,
            "truncation": config.text.truncation,
            "calibration_temperature": config.temperature,
        },
    }
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    shutil.copyfile(ENGINE_DIR / "modalities" / "text" / "hf.py", out / HF_MODELING)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    # Tokenizing as thaw does: at most `max_length` tokens, `[CLS]` and `[SEP]` included.
    tokenizer_config = out / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    settings["model_max_length"] = config.text.max_length
    tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n")
