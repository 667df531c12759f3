"""The error interceptor's helpers: bounded status messages, rate-limited store warnings."""

from __future__ import annotations

import logging

import grpc
import pytest
from redis.exceptions import OutOfMemoryError

from libs.common import interceptors
from libs.common.interceptors import MAX_STATUS_MESSAGE_CHARS, bounded_message

pytestmark = pytest.mark.timeout(10)


def test_a_status_message_never_outgrows_its_bound() -> None:
    assert bounded_message("campaign: short") == "campaign: short"
    long = "campaign: no deployment serves campaign '" + "x" * 70_000 + "'"
    cut = bounded_message(long)
    assert len(cut) <= MAX_STATUS_MESSAGE_CHARS
    assert cut.startswith("campaign: no deployment serves")
    assert cut.endswith(f"({len(long)} characters, cut)")


def test_store_warnings_are_one_per_interval_and_count_what_they_held_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    monkeypatch.setattr(interceptors.time, "monotonic", lambda: now[0])
    warnings = interceptors._RateLimitedWarning(every_seconds=10.0)
    with caplog.at_level(logging.WARNING, logger="libs.common.interceptors"):
        for _ in range(50):
            warnings.warn("backing store unavailable: %s", "refused")
        now[0] = 111.0
        warnings.warn("backing store unavailable: %s", "refused")
    assert [record.getMessage() for record in caplog.records] == [
        "backing store unavailable: refused",
        "backing store unavailable: refused (49 more like it in the last 10 s not logged)",
    ]


class _Aborted(Exception):
    pass


class _Context:
    """What _map_error uses of a servicer context: abort, which ends the call."""

    def __init__(self) -> None:
        self.aborted: tuple[object, str] | None = None

    async def abort(self, code: object, message: str) -> None:
        self.aborted = (code, message)
        raise _Aborted


async def test_a_full_redis_is_resource_exhausted_not_internal() -> None:
    context = _Context()
    with pytest.raises(_Aborted):
        await interceptors._map_error((OutOfMemoryError("OOM command not allowed"), context))
    assert context.aborted == (grpc.StatusCode.RESOURCE_EXHAUSTED, "Redis is out of memory; retry later")


def test_a_handler_is_wrapped_once_per_key_and_handler_and_the_cache_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = interceptors._WrappedHandlers()
    wrapped: list[object] = []

    def wrap(handler: object) -> object:
        wrapped.append(handler)
        return ("wrapped", handler)

    first, second = object(), object()  # the handlers an inner interceptor hands on for two callers
    for _ in range(3):
        assert cache.get("Invoke", first, wrap) == ("wrapped", first)
        assert cache.get("Invoke", second, wrap) == ("wrapped", second)
    assert wrapped == [first, second]  # each wrapped once, though the two alternate

    monkeypatch.setattr(interceptors._WrappedHandlers, "MAX_ENTRIES", 4)
    handlers = [object() for _ in range(10)]
    for handler in handlers:
        cache.get("Invoke", handler, wrap)
    assert len(cache._cache) <= 4
