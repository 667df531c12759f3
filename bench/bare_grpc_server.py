"""The limit of Python gRPC on this machine: a bare grpc.aio server with Ping's contract and nothing
else (no interceptors, no metrics, no key check), and the gRPC health service that Envoy's active
health check asks. bench/invoke_throughput.py runs two of them behind an Envoy configured like the
stack's, as the baseline that Invoke, Respond and Ping are measured against in the same run.

    .venv/bin/python bench/bare_grpc_server.py --port 50999 --replica-id bare-1
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from libs.common.server import SERVER_OPTIONS
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack.topology import PREDICTOR


class BarePing(predictor_pb2_grpc.PredictorServiceServicer):
    """Ping as liveloop's replica answers it (replica id, revision, server time), and nothing more."""

    def __init__(self, replica_id: str) -> None:
        self._replica_id = replica_id

    async def Ping(self, request: predictor_pb2.PingRequest, context: Any) -> predictor_pb2.PingResponse:  # noqa: N802
        server_time = Timestamp()
        server_time.GetCurrentTime()
        return predictor_pb2.PingResponse(
            replica_id=self._replica_id, config_revision=1, server_time=server_time
        )


async def serve(port: int, replica_id: str) -> None:
    server = aio.server(options=SERVER_OPTIONS)
    predictor_pb2_grpc.add_PredictorServiceServicer_to_server(BarePing(replica_id), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *PREDICTOR.grpc_services):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica-id", default="bare")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.replica_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
