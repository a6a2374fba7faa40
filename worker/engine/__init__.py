"""Pure-PyTorch transfer learning: zoo backbones, training plans, training, export, inference."""

from .data import ImageDataset, Sample, preprocess
from .export import export_model
from .model import (
    TransferModel,
    build_model,
    freeze,
    make_param_groups,
    set_batchnorm_mode,
)
from .plan import (
    BatchNormMode,
    HeadConfig,
    Plan,
    Schedule,
    Stage,
    Strategy,
    TransferConfig,
    compile_plan,
    describe_plan,
)
from .predictor import Predictor
from .train import (
    EpochResult,
    TrainingCancelled,
    TrainingHooks,
    TrainingResult,
    evaluate,
    run,
    train_one_epoch,
)
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

__all__ = [
    "Backbone",
    "BaseModelInfo",
    "BatchNormMode",
    "EpochResult",
    "HeadConfig",
    "ImageDataset",
    "Plan",
    "Predictor",
    "Sample",
    "Schedule",
    "Stage",
    "Strategy",
    "TrainingCancelled",
    "TrainingHooks",
    "TrainingResult",
    "TransferConfig",
    "TransferModel",
    "UnknownBaseModelError",
    "WeightsUnavailableError",
    "build_backbone",
    "build_model",
    "compile_plan",
    "describe_plan",
    "evaluate",
    "export_model",
    "freeze",
    "get_base_model_info",
    "list_base_models",
    "make_param_groups",
    "preprocess",
    "run",
    "set_batchnorm_mode",
    "train_one_epoch",
    "weights_available",
]
