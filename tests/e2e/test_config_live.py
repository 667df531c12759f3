"""Live configuration across real processes: a config service and predictor replicas, each started
as `python -m services.<name>` on free ports, with auth on, killed and restarted for real."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from libs.common.client import open_blocking_channel
from libs.common.health_check import grpc_health
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack.processes import free_port, port_accepts, tail, wait_until
from tests.conftest import ApiKeys
from tests.plugin_packages import install_plugin_package

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "deployments" / "telco-offers.yaml"
START_TIMEOUT = 30.0
CONVERGE_TIMEOUT = 30.0


@dataclass
class ServiceProcess:
    """One service process, started with `python -m`, its output in a log file."""

    name: str
    module: str
    env: dict[str, str]
    log_path: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is already running"
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye to the streams it serves."""
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it does not exit in time."""
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def health(self) -> str:
        return grpc_health(self.target, "", timeout=1)

    def log(self) -> str:
        return f"--- {self.name} ({self.log_path}) ---\n{tail(self.log_path, 40)}"


@dataclass
class LiveConfig:
    """A config service and predictor replicas that follow it, with one key file."""

    root: Path
    api_keys: ApiKeys
    redis_url: str
    config: ServiceProcess = field(init=False)
    replicas: dict[str, ServiceProcess] = field(default_factory=dict)
    model_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.model_dir = self.root / "models"
        self.model_dir.mkdir(parents=True)
        env = _base_environment() | {
            "LIVELOOP_CONFIG_HOST": "127.0.0.1",
            "LIVELOOP_CONFIG_PORT": str(free_port()),
            "LIVELOOP_CONFIG_DATABASE_URL": f"sqlite:///{self.root / 'config.db'}",
            "LIVELOOP_CONFIG_AUTH_ENABLED": "true",
            "LIVELOOP_CONFIG_API_KEYS_FILE": str(self.api_keys.file),
            "LIVELOOP_CONFIG_HEARTBEAT_SECONDS": "1",
            "LIVELOOP_CONFIG_SHUTDOWN_DRAIN_SECONDS": "0",
            "LIVELOOP_CONFIG_SHUTDOWN_GRACE_SECONDS": "1",
        }
        port = int(env["LIVELOOP_CONFIG_PORT"])
        self.config = ServiceProcess("config", "services.config", env, self.root / "config.log", port)

    # Processes ---------------------------------------------------------------------------------

    def start_config(self) -> None:
        self.config.start()
        self.wait(lambda: self.config.health() == "SERVING", "the config service is SERVING", START_TIMEOUT)

    def start_replica(
        self,
        replica_id: str,
        state_dir: Path | None = None,
        *,
        wait_serving: bool = True,
        env: dict[str, str] | None = None,
    ) -> ServiceProcess:
        port = free_port()
        env = (
            _base_environment()
            | (env or {})
            | {
                "LIVELOOP_PREDICTOR_HOST": "127.0.0.1",
                "LIVELOOP_PREDICTOR_PORT": str(port),
                "LIVELOOP_PREDICTOR_REPLICA_ID": replica_id,
                "LIVELOOP_PREDICTOR_CONFIG_TARGET": self.config.target,
                "LIVELOOP_PREDICTOR_CONFIG_API_KEY": self.api_keys.service,
                "LIVELOOP_PREDICTOR_STATE_DIR": str(state_dir or self.root / replica_id / "state"),
                "LIVELOOP_PREDICTOR_MODEL_DIR": str(self.model_dir),
                "LIVELOOP_PREDICTOR_REDIS_URL": self.redis_url,
                "LIVELOOP_PREDICTOR_AUTH_ENABLED": "true",
                "LIVELOOP_PREDICTOR_API_KEYS_FILE": str(self.api_keys.file),
                "LIVELOOP_PREDICTOR_SHUTDOWN_DRAIN_SECONDS": "0",
                "LIVELOOP_PREDICTOR_SHUTDOWN_GRACE_SECONDS": "1",
            }
        )
        log = self.root / f"{replica_id}-{len(self.replicas)}.log"
        process = ServiceProcess(replica_id, "services.predictor", env, log, port)
        self.replicas[f"{replica_id}#{len(self.replicas)}"] = process
        process.start()
        self.wait(lambda: process.health() != "UNREACHABLE", f"{replica_id} answers", START_TIMEOUT)
        if wait_serving:
            self.wait(lambda: process.health() == "SERVING", f"{replica_id} is SERVING", START_TIMEOUT)
        return process

    def stop_all(self) -> None:
        for process in [*self.replicas.values(), self.config]:
            process.stop()

    def logs(self) -> str:
        return "\n".join(process.log() for process in [self.config, *self.replicas.values()])

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = CONVERGE_TIMEOUT) -> None:
        def holds() -> bool:
            try:
                return condition()
            except grpc.RpcError:
                return False

        assert wait_until(holds, timeout=timeout, interval=0.1), (
            f"not within {timeout}s: {what}\n{self.logs()}"
        )

    # Calls -------------------------------------------------------------------------------------

    def admin(self, call: Callable[[config_pb2_grpc.ConfigServiceStub], Any]) -> Any:
        with open_blocking_channel(
            self.config.target, api_key=self.api_keys.admin, deadline_seconds=10
        ) as channel:
            return call(config_pb2_grpc.ConfigServiceStub(channel))

    def publish(self, document: dict[str, Any]) -> int:
        reply = self.admin(
            lambda stub: stub.Publish(config_pb2.PublishRequest(spec_text=yaml.safe_dump(document)))
        )
        assert reply.changed, reply
        return int(reply.revision)

    def replica_states(self) -> dict[str, config_pb2.ReplicaState]:
        status = self.admin(lambda stub: stub.ReplicaStatus(config_pb2.ReplicaStatusRequest()))
        return {state.replica_id: state for state in status.replicas}

    def ping_revision(self, replica: ServiceProcess) -> int:
        with open_blocking_channel(
            replica.target, api_key=self.api_keys.invoke, deadline_seconds=3
        ) as channel:
            reply = predictor_pb2_grpc.PredictorServiceStub(channel).Ping(predictor_pb2.PingRequest())
        assert reply.replica_id == replica.name
        return int(reply.config_revision)

    def wait_revision(self, replicas: list[ServiceProcess], revision: int) -> None:
        for replica in replicas:
            self.wait(
                lambda replica=replica: self.ping_revision(replica) == revision,  # type: ignore[misc]
                f"{replica.name} serves revision {revision} (Ping)",
            )

    def wait_status(
        self, replica_ids: list[str], check: Callable[[config_pb2.ReplicaState], bool], what: str
    ) -> dict[str, config_pb2.ReplicaState]:
        seen: dict[str, config_pb2.ReplicaState] = {}

        def all_hold() -> bool:
            seen.clear()
            seen.update(self.replica_states())
            return all(rid in seen and check(seen[rid]) for rid in replica_ids)

        self.wait(all_hold, f"{what} (last ReplicaStatus: {seen})")
        return dict(seen)


def _base_environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIVELOOP_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def live(tmp_path: Path, api_keys: ApiKeys, redis_url: str) -> Iterator[LiveConfig]:
    stack = LiveConfig(tmp_path, api_keys, redis_url)
    try:
        yield stack
    finally:
        stack.stop_all()


def telco(description: str, **changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    document["description"] = description
    document.update(changes)
    return document


def small(name: str, price: float) -> dict[str, Any]:
    return {"name": name, "offers": [{"id": "plan-a", "price": price}, {"id": "plan-b", "price": 1.0}]}


def write_model_artifact(directory: Path, name: str, version: int) -> None:
    """The smallest artifact a replica loads (libs/common/model_artifacts.py): a TorchScript
    logistic model of one numeric feature, its preprocessing, reference rows and the manifest."""
    import torch

    from libs.common import model_artifacts

    class Logistic(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(0.01 * x.sum(dim=1, keepdim=True))

    staging = directory.with_name(f".{directory.name}.staging")
    staging.mkdir(parents=True)
    with warnings.catch_warnings():  # TorchScript is the artifact format; torch 2.13 deprecates it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Logistic()), str(staging / model_artifacts.MODEL_FILE))
    preprocessing = {
        "format": model_artifacts.PREPROCESSING_FORMAT,
        "features": [{"name": "age", "encoding": "standardize", "mean": 35.0}],
        "inputs": ["age"],
    }
    (staging / model_artifacts.PREPROCESSING_FILE).write_text(json.dumps(preprocessing))
    rows = [{"age": 20}, {"age": 60}]
    predictions = [float(torch.sigmoid(torch.tensor(0.01 * row["age"]))) for row in rows]
    (staging / model_artifacts.REFERENCE_FILE).write_text(
        json.dumps({"rows": rows, "predictions": predictions})
    )
    files = {
        file: hashlib.sha256((staging / file).read_bytes()).hexdigest()
        for file in model_artifacts.REQUIRED_FILES
    }
    manifest = {"format": model_artifacts.MANIFEST_FORMAT, "model": name, "version": version, "files": files}
    (staging / model_artifacts.MANIFEST_FILE).write_text(json.dumps(manifest))
    staging.rename(directory)


def deployments_of(state: config_pb2.ReplicaState) -> dict[str, int]:
    return {ref.name: ref.revision for ref in state.deployments}


def test_replicas_resume_after_the_config_service_is_killed_and_miss_no_revision(live: LiveConfig) -> None:
    live.start_config()
    one = live.start_replica("predictor-1", wait_serving=False)
    two = live.start_replica("predictor-2", wait_serving=False)
    assert live.publish(telco("first")) == 1
    assert live.publish(small("second", 1.0)) == 2
    assert live.publish(telco("third")) == 3
    live.wait_revision([one, two], 3)
    assert one.health() == two.health() == "SERVING"
    live.wait_status(
        ["predictor-1", "predictor-2"],
        lambda s: s.applied_revision == 3 and deployments_of(s) == {"telco-offers": 3, "second": 2},
        "both replicas ACKed revision 3",
    )

    # Kill the config service in the middle of the streams; the replicas keep serving.
    live.config.kill()
    assert not port_accepts("127.0.0.1", live.config.port)
    assert live.ping_revision(one) == live.ping_revision(two) == 3
    assert one.health() == two.health() == "SERVING"

    # Same port, same database: the replicas reconnect from revision 3 and get what comes next.
    live.start_config()
    states = live.wait_status(
        ["predictor-1", "predictor-2"],
        lambda s: s.connected and s.applied_revision == 3,
        "both replicas reconnected at revision 3",
    )
    for state in states.values():
        assert state.revisions_behind == 0
        assert deployments_of(state) == {"telco-offers": 3, "second": 2}
    assert live.publish(telco("fourth")) == 4
    assert live.publish(small("second", 2.0)) == 5
    live.wait_revision([one, two], 5)
    states = live.wait_status(
        ["predictor-1", "predictor-2"],
        lambda s: s.applied_revision == 5 and deployments_of(s) == {"telco-offers": 4, "second": 5},
        "both replicas ACKed revision 5 with both deployments at their latest revisions",
    )
    for state in states.values():
        assert state.connected
        assert state.revisions_behind == 0
        assert state.last_nack_revision == 0
        assert state.service == "predictor"


def test_a_spec_whose_model_is_missing_is_nacked_and_the_old_config_keeps_serving(live: LiveConfig) -> None:
    live.start_config()
    assert live.publish(telco("no model yet")) == 1
    one = live.start_replica("predictor-1")
    two = live.start_replica("predictor-2")
    live.wait_revision([one, two], 1)

    bad = live.publish(telco("model 9", model={"name": "m", "version": 9}))
    assert bad == 2
    states = live.wait_status(
        ["predictor-1", "predictor-2"],
        lambda s: s.last_nack_revision == 2,
        "both replicas NACKed revision 2",
    )
    for state in states.values():
        assert "model 'm' version 9 cannot be loaded" in state.last_nack_reason, state
        assert state.applied_revision == 1
        assert deployments_of(state) == {"telco-offers": 1}
        assert state.revisions_behind == 1
    assert live.ping_revision(one) == live.ping_revision(two) == 1
    assert one.health() == two.health() == "SERVING"

    # The version appears (as the trainer writes it); the next change that binds it is applied.
    write_model_artifact(live.model_dir / "m" / "9", "m", 9)
    good = live.publish(telco("model 9, now there", model={"name": "m", "version": 9}))
    assert good == 3
    live.wait_revision([one, two], 3)
    states = live.wait_status(
        ["predictor-1", "predictor-2"],
        lambda s: s.applied_revision == 3,
        "both replicas ACKed revision 3",
    )
    for state in states.values():
        assert deployments_of(state) == {"telco-offers": 3}
        assert state.revisions_behind == 0
        assert state.last_nack_revision == 2  # the last refusal stays on record


def test_a_new_replica_serves_its_last_known_good_config_while_the_config_service_is_down(
    live: LiveConfig,
) -> None:
    live.start_config()
    first = live.start_replica("predictor-1")
    live.publish(telco("one"))
    live.publish(small("second", 1.0))
    live.wait_revision([first], 2)
    state_dir = Path(first.env["LIVELOOP_PREDICTOR_STATE_DIR"])
    first.stop()
    live.config.stop()
    assert not port_accepts("127.0.0.1", live.config.port)

    # A new process on the old state directory is ready from its copy alone...
    restarted = live.start_replica("predictor-1", state_dir)
    assert restarted.health() == "SERVING"
    assert live.ping_revision(restarted) == 2
    # ...while one with no copy is not ready until it gets a config.
    blank = live.start_replica("predictor-blank", wait_serving=False)
    assert blank.health() == "NOT_SERVING"
    assert live.ping_revision(blank) == 0
    assert not live.config.running()

    # The config service comes back: the replica reconnects and follows again.
    live.start_config()
    states = live.wait_status(
        ["predictor-1"], lambda s: s.connected and s.applied_revision == 2, "the replica reconnected"
    )
    assert deployments_of(states["predictor-1"]) == {"telco-offers": 1, "second": 2}
    live.wait(lambda: blank.health() == "SERVING", "the replica without a copy is SERVING")
    assert live.ping_revision(blank) == 2
    assert live.publish(small("second", 3.0)) == 3
    live.wait_revision([restarted, blank], 3)
    assert restarted.health() == "SERVING"


# A pre-score plugin whose behaviour changes with its package's version: 1.0 drops plan-a, 1.1
# drops plan-b; either raises when the request's params say `fail`.
DROP_PLAN = """
    from typing import ClassVar
    from libs.common.deployment_spec import PluginStage
    from libs.policy.plugins import PluginParams

    class DropPlan:
        stage: ClassVar[PluginStage] = PluginStage.PRE_SCORE
        Params = PluginParams

        def __init__(self, params):
            pass

        def pre_score(self, request):
            if request.params.get("fail"):
                raise RuntimeError("asked to fail")
            return [offer for offer in request.offers if offer.id != "DROPPED"]
