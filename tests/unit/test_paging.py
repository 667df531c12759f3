"""The one pager every List RPC uses: offsets as tokens, defaults, caps, bad tokens named."""

from __future__ import annotations

import pytest

from libs.common.errors import InvalidArgument
from libs.common.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, page_of

pytestmark = pytest.mark.timeout(10)


def test_pages_cover_the_list_once_in_order() -> None:
    items = list(range(7))
    seen, token = [], ""
    while True:
        page, token = page_of(items, 3, token)
        seen += page
        if not token:
            break
    assert seen == items
    assert page_of(items, 0, "")[0] == items  # 0: the default size
    assert len(page_of(list(range(5000)), 0, "")[0]) == DEFAULT_PAGE_SIZE
    assert len(page_of(list(range(5000)), 10**6, "")[0]) == MAX_PAGE_SIZE
    assert page_of(items, 3, "99") == ([], "")


@pytest.mark.parametrize(
    ("size", "token", "field"), [(-1, "", "page.page_size"), (1, "x", "page.page_token")]
)
def test_bad_paging_is_refused_naming_the_field(size: int, token: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        page_of([1, 2], size, token)
    assert caught.value.field == field
