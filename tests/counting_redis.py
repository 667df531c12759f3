"""A real Redis client that counts its round trips, for tests of how many a code path takes."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis


class CountingRedis(Redis):
    """Counts each command sent alone and each pipeline (a RedisBatch counts its own round trips)."""

    executed = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.executed += 1
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipeline = super().pipeline(transaction=transaction, shard_hint=shard_hint)
        execute = pipeline.execute
        client = self

        async def counted(raise_on_error: bool = True) -> Any:
            client.executed += 1
            return await execute(raise_on_error)

        pipeline.execute = counted  # type: ignore[method-assign]
        return pipeline
