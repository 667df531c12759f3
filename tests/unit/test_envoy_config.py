import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from libs.stack import topology
from libs.stack.certificates import ensure_certificates
from libs.stack.envoy_config import (
    DASHBOARD_ASSETS,
    DASHBOARD_CSP,
    REPO_DASHBOARD_DIR,
    REPO_DESCRIPTOR_PATH,
    TRANSCODED_SERVICES,
    EnvoyTls,
    build_envoy_config,
    container_upstreams,
    main,
)
from libs.stack.launcher import StackSettings, local_upstreams
from libs.stack.processes import envoy_binary, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def _container_config() -> dict:
    """The container configuration (DNS upstreams), without the transcoder."""
    return build_envoy_config(
        container_upstreams(),
        listen_address="0.0.0.0",
        listen_port=8080,
        admin_address="0.0.0.0",
        admin_port=9901,
        descriptor_path=None,
        dns=True,
    )


def _assert_envoy_validates(config: dict, tmp_path: Path) -> None:
    """A real Envoy loads the configuration (--mode validate: files read, nothing bound)."""
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _routes(config: dict) -> list[dict]:
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager["route_config"]["virtual_hosts"][0]["routes"]


def test_every_grpc_service_has_a_route_and_predictors_are_health_checked() -> None:
    config = _container_config()
    prefixes = {route["match"].get("prefix") for route in _routes(config)}
    for service in topology.SERVICES:
        for grpc_service in service.grpc_services:
            assert f"/{grpc_service}/" in prefixes
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    predictor = clusters["predictor"]
    assert predictor["type"] == "STRICT_DNS"
    assert (
        predictor["health_checks"][0]["grpc_health_check"]["service_name"]
        == topology.PREDICTOR.health_service
    )
    assert "outlier_detection" in predictor
    assert config["static_resources"]["listeners"][0]["enable_reuse_port"] is False


def test_local_upstreams_list_every_replica() -> None:
    settings = StackSettings(predictor_ports=[1001, 1002, 1003], predictor_metrics_ports=[2001, 2002, 2003])
    predictor = next(u for u in local_upstreams(settings) if u.name == "predictor")
    assert [port for _host, port in predictor.endpoints] == [1001, 1002, 1003]


def test_committed_container_config_is_current() -> None:
    assert main(["--check", str(REPO / "deploy" / "envoy" / "envoy.yaml")]) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_real_envoy_accepts_the_generated_config(tmp_path: Path, tls: bool) -> None:
    descriptor = str(REPO_DESCRIPTOR_PATH) if REPO_DESCRIPTOR_PATH.exists() else None
    files = ensure_certificates(tmp_path / "tls") if tls else None
    config = build_envoy_config(
        container_upstreams(),
        listen_address="127.0.0.1",
        listen_port=1,
        admin_address="127.0.0.1",
        admin_port=2,
        descriptor_path=descriptor,
        dns=True,
        dashboard_dir=REPO_DASHBOARD_DIR,
        tls=EnvoyTls(str(files.service_cert), str(files.service_key), str(files.ca)) if files else None,
    )
    if tls:  # with real certificates: the front door serves TLS, every upstream is mutual TLS
        listener = config["static_resources"]["listeners"][0]
        assert listener["filter_chains"][0]["transport_socket"]["name"] == "envoy.transport_sockets.tls"
        assert all("transport_socket" in cluster for cluster in config["static_resources"]["clusters"])
    _assert_envoy_validates(config, tmp_path)


def test_dashboard_is_served_by_envoy_before_any_upstream_route() -> None:
    config = build_envoy_config(
        container_upstreams(),
        listen_address="0.0.0.0",
        listen_port=8080,
        admin_address="0.0.0.0",
        admin_port=9901,
        descriptor_path="/etc/envoy/liveloop.pb",
        dns=True,
        dashboard_dir=REPO_DASHBOARD_DIR,
    )
    routes = _routes(config)
    served = routes[: len(DASHBOARD_ASSETS)]
    assert [route["match"]["path"] for route in served] == [asset.path for asset in DASHBOARD_ASSETS]
    for route, asset in zip(served, DASHBOARD_ASSETS, strict=True):
        body = route["direct_response"]["body"]["inline_string"]
        assert body == (REPO_DASHBOARD_DIR / asset.file_name).read_text()
        headers = {h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]}
        assert headers["content-type"] == asset.content_type
        assert headers["content-security-policy"] == DASHBOARD_CSP
    # After the dashboard, only the two error answers are Envoy's own: 405 and, last, 404.
    own = [
        route["direct_response"]["status"]
        for route in routes[len(DASHBOARD_ASSETS) :]
        if "direct_response" in route
    ]
    assert own == [405, 404]
    assert routes[-1]["match"] == {"prefix": "/"}
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    limit = manager["route_config"]["max_direct_response_body_size_bytes"]
    assert all(len(route["direct_response"]["body"]["inline_string"].encode()) <= limit for route in served)
    # the page's data comes over REST from these, through the transcoder
    (transcoder,) = [f for f in manager["http_filters"] if f["name"].endswith("grpc_json_transcoder")]
    assert transcoder["typed_config"]["services"] == list(TRANSCODED_SERVICES)
    assert {"liveloop.monitor.v1.MonitorService", "liveloop.config.v1.ConfigService"} <= set(
        TRANSCODED_SERVICES
    )


