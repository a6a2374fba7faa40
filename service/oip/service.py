"""The Open Inference Protocol (KServe/Triton "v2") as thaw speaks it: tensors in and out.

A request is JSON, optionally followed by the binary tensor data extension's raw bytes (the
JSON's length in `Inference-Header-Content-Length`; an input with `parameters.binary_data_size`
takes that many bytes of what follows, in input order). Tensors are little-endian; a `BYTES`
tensor's binary form is each element as a 4-byte little-endian length and its bytes.

What each model takes (its modality's `ServedInputs.oip_input`) and answers:
- an image model: `images`, FP32 `(B, 3, H, W)` already preprocessed as the version's
  `config.json` says (straight to the batcher: no decoding), or `image_bytes`, BYTES `(B,)`
  encoded images (base64 strings in JSON) that thaw decodes as predict does, test-time views
  included;
- a text model: `texts`, BYTES `(B,)` UTF-8 strings, tokenized as predict does;
- outputs: `probabilities`, FP32 `(B, C)` (calibrated unless `parameters.calibrated` is false),
  and `top_labels`, BYTES `(B, k)` the `parameters.top_k` (default 5) most likely labels.
"""

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import ApiError
from service.models.service import resolve_version
from service.tables import ModelVersion, RegisteredModel

PROBABILITIES = "probabilities"
TOP_LABELS = "top_labels"
OUTPUTS = (PROBABILITIES, TOP_LABELS)
DEFAULT_TOP_K = 5
DEFAULT_ALIAS = "production"
"""A call that names no version is served by this alias, or the newest version without it."""

_NUMPY_TYPES = {"FP32": np.dtype("<f4")}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any
    """A numpy array (FP32), or a list of bytes (BYTES)."""
    binary: bool
    """Sent as binary data after the JSON (else as JSON `data`)."""


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: dict[str, bool]
    """Requested output name → whether it is answered as binary data."""
    parameters: dict[str, Any] = field(default_factory=dict)


def default_version(session: Session, *, model: RegisteredModel) -> ModelVersion | None:
    """The version a call without one is served by: `production`, else the newest live one."""
    aliased = resolve_version(session, model=model, ref=DEFAULT_ALIAS)
    if aliased is not None:
        return aliased
    return session.scalar(
        select(ModelVersion)
        .where(ModelVersion.model_id == model.id, ModelVersion.archived_at.is_(None))
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )


