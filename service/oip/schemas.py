"""The Open Inference Protocol's metadata answers (its `$metadata_*_response` objects)."""

from typing import Any

from pydantic import BaseModel


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    """-1 where the size varies (the batch)."""
    parameters: dict[str, Any] | None = None
    """thaw's additions: an image input's preprocessing, the output's labels."""


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ProtocolError(BaseModel):
    """The protocol's error answer: one message (thaw's status codes, not its envelope)."""

    error: str
