"""How services reach Redis (libs/common/redis_connection.py, processes.redis_argv), on real
redis-server processes: a password is required and never on the command line, and a restart of
Redis fails no command on the connections pooled before it, each command applied once."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from libs.common.redis_connection import open_blocking_redis, open_redis
from libs.stack.processes import free_port, redis_argv, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PASSWORD = "0123abcd" * 6


@dataclass
class RestartableRedis:
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = redis_argv(self.port, self.data_dir, persistent=False, password=PASSWORD)
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            assert wait_until(lambda: _answers(client), timeout=15), "redis-server did not start"
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(free_port(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_the_password_is_required_and_never_on_the_command_line(server: RestartableRedis) -> None:
    assert server.process is not None
    assert not any(PASSWORD in argument for argument in server.process.args)  # type: ignore[union-attr]
    config_file = server.data_dir / "redis.conf"
    assert config_file.stat().st_mode & 0o777 == 0o600
    anonymous = redis.Redis(port=server.port, socket_connect_timeout=1)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.set("x", 1)
    anonymous.close()
    wrong = redis.Redis(port=server.port, password="wrong", socket_connect_timeout=1)
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()
    wrong.close()


async def test_a_restart_fails_no_command_on_pooled_connections_and_applies_each_once(
    server: RestartableRedis,
) -> None:
    client = open_redis(server.url, socket_timeout=5, max_connections=20, wait_for_connection_seconds=5)
    try:
        # Twenty connections in the pool, all of them dead once Redis restarts.
        await asyncio.gather(*(client.incr("before") for _ in range(20)))
        await asyncio.to_thread(server.restart)
        outcomes = await asyncio.gather(*(client.incr("after") for _ in range(20)), return_exceptions=True)
        assert [o for o in outcomes if isinstance(o, BaseException)] == []
        assert await client.get("after") == b"20"  # a fresh Redis (nothing persisted): each ran once
    finally:
        await client.aclose()


def test_the_blocking_client_survives_a_restart_too(server: RestartableRedis) -> None:
    client = open_blocking_redis(server.url, socket_timeout=5)
    try:
        client.incr("before")
        server.restart()
        assert client.incr("after") == 1
    finally:
        client.close()


async def test_a_timeout_is_not_sent_again(server: RestartableRedis) -> None:
    """Redis may have run a command whose answer was late: resending could apply it twice."""
    client = open_redis(server.url, socket_timeout=0.2)
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.blpop(["never-filled"], timeout=2)
        stats = await client.info("commandstats")
        assert stats["cmdstat_blpop"]["calls"] == 1
    finally:
        await client.aclose()