def parse_infer_request(body: bytes | bytearray, header_length: str | None) -> InferRequest:
    """The request's JSON and its inputs' tensors; 400 for anything malformed."""
    view = memoryview(body)
    if header_length is None:
        json_part, binary = view, view[len(view) :]
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise bad_request("Inference-Header-Content-Length is not an integer.") from None
        if not 0 < length <= len(view):
            raise bad_request(f"Inference-Header-Content-Length {length} is outside the body.")
        json_part, binary = view[:length], view[length:]
    try:
        raw = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request is not valid JSON: {exc}.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("inputs"), list) or not raw["inputs"]:
        raise bad_request("The request must be a JSON object with a non-empty `inputs` list.")
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request("`parameters` must be an object.")
    inputs: list[InputTensor] = []
    offset = 0
    for spec in raw["inputs"]:
        tensor, used = _input_tensor(spec, binary[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes after the inputs' binary data.")
    binary_default = bool(parameters.get("binary_data_output", False))
    outputs: dict[str, bool] = {}
    for spec in raw.get("outputs") or [{"name": name} for name in OUTPUTS]:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in OUTPUTS:
            raise bad_request(f"Unknown output {name!r}; this model answers {', '.join(OUTPUTS)}.")
        wanted = (spec.get("parameters") or {}).get("binary_data", binary_default)
        outputs[name] = bool(wanted)
    request_id = raw.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
    )


def _input_tensor(spec: Any, binary: memoryview) -> tuple[InputTensor, int]:
    """One input and the binary bytes it took."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad_request("Each input needs a `name`, a `datatype` and a `shape`.")
    name = spec["name"]
    datatype, shape = spec.get("datatype"), spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape
    ):
        raise bad_request(f"Input {name!r}: `shape` must be a list of non-negative integers.")
    count = math.prod(shape)
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if datatype == "BYTES":
        if size is not None:
            elements = _bytes_elements(name, binary[: _size(name, size, binary)])
        else:
            strings = _flat(name, spec.get("data"))
            if not all(isinstance(element, str) for element in strings):
                raise bad_request(f"Input {name!r}: BYTES data in JSON must be strings.")
            elements = [element.encode() for element in strings]
        if len(elements) != count:
            raise bad_request(
                f"Input {name!r} has {len(elements)} elements; its shape {shape} holds {count}."
            )
        tensor = InputTensor(name, datatype, tuple(shape), elements, binary=size is not None)
        return tensor, size or 0
    dtype = _NUMPY_TYPES.get(str(datatype))
    if dtype is None:
        raise bad_request(
            f"Input {name!r}: datatype {datatype!r} is not taken; send FP32 or BYTES."
        )
    if size is not None:
        taken = binary[: _size(name, size, binary)]
        if len(taken) != count * dtype.itemsize:
            raise bad_request(
                f"Input {name!r} has {len(taken)} bytes; its shape {shape} takes "
                f"{count * dtype.itemsize}."
            )
        # Over the request's own buffer: no copy (a bytearray's view is writable).
        array = np.frombuffer(taken, dtype=dtype).reshape(shape)
    else:
        values = _flat(name, spec.get("data"))
        try:
            array = np.asarray(values, dtype=dtype)
        except (TypeError, ValueError):
            raise bad_request(f"Input {name!r}: data must be numbers.") from None
        if array.size != count:
            raise bad_request(
                f"Input {name!r} has {array.size} values; its shape {shape} holds {count}."
            )
        array = array.reshape(shape)
    tensor = InputTensor(name, str(datatype), tuple(shape), array, binary=size is not None)
    return tensor, size or 0


def _size(name: str, size: Any, binary: memoryview) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
        raise bad_request(f"Input {name!r}: binary_data_size {size!r} is outside the body.")
    return size


def _flat(name: str, data: Any) -> list[Any]:
    """JSON tensor data, nested by the shape or flat, as one flat list."""
    if not isinstance(data, list):
        raise bad_request(f"Input {name!r} has no `data` and no `binary_data_size`.")
    flat: list[Any] = []
    pending = [iter(data)]
    while pending:
        for item in pending[-1]:
            if isinstance(item, list):
                pending.append(iter(item))
                break
            flat.append(item)
        else:
            pending.pop()
    return flat


def _bytes_elements(name: str, raw: memoryview) -> list[bytes]:
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad_request(f"Input {name!r}: a BYTES element's length is cut short.")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise bad_request(f"Input {name!r}: a BYTES element runs past its data.")
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    return elements


def serialize_bytes(elements: list[bytes]) -> bytes:
    """A BYTES tensor's binary form: each element's 4-byte little-endian length, then it."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def infer_response(
    *,
    model_name: str,
    version: int,
    request: InferRequest,
    task: str,
    probabilities: np.ndarray,
    top_labels: list[list[str]],
) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the length of its JSON part."""
    tensors: dict[str, tuple[str, list[int], Any, bytes]] = {}
    if PROBABILITIES in request.outputs:
        values = np.ascontiguousarray(probabilities, dtype="<f4")
        tensors[PROBABILITIES] = ("FP32", list(values.shape), values, values.tobytes())
    if TOP_LABELS in request.outputs:
        shape = [len(top_labels), len(top_labels[0]) if top_labels else 0]
        flat = [label for row in top_labels for label in row]
        tensors[TOP_LABELS] = (
            "BYTES",
            shape,
            flat,
            serialize_bytes([label.encode() for label in flat]),
        )
    outputs: list[dict[str, Any]] = []
    binaries: list[bytes] = []
    for name in request.outputs:
        datatype, shape, data, raw = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if request.outputs[name]:
            entry["parameters"] = {"binary_data_size": len(raw)}
            binaries.append(raw)
        else:
            entry["data"] = data.ravel().tolist() if isinstance(data, np.ndarray) else data
        outputs.append(entry)
    answer: dict[str, Any] = {
        "model_name": model_name,
        "model_version": str(version),
        "parameters": {"task": task},
        "outputs": outputs,
    }
    if request.id is not None:
        answer["id"] = request.id
    header = orjson.dumps(answer)
    if not binaries:
        return header, None
    return header + b"".join(binaries), len(header)
