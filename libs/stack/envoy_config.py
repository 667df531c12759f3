"""Builds Envoy's configuration for the front door, for the local launcher and for containers.

One builder, two address modes: STATIC upstreams on loopback ports (local processes) or STRICT_DNS
on service hostnames (docker compose and Kubernetes, where `predictor` resolves to every replica).
`python -m libs.stack.envoy_config --write deploy/envoy/envoy.yaml` regenerates the container file.

Envoy also serves the monitoring dashboard's static shell (deploy/dashboard/) at GET /dashboard as
direct responses inlined into the config, so the page needs no web server and no mount of its own
(the Kubernetes ConfigMap copy of envoy.yaml carries it too). The page holds no data: it reads
everything from the monitor's REST routes (gRPC-JSON transcoding) with the caller's API key.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from libs.stack.topology import (
    ENVOY_ADMIN_PORT,
    ENVOY_PORT,
    ENVOY_PROBE_PORT,
    MONITOR,
    PREDICTOR,
    SERVICE_HEADER,
    SERVICES,
)

CONTAINER_DESCRIPTOR_PATH = "/etc/envoy/liveloop.pb"
REPO_DESCRIPTOR_PATH = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "liveloop.pb"
REPO_DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "dashboard"
# Services whose google.api.http annotations are served as REST (only annotated RPCs are mapped).
TRANSCODED_SERVICES = (
    "liveloop.predictor.v1.PredictorService",
    "liveloop.config.v1.ConfigService",
    "liveloop.monitor.v1.MonitorService",
)

DASHBOARD_PATH = "/dashboard"


@dataclass(frozen=True)
class StaticAsset:
    """A file of the dashboard shell served by Envoy itself."""

    path: str
    file_name: str
    content_type: str


DASHBOARD_ASSETS = (
    StaticAsset(DASHBOARD_PATH, "index.html", "text/html; charset=utf-8"),
    StaticAsset(f"{DASHBOARD_PATH}/dashboard.js", "dashboard.js", "text/javascript; charset=utf-8"),
    StaticAsset(f"{DASHBOARD_PATH}/dashboard.css", "dashboard.css", "text/css; charset=utf-8"),
)
# The page may talk only to its own origin (the REST routes below); nothing is loaded from elsewhere.
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Envoy refuses direct responses above 4 KiB unless the route configuration raises the bound.
MAX_STATIC_BODY_BYTES = 256 * 1024
# The ecosystem.Ai runtime's REST paths and liveloop's own: another method on them answers 405.
REST_PATHS = ("/invocations", "/response", "/responseResult", "/refresh", "/health", "/ping")
# Every error the front door answers itself (a path it does not serve, a body that is not JSON, no
# replica up) is a JSON object shaped like the transcoder's errors from the services,
# {"code": <gRPC code>, "message": ...}: one shape for every error of the REST face.
LOCAL_ERROR_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 405: 12, 413: 8, 429: 8, 503: 14, 504: 4}
MAX_REST_BODY_BYTES = 4 * 1024 * 1024
METADATA_NAMESPACE = "liveloop"
# What is at fault, named as the services name a field: the message starts "<field>: ".
LOCAL_ERROR_FIELDS = {400: "body: ", 404: "path: ", 405: "method: ", 413: "body: "}


@dataclass(frozen=True)
class Upstream:
    name: str
    grpc_services: tuple[str, ...]
    health_service: str
    endpoints: tuple[tuple[str, int], ...]


def _http2_options() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


@dataclass(frozen=True)
class EnvoyTls:
    """TLS at both ends of Envoy: the front door serves `cert_file`; upstream connections trust
    `ca_file` and present `cert_file` (mutual TLS with services that require client certificates)."""

    cert_file: str
    key_file: str
    ca_file: str

    def _certificate(self) -> dict[str, Any]:
        return {
            "certificate_chain": {"filename": self.cert_file},
            "private_key": {"filename": self.key_file},
        }

    def downstream(self) -> dict[str, Any]:
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "tls_certificates": [self._certificate()],
                    "alpn_protocols": ["h2", "http/1.1"],
                },
            },
        }

    def upstream(self) -> dict[str, Any]:
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {
                    "tls_certificates": [self._certificate()],
                    "validation_context": {"trusted_ca": {"filename": self.ca_file}},
                    "alpn_protocols": ["h2"],
                },
            },
        }


def _cluster(upstream: Upstream, dns: bool, tls: EnvoyTls | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": upstream.name,
        "connect_timeout": "1s",
        "type": "STRICT_DNS" if dns else "STATIC",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": _http2_options(),
        "load_assignment": {
            "cluster_name": upstream.name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                        for host, port in upstream.endpoints
                    ]
                }
            ],
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "1s",
                "no_traffic_interval": "2s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": upstream.health_service},
            }
        ],
        # Sized on purpose, not Envoy's 1024 requests per cluster: a burst of stuck calls (a client
        # that never completes its message, reset at the route timeout) must not take every slot.
        # Retries may use a fifth of the requests in flight, never more (a retry storm on a
        # struggling backend triples its load).
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": CLUSTER_MAX_REQUESTS,
                    "max_pending_requests": CLUSTER_MAX_REQUESTS,
                    "max_requests": CLUSTER_MAX_REQUESTS,
                    "retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 10},
                }
            ]
        },
        "outlier_detection": {
            "consecutive_5xx": 3,
            "consecutive_gateway_failure": 3,
            "interval": "1s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 50,
        },
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
    }
    if tls is not None:
        cluster["transport_socket"] = tls.upstream()  # health checks go over it too
    if dns:
        cluster["dns_lookup_family"] = "V4_ONLY"
        cluster["dns_refresh_rate"] = "5s"
        cluster["respect_dns_ttl"] = True
    return cluster


# How long a call may take through the front door, per upstream. The predictors and the monitor
# serve unary calls only, so a call that has not finished by then (a client that never sends the
# rest of its message) is reset instead of holding a slot for ever; a client's own grpc-timeout
# below the bound is honoured. Config (Watch), ingest and trainer (progress streams, uploads) have
# streams of no fixed length: those are bounded by silence instead, a stream with no message in
# either direction for its upstream's idle timeout is reset (Watch sends a heartbeat every 5 s;
# ingest and trainer report progress), and every other stream after STREAM_IDLE_TIMEOUT.
CLUSTER_MAX_REQUESTS = 20_000
ROUTE_TIMEOUTS = {PREDICTOR.name: "30s", MONITOR.name: "900s"}  # EvaluatePolicy over 1M decisions: ~6 min
STREAM_IDLE_TIMEOUT = "300s"
# Retried on another host: the call never reached a handler that could answer. A predictor call is
# retried when the replica cancelled it too (a stopping replica cancels the calls it had not started
# yet: measured, 2 in 8 graceful restarts under load): Invoke and Respond are safe to send again (a
# Respond already learned answers `duplicate`), unlike a config Publish.
RETRY_ON = "unavailable,reset,connect-failure,refused-stream"
ROUTE_IDLE_TIMEOUTS = {"config": "60s", "ingest": "3600s", "trainer": "3600s"}
# Envoy's own memory and connections (the overload manager): past 90% of the heap it returns
# memory to the system, past 98% it answers new requests 503 at once instead of falling over;
# beyond the connection bound new connections are refused.
MAX_HEAP_BYTES = 512 * 2**20
MAX_DOWNSTREAM_CONNECTIONS = 50_000


def overload_manager() -> dict[str, Any]:
    heap = "envoy.resource_monitors.fixed_heap"
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": heap,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": MAX_HEAP_BYTES,
                },
            },
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                },
            },
        ],
        "actions": [
            {
                "name": "envoy.overload_actions.shrink_heap",
                "triggers": [{"name": heap, "threshold": {"value": 0.90}}],
            },
            {
                "name": "envoy.overload_actions.stop_accepting_requests",
                "triggers": [{"name": heap, "threshold": {"value": 0.98}}],
            },
        ],
    }


def _route_action(cluster: str) -> dict[str, Any]:
    timeout = ROUTE_TIMEOUTS.get(cluster, "0s")
    action: dict[str, Any] = {
        "cluster": cluster,
        # Unary calls carry their own grpc-timeout, bounded by this; streams are bounded by silence.
        "timeout": timeout,
        "max_stream_duration": {"grpc_timeout_header_max": timeout},
        "retry_policy": {
            "retry_on": RETRY_ON + (",cancelled" if cluster == PREDICTOR.name else ""),
            "num_retries": 2,
            "per_try_timeout": "0s",
            "retry_host_predicate": [
                {
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": "type.googleapis.com/"
                        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    },
                }
            ],
            "host_selection_retry_max_attempts": 3,
            "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
        },
    }
    if cluster in ROUTE_IDLE_TIMEOUTS:
        action["idle_timeout"] = ROUTE_IDLE_TIMEOUTS[cluster]
    return action


def _header(name: str, value: str) -> dict[str, Any]:
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def dashboard_routes(dashboard_dir: Path) -> list[dict[str, Any]]:
    """GET /dashboard and its two assets as direct responses (no upstream, no API key: no data)."""
    routes: list[dict[str, Any]] = []
    for asset in DASHBOARD_ASSETS:
        body = (dashboard_dir / asset.file_name).read_text(encoding="utf-8")
        if len(body.encode("utf-8")) > MAX_STATIC_BODY_BYTES:
            raise ValueError(f"{asset.file_name} is larger than {MAX_STATIC_BODY_BYTES} bytes")
        routes.append(
            {
                "match": {
                    "path": asset.path,
                    "headers": [{"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}],
                },
                "direct_response": {"status": 200, "body": {"inline_string": body}},
                "response_headers_to_add": [
                    _header("content-type", asset.content_type),
                    _header("cache-control", "no-store"),
                    _header("x-content-type-options", "nosniff"),
                    _header("referrer-policy", "no-referrer"),
                    _header("content-security-policy", DASHBOARD_CSP),
                ],
            }
        )
    return routes


def _routes(upstreams: Sequence[Upstream], dashboard_dir: Path | None) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = dashboard_routes(dashboard_dir) if dashboard_dir is not None else []
    for upstream in upstreams:
        routes.append(
            {
                "match": {
                    "prefix": "/",
                    "headers": [{"name": SERVICE_HEADER, "string_match": {"exact": upstream.name}}],
                },
                "route": _route_action(upstream.name),
            }
        )
    for upstream in upstreams:
        for grpc_service in upstream.grpc_services:
            routes.append({"match": {"prefix": f"/{grpc_service}/"}, "route": _route_action(upstream.name)})
    # Other gRPC calls (unpinned health checks, reflection) go to the predictors, the service most
    # clients call, which answers an unknown method with UNIMPLEMENTED.
    routes.append(
        {
            "match": {
                "prefix": "/",
                "headers": [{"name": "content-type", "string_match": {"prefix": "application/grpc"}}],
            },
            "route": _route_action(PREDICTOR.name),
        }
    )
    # A REST path the transcoder did not take (another method): 405. Anything else: 404.
    paths = "|".join(path.lstrip("/") for path in REST_PATHS)
    routes.append(
        {
            "match": {"safe_regex": {"regex": f"/({paths})"}},
            "direct_response": {"status": 405, "body": {"inline_string": "method not allowed"}},
        }
    )
    routes.append(
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": "no such path"}},
        }
    )
    return routes


def local_reply_config() -> dict[str, Any]:
    """Errors Envoy answers itself, as JSON: {"code": gRPC code, "message": what and where}."""

    def mapper(status: int | None, code: int) -> dict[str, Any]:
        # The method only where the request reached no filter that rewrites it (404, 405): a
        # transcoded GET is a POST by the time an upstream error comes back.
        where = (
            "%REQ(:METHOD)% %REQ(:PATH)%" if status in (404, 405) else "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"
        )
        comparison: dict[str, Any] = (
            {"op": "EQ", "value": {"default_value": status, "runtime_key": f"local_reply.status_{status}"}}
            if status is not None
            else {"op": "GE", "value": {"default_value": 400, "runtime_key": "local_reply.status_error"}}
        )
        return {
            "filter": {"status_code_filter": {"comparison": comparison}},
            "body_format_override": {
                "json_format": {
                    "code": code,
                    "message": f"{LOCAL_ERROR_FIELDS.get(status or 0, '')}%LOCAL_REPLY_BODY% ({where})",
                    "details": [],
                },
                "content_type": "application/json",
            },
        }

    # A body over the buffer limit fails inside the transcoder with a bare 500 (Envoy's flow-control
    # rule for filters that buffer whole bodies); when the declared length says why, answer 413.
    too_large = {
        "filter": {
            "and_filter": {
                "filters": [
                    {
                        "status_code_filter": {
                            "comparison": {
                                "op": "EQ",
                                "value": {"default_value": 500, "runtime_key": "local_reply.status_500"},
                            }
                        }
                    },
                    {
                        # The transcoder drops content-length; the filter before it kept it here.
                        "metadata_filter": {
                            "matcher": {
                                "filter": METADATA_NAMESPACE,
                                "path": [{"key": "content_length"}],
                                "value": {
                                    "double_match": {"range": {"start": MAX_REST_BODY_BYTES + 1, "end": 1e18}}
                                },
                            }
                        }
                    },
                ]
            }
        },
        "status_code": 413,
        "body": {"inline_string": f"is larger than the front door takes ({MAX_REST_BODY_BYTES} bytes)"},
        "body_format_override": {
            "json_format": {
                "code": LOCAL_ERROR_CODES[413],
                "message": "body: %LOCAL_REPLY_BODY% (%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%)",
                "details": [],
            },
            "content_type": "application/json",
        },
    }
    return {
        "mappers": [
            too_large,
            *(mapper(status, code) for status, code in LOCAL_ERROR_CODES.items()),
            mapper(None, 2),  # any other error: UNKNOWN
        ]
    }


def build_envoy_config(
    upstreams: Sequence[Upstream],
    *,
    listen_address: str,
    listen_port: int,
    admin_address: str,
    admin_port: int,
    descriptor_path: str | None,
    dns: bool,
    access_log: bool = False,
    dashboard_dir: Path | None = None,
    probe_port: int | None = None,
    tls: EnvoyTls | None = None,
) -> dict[str, Any]:
    """With `probe_port`, a second listener on `listen_address` answers only GET /ready and
    /stats/prometheus, from the admin interface (which then need not listen beyond localhost)."""
    http_filters: list[dict[str, Any]] = []
    if descriptor_path is not None:
        http_filters.append(
            {
                "name": "envoy.filters.http.header_to_metadata",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
                    "request_rules": [
                        {
                            "header": "content-length",
                            "on_header_present": {
                                "metadata_namespace": METADATA_NAMESPACE,
                                "key": "content_length",
                                "type": "NUMBER",
                            },
                            "remove": False,
                        }
                    ],
                },
            }
        )
        http_filters.append(
            {
                "name": "envoy.filters.http.grpc_json_transcoder",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                    "proto_descriptor": descriptor_path,
                    "services": list(TRANSCODED_SERVICES),
                    "convert_grpc_status": True,
                    "print_options": {
                        "preserve_proto_field_names": True,
                        "always_print_primitive_fields": True,
                    },
                },
            }
        )
    http_filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    connection_manager: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "front_door",
        "codec_type": "AUTO",
        "stream_idle_timeout": STREAM_IDLE_TIMEOUT,
        # A client must have sent its request headers within this (a slow-headers client holds nothing).
        "request_headers_timeout": "10s",
        # Streams one client connection may hold open at once (Envoy's default is 2^31 - 1).
        "http2_protocol_options": {"max_concurrent_streams": 1000},
        "route_config": {
            "name": "liveloop",
            "virtual_hosts": [
                {"name": "liveloop", "domains": ["*"], "routes": _routes(upstreams, dashboard_dir)}
            ],
            "max_direct_response_body_size_bytes": MAX_STATIC_BODY_BYTES,
        },
        "http_filters": http_filters,
        "local_reply_config": local_reply_config(),
    }
    if access_log:
        connection_manager["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
                },
            }
        ]
    listeners: list[dict[str, Any]] = [
        {
            "name": "front_door",
            "address": {"socket_address": {"address": listen_address, "port_value": listen_port}},
            # A taken port must fail loudly instead of silently sharing traffic.
            "enable_reuse_port": False,
            # The transcoder buffers a REST body whole: a larger one is answered 413 (JSON).
            "per_connection_buffer_limit_bytes": MAX_REST_BODY_BYTES,
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": connection_manager,
                        }
                    ]
                }
            ],
        }
    ]
    if tls is not None:
        listeners[0]["filter_chains"][0]["transport_socket"] = tls.downstream()
    clusters = [_cluster(upstream, dns, tls) for upstream in upstreams]
    if probe_port is not None:
        listeners.append(_probe_listener(listen_address, probe_port))
        clusters.append(_admin_cluster(admin_port))
    return {
        "admin": {"address": {"socket_address": {"address": admin_address, "port_value": admin_port}}},
        "overload_manager": overload_manager(),
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


ADMIN_CLUSTER = "envoy_admin"
PROBE_PATHS = ("/ready", "/stats/prometheus")


def _probe_listener(address: str, port: int) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            "match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
            "route": {"cluster": ADMIN_CLUSTER, "timeout": "5s"},
        }
        for path in PROBE_PATHS
    ]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "probes",
        "codec_type": "AUTO",
        "request_headers_timeout": "10s",
        "route_config": {
            "name": "probes",
            "virtual_hosts": [{"name": "probes", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "name": "probes",
        "address": {"socket_address": {"address": address, "port_value": port}},
        "enable_reuse_port": False,
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def _admin_cluster(admin_port: int) -> dict[str, Any]:
    return {
        "name": ADMIN_CLUSTER,
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": admin_port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def container_upstreams(predictor_host: str = PREDICTOR.name) -> list[Upstream]:
    """Upstreams by service hostname: compose service names or Kubernetes Services."""
    return [
        Upstream(
            name=service.name,
            grpc_services=service.grpc_services,
            health_service=service.health_service,
            endpoints=((predictor_host if service is PREDICTOR else service.name, service.port),),
        )
        for service in SERVICES
    ]


class _ReadableDumper(yaml.SafeDumper):
    """Writes multi-line strings (the dashboard's files) as literal blocks, so the file stays readable."""


def _represent_text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ReadableDumper.add_representer(str, _represent_text)


def render(config: dict[str, Any]) -> str:
    header = "# Generated by `make envoy-config` (libs/stack/envoy_config.py); do not edit by hand.\n"
    return header + yaml.dump(config, Dumper=_ReadableDumper, sort_keys=False, width=120)


# Where the TLS container config (deploy/envoy/envoy-tls.yaml) reads the files `liveloop tls create`
# writes: the same directory as the services' (docker-compose.tls.yml, deploy/k8s/tls/).
CONTAINER_TLS_DIR = "/etc/liveloop/tls"
CONTAINER_TLS = EnvoyTls(
    cert_file=f"{CONTAINER_TLS_DIR}/service.pem",
    key_file=f"{CONTAINER_TLS_DIR}/service-key.pem",
    ca_file=f"{CONTAINER_TLS_DIR}/ca.pem",
)


def container_config_text(tls: bool = False) -> str:
    config = build_envoy_config(
        container_upstreams(),
        listen_address="0.0.0.0",
        listen_port=ENVOY_PORT,
        admin_address="127.0.0.1",
        admin_port=ENVOY_ADMIN_PORT,
        descriptor_path=CONTAINER_DESCRIPTOR_PATH,
        dns=True,
        dashboard_dir=REPO_DASHBOARD_DIR,
        probe_port=ENVOY_PROBE_PORT,
        tls=CONTAINER_TLS if tls else None,
    )
    return render(config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the container Envoy configuration")
    parser.add_argument("--write", type=Path, help="file to write (default: print)")
    parser.add_argument("--check", type=Path, help="fail if this file differs from the generated config")
    parser.add_argument(
        "--tls", action="store_true", help="the TLS variant: TLS front door, mutual TLS to every upstream"
    )
    args = parser.parse_args(argv)
    text = container_config_text(tls=args.tls)
    if args.check is not None:
        if not args.check.exists() or args.check.read_text() != text:
            print(f"{args.check} is stale: run `make envoy-config`", file=sys.stderr)
            return 1
        return 0
    if args.write is not None:
        args.write.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
