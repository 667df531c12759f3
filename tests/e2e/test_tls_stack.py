"""TLS across the whole local stack (issue 13, defect 5), with certificates it generates: the front
door serves TLS only, every service requires a client certificate of the stack's CA (mutual TLS),
and the services, Envoy, the launcher and the CLI all connect that way."""

from __future__ import annotations

import json
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from libs.common.client import open_blocking_channel
from libs.common.tls import ChannelTls
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack.certificates import CertificateFiles
from libs.stack.launcher import is_healthy
from tests.e2e.conftest import REPO, LocalStack, local_stack, started

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

EXAMPLE = REPO / "examples" / "deployments" / "telco-offers.yaml"


@pytest.fixture
def tls_stack(tmp_path: Path) -> Iterator[LocalStack]:
    stack = local_stack(tmp_path / "state")
    stack.env["LIVELOOP_STACK_TLS"] = "true"
    with started(stack) as running:
        yield running


def _ping(target: str, key: str, tls: ChannelTls | None) -> str:
    with open_blocking_channel(target, api_key=key, deadline_seconds=5, tls=tls) as channel:
        return str(
            predictor_pb2_grpc.PredictorServiceStub(channel).Ping(predictor_pb2.PingRequest()).replica_id
        )


def test_every_connection_of_a_tls_stack_is_tls_and_services_require_certificates(
    tls_stack: LocalStack,
) -> None:
    stack = tls_stack
    files = CertificateFiles(stack.state_dir / "tls")
    invoke = stack.credentials()["invoke"]

    # The launcher reached every service and Envoy over TLS (up succeeded); status does too.
    status = stack.cli("status", "--json")
    assert status.returncode == 0, status.stdout
    assert all(is_healthy(row) for row in json.loads(status.stdout)["processes"])

    # The CLI finds the stack's certificates: a publish reaches every replica (their Watch streams
    # to the config service are mutual TLS), and pings go through the TLS front door.
    published = stack.cli("config", "publish", str(EXAMPLE), "--no-diff")
    assert published.returncode == 0, published.stderr
    waited = stack.cli("config", "status", "--wait-for-head", "30")
    assert waited.returncode == 0, waited.stdout
    pinged = stack.cli("ping", "--count", "4", "--json")
    assert pinged.returncode == 0, pinged.stderr

    # An application needs only the CA to call the front door (its API key says who it is)...
    assert _ping(stack.front_door, invoke, ChannelTls(files.ca)).startswith("predictor-")
    # ...and cannot call it in plaintext.
    with pytest.raises(grpc.RpcError) as plaintext:
        _ping(stack.front_door, invoke, None)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

    # REST over HTTPS through the front door.
    context = ssl.create_default_context(cafile=str(files.ca))
    request = urllib.request.Request(f"https://{stack.front_door}/ping", headers={"x-api-key": invoke})
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        assert json.loads(response.read())["replica_id"].startswith("predictor-")

    # A service itself takes only holders of a certificate of the stack's CA.
    predictor = next(p for p in stack.record()["processes"] if p["name"] == "predictor-1")
    direct = f"127.0.0.1:{predictor['port']}"
    assert _ping(direct, invoke, ChannelTls(files.ca, files.client_cert, files.client_key)) == "predictor-1"
    for refused in (None, ChannelTls(files.ca)):
        with pytest.raises(grpc.RpcError) as error:
            _ping(direct, invoke, refused)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

    # The keys never left the state directory in a readable file.
    assert all(path.stat().st_mode & 0o077 == 0 for path in files.directory.iterdir())

    # Started again without the setting, the stack refuses rather than fall back to plaintext.
    assert stack.cli("down").returncode == 0
    stack.env.pop("LIVELOOP_STACK_TLS")
    again = stack.cli("up")
    assert again.returncode != 0
    assert "ran with TLS" in again.stderr
    assert "LIVELOOP_STACK_TLS=true" in again.stderr
