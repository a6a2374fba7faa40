"""A text version as a Hugging Face folder: the `save_pretrained` layout, `config.json` (with
`auto_map`), `model.safetensors`, the tokenizer files and `modeling_thaw.py` (`hf.py`, copied by
path: importing it would load torch), loaded with
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`; the logits
come calibrated (the head's last layer divided by the temperature). Numpy and safetensors only.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from ...artifacts import CONFIG_FILE, WEIGHTS_FILE, ModelConfig
from .exported import ExportedTextPreprocessing

HF_MODELING = "modeling_thaw.py"
HF_MODEL_TYPE = "thaw_text"
"""`hf.ThawTextConfig.model_type`."""


def write_hf_folder(folder: Path, config: ModelConfig, out: Path) -> None:
    """The Hugging Face folder of the text version in `folder` (see the module's docstring)."""
    text = ExportedTextPreprocessing.of(config)
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
        "encoder": text.encoder,
        "hidden": hidden,
        "id2label": dict(enumerate(labels)),
        "label2id": {label: index for index, label in enumerate(labels)},
        "thaw": {
            "max_length": text.max_length,
            "truncation": text.truncation,
            "calibration_temperature": config.temperature,
        },
    }
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    shutil.copyfile(Path(__file__).parent / "hf.py", out / HF_MODELING)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    # Tokenizing as thaw does: at most `max_length` tokens, `[CLS]` and `[SEP]` included.
    tokenizer_config = out / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    settings["model_max_length"] = text.max_length
    tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n")
