"""The stack's Redis under its memory bound (redis_argv's maxmemory and volatile-ttl), on a real
redis-server: what expires anyway is evicted, what the loop learned never is, and when nothing is
left to evict a write fails with redis-py's OutOfMemoryError, which the services answer
RESOURCE_EXHAUSTED (libs/common/interceptors.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis

from libs.common import redis_keys
from libs.stack.processes import free_port, redis_argv, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_only_expiring_keys_are_evicted_and_a_full_redis_refuses_writes(tmp_path: Path) -> None:
    port = free_port()
    argv = redis_argv(port, tmp_path / "redis", persistent=False, maxmemory_mb=4)
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    try:
        assert wait_until(lambda: _answers(client), timeout=15), "redis-server did not start"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-ttl"
        arms = redis_keys.arm_statistics("d", "0", "")
        client.hset(arms, mapping={"a|n": 10, "a|s": 3})
        blob = "x" * 10_000
        # Contacts (with a TTL, as Invoke writes them) far beyond the bound: the oldest go, the
        # arm statistics stay.
        for index in range(2_000):
            client.set(redis_keys.contact(f"u-{index}"), blob, ex=3600)
        assert client.info("stats")["evicted_keys"] > 0
        assert client.hgetall(arms) == {b"a|n": b"10", b"a|s": b"3"}
        # Nothing left to evict: a write of what never expires is refused, not silently dropped.
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            _fill_with_permanent_keys(client, blob)
        assert client.hgetall(arms) == {b"a|n": b"10", b"a|s": b"3"}
    finally:
        process.terminate()
        process.wait(timeout=10)


def _fill_with_permanent_keys(client: redis.Redis, blob: str) -> None:
    for index in range(2_000):
        client.set(f"ll:permanent:{index}", blob)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
