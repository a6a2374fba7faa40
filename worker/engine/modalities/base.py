"""What a modality is to the rest of thaw: one object per kind of input (images, texts).

Plans, stages, the training loop, checkpoints, LwF and the feature cache are written once and
never see an image or a text; the service, UI and CLI never compare modality names. Whatever
differs per modality is a method or attribute of its `Modality`, found by name with
`modalities.modality_for` (a plan's, a dataset's or a model's `modality`) or by base model
with `modalities.modality_of_base_model`.

Modules importing this one must stay importable without torch (the API, the card, the CLI and
the recipe read plans through it): a modality imports its heavy parts inside its methods.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, Self

from ..artifacts import ExportedPreprocessing
from ..preset_defaults import PresetDefaults
from ..spec import ModalityDefaults
from ..stages import CLASSIFY, Base, Plan, Preprocessing, Stage, TaskInfo, TransferConfig

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image
    from torch import Tensor, nn
    from torch.utils.data import DataLoader

    from ..artifacts import ModelConfig
    from ..onnx_export import OnnxExport
    from ..zoo import Backbone, BaseModelInfo


@dataclass(frozen=True)
class ModelInput:
    """What a base model reads, as its modality's zoo describes it (`BaseModelInfo.
    preprocessing`): each modality subclasses it in its own folder (an image size and pixel
    statistics; a token limit and pooling), so `BaseModelInfo` carries no field of one
    modality."""

    modality: ClassVar[str]
    """The modality's name (`Modality.name`)."""

    @classmethod
    def of(cls, info: "BaseModelInfo") -> Self:
        """`info`'s input, which must be of this kind (ValueError names the model)."""
        if not isinstance(info.preprocessing, cls):
            raise ValueError(f"{info.name} reads {info.modality}s, not {cls.modality}s")
        return info.preprocessing


class EntryCache(Protocol):
    """A host cache of files with a size budget (`service.storage.cache.LocalCache`), where a
    modality keeps what it derives from a dataset's items for later runs on this host."""

    def hold(self, entry: str, fill: Callable[[Path], None]) -> AbstractContextManager[Path]:
        """The entry's path, made by `fill(temporary path)` when absent, kept from eviction
        until the block ends."""
        ...


class Inputs(Protocol):
    """How a run reads its samples, for the modality-free training machinery:

    - `batches(samples, stage, shuffled=..., recorded=None)`: a loader of `(inputs, targets)`
      batches of the samples as the stage reads them (an image size; a token length), where
      `inputs` is one tensor the backbone takes whole and `targets` the labels (with LwF's
      recorded outputs when given). Shuffled loaders draw only from the run's shuffle stream,
      which is what makes a resumed run redraw the same batches.
    - `steps(samples, stage)`: optimizer steps of one pass over the samples (an epoch of a stage
      on cached features makes `stage.passes` passes).
    - `view_batches(samples, stage, view)`: unshuffled batches of the samples as augmented in
      the cached view `view` (a stage on cached features of a modality that `augments`).
    - `describe()`: facts kept with the metrics (text: token-length statistics).
    - `language_model(...)`: ulmfit's masked-LM stage (text only).
    """

    def batches(
        self,
        samples: Sequence[Any],
        stage: Stage,
        *,
        shuffled: bool,
        recorded: "Tensor | None" = None,
    ) -> "DataLoader[Any]": ...

    def steps(self, samples: Sequence[Any], stage: Stage) -> int: ...

    def view_batches(
        self, samples: Sequence[Any], stage: Stage, view: int
    ) -> "DataLoader[Any]": ...

    def describe(self) -> dict[str, Any]: ...

    def language_model(
        self, backbone: "Backbone", lm_head: "nn.Module", train: Sequence[Any], val: Sequence[Any]
    ) -> "tuple[nn.Module, DataLoader[Any], DataLoader[Any]]": ...


class RejectedItemError(ValueError):
    """One request item cannot be read (`code`, and the message says why): its answer entry
    carries the error and the call goes on without it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ItemReading(Protocol):
    """How the service reads a call's untrusted items (its caps and its image allowlist live
    in the service, which the engine never imports)."""

    @property
    def max_text_chars(self) -> int:
        """The most characters of a text predict reads (`THAW_MAX_PREDICT_TEXT_CHARS`)."""
        ...

    def open_image(self, data: bytes, *, draft_to: int) -> "Image.Image":
        """The decoded image, or RejectedItemError (format, pixel cap, corrupt)."""
        ...


class PredictCaps(Protocol):
    """The service's caps on what one call sends (`THAW_MAX_PREDICT_*`)."""

    max_predict_images: int
    max_predict_bytes: int
    max_predict_texts: int
    max_predict_text_chars: int


class Prepared(NamedTuple):
    """A call's items read as model input: per item, its answer entry (an `error` filled in
    where it could not be read); the indexes of those that could; and their input, one block
    for the batcher (None when none could be read)."""

    results: list[dict[str, Any]]
    good: list[int]
    inputs: Any


@dataclass(frozen=True)
class OipInput:
    """An Open Inference Protocol call's one input tensor, read for the model it calls."""

    items: Any
    """What `ServedInputs.prepare` reads, or with `preprocessed` the batcher's block itself."""
    preprocessed: bool
    """Sent as the model's own input (an FP32 tensor): straight to the batcher."""
    views: int
    """Forward-pass rows per item."""
    limit: int
    """The most items one call may send."""
    item: str
    """What one item is, in an error (`image`)."""


class ServedInputs(Protocol):
    """How a served model's requests become its forward pass's input: one per loaded model,
    built by `Modality.served_inputs` from the exported `config.json`. Numpy, PIL and
    tokenizers only: the API's inference path imports no torch (a version served by PyTorch
    runs `Modality.torch_forward`)."""

    @property
    def modality(self) -> str:
        """The modality's name, as `Modality.name`."""
        ...

    @property
    def views(self) -> int:
        """Forward-pass rows per item `prepare` reads (an image's test-time views)."""
        ...

    @property
    def oip_input_names(self) -> tuple[str, ...]:
        """The Open Inference Protocol input tensors the model takes (one per call)."""
        ...

    def warm_up_input(self) -> Any:
        """A smallest forward-pass input: the first pass allocates and picks kernels."""
        ...

    def read(self, items: Sequence[Any]) -> tuple[Any, list[dict[str, Any]]]:
        """Items as `Predictor.predict` and an MLflow pyfunc take them (images decoded or
        encoded; texts), trusted: one block for `batch_input`, and per item what its answer
        notes (a text: `truncated`). An item of another kind is a ValueError saying what the
        model takes."""
        ...

    def prepare(self, items: Sequence[Any], reading: ItemReading) -> Prepared:
        """A call's items (`(name, bytes or None)` per image, a text per text) as model input;
        an item whose bytes are None was already found unreadable (bad base64)."""
        ...

    def batch_input(self, blocks: list[Any]) -> Any:
        """The queued requests' blocks as one forward pass's input."""
        ...

    def onnx_feed(self, batch: Any) -> dict[str, Any]:
        """A forward-pass input by `model.onnx`'s input names."""
        ...

    def sample_item(self, sample: Any) -> Any:
        """A training sample as a predict call would send it (the reference profile reads
        training items as predict reads them)."""
        ...

    def kept_bytes(self, item: Any) -> bytes:
        """An item as sent, for capture."""
        ...

    def body_cap(self, caps: PredictCaps) -> int:
        """The most bytes an infer call may send: its items at the predict caps, written as
        JSON numbers (about 16 bytes a float) or base64, plus room for the header."""
        ...

    def oip_input(self, tensor: Any, caps: PredictCaps) -> OipInput:
        """One of `oip_input_names`'s tensors (`service.oip`'s `InputTensor`) checked and
        read; ValueError says what is wrong with it."""
        ...


def average_views(probabilities: "np.ndarray", views: int) -> "np.ndarray":
    """(N * views, C) per-view rows, an item's views adjacent (`ServedInputs.views`) →
    (N, C) their mean."""
    averaged: np.ndarray = probabilities.reshape(-1, views, probabilities.shape[1]).mean(axis=1)
    return averaged


def bytes_tensor_elements(tensor: Any) -> list[bytes]:
    """A BYTES input tensor's elements, its datatype and shape checked (ValueError)."""
    if tensor.datatype != "BYTES":
        raise ValueError(f"Input {tensor.name!r} is BYTES; got {tensor.datatype}.")
    if len(tensor.shape) != 1 or not tensor.shape[0]:
        raise ValueError(f"Input {tensor.name!r} has shape [-1]; got {list(tensor.shape)}.")
    return list(tensor.data)


class Modality(ABC):
    name: str
    """As plans, datasets and models record it (`image`, `text`)."""
    items: str
    """Its items in prose, plural (`images`)."""
    a_model: str
    """What a base model of it is, with its article: `an image` (model)."""
    skipped_items: str
    """What an upload's skipped entries are (`files`, `rows`)."""
    skipped_where: str
    """The column naming where a skipped entry was (`path`, `where`)."""
    imbalance_remedy: str
    """The settings that answer imbalanced classes."""
    wrong_input: str
    """What an inference request sent to a model of this modality should look like."""
    input_param: str
    """The request field its inputs arrive in (`images`, `texts`)."""
    augments: bool = False
    """Training may augment its items (the `augment` setting and its data-following default)."""
    exports_hf: bool = False
    """A version can be exported as a Hugging Face folder (`transformers` loads it):
    `write_hf_folder`."""
    pyfunc_requirements: tuple[str, ...] = ()
    """What an MLflow export's pyfunc needs to read its items, besides numpy, pillow,
    onnxruntime and pandas (a tokenizer)."""
    legacy_count_field: str | None = None
    """The field a dataset's answer named its labelled items by before `num_labelled`
    (`num_images`, `num_texts`), still given for clients written then."""
    served_modules: tuple[str, ...] = ("exported.py", "serving.py")
    """The modules of its folder that its `serving.py` imports, itself included (numpy, PIL
    and tokenizers only): an MLflow export ships them, and its pyfunc reads items through
    `serving.served_inputs` as the API does."""
    inline_items: bool = False
    """A dataset item's content is the item itself (a text), not the path of its file: given
    inline to predict, shown as it is."""
    upload_kinds: frozenset[str]
    """What an upload of its datasets may be, as the datasets service recognises an upload
    (`archive`, `csv`, `jsonl`): an upload of a kind only one modality takes is known to hold
    that modality before it is ingested (`modalities.upload_modality`)."""
    reads_token_lengths: bool = False
    """Ingestion measures each item's tokens (shown before training)."""
    packs_files: bool = False
    """Ingestion packs the item files into shards, unpacked once per host to be read (shards
    of rows are read in place)."""
    objectives: frozenset[str] = frozenset({CLASSIFY})
    """The stage objectives its inputs train: `classify` (`Inputs.batches`) and, where its
    backbones have an LM head, `masked_lm` (`Inputs.language_model`). A strategy compiling
    another (`Strategy.objectives`) is refused for its base models."""
    defaults: ModalityDefaults
    """What rates, decay, batch size and length a spec leaving them out gets."""
    preprocessing: type[Preprocessing]
    """Its plans' kind of `Plan.preprocessing` (`Plan.from_dict` reads it by this)."""
    exported: type[ExportedPreprocessing]
    """Its exported models' kind of `ModelConfig.preprocessing` (`parse_model_config` reads
    `config.json` by this)."""
    presets: ClassVar[Mapping[str, PresetDefaults]] = {}
    """A preset's own defaults on this modality, by strategy name, where they differ from
    `defaults` (a text encoder from random weights wants its own rate and schedule)."""

    def preset(self, strategy: str) -> PresetDefaults:
        """The `strategy` preset's own defaults on this modality (none: every field None)."""
        return self.presets.get(strategy, PresetDefaults())

    # The service, UI and CLI.

    @abstractmethod
    def sizes(self, dataset: Any) -> list[list[Any]]:
        """A dataset's item counts as (what, how many) rows."""

    @abstractmethod
    def size_text(self, dataset: Any) -> str:
        """A dataset's items in a few words (`12 texts + 3 unlabelled`)."""

    @abstractmethod
    def upload(self, items: Sequence[tuple[str, Any]]) -> tuple[bytes, str]:
        """Labelled items as an upload its datasets ingest, and the upload's file name: per
        item its label and the item as predict captured it (bytes) or as a dataset holds it
        (`DatasetItem.content`: a file, a text)."""

    @abstractmethod
    def sample(self, content: str, label: int) -> Any:
        """The training sample of a dataset item (a path to its file, or its text)."""

    # Plans.

    @abstractmethod
    def check_settings(self, config: TransferConfig, base_model: str) -> None:
        """Refuse settings of another modality, so a preview never shows one that is unused."""

    @abstractmethod
    def new_base(self, config: TransferConfig, info: "BaseModelInfo") -> Base:
        """What a plan starts from: a zoo model."""

    @abstractmethod
    def parent_base(
        self,
        config: TransferConfig,
        info: "BaseModelInfo",
        parent: Plan,
        old_tasks: tuple[TaskInfo, ...],
    ) -> Base:
        """What a plan starts from: an exported model (`config.parent`) trained by `parent`."""

    @abstractmethod
    def stage_inputs(self, plan: Plan, stage: Stage) -> dict[str, Any]:
        """How a stage reads its inputs, as `describe_plan` shows it."""

    @abstractmethod
    def stage_reads(self, plan: Plan, stage: Stage) -> str:
        """What a stage reads, in a few words for people (`64 px images`)."""

    @abstractmethod
    def feature_preprocessing(self, plan: Plan, stage: Stage) -> dict[str, Any]:
        """What decides a stage's cached features besides the weights and the items."""

    def tta(self, plan: Plan) -> list[str] | None:
        """The views the finished model predicts on (None: no test-time augmentation)."""
        return None

    def evaluate_tta(
        self, model: Any, samples: Sequence[Any], plan: Plan, device: "torch.device"
    ) -> dict[str, Any]:
        """Validation accuracy of the plan's test-time augmentation (`mode`, `views`,
        `val_accuracy`). Only a modality whose `tta` has views is asked: `check_settings`
        refuses a `tta` setting for the others."""
        raise NotImplementedError(f"{self.name} models have no test-time augmentation")

    # Training.

    @abstractmethod
    def sample_type(self) -> type:
        """The class of the samples a plan of this modality trains on."""

    @abstractmethod
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
        """How a run of `plan` reads these samples, keeping what it derives from them (a text
        run's token ids) in the host's `host_cache` when given."""

    @abstractmethod
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
        """The pretrained backbone's pooled features of `samples`, and each group's."""

    # The zoo.

    @abstractmethod
    def owns_base_model(self, name: str) -> bool:
        """Whether `name` is one of this modality's base models."""

    @abstractmethod
    def base_model_info(self, name: str) -> "BaseModelInfo": ...

    @abstractmethod
    def weights_available(self, name: str, weights_dir: Path | None) -> bool: ...

    @abstractmethod
    def build_backbone(
        self, name: str, *, pretrained: bool, weights_dir: Path | None
    ) -> "Backbone":
        """With `pretrained`, missing weights raise instead of random init."""

    @abstractmethod
    def exported_backbone(self, name: str, config: "ModelConfig") -> "Backbone":
        """The architecture of exported model `config`'s backbone, without weights (a text
        encoder from its exported `transformers` config)."""

    @abstractmethod
    def list_base_models(self, weights_dir: Path | None) -> list[dict[str, Any]]: ...

    # Exports.

    def export_files(self, plan: Plan, out_dir: Path, weights_dir: Path | None) -> dict[str, Any]:
        """Write what the model needs besides its weights into `out_dir` (a tokenizer); the
        entries config.json keeps of them (see `config_entries`)."""
        return {}

    @abstractmethod
    def config_entries(
        self, plan: Plan, files: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """config.json's architecture entries of this modality, and its `preprocessing`."""

    @abstractmethod
    def export_onnx(self, model: Any, plan: Plan, out_path: Path) -> "OnnxExport": ...

    @abstractmethod
    def onnx_inputs(self, config: "ModelConfig") -> list[tuple[str, str, list[int]]]:
        """`model.onnx`'s inputs: name, datatype as the Open Inference Protocol and Triton
        spell it (`FP32`), dims after the batch axis (-1: any length)."""

    def write_hf_folder(self, folder: Path, config: "ModelConfig", out: Path) -> None:
        """The Hugging Face folder of the version in `folder`, written to `out` (where
        `exports_hf`)."""
        raise NotImplementedError(f"{self.name} versions have no Hugging Face export")

    # Serving.

    @abstractmethod
    def served_inputs(self, config: "ModelConfig", model_dir: Path) -> ServedInputs:
        """How the exported model in `model_dir` serves requests (a text model's tokenizer
        loaded)."""

    @abstractmethod
    def oip_inputs(self, config: "ModelConfig") -> list[dict[str, Any]]:
        """The Open Inference Protocol metadata of the input tensors its models take
        (`TensorMetadata` fields), from `config.json` alone."""

    @abstractmethod
    def item_input(self, content: Any) -> Any:
        """A dataset item's content (`DatasetItem.content`: a file or a text) as
        `Predictor.predict` takes it (an image read and decoded)."""

    @abstractmethod
    def torch_forward(
        self, module: Any, device: "torch.device"
    ) -> "tuple[Callable[[Any], tuple[Tensor, list[Tensor]]], Any]":
        """PyTorch serving of an exported model's module: a forward-pass input (as
        `ServedInputs.batch_input` makes it) → its (features, per-task logits), under inference
        mode; and the module as it serves (the bytes of its weights are counted)."""
