"""Pydantic models made from the engine's settings declaration (worker/engine/spec.py).

The HTTP schema is not written by hand: each settings dataclass becomes a pydantic model whose
fields have the declared types, defaults, bounds and descriptions, so the API, the engine's
config and the stored plan cannot drift apart.
"""

import types
import typing
from dataclasses import MISSING, is_dataclass
from functools import cache
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from service.bounds import RequestBody
from worker.engine.spec import Bounds, settings_of


def model_of(
    cls: type,
    *,
    name: str,
    doc: str | None = None,
    base: type[BaseModel] | None = None,
    config: ConfigDict | None = None,
) -> type[BaseModel]:
    """A pydantic model with a field for every public setting of the dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    definitions: dict[str, Any] = {}
    for item, declared in settings_of(cls):
        if not declared.public:
            continue
        annotation = _annotation(hints[item.name], declared.items)
        bounds = declared.bounds
        if _is_number_or_word(annotation):
            # pydantic applies a field's bounds to every member of a union, words included.
            annotation, bounds = _constrained_numbers(annotation, bounds), Bounds()
        definitions[item.name] = (
            annotation,
            _field(item.default, bounds, declared.description),
        )
    model: type[BaseModel] = create_model(
        name,
        __doc__=doc or cls.__doc__,
        __base__=base,
        __config__=None if base is not None else config,
        **definitions,
    )
    return model


def _field(default: Any, bounds: Bounds, description: str | None) -> FieldInfo:
    if default is MISSING:
        raise TypeError("every public setting needs a default")
    info: FieldInfo = Field(
        default=_json_default(default),
        description=description,
        ge=bounds.ge,
        gt=bounds.gt,
        le=bounds.le,
        lt=bounds.lt,
        min_length=bounds.min_length,
        max_length=bounds.max_length,
        pattern=bounds.pattern,
    )
    return info


def _json_default(default: Any) -> Any:
    """Defaults as the request body writes them: lists for tuples, models for dataclasses."""
    if isinstance(default, tuple):
        return list(default)
    if is_dataclass(default) and not isinstance(default, type):
        return _dataclass_model(type(default))()
    return default


def _constrained(annotation: Any, bounds: Bounds | None) -> Any:
    if bounds is None:
        return annotation
    return Annotated[
        annotation,
        Field(ge=bounds.ge, gt=bounds.gt, le=bounds.le, lt=bounds.lt, pattern=bounds.pattern),
    ]


def _is_number_or_word(annotation: Any) -> bool:
    """A setting that takes a number or a word (`lr`: a rate or `auto`)."""
    if get_origin(annotation) not in (typing.Union, types.UnionType):
        return False
    args = get_args(annotation)
    return any(arg in (int, float) for arg in args) and any(
        get_origin(arg) is typing.Literal for arg in args
    )


def _constrained_numbers(annotation: Any, bounds: Bounds) -> Any:
    members = [
        _constrained(arg, bounds) if arg in (int, float) else arg for arg in get_args(annotation)
    ]
    return typing.Union[tuple(members)]  # noqa: UP007 (built from a runtime list)


def _annotation(annotation: Any, items: Bounds | None) -> Any:
    """The request-body type of a setting's type: tuples are JSON lists, dataclasses models."""
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and is_dataclass(annotation):
        return _dataclass_model(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [_annotation(arg, items) for arg in args]
        return typing.Union[tuple(members)]  # noqa: UP007 (built from a runtime list)
    if origin is tuple:
        return list[_constrained(_annotation(args[0], None), items)]  # type: ignore[misc]
    if origin is dict:
        return dict[str, _constrained(_annotation(args[1], None), items)]  # type: ignore[misc]
    return annotation


_MODEL_NAMES = {"HeadConfig": "HeadSpec", "StageSpec": "StageIn"}
"""Names the OpenAPI schema has always used for the nested settings."""


@cache
def _dataclass_model(cls: type) -> type[BaseModel]:
    return model_of(
        cls, name=_MODEL_NAMES.get(cls.__name__, cls.__name__), config=RequestBody.model_config
    )
