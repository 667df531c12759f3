"""Legitimate traffic for the chaos tests: Invoke then Respond, from several concurrent clients
through the front door, while something is broken on purpose.

Every Respond is sent again until it is acknowledged (as a careful client does), so afterwards each
contact answered must have been learned exactly once. Figures are counted per outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from google.protobuf import struct_pb2
from grpc import aio

from libs.common.client import open_channel
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc

RESPOND_ATTEMPTS = 100
CALL_DEADLINE_SECONDS = 10.0


@dataclass
class LoadFigures:
    invokes: Counter[str] = field(default_factory=Counter)  # status name -> calls
    responds: Counter[str] = field(default_factory=Counter)  # status name -> attempts
    answered: list[str] = field(default_factory=list)  # uuids whose Respond was acknowledged
    unanswered: list[str] = field(default_factory=list)  # uuids given up on (RESPOND_ATTEMPTS failures)
    latencies: list[float] = field(default_factory=list)  # seconds per Invoke + Respond cycle
    seconds: float = 0.0

    @property
    def failed_invokes(self) -> int:
        return sum(count for status, count in self.invokes.items() if status != "OK")

    @property
    def failed_responds(self) -> int:
        return sum(count for status, count in self.responds.items() if status != "OK")

    def summary(self) -> dict[str, object]:
        ordered = sorted(self.latencies)
        return {
            "invokes_ok": self.invokes["OK"],
            "invokes_failed": self.failed_invokes,
            "respond_attempts_failed": self.failed_responds,
            "responses_acknowledged": len(self.answered),
            "responses_given_up": len(self.unanswered),
            "cycles_per_second": round(len(ordered) / self.seconds, 1) if self.seconds else 0.0,
            "p99_cycle_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 1) if ordered else None,
            "max_cycle_ms": round(ordered[-1] * 1000, 1) if ordered else None,
            "failures": dict(
                {f"Invoke {k}": v for k, v in self.invokes.items() if k != "OK"}
                | {f"Respond {k}": v for k, v in self.responds.items() if k != "OK"}
            ),
        }


class Load:
    """`clients` concurrent Invoke→Respond loops in a thread of their own until stopped."""

    def __init__(self, target: str, api_key: str, campaign: str, clients: int = 6) -> None:
        self.target, self.api_key, self.campaign, self.clients = target, api_key, campaign, clients
        self.figures = LoadFigures()
        self._stop = threading.Event()
        self._cycles = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    @property
    def cycles(self) -> int:
        return self._cycles

    async def _run(self) -> None:
        channel = open_channel(self.target, api_key=self.api_key, deadline_seconds=CALL_DEADLINE_SECONDS)
        started = time.monotonic()
        try:
            stub = predictor_pb2_grpc.PredictorServiceStub(channel)
            await asyncio.gather(*(self._client(stub, index) for index in range(self.clients)))
        finally:
            self.figures.seconds = time.monotonic() - started
            await channel.close()

    async def _client(self, stub: predictor_pb2_grpc.PredictorServiceStub, index: int) -> None:
        sequence = 0
        while not self._stop.is_set():
            sequence += 1
            began = time.monotonic()
            request = predictor_pb2.InvokeRequest(
                campaign=self.campaign, customer=f"chaos-{index}-{sequence}", channel="app"
            )
            request.numberoffers.CopyFrom(struct_pb2.Value(number_value=1))
            try:
                shown = await stub.Invoke(request)
            except aio.AioRpcError as error:
                self.figures.invokes[error.code().name] += 1
                continue
            self.figures.invokes["OK"] += 1
            await self._respond(stub, shown)
            self.figures.latencies.append(time.monotonic() - began)
            self._cycles += 1

    async def _respond(
        self, stub: predictor_pb2_grpc.PredictorServiceStub, shown: predictor_pb2.InvokeResponse
    ) -> None:
        request = predictor_pb2.RespondRequest(uuid=shown.uuid)
        accepted = struct_pb2.ListValue()
        accepted.append(shown.final_result[0].result.offer)
        request.offers_accepted.CopyFrom(struct_pb2.Value(list_value=accepted))
        for attempt in range(RESPOND_ATTEMPTS):
            try:
                await stub.Respond(request)
            except aio.AioRpcError as error:
                self.figures.responds[error.code().name] += 1
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    break
                await asyncio.sleep(min(0.05 * (attempt + 1), 1.0))  # back-off before the retry
                continue
            self.figures.responds["OK"] += 1
            self.figures.answered.append(shown.uuid)
            return
        self.figures.unanswered.append(shown.uuid)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> LoadFigures:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the load did not stop"
        return self.figures


@contextlib.contextmanager
def running_load(target: str, api_key: str, campaign: str, clients: int = 6) -> Iterator[Load]:
    load = Load(target, api_key, campaign, clients)
    load.start()
    try:
        yield load
    finally:
        load.stop()
