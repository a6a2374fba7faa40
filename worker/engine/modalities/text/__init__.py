"""Texts: a CSV of text,label rows (and unlabelled texts for ulmfit), BERT-family encoders
(`zoo.py`, `hf.py`), tokenized once and batched by length (`inputs.py`, `tokens.py`,
`token_cache.py`); exports carry the tokenizer files."""

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...preset_defaults import PresetDefaults
from ...spec import ModalityDefaults, SpecError
from ...stages import CLASSIFY, MASKED_LM, Base, Plan, Stage, TaskInfo, TransferConfig
from ..base import EntryCache, Inputs, Modality, ServedInputs
from .exported import ExportedTextPreprocessing
from .preprocessing import TextModelInput, TextPreprocessing

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor

    from ...artifacts import ModelConfig
    from ...onnx_export import OnnxExport
    from ...zoo import Backbone, BaseModelInfo


# A head on frozen sentence embeddings takes a higher rate than a conv head. Once the encoder
# trains, the head runs at 2e-3 * 0.05 = 1e-4 and each layer below 1.2 times less (the top
# layer ≈ 8e-5, the embeddings ≈ 3e-5): BERT's usual range, with the mild layer-wise decay
# Sun et al. 2019 found best. ulmfit keeps ULMFiT's 2.6 (its strategy's `lr_decay`).
# Batches of 16 (BERT's own fine-tuning range is 16-32): on a few hundred labelled texts
# twice the optimizer steps of 32 per epoch, 0.844 against 0.833 for fine_tune on
# bench/text_quality.py's descriptions.
TEXT_DEFAULTS = ModalityDefaults(
    lr=2e-3, fine_tune_lr_factor=0.05, lr_decay=1.2, max_length=128, batch_size=16
)


def _text_length(config: TransferConfig, base_model: str, model_max: int) -> int:
    wanted = config.max_length or TEXT_DEFAULTS.max_length or model_max
    if config.max_length is not None and config.max_length > model_max:
        raise SpecError(
            "max_length",
            f"max_length: {base_model} reads at most {model_max} tokens; got {config.max_length}",
        )
    return min(wanted, model_max)


