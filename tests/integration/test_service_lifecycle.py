"""A service as a real process: graceful SIGTERM, metrics endpoint, JSON logs, TLS, tracing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from libs.common.client import open_blocking_channel
from libs.common.config_follower import LAST_KNOWN_GOOD_FILE
from libs.common.health_check import grpc_health
from libs.common.tls import ChannelTls
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack.certificates import ensure_certificates
from libs.stack.processes import free_port, wait_until
from tests.conftest import ApiKeys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
REPO = Path(__file__).resolve().parents[2]


def _start_predictor(env_extra: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIVELOOP_")}
    env.update(env_extra)
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "services.predictor"],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def test_sigterm_reports_not_serving_then_exits_cleanly(tmp_path: Path, api_keys: ApiKeys) -> None:
    port, metrics_port = free_port(), free_port()
    # No config service answers: the replica serves its last-known-good copy (here: no deployments).
    state_dir = tmp_path / "predictor-state"
    state_dir.mkdir()
    (state_dir / LAST_KNOWN_GOOD_FILE).write_text('{"revision": 3, "deployments": {}}')
    process = _start_predictor(
        {
            "LIVELOOP_PREDICTOR_STATE_DIR": str(state_dir),
            "LIVELOOP_PREDICTOR_CONFIG_TARGET": f"127.0.0.1:{free_port()}",
            "LIVELOOP_PREDICTOR_PORT": str(port),
            "LIVELOOP_PREDICTOR_METRICS_PORT": str(metrics_port),
            "LIVELOOP_PREDICTOR_API_KEYS_FILE": str(api_keys.file),
            "LIVELOOP_PREDICTOR_REPLICA_ID": "lifecycle",
            "LIVELOOP_PREDICTOR_LOG_FORMAT": "json",
            "LIVELOOP_PREDICTOR_SHUTDOWN_DRAIN_SECONDS": "3",
        },
        tmp_path / "predictor.log",
    )
    target = f"127.0.0.1:{port}"
    service = "liveloop.predictor.v1.PredictorService"
    try:
        assert wait_until(lambda: grpc_health(target, service) == "SERVING", timeout=30)
        with grpc.insecure_channel(target) as channel:
            reply = predictor_pb2_grpc.PredictorServiceStub(channel).Ping(
                predictor_pb2.PingRequest(), metadata=(("x-api-key", api_keys.invoke),), timeout=5
            )
        assert reply.replica_id == "lifecycle"
        assert reply.config_revision == 3

        # The Prometheus endpoint counts the call with its status code.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert (
            'liveloop_rpc_requests_total{code="OK",method="PredictorService/Ping",service="predictor"} 1.0'
            in metrics
        )

        process.send_signal(signal.SIGTERM)
        # During the drain window the server still answers, but says NOT_SERVING.
        assert wait_until(lambda: grpc_health(target, service) == "NOT_SERVING", timeout=3)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    lines = [
        json.loads(line)
        for line in (tmp_path / "predictor.log").read_text().splitlines()
        if line.startswith("{")
    ]
    messages = [line["message"] for line in lines]
    assert any("listening on" in message for message in messages)
    assert any("stopped" in message for message in messages)
    assert all(line["service"] == "predictor" for line in lines)


def test_taken_port_exits_with_the_port_named(tmp_path: Path) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        process = _start_predictor(
            {"LIVELOOP_PREDICTOR_PORT": str(port), "LIVELOOP_PREDICTOR_AUTH_ENABLED": "false"},
            tmp_path / "predictor.log",
        )
        assert process.wait(timeout=60) == 1
    assert f"127.0.0.1:{port}" in (tmp_path / "predictor.log").read_text()


def test_missing_key_file_refuses_to_start(tmp_path: Path) -> None:
    process = _start_predictor({"LIVELOOP_PREDICTOR_PORT": str(free_port())}, tmp_path / "predictor.log")
    assert process.wait(timeout=60) == 1
    assert "api_keys_file" in (tmp_path / "predictor.log").read_text()


def test_tls_listener_serves_only_tls_clients_and_mutual_tls_only_clients_with_a_certificate(
    tmp_path: Path, api_keys: ApiKeys
) -> None:
    files = ensure_certificates(tmp_path / "tls")
    port = free_port()
    process = _start_predictor(
        {
            "LIVELOOP_PREDICTOR_PORT": str(port),
            "LIVELOOP_PREDICTOR_API_KEYS_FILE": str(api_keys.file),
            "LIVELOOP_PREDICTOR_TLS_CERT_FILE": str(files.service_cert),
            "LIVELOOP_PREDICTOR_TLS_KEY_FILE": str(files.service_key),
            "LIVELOOP_PREDICTOR_TLS_CLIENT_CA_FILE": str(files.ca),
            "LIVELOOP_PREDICTOR_SHUTDOWN_DRAIN_SECONDS": "0",
        },
        tmp_path / "predictor.log",
    )

    def ping(tls: ChannelTls | None) -> str:
        with open_blocking_channel(
            f"127.0.0.1:{port}", api_key=api_keys.invoke, deadline_seconds=2, tls=tls
        ) as ch:
            return str(
                predictor_pb2_grpc.PredictorServiceStub(ch).Ping(predictor_pb2.PingRequest()).replica_id
            )

    with_certificate = ChannelTls(files.ca, files.client_cert, files.client_key)
    try:
        assert wait_until(lambda: _succeeds(lambda: ping(with_certificate)), timeout=30)
        for refused in (None, ChannelTls(files.ca)):  # plaintext; TLS without a client certificate
            with pytest.raises(grpc.RpcError) as error:
                ping(refused)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        # The containers' health check reads the same settings and passes the mutual TLS: it gets
        # the replica's answer (NOT_SERVING: no config service here), where plaintext gets none.
        settings = {
            "LIVELOOP_PREDICTOR_PORT": str(port),
            "LIVELOOP_PREDICTOR_TLS_CERT_FILE": str(files.service_cert),
            "LIVELOOP_PREDICTOR_TLS_KEY_FILE": str(files.service_key),
            "LIVELOOP_PREDICTOR_TLS_CLIENT_CA_FILE": str(files.ca),
        }
        answered = _health_check(settings)
        assert (answered.returncode, answered.stderr) == (1, "predictor: NOT_SERVING\n")
        plaintext = _health_check({"LIVELOOP_PREDICTOR_PORT": str(port)})
        assert plaintext.returncode == 1
        assert "predictor: UNREACHABLE" in plaintext.stderr
    finally:
        process.terminate()
        process.wait(timeout=30)


def _health_check(settings: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIVELOOP_")} | settings
    return subprocess.run(
        [sys.executable, "-m", "libs.common.health_check", "predictor", "--timeout", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _succeeds(call: object) -> bool:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError:
        return False
    return True
