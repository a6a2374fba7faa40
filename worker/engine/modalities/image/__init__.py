"""Images: a dataset of files in label folders, the image zoo (`zoo.py`: torchvision and timm
backbones), resized and normalized pixels (`data.py`, `pixels.py` for the predictor),
augmentation (`augment.py`) and test-time augmentation."""

import io
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...spec import ModalityDefaults, SpecError
from ...stages import Base, Plan, Stage, TaskInfo, TransferConfig
from ..base import EntryCache, Inputs, Modality, ServedInputs
from .exported import ExportedImagePreprocessing
from .preprocessing import ImageModelInput, ImagePreprocessing, final_image_size

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image
    from torch import Tensor

    from ...artifacts import ModelConfig
    from ...onnx_export import OnnxExport
    from ...zoo import Backbone, BaseModelInfo


def _sizes_allowed(config: TransferConfig, info: "BaseModelInfo") -> ImageModelInput:
    """`info`'s input; SpecError for `progressive_resizing` on a model of one input size."""
    reads = ImageModelInput.of(info)
    if config.progressive_resizing is not None and reads.fixed_input_size:
        raise SpecError(
            "progressive_resizing",
            f"progressive_resizing: {info.name} only accepts {reads.input_size}px images",
        )
    return reads


class ImageModality(Modality):
    name = "image"
    items = "images"
    a_model = "an image"
    skipped_items = "files"
    skipped_where = "path"
    imbalance_remedy = '`class_weights: "balanced"` or `sampler: "balanced"`'
    wrong_input = (
        "This model classifies images: send them as multipart field `images` or as "
        'JSON {"images": [{"name": ..., "data": "<base64>"}]}.'
    )
    input_param = "images"
    augments = True
    legacy_count_field = "num_images"
    served_modules = ("exported.py", "pixels.py", "serving.py")
    upload_kinds = frozenset({"archive"})
    packs_files = True
    defaults = ModalityDefaults(lr=1e-3, fine_tune_lr_factor=0.1, lr_decay=2.6)
    preprocessing = ImagePreprocessing
    exported = ExportedImagePreprocessing

    def sizes(self, dataset: Any) -> list[list[Any]]:
        return [["images", dataset.num_labelled]]

    def size_text(self, dataset: Any) -> str:
        return f"{dataset.num_labelled} images"

    def upload(self, items: Sequence[tuple[str, Any]]) -> tuple[bytes, str]:
        """A zip of label folders."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for index, (label, item) in enumerate(items):
                data = item if isinstance(item, bytes) else Path(item).read_bytes()
                archive.writestr(f"feedback/{label}/item-{index}", data)
        return buffer.getvalue(), "feedback.zip"

    def sample(self, content: str, label: int) -> Any:
        from .data import Sample

        return Sample(path=Path(content), label=label)

    def check_settings(self, config: TransferConfig, base_model: str) -> None:
        for name in ("max_length", "truncation", "lm_epochs", "lm_lr"):
            if getattr(config, name) is not None:
                raise SpecError(name, f"{name}: {base_model} is an image model; {name} is for text")
        if config.tta == "flip" and not config.flip:
            raise SpecError(
                "tta",
                "tta: `flip` with `flip: false` leaves only the original view; use `flip_crops` "
                "(crops without mirrors) or `none`",
            )

    def new_base(self, config: TransferConfig, info: "BaseModelInfo") -> Base:
        reads = _sizes_allowed(config, info)
        if reads.fixed_input_size and config.image_size not in (None, reads.input_size):
            raise SpecError(
                "image_size",
                f"image_size: {config.base_model} only accepts {reads.input_size}px images; "
                f"got {config.image_size}",
            )
        return Base(
            base_model=config.base_model,
            backbone_groups=info.group_names,
            image_size=config.image_size or reads.input_size,
            preprocessing=ImagePreprocessing(mean=reads.mean, std=reads.std),
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
        _sizes_allowed(config, info)
        return Base(
            base_model=parent.base_model,
            backbone_groups=info.group_names,
            image_size=config.image_size or final_image_size(parent),
            preprocessing=ImagePreprocessing.of(parent),
            parent_location=config.parent.location,
            old_tasks=old_tasks,
            defaults=self.defaults,
        )

    def stage_inputs(self, plan: Plan, stage: Stage) -> dict[str, Any]:
        return {"image_size": stage.image_size}

    def stage_reads(self, plan: Plan, stage: Stage) -> str:
        return f"{stage.image_size} px images"

    def feature_preprocessing(self, plan: Plan, stage: Stage) -> dict[str, Any]:
        pixels = ImagePreprocessing.of(plan)
        return {"image_size": stage.image_size, "mean": pixels.mean, "std": pixels.std}

    def tta(self, plan: Plan) -> list[str] | None:
        from ...recipe import tta_views

        return list(tta_views(plan.tta, flip=plan.flip))

    def evaluate_tta(
        self, model: Any, samples: Sequence[Any], plan: Plan, device: "torch.device"
    ) -> dict[str, Any]:
        from .tta import evaluate_tta

        summary, _ = evaluate_tta(model, samples, plan, device)
        return summary

    def sample_type(self) -> type:
        from .data import Sample

        return Sample

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
        from .inputs import ImageInputs

        if unlabelled:
            raise ValueError("unlabelled texts are for text base models")
        return ImageInputs(plan, device=device, shuffle=shuffle, num_workers=num_workers)

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
        from .data import Sample
        from .features import pooled_features

        reads = ImageModelInput.of(info)
        backbone = self.build_backbone(info.name, pretrained=True, weights_dir=weights_dir)
        return pooled_features(
            backbone,
            [sample for sample in samples if isinstance(sample, Sample)],
            image_size=image_size or reads.input_size,
            mean=reads.mean,
            std=reads.std,
            batch_size=batch_size,
            on_progress=on_progress,
        )

    def owns_base_model(self, name: str) -> bool:
        from .zoo import is_image_model

        return is_image_model(name)

    def base_model_info(self, name: str) -> "BaseModelInfo":
        from .zoo import image_model_info

        return image_model_info(name)

    def weights_available(self, name: str, weights_dir: Path | None) -> bool:
        from .zoo import image_weights_available

        return image_weights_available(name, weights_dir)

    def build_backbone(
        self, name: str, *, pretrained: bool, weights_dir: Path | None
    ) -> "Backbone":
        from .zoo import build_image_backbone

        return build_image_backbone(name, pretrained=pretrained, weights_dir=weights_dir)

    def exported_backbone(self, name: str, config: "ModelConfig") -> "Backbone":
        return self.build_backbone(name, pretrained=False, weights_dir=None)

    def list_base_models(self, weights_dir: Path | None) -> list[dict[str, Any]]:
        from .zoo import list_image_models

        return list_image_models(weights_dir)

    def config_entries(
        self, plan: Plan, files: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from ...recipe import tta_views

        pixels = ImagePreprocessing.of(plan)
        return {}, {
            "image_size": final_image_size(plan),
            "mean": list(pixels.mean),
            "std": list(pixels.std),
            "resize": "bilinear",
            "color": "RGB",
            "tta": list(tta_views(plan.tta, flip=plan.flip)),
        }

    def export_onnx(self, model: Any, plan: Plan, out_path: Path) -> "OnnxExport":
        from ...onnx_export import export_onnx

        return export_onnx(model, image_size=final_image_size(plan), out_path=out_path)

    def onnx_inputs(self, config: "ModelConfig") -> list[tuple[str, str, list[int]]]:
        from .serving import onnx_inputs

        return onnx_inputs(config)

    def served_inputs(self, config: "ModelConfig", model_dir: Path) -> "ServedInputs":
        from .serving import served_inputs

        return served_inputs(config, model_dir)

    def oip_inputs(self, config: "ModelConfig") -> list[dict[str, Any]]:
        from .serving import oip_inputs

        return oip_inputs(config)

    def item_input(self, content: Any) -> "Image.Image":
        from .pixels import read_image

        return read_image(content)

    def torch_forward(
        self, module: Any, device: "torch.device"
    ) -> "tuple[Callable[[Any], tuple[Tensor, list[Tensor]]], Any]":
        from .forward import torch_forward

        return torch_forward(module, device)
