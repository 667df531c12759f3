"""The one way services open Redis: a pool whose dead connections are replaced, not reported.

After Redis restarts, every pooled connection is dead, and each one fails the first command sent on
it (measured: 20 of 20 commands after a restart failed with a plain pool). A command that failed
with a *connection* error is sent once more on a fresh connection: after a restart the old
connection belonged to a process that is gone, so the command never ran. (Only a connection broken
between Redis running a command and its answer reaching us could apply it twice; Respond's marks
make its own retry a duplicate, learned once.) A *timeout* is never retried: Redis may have run
that command and only its answer was late.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry as BlockingRetry

# Idle connections are pinged before use after this long (busy ones are never pinged).
HEALTH_CHECK_SECONDS = 5


def open_redis(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float = 2.0,
    max_connections: int | None = None,
    wait_for_connection_seconds: float | None = None,
) -> Redis:
    """A client on its own pool. With `wait_for_connection_seconds`, a command waits that long for
    a free connection when all `max_connections` are busy instead of failing at once."""
    options = _options(socket_timeout, connect_timeout)
    options["retry"] = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    pool: ConnectionPool
    if wait_for_connection_seconds is not None:
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections or 100, timeout=wait_for_connection_seconds, **options
        )
    else:
        pool = ConnectionPool.from_url(url, max_connections=max_connections, **options)
    return Redis.from_pool(pool)


def open_blocking_redis(url: str, *, socket_timeout: float, connect_timeout: float = 2.0) -> redis.Redis:
    """The same for code that runs in threads (ingest's bulk writes)."""
    options = _options(socket_timeout, connect_timeout)
    options["retry"] = BlockingRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    return redis.Redis.from_url(url, **options)


def _options(socket_timeout: float, connect_timeout: float) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": HEALTH_CHECK_SECONDS,
        "retry_on_error": [RedisConnectionError],
    }
