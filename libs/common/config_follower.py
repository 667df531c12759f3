"""The replica side of live configuration: follow the config service's Watch stream.

A follower keeps the deployments this replica serves as one immutable `AppliedConfig`, replaced
whole on every change (readers take `follower.current` once per request and never see half of a
change). Each change is validated (and prepared, e.g. a model loaded) before the swap; a change
that fails is NACKed with its reason and the old config keeps serving. The last applied config is
persisted, so a replica that boots while the config service is away serves its last-known-good copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar

from grpc import aio

from libs.common.client import open_channel
from libs.common.deployment_spec import DeploymentSpec, deployment_spec_from_mapping, spec_checksum
from libs.common.errors import LiveloopError
from libs.common.tls import ChannelTls
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc

logger = logging.getLogger(__name__)

LAST_KNOWN_GOOD_FILE = "config-last-known-good.json"


# What a replica builds from each spec before serving it (the predictor: a PreparedDeployment).
PreparedT = TypeVar("PreparedT")


@dataclass(frozen=True)
class AppliedDeployment(Generic[PreparedT]):
    name: str
    revision: int
    checksum: str
    spec: DeploymentSpec
    prepared: PreparedT


@dataclass(frozen=True)
class AppliedConfig(Generic[PreparedT]):
    revision: int
    deployments: Mapping[str, AppliedDeployment[PreparedT]]
    source: Literal["stream", "last_known_good"]


async def _keep_spec(spec: DeploymentSpec) -> DeploymentSpec:
    return spec


class SpecRejected(Exception):
    def __init__(self, deployment: str, reason: str) -> None:
        super().__init__(f"{deployment}: {reason}")
        self.deployment = deployment
        self.reason = reason


def _raise_if_cancelling() -> None:
    """grpc.aio turns a cancellation that lands in `call.write()` into InvalidStateError; without
    this the follower would swallow `stop()`'s cancel and reconnect forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class ConfigFollower(Generic[PreparedT]):
    """`prepare` builds what the replica serves from a spec (validating it: raising NACKs the
    revision); a follower without one serves the spec itself. A spec unchanged by a revision keeps
    what was prepared from it, unless `still_current` says it is out of date (built with a plugin
    package upgraded since). Each Ack reports `plugins()`, the plugins the replica can run."""

    def __init__(
        self,
        *,
        target: str,
        api_key: str | None,
        tls: ChannelTls | None = None,
        replica_id: str,
        state_dir: Path,
        service: str = "predictor",
        version: str = "",
        deployments: tuple[str, ...] = (),
        prepare: Callable[[DeploymentSpec], Awaitable[PreparedT]] = _keep_spec,  # type: ignore[assignment]
        still_current: Callable[[PreparedT], bool] | None = None,
        plugins: Callable[[], Mapping[str, str]] | None = None,
        on_change: Callable[[AppliedConfig[PreparedT]], Awaitable[None]] | None = None,
        heartbeat_timeout_seconds: float = 15.0,
        backoff_initial_seconds: float = 0.1,
        backoff_max_seconds: float = 5.0,
    ) -> None:
        self._target = target
        self._api_key = api_key
        self._tls = tls
        self._replica_id = replica_id
        self._state_dir = state_dir
        self._service = service
        self._version = version
        self._deployments = deployments
        self._prepare = prepare
        self._still_current = still_current
        self._plugins = plugins
        self._on_change = on_change
        self._heartbeat_timeout = heartbeat_timeout_seconds
        self._backoff_initial = backoff_initial_seconds
        self._backoff_max = backoff_max_seconds
        self._current: AppliedConfig[PreparedT] | None = None
        self._synced_revision = 0
        self._send: Callable[[config_pb2.WatchRequest], Awaitable[None]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._snapshot_applied = asyncio.Condition()
        self.ready = asyncio.Event()
        self.connected = False
        self.head_revision = 0
        self.last_heard = 0.0
        self.last_rejection: tuple[int, str] | None = None

    @property
    def current(self) -> AppliedConfig[PreparedT] | None:
        return self._current

    @property
    def last_known_good_path(self) -> Path:
        return self._state_dir / LAST_KNOWN_GOOD_FILE

    async def start(self) -> None:
        await self._load_last_known_good()
        self._task = asyncio.create_task(self._follow(), name="config-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self, wait_seconds: float = 10.0) -> int:
        """Ask the config service for a full snapshot and wait until it is applied (`/refresh`)."""
        send = self._send
        if send is None or not self.connected:
            raise ConnectionError(f"not connected to the config service at {self._target}")
        async with self._snapshot_applied:
            await send(self._subscribe(known_revision=0))
            await asyncio.wait_for(self._snapshot_applied.wait(), wait_seconds)
        return self._current.revision if self._current is not None else 0

    # The stream ---------------------------------------------------------------------------------

    def _subscribe(self, known_revision: int) -> config_pb2.WatchRequest:
        return config_pb2.WatchRequest(
            subscribe=config_pb2.Subscribe(
                replica_id=self._replica_id,
                deployments=list(self._deployments),
                known_revision=known_revision,
                service=self._service,
                version=self._version,
            )
        )

    async def _follow(self) -> None:
        backoff = self._backoff_initial
        async with open_channel(
            self._target, api_key=self._api_key, deadline_seconds=None, tls=self._tls
        ) as channel:
            stub = config_pb2_grpc.ConfigServiceStub(channel)
            while True:
                started = time.monotonic()
                try:
                    await self._watch_once(stub)
                except asyncio.CancelledError:
                    raise
                except (aio.AioRpcError, TimeoutError, ConnectionError) as exc:
                    _raise_if_cancelling()
                    reason = exc.code().name if isinstance(exc, aio.AioRpcError) else type(exc).__name__
                    logger.warning("config stream to %s lost (%s); reconnecting", self._target, reason)
                except Exception:
                    _raise_if_cancelling()
                    logger.exception("config stream failed; reconnecting")
                finally:
                    self.connected = False
                if time.monotonic() - started > 10 * self._backoff_max:
                    backoff = self._backoff_initial  # the last stream was healthy for a while
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))  # jitter spreads reconnects
                backoff = min(backoff * 2, self._backoff_max)

    async def _watch_once(self, stub: config_pb2_grpc.ConfigServiceStub) -> None:
        call = stub.Watch()
        send_lock = asyncio.Lock()

        async def send(message: config_pb2.WatchRequest) -> None:
            async with send_lock:  # refresh() may write while the stream loop acknowledges
                await call.write(message)

        try:
            await send(self._subscribe(self._synced_revision))
            while True:
                response = await asyncio.wait_for(call.read(), self._heartbeat_timeout)
                if response is aio.EOF:
                    raise ConnectionError("the config service closed the stream")
                if not self.connected:
                    self.connected = True
                    self._send = send
                    logger.info("following config from %s as %s", self._target, self._replica_id)
                self.last_heard = time.monotonic()
                reply = await self._handle(response)
                if reply is not None:
                    await send(reply)
        finally:
            self._send = None
            call.cancel()

    async def _handle(self, response: config_pb2.WatchResponse) -> config_pb2.WatchRequest | None:
        kind = response.WhichOneof("kind")
        if kind == "heartbeat":
            self.head_revision = response.heartbeat.head_revision
            # Everything up to the heartbeat's head that concerns us was sent before it.
            if self._current is not None and self.last_rejection is None:
                self._synced_revision = max(self._synced_revision, self.head_revision)
            return None
        if kind == "snapshot":
            snapshot = response.snapshot
            return await self._apply(snapshot.revision, self._snapshot_changes(snapshot), replace_all=True)
        update = response.update
        change = {update.deployment: None if update.deleted else (update.revision, update.spec_json)}
        return await self._apply(update.revision, change, replace_all=False)

    @staticmethod
    def _snapshot_changes(snapshot: config_pb2.Snapshot) -> dict[str, tuple[int, str] | None]:
        return {d.name: (d.revision, d.spec_json) for d in snapshot.deployments}

    async def _apply(
        self, revision: int, changes: Mapping[str, tuple[int, str] | None], *, replace_all: bool
    ) -> config_pb2.WatchRequest:
        try:
            deployments = await self._build(changes, replace_all)
        except SpecRejected as rejected:
            self.last_rejection = (revision, str(rejected))
            logger.warning("rejected config revision %d: %s", revision, rejected)
            return config_pb2.WatchRequest(
                nack=config_pb2.Nack(
                    revision=revision, reason=rejected.reason, deployment=rejected.deployment
                )
            )
        await self._swap(AppliedConfig(revision, deployments, "stream"))
        self._synced_revision = max(self._synced_revision, revision)
        self.last_rejection = None
        if replace_all:
            async with self._snapshot_applied:
                self._snapshot_applied.notify_all()
        plugins = self._plugins() if self._plugins is not None else {}
        return config_pb2.WatchRequest(ack=config_pb2.Ack(revision=revision, plugins=plugins))

    async def _build(
        self, changes: Mapping[str, tuple[int, str] | None], replace_all: bool
    ) -> dict[str, AppliedDeployment[PreparedT]]:
        current = {} if replace_all or self._current is None else dict(self._current.deployments)
        for name, change in changes.items():
            if change is None:
                current.pop(name, None)
                continue
            deployment_revision, spec_json = change
            current[name] = await self._prepared(name, deployment_revision, spec_json)
        return current

    async def _prepared(self, name: str, revision: int, spec_json: str) -> AppliedDeployment[PreparedT]:
        existing = self._current.deployments.get(name) if self._current is not None else None
        checksum = spec_checksum(spec_json)
        if (
            existing is not None
            and existing.checksum == checksum
            and (self._still_current is None or self._still_current(existing.prepared))
        ):
            return AppliedDeployment(name, revision, checksum, existing.spec, existing.prepared)
        try:
            spec = deployment_spec_from_mapping(json.loads(spec_json))
            prepared = await self._prepare(spec)
        except LiveloopError as exc:
            raise SpecRejected(name, exc.message) from None
        except Exception as exc:  # a spec this replica cannot serve, whatever the cause
            raise SpecRejected(name, f"{type(exc).__name__}: {exc}") from None
        return AppliedDeployment(name, revision, checksum, spec, prepared)

    async def _swap(self, applied: AppliedConfig[PreparedT]) -> None:
        self._current = applied
        self.ready.set()
        await asyncio.to_thread(self._persist, applied)
        if self._on_change is not None:
            await self._on_change(applied)

    # Last-known-good copy -----------------------------------------------------------------------

    def _persist(self, applied: AppliedConfig[PreparedT]) -> None:
        document = {
            "revision": applied.revision,
            "deployments": {
                name: {"revision": d.revision, "spec": d.spec.model_dump(mode="json")}
                for name, d in applied.deployments.items()
            },
        }
        self._state_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.last_known_good_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(document, sort_keys=True, separators=(",", ":")))
        os.replace(temporary, self.last_known_good_path)

    async def _load_last_known_good(self) -> None:
        path = self.last_known_good_path
        if not path.exists():
            return
        try:
            document = json.loads(path.read_text())
            changes = {
                name: (int(item["revision"]), json.dumps(item["spec"], sort_keys=True, separators=(",", ":")))
                for name, item in document["deployments"].items()
            }
            deployments = await self._build(changes, replace_all=True)
            revision = int(document["revision"])
        except (OSError, ValueError, KeyError, TypeError, SpecRejected) as exc:
            logger.warning("ignoring the last-known-good config in %s: %s", path, exc)
            return
        self._current = AppliedConfig(revision, deployments, "last_known_good")
        self._synced_revision = revision
        self.ready.set()
        logger.info("serving last-known-good config revision %d from %s", revision, path)
        if self._on_change is not None:
            await self._on_change(self._current)
