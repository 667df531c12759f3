"""`python -m libs.common.health_check SERVICE`: exit 0 when the service in this container answers
its gRPC health check with SERVING, 1 otherwise. For container health checks and Kubernetes exec
probes, which (unlike Kubernetes' own gRPC probes) also work when the service requires TLS or mutual
TLS: the check reads the service's own settings (`LIVELOOP_<SERVICE>_PORT` and its TLS files) and
presents the service's certificate, which its CA signed.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import SettingsConfigDict

from libs.common.settings import ServiceSettings
from libs.common.tls import ChannelTls
from libs.stack.topology import SERVICES_BY_NAME


def check(service_name: str, timeout: float, whole_server: bool = False) -> str:
    """What `grpc_health` says of the service on this host's port (SERVING, NOT_SERVING, ...); with
    `whole_server`, the server's own status (service ""), SERVING while it answers at all."""
    service = SERVICES_BY_NAME[service_name]
    settings_class = type(
        "HealthCheckSettings",
        (ServiceSettings,),
        {"model_config": SettingsConfigDict(env_prefix=f"LIVELOOP_{service_name.upper()}_", extra="ignore")},
    )
    settings: ServiceSettings = settings_class()
    port = settings.port or service.port
    tls = None
    if settings.tls_cert_file is not None:
        ca = settings.tls_client_ca_file or settings.tls_ca_file
        if ca is None:
            return (
                "UNREACHABLE (the service serves TLS, and neither tls_client_ca_file nor tls_ca_file is set)"
            )
        tls = ChannelTls(ca, settings.tls_cert_file, settings.tls_key_file)
    return grpc_health(
        f"127.0.0.1:{port}", "" if whole_server else service.health_service, timeout=timeout, tls=tls
    )


def grpc_health(
    target: str,
    service: str,
    timeout: float = 1.0,
    metadata: tuple[tuple[str, str], ...] = (),
    tls: ChannelTls | None = None,
) -> str:
    """SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNREACHABLE."""
    channel = grpc.secure_channel(target, tls.credentials()) if tls else grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            return "SERVICE_UNKNOWN" if exc.code() == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Exit 0 when the service here is SERVING")
    parser.add_argument("service", choices=sorted(SERVICES_BY_NAME))
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument(
        "--whole-server",
        action="store_true",
        help="the server as a whole (liveness): SERVING while it answers, even waiting for a dependency",
    )
    args = parser.parse_args(argv)
    status = check(args.service, args.timeout, args.whole_server)
    if status != "SERVING":
        sys.stderr.write(f"{args.service}: {status}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
