"""The ranges of the numbers a request may carry, in one place for every router.

Every integer the API takes (ids, versions, event cursors, counts, seeds) fits a signed 64-bit
database column: a larger one is a 422 in the error envelope here, at the edge, never an
`OverflowError` from the database driver. JSON bodies are typed strictly: `true` is not the
integer 1, nor `"3"` the number 3 (query strings and form fields are text, and stay lax).
"""

from typing import Annotated

from fastapi import Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.errors import ApiError

INT64_MAX = 2**63 - 1
"""The largest integer a database column holds (BIGINT; SQLite's INTEGER alike)."""

ALIAS_PATTERN = r"[a-z][a-z0-9._-]{0,99}"
"""An alias: lowercase, starting with a letter (so it can never be mistaken for a number)."""


class RequestBody(BaseModel):
    """A JSON request body: unknown fields refused, every field of its own JSON type."""

    model_config = ConfigDict(extra="forbid", strict=True)


BodyId = Annotated[int, Field(ge=1, le=INT64_MAX)]
"""A row number in a body (a version): positive, and no larger than the database holds."""

MAX_SEED = 2**31 - 1
BodySeed = Annotated[int, Field(ge=0, le=MAX_SEED)]
"""A random seed, as the engine takes it (NumPy and PyTorch both accept 32 bits)."""


def parse_cursor(text: str, *, param: str) -> int:
    """An integer cursor from a query string or header (an event id): 0..INT64_MAX or 422."""
    digits = text.strip()
    # Measured before `int()`, which refuses (slowly) a string of more than 4300 digits.
    if not (digits.isascii() and digits.isdigit()) or len(digits.lstrip("0")) > 19:
        raise ApiError(
            422, "invalid_request", f"{param}: must be an integer from 0 to {INT64_MAX}", param
        )
    value = int(digits)
    if value > INT64_MAX:
        raise ApiError(422, "invalid_request", f"{param}: must be at most {INT64_MAX}", param)
    return value


def _version_ref(ref: str) -> str:
    if ref.isdigit() and int(ref) > INT64_MAX:  # the pattern allows 19 digits at most
        raise ValueError(f"a version number is at most {INT64_MAX}")
    return ref


VersionRef = Annotated[
    str,
    Path(
        pattern=rf"^(?:[0-9]{{1,19}}|{ALIAS_PATTERN})$",
        description=f"Version number (1 to {INT64_MAX}), or an alias such as `production`.",
    ),
    AfterValidator(_version_ref),
]
"""A version in a path: its number or an alias; a number past the database's range is a 422."""
