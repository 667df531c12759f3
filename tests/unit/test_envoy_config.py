import subprocess
from pathlib import Path

import pytest
import yaml

from libs.stack import topology
from libs.stack.envoy_config import REPO_DESCRIPTOR_PATH, build_envoy_config, container_upstreams, main
from libs.stack.launcher import StackSettings, local_upstreams
from libs.stack.processes import envoy_binary

REPO = Path(__file__).resolve().parents[2]


def _routes(config: dict) -> list[dict]:
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager["route_config"]["virtual_hosts"][0]["routes"]


def test_every_grpc_service_has_a_route_and_predictors_are_health_checked() -> None:
    config = build_envoy_config(
        container_upstreams(),
        listen_address="0.0.0.0",
        listen_port=8080,
        admin_address="0.0.0.0",
        admin_port=9901,
        descriptor_path=None,
        dns=True,
    )
    prefixes = {route["match"]["prefix"] for route in _routes(config)}
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
def test_real_envoy_accepts_the_generated_config(tmp_path: Path) -> None:
    descriptor = str(REPO_DESCRIPTOR_PATH) if REPO_DESCRIPTOR_PATH.exists() else None
    config = build_envoy_config(
        container_upstreams(),
        listen_address="127.0.0.1",
        listen_port=1,
        admin_address="127.0.0.1",
        admin_port=2,
        descriptor_path=descriptor,
        dns=True,
    )
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
