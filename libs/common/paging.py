"""Pages of a list result (liveloop.common.v1.PageRequest / PageResponse), the same in every service.

A page token is the offset of the page, as text: opaque to clients, stable while the list does not
change. page_size 0 takes the default; above the maximum it is capped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from libs.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

Item = TypeVar("Item")


def page_window(page_size: int, page_token: str) -> tuple[int, int]:
    """(limit, offset) of a page; the token is the offset of the page, as text."""
    if page_size < 0:
        raise InvalidArgument("must not be negative", field="page.page_size")
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return limit, 0
    if not page_token.isdigit():
        raise InvalidArgument("is not a token this server gave out", field="page.page_token")
    return limit, int(page_token)


def next_page_token(limit: int, offset: int, total: int) -> str:
    """The token of the page after [offset, offset + limit); empty after the last."""
    return str(offset + limit) if offset + limit < total else ""


def page_of(items: Sequence[Item], page_size: int, page_token: str) -> tuple[list[Item], str]:
    """(this page's items, the next page's token) of a whole list held in memory."""
    limit, offset = page_window(page_size, page_token)
    return list(items[offset : offset + limit]), next_page_token(limit, offset, len(items))