class TextModality(Modality):
    name = "text"
    items = "texts"
    a_model = "a text"
    skipped_items = "rows"
    skipped_where = "where"
    imbalance_remedy = (
        '`class_weights: "balanced"` (texts are batched by length, so no balanced sampler)'
    )
    wrong_input = 'This model classifies texts: send JSON {"texts": ["...", ...]}.'
    input_param = "texts"
    exports_hf = True
    pyfunc_requirements = ("tokenizers",)
    inline_items = True
    legacy_count_field = "num_texts"
    served_modules = ("exported.py", "tokens.py", "serving.py")
    # An archive may hold a folder of .txt files per class as well as images.
    upload_kinds = frozenset({"archive", "csv", "jsonl"})
    reads_token_lengths = True
    objectives = frozenset({CLASSIFY, MASKED_LM})
    defaults = TEXT_DEFAULTS
    preprocessing = TextPreprocessing
    exported = ExportedTextPreprocessing
    presets: ClassVar[Mapping[str, PresetDefaults]] = {
        # A transformer from random weights stayed at chance at the text head rate (2e-3)
        # with cosine decay and no warm-up; one-cycle (30 % warm-up, then cosine annealing)
        # at 5e-4, every layer alike, trains it. 1e-3 (linear scaling from a script's batch
        # 16 to thaw's 32) did worse on bench/text_quality.py: 0.30-0.37 against 0.49 on the
        # descriptions.
        "scratch": PresetDefaults(lr=5e-4, schedule="one_cycle"),
        # Fine-tuning BERT-family encoders wants a warm-up before the peak rate (Devlin et al.
        # 2019, Mosbach et al. 2021): slanted triangular rates warm up over the first 10 % of
        # the steps, then decay linearly. The head, from random weights, trains at 1e-3 over
        # an encoder at 1e-4 (top layer) to 3e-5 (embeddings), as a careful script's 1e-3
        # over 5e-5.
        "fine_tune": PresetDefaults(schedule="slanted_triangular", head_boost=10.0),
        "partial": PresetDefaults(schedule="slanted_triangular", head_boost=10.0),
        # ulmfit's masked-LM stage did not pay on labelled sets of a few hundred texts: 0.797
        # against 0.871 for fine_tune on a 10-class task of 100 per class, and no gain for one
        # more epoch's wall time on bench/text_quality.py; `lm_epochs` brings it back.
        "ulmfit": PresetDefaults(lm_epochs=0),
    }

    def sizes(self, dataset: Any) -> list[list[Any]]:
        return [["texts", dataset.num_labelled], ["unlabelled texts", dataset.num_unlabelled]]

    def size_text(self, dataset: Any) -> str:
        unlabelled = f" + {dataset.num_unlabelled} unlabelled" if dataset.num_unlabelled else ""
        return f"{dataset.num_labelled} texts{unlabelled}"

    def upload(self, items: Sequence[tuple[str, Any]]) -> tuple[bytes, str]:
        """A CSV of `text,label` rows."""
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(["text", "label"])
        for label, item in items:
            writer.writerow([item.decode() if isinstance(item, bytes) else str(item), label])
        return rows.getvalue().encode(), "feedback.csv"

    def sample(self, content: str, label: int) -> Any:
        from .inputs import TextSample

        return TextSample(text=str(content), label=label)

    def check_settings(self, config: TransferConfig, base_model: str) -> None:
        for name in ("image_size", "progressive_resizing"):
            if getattr(config, name) is not None:
                raise SpecError(name, f"{name}: {base_model} is a text model; {name} is for images")
        if config.stages is not None:
            for index, spec in enumerate(config.stages):
                if spec.image_size is not None:
                    raise SpecError(
                        f"stages[{index}].image_size",
                        f"stages[{index}].image_size: {base_model} is a text model; "
                        "image_size is for images",
                    )
        if config.augment not in (None, "none"):
            raise SpecError(
                "augment", f"augment: {base_model} is a text model; augment is for images"
            )
        if config.tta not in (None, "none"):
            raise SpecError(
                "tta",
                f"tta: {base_model} is a text model; test-time augmentation (flips, crops) "
                "is for images",
            )
        if config.sampler != "shuffle":
            raise SpecError(
                "sampler",
                f"sampler: {base_model} is a text model, whose batches group texts by length; "
                "use class_weights for imbalanced classes",
            )

    def new_base(self, config: TransferConfig, info: "BaseModelInfo") -> Base:
        return Base(
            base_model=config.base_model,
            backbone_groups=info.group_names,
            image_size=None,
            preprocessing=TextPreprocessing(
                max_length=_text_length(
                    config, config.base_model, TextModelInput.of(info).max_length
                ),
                truncation=config.truncation or "head",
            ),
            parent_location=None,
            old_tasks=(),
            defaults=self.defaults,
        )

    def parent_base(
        self,
        config: TransferConfig,
        info: "BaseModelInfo",
        parent: Plan,
        old_tasks: tuple[TaskInfo, ...],
    ) -> Base:
        assert config.parent is not None
        inherited = TextPreprocessing.of(parent)
        return Base(
            base_model=parent.base_model,
            backbone_groups=info.group_names,
            image_size=None,
            preprocessing=TextPreprocessing(
                max_length=(
                    _text_length(config, parent.base_model, TextModelInput.of(info).max_length)
                    if config.max_length is not None
                    else inherited.max_length
                ),
                truncation=config.truncation or inherited.truncation,
            ),
            parent_location=config.parent.location,
            old_tasks=old_tasks,
            defaults=self.defaults,
        )

    def stage_inputs(self, plan: Plan, stage: Stage) -> dict[str, Any]:
        return {"objective": stage.objective, "max_length": TextPreprocessing.of(plan).max_length}

    def stage_reads(self, plan: Plan, stage: Stage) -> str:
        tokens = TextPreprocessing.of(plan)
        task = ", masked" if stage.objective == MASKED_LM else ""
        return f"texts of up to {tokens.max_length} tokens ({tokens.truncation}{task})"

    def feature_preprocessing(self, plan: Plan, stage: Stage) -> dict[str, Any]:
        tokens = TextPreprocessing.of(plan)
        return {"max_length": tokens.max_length, "truncation": tokens.truncation}

    def sample_type(self) -> type:
        from .inputs import TextSample

        return TextSample

    def inputs(
        self,
        plan: Plan,
        train: Sequence[Any],
        val: Sequence[Any],
        *,
        unlabelled: Sequence[str],
        weights_dir: Path | None,
        device: "torch.device",
        shuffle: "torch.Generator",
        num_workers: int,
        host_cache: "EntryCache | None",
    ) -> Inputs:
        from .inputs import TextInputs

        return TextInputs(
            plan,
            train,
            val,
            unlabelled=unlabelled,
            weights_dir=weights_dir,
            shuffle=shuffle,
            token_cache=host_cache,
        )

    def pooled_features(
        self,
        info: "BaseModelInfo",
        samples: Sequence[Any],
        *,
        weights_dir: Path | None,
        image_size: int | None,
        max_length: int | None,
        batch_size: int,
        on_progress: Callable[[int, int], None] | None,
    ) -> "tuple[np.ndarray, dict[str, np.ndarray]]":
        from .features import group_features
        from .inputs import TextSample

        length = max_length or self.defaults.max_length or 128
        return group_features(
            info.name,
            [sample.text for sample in samples if isinstance(sample, TextSample)],
            weights_dir=weights_dir,
            max_length=min(length, TextModelInput.of(info).max_length),
            batch_size=batch_size,
            on_progress=on_progress,
        )

    def owns_base_model(self, name: str) -> bool:
        from .zoo import is_text_model

        return is_text_model(name)

    def base_model_info(self, name: str) -> "BaseModelInfo":
        from .zoo import text_info

        return text_info(name)

    def weights_available(self, name: str, weights_dir: Path | None) -> bool:
        from .zoo import locate_folder, remember_folders

        remember_folders(weights_dir)
        return locate_folder(name, weights_dir) is not None

    def build_backbone(
        self, name: str, *, pretrained: bool, weights_dir: Path | None
    ) -> "Backbone":
        from .zoo import build_text_backbone

        return build_text_backbone(name, pretrained=pretrained, weights_dir=weights_dir)

    def exported_backbone(self, name: str, config: "ModelConfig") -> "Backbone":
        from .zoo import build_text_backbone

        return build_text_backbone(
            name,
            pretrained=False,
            weights_dir=None,
            encoder_config=ExportedTextPreprocessing.of(config).encoder,
        )

    def list_base_models(self, weights_dir: Path | None) -> list[dict[str, Any]]:
        from .zoo import list_text_models

        return list_text_models(weights_dir)

    def export_files(self, plan: Plan, out_dir: Path, weights_dir: Path | None) -> dict[str, Any]:
        """Write the tokenizer files; config.json's `encoder` and `preprocessing` of them
        (read back as `ExportedTextPreprocessing`)."""
        from dataclasses import asdict

        from .tokens import TOKENIZER_FILE, SpecialTokens
        from .zoo import encoder_config_dict, load_tokenizer, text_info

        tokenizer = load_tokenizer(plan.base_model, weights_dir)
        tokenizer.save_pretrained(out_dir)
        assert (out_dir / TOKENIZER_FILE).is_file()
        return {
            "encoder": encoder_config_dict(plan.base_model),
            "preprocessing": {
                "modality": "text",
                "tokenizer": TOKENIZER_FILE,
                "max_length": TextPreprocessing.of(plan).max_length,
                "truncation": TextPreprocessing.of(plan).truncation,
                "pooling": TextModelInput.of(text_info(plan.base_model)).pooling,
                "special_tokens": asdict(SpecialTokens.of(tokenizer)),
            },
        }

    def config_entries(
        self, plan: Plan, files: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        assert files, "a text model's config needs its tokenization (`export_files`)"
        return {"modality": "text", "encoder": files["encoder"]}, files["preprocessing"]

    def export_onnx(self, model: Any, plan: Plan, out_path: Path) -> "OnnxExport":
        from ...onnx_export import export_text_onnx

        vocab_size = int(model.backbone.config.vocab_size)
        return export_text_onnx(
            model,
            vocab_size=vocab_size,
            max_length=TextPreprocessing.of(plan).max_length,
            out_path=out_path,
        )

    def onnx_inputs(self, config: "ModelConfig") -> list[tuple[str, str, list[int]]]:
        from .serving import onnx_inputs

        return onnx_inputs(config)

    def write_hf_folder(self, folder: Path, config: "ModelConfig", out: Path) -> None:
        from .hf_folder import write_hf_folder

        write_hf_folder(folder, config, out)

    def served_inputs(self, config: "ModelConfig", model_dir: Path) -> "ServedInputs":
        from .serving import served_inputs

        return served_inputs(config, model_dir)

    def oip_inputs(self, config: "ModelConfig") -> list[dict[str, Any]]:
        from .serving import oip_inputs

        return oip_inputs(config)

    def item_input(self, content: Any) -> str:
        return str(content)

    def torch_forward(
        self, module: Any, device: "torch.device"
    ) -> "tuple[Callable[[Any], tuple[Tensor, list[Tensor]]], Any]":
        from .forward import torch_forward

        return torch_forward(module, device)
