"""Cursor pagination shared by every list: `?limit=&after=` → `{"data", "has_more", "last_id"}`."""

from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.bounds import parse_cursor

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool
    last_id: str | int | None


class PageParams(BaseModel):
    limit: int = 20
    after: str | None = None


def page_params(
    limit: Annotated[int, Query(ge=1, le=200, description="Items per page.")] = 20,
    after: Annotated[
        str | None,
        Query(
            max_length=100,
            description="Return items after this id (the previous `last_id`); an event id is "
            "an integer from 0 to 2**63-1.",
        ),
    ] = None,
) -> PageParams:
    # `?after=` with no value means the first page, as if it were absent.
    return PageParams(limit=limit, after=after or None)


def _cursor(id_column: InstrumentedAttribute[Any], after: str) -> Any:
    if id_column.type.python_type is not int:
        return after
    return parse_cursor(after, param="after")


def paginate(
    session: Session,
    query: Select[Any],
    id_column: InstrumentedAttribute[Any],
    params: PageParams,
) -> tuple[list[Any], bool, Any]:
    """Rows after the cursor in id order, whether more exist, and the last row's id."""
    if params.after is not None:
        query = query.where(id_column > _cursor(id_column, params.after))
    rows = list(session.scalars(query.order_by(id_column).limit(params.limit + 1)))
    has_more = len(rows) > params.limit
    rows = rows[: params.limit]
    return rows, has_more, (getattr(rows[-1], id_column.key) if rows else None)
