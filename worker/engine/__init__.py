"""Pure-PyTorch transfer learning: zoo backbones, training plans, training, export, inference.

Names are loaded on first use, so that `worker.engine.spec` (the settings declaration, standard
library only) can be imported without importing torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import load_checkpoint
    from .export import Bundle, export_bundle, export_model
    from .features import FeatureStore, SharedFeatures
    from .loop import (
        EpochPosition,
        EpochResult,
        TrainingCancelled,
        TrainingHooks,
        TrainingPaused,
        evaluate,
        train_one_epoch,
    )
    from .modalities.image.data import ImageDataset, Sample, preprocess
    from .modalities.text.inputs import TextSample, token_lengths, token_limit
    from .modalities.text.zoo import remember_folders
    from .model import (
        TransferModel,
        build_model,
        describe_plan,
        freeze,
        load_exported,
        make_param_groups,
        preview_plan,
        set_batchnorm_mode,
    )
    from .plan import (
        ParentModel,
        Plan,
        Stage,
        TaskInfo,
        TransferConfig,
        compile_plan,
    )
    from .predictor import Predictor
    from .spec import BatchNormMode, HeadConfig, Schedule, StageSpec, Strategy
    from .train import TrainingResult, run
    from .transferability import Transferability, score_base_model
    from .zoo import (
        Backbone,
        BaseModelInfo,
        UnknownBaseModelError,
        WeightsUnavailableError,
        build_backbone,
        get_base_model_info,
        list_base_models,
        weights_available,
    )

_HOMES = {
    "modalities.image.data": ("ImageDataset", "Sample", "preprocess"),
    "export": ("Bundle", "export_bundle", "export_model"),
    "features": ("FeatureStore", "SharedFeatures"),
    "model": (
        "TransferModel",
        "build_model",
        "describe_plan",
        "freeze",
        "load_exported",
        "make_param_groups",
        "preview_plan",
        "set_batchnorm_mode",
    ),
    "plan": (
        "ParentModel",
        "Plan",
        "Stage",
        "TaskInfo",
        "TransferConfig",
        "compile_plan",
    ),
    "predictor": ("Predictor",),
    "spec": ("BatchNormMode", "HeadConfig", "Schedule", "StageSpec", "Strategy"),
    "modalities.text.inputs": ("TextSample", "token_lengths", "token_limit"),
    "modalities.text.zoo": ("remember_folders",),
    "checkpoint": ("load_checkpoint",),
    "loop": (
        "EpochPosition",
        "EpochResult",
        "TrainingCancelled",
        "TrainingHooks",
        "TrainingPaused",
        "evaluate",
        "train_one_epoch",
    ),
    "train": ("TrainingResult", "run"),
    "transferability": ("Transferability", "score_base_model"),
    "zoo": (
        "Backbone",
        "BaseModelInfo",
        "UnknownBaseModelError",
        "WeightsUnavailableError",
        "build_backbone",
        "get_base_model_info",
        "list_base_models",
        "weights_available",
    ),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