"""


def plugged(description: str) -> dict[str, Any]:
    return {
        **small("plugged", 2.0),
        "description": description,
        "default_number_of_offers": 2,
        "plugins": [{"name": "drop_plan", "stage": "pre_score"}],
    }


def offered(
    live: LiveConfig, replica: ServiceProcess, count: int = 1, **params: Any
) -> tuple[list[str], list[str]]:
    request = predictor_pb2.InvokeRequest(campaign="plugged", customer="c-1", channel="app")
    request.numberoffers.number_value = count
    request.params.struct_value.update(params)
    with open_blocking_channel(replica.target, api_key=live.api_keys.invoke, deadline_seconds=5) as channel:
        reply = predictor_pb2_grpc.PredictorServiceStub(channel).Invoke(request)
    return sorted(row.result.offer for row in reply.final_result), list(reply.warnings)


def test_a_plugin_package_installed_and_upgraded_while_serving_is_used_without_a_restart(
    live: LiveConfig, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    with_plugins = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    install_plugin_package(site, "1.0", DROP_PLAN.replace("DROPPED", "plan-a"), {"drop_plan": "DropPlan"})
    live.config.env.update(with_plugins)
    live.start_config()
    one = live.start_replica("predictor-1", env=with_plugins)
    without = live.start_replica("predictor-2", wait_serving=False)  # a replica whose image lacks it

    assert live.publish(plugged("1.0")) == 1
    live.wait_revision([one], 1)
    assert offered(live, one) == (["plan-b"], [])
    states = live.wait_status(["predictor-2"], lambda s: s.last_nack_revision == 1, "predictor-2 NACKed 1")
    assert "plugins[0].name: unknown plugin 'drop_plan'" in states["predictor-2"].last_nack_reason
    assert without.running()

    # Upgraded in place, as `pip install -U` would: the next revision naming it runs the new code.
    pid = one.popen.pid if one.popen is not None else 0
    install_plugin_package(site, "1.1", DROP_PLAN.replace("DROPPED", "plan-b"), {"drop_plan": "DropPlan"})
    assert live.publish(plugged("1.1")) == 2
    live.wait_revision([one], 2)
    assert offered(live, one) == (["plan-a"], [])
    reported = live.wait_status(["predictor-1"], lambda s: s.applied_revision == 2, "predictor-1 ACKed 2")
    assert reported["predictor-1"].plugins["drop_plan"] == "1.1"  # installed, as its last Ack says
    assert reported["predictor-1"].plugins["exclude_offers"] == "builtin"
    assert one.popen is not None
    assert one.popen.pid == pid

    # Upgraded again with the spec unchanged (no new revision): a refresh binds it again.
    install_plugin_package(site, "1.2", DROP_PLAN.replace("DROPPED", "none"), {"drop_plan": "DropPlan"})
    live.admin(lambda stub: stub.Refresh(config_pb2.RefreshRequest()))
    live.wait(
        lambda: offered(live, one, count=2)[0] == ["plan-a", "plan-b"], "predictor-1 runs drop_plan 1.2"
    )
    assert one.popen.pid == pid

    # A plugin that raises is skipped for that request (on_error: skip, the default), with a warning.
    shown, warnings = offered(live, one, count=2, fail=True)
    assert shown == ["plan-a", "plan-b"]
    assert warnings == ["plugin drop_plan skipped (error): RuntimeError: asked to fail"]