def test_descriptor_set_maps_the_monitor_and_config_rest_routes() -> None:
    """What the transcoder reads: GET/POST paths of MonitorService and ConfigService.List."""
    from google.api import annotations_pb2
    from google.protobuf import descriptor_pb2

    descriptors = descriptor_pb2.FileDescriptorSet.FromString(REPO_DESCRIPTOR_PATH.read_bytes())
    routes = {}
    for file in descriptors.file:
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                pattern = rule.WhichOneof("pattern")
                if pattern is not None:
                    routes[f"{file.package}.{service.name}/{method.name}"] = (
                        pattern.upper(),
                        getattr(rule, pattern),
                        rule.body,
                    )
    monitor = "liveloop.monitor.v1.MonitorService"
    assert routes[f"{monitor}/GetSummary"] == ("GET", "/v1/monitor/{deployment}/summary", "")
    assert routes[f"{monitor}/GetTimeSeries"] == ("GET", "/v1/monitor/{deployment}/time-series", "")
    assert routes[f"{monitor}/GetDrift"] == ("GET", "/v1/monitor/{deployment}/drift", "")
    assert routes[f"{monitor}/ListAlerts"] == ("GET", "/v1/monitor/alerts", "")
    assert routes[f"{monitor}/EvaluatePolicy"] == ("POST", "/v1/monitor/{deployment}/evaluate", "*")
    assert routes["liveloop.config.v1.ConfigService/List"] == ("GET", "/v1/config/deployments", "")
    # every service with a REST route is one the transcoder is told about
    assert {name.split("/")[0] for name in routes} <= set(TRANSCODED_SERVICES)


def test_unary_calls_are_bounded_in_time_and_streams_by_silence() -> None:
    config = _container_config()
    actions = {route["route"]["cluster"]: route["route"] for route in _routes(config) if "route" in route}
    assert actions["predictor"]["timeout"] == "30s"  # every predictor RPC is unary: a stuck call is reset
    assert actions["monitor"]["timeout"] == "900s"
    # Streams of no fixed length are reset after a silence: Watch sends a heartbeat every 5 s.
    assert actions["config"]["timeout"] == "0s"
    assert actions["config"]["idle_timeout"] == "60s"
    assert actions["ingest"]["idle_timeout"] == actions["trainer"]["idle_timeout"] == "3600s"
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["stream_idle_timeout"] == "300s"  # every other stream
    assert manager["request_headers_timeout"] == "10s"
    assert manager["http2_protocol_options"]["max_concurrent_streams"] == 1000
    # Envoy protects itself: 503 at once near its heap bound, no connection beyond the bound.
    overload = config["overload_manager"]
    monitors = {monitor["name"] for monitor in overload["resource_monitors"]}
    assert monitors == {
        "envoy.resource_monitors.fixed_heap",
        "envoy.resource_monitors.global_downstream_max_connections",
    }
    assert "envoy.overload_actions.stop_accepting_requests" in {
        action["name"] for action in overload["actions"]
    }


@pytest.mark.timeout(60)
def test_the_probe_listener_answers_ready_and_stats_and_nothing_else_of_the_admin(tmp_path: Path) -> None:
    """In containers the admin listens on 127.0.0.1 only; probes and Prometheus use this listener,
    which must not hand out the admin's other paths (/quitquitquit stops Envoy)."""
    front, admin, probes = free_port(), free_port(), free_port()
    config = build_envoy_config(
        container_upstreams(),
        listen_address="127.0.0.1",
        listen_port=front,
        admin_address="127.0.0.1",
        admin_port=admin,
        descriptor_path=None,
        dns=True,
        probe_port=probes,
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [envoy_binary(), "-c", str(path), "--base-id", str(probes), "--concurrency", "1"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def get(url: str, method: str = "GET") -> tuple[int, str]:
        request = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""

    def probe_ready() -> bool:
        try:
            return get(f"http://127.0.0.1:{probes}/ready")[0] == 200
        except OSError:
            return False

    try:
        assert wait_until(probe_ready, timeout=30), "the probe listener never answered /ready"
        status, text = get(f"http://127.0.0.1:{probes}/stats/prometheus")
        assert status == 200
        assert "envoy_server_live" in text
        for method, admin_path in (("POST", "/quitquitquit"), ("GET", "/clusters"), ("GET", "/config_dump")):
            assert get(f"http://127.0.0.1:{probes}{admin_path}", method)[0] == 404, admin_path
        assert get(f"http://127.0.0.1:{probes}/ready", "POST")[0] == 404
        assert process.poll() is None  # still running
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_committed_tls_container_config_is_current() -> None:
    assert main(["--tls", "--check", str(REPO / "deploy" / "envoy" / "envoy-tls.yaml")]) == 0
