"""The local stack: real Redis, the five services (two predictor replicas) and Envoy, as processes.

`up` starts everything detached, then a supervisor that starts again whatever exits
(libs/stack/supervisor.py), and records it all in `<state_dir>/stack.json`; `status` reads that
record and asks every process for its health; `restart` stops one process and waits for the
supervisor to bring it back; `down` stops the supervisor, then exactly the processes it recorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.common.health_check import grpc_health
from libs.common.tls import ChannelTls
from libs.stack import supervisor, topology
from libs.stack.certificates import CertificateFiles, ensure_certificates
from libs.stack.credentials import Credentials, ensure_credentials
from libs.stack.envoy_config import (
    REPO_DASHBOARD_DIR,
    REPO_DESCRIPTOR_PATH,
    EnvoyTls,
    Upstream,
    build_envoy_config,
    render,
)
from libs.stack.processes import (
    PortTaken,
    ProcessRecord,
    envoy_binary,
    free_port,
    port_accepts,
    port_is_free,
    process_environment,
    redis_argv,
    start_process,
    stop_processes,
    tail,
)

logger = logging.getLogger(__name__)

STACK_FILE = "stack.json"
TLS_DIR = "tls"  # <state_dir>/tls/: the certificates of a TLS stack


class StackSettings(BaseSettings):
    """Ports and paths of the local stack (env prefix LIVELOOP_STACK_)."""

    model_config = SettingsConfigDict(env_prefix="LIVELOOP_STACK_", extra="ignore", frozen=True)

    state_dir: Path = Path(".liveloop")
    host: str = "127.0.0.1"
    envoy_port: int = Field(topology.ENVOY_PORT, gt=0, le=65535)
    envoy_admin_port: int = Field(topology.ENVOY_ADMIN_PORT, gt=0, le=65535)
    envoy_base_id: int | None = Field(None, ge=0, description="Envoy shared-memory id; default from the port")
    redis_port: int = Field(topology.REDIS_PORT, gt=0, le=65535)
    redis_url: str | None = Field(None, description="Use this Redis instead of starting one")
    redis_maxmemory_mb: int = Field(
        1024,
        ge=16,
        description="Memory bound of the Redis the stack starts; only keys that expire anyway are evicted",
    )
    database_url: str | None = Field(
        None, description="One SQL URL for every service instead of SQLite files"
    )
    config_port: int = Field(topology.CONFIG.port, gt=0, le=65535)
    predictor_ports: list[int] = Field(
        default_factory=lambda: [topology.PREDICTOR.port, topology.PREDICTOR.port + 1]
    )
    ingest_port: int = Field(topology.INGEST.port, gt=0, le=65535)
    trainer_port: int = Field(topology.TRAINER.port, gt=0, le=65535)
    monitor_port: int = Field(topology.MONITOR.port, gt=0, le=65535)
    metrics: bool = Field(True, description="Give every service a Prometheus port")
    config_metrics_port: int = topology.CONFIG.metrics_port
    predictor_metrics_ports: list[int] = Field(
        default_factory=lambda: [topology.PREDICTOR.metrics_port, topology.PREDICTOR.metrics_port + 1]
    )
    ingest_metrics_port: int = topology.INGEST.metrics_port
    trainer_metrics_port: int = topology.TRAINER.metrics_port
    monitor_metrics_port: int = topology.MONITOR.metrics_port
    startup_timeout_seconds: float = Field(45.0, gt=0)
    log_level: str = "INFO"
    tls: bool = Field(
        False,
        description="TLS on every connection of the stack, mutual between services (certificates "
        "created in <state_dir>/tls/); the front door then takes TLS clients only",
    )

    @property
    def certificates(self) -> CertificateFiles:
        return CertificateFiles(self.state_dir.resolve() / TLS_DIR)

    def client_tls(self) -> ChannelTls | None:
        """How the launcher and the CLI on this machine call the stack's services and Envoy."""
        return self.certificates.client_tls() if self.tls else None

    @classmethod
    def on_free_ports(cls, state_dir: Path, **overrides: Any) -> StackSettings:
        """Every port picked free now: for tests and benchmarks that run beside other stacks."""
        chosen: set[int] = set()

        def pick() -> int:
            while (port := free_port()) in chosen:  # the OS may hand a just-closed port out twice
                continue
            chosen.add(port)
            return port

        ports: dict[str, Any] = {
            name: pick()
            for name in (
                "envoy_port",
                "envoy_admin_port",
                "redis_port",
                "config_port",
                "ingest_port",
                "trainer_port",
                "monitor_port",
                "config_metrics_port",
                "ingest_metrics_port",
                "trainer_metrics_port",
                "monitor_metrics_port",
            )
        }
        ports["predictor_ports"] = [pick(), pick()]
        ports["predictor_metrics_ports"] = [pick(), pick()]
        return cls(state_dir=state_dir, **{**ports, **overrides})

    def environment(self) -> dict[str, str]:
        """The LIVELOOP_STACK_* variables that make a `liveloop` subprocess use these settings."""
        variables = {}
        for name, value in self.model_dump(mode="json", exclude_none=True).items():
            text = json.dumps(value) if isinstance(value, list) else str(value)
            variables[f"LIVELOOP_STACK_{name.upper()}"] = text
        return variables

    @model_validator(mode="after")
    def _ports_are_consistent(self) -> StackSettings:
        if not self.predictor_ports:
            raise ValueError("predictor_ports: at least one predictor replica is needed")
        if self.metrics and len(self.predictor_metrics_ports) < len(self.predictor_ports):
            raise ValueError("predictor_metrics_ports: one metrics port per predictor replica is needed")
        return self


@dataclass
class ProcessPlan:
    name: str
    kind: str
    argv: list[str]
    env: dict[str, str]
    port: int | None
    health_service: str | None = None
    metrics_port: int | None = None


@dataclass
class StackRecord:
    state_dir: Path
    envoy_port: int
    envoy_admin_port: int
    processes: list[ProcessRecord] = field(default_factory=list)
    started_at: float = 0.0
    tls: bool = False

    def client_tls(self) -> ChannelTls | None:
        """How to call this stack's processes: with its certificates when it runs TLS."""
        return CertificateFiles(self.state_dir.resolve() / TLS_DIR).client_tls() if self.tls else None

    def save(self) -> None:
        path = self.state_dir / STACK_FILE
        document = {
            "envoy_port": self.envoy_port,
            "envoy_admin_port": self.envoy_admin_port,
            "started_at": self.started_at,
            "tls": self.tls,
            "processes": [record.to_json() for record in self.processes],
        }
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n")
        temporary.replace(path)

    @classmethod
    def load(cls, state_dir: Path) -> StackRecord | None:
        path = state_dir / STACK_FILE
        if not path.exists():
            return None
        document = json.loads(path.read_text())
        return cls(
            state_dir=state_dir,
            envoy_port=int(document["envoy_port"]),
            envoy_admin_port=int(document["envoy_admin_port"]),
            processes=[ProcessRecord.from_json(item) for item in document["processes"]],
            started_at=float(document.get("started_at", 0.0)),
            tls=bool(document.get("tls", False)),
        )


class StackError(RuntimeError):
    pass


def _service_env(
    service: topology.ServiceInfo,
    settings: StackSettings,
    credentials: Credentials,
    port: int,
    metrics_port: int | None,
) -> dict[str, str]:
    prefix = f"LIVELOOP_{service.name.upper()}_"
    values: dict[str, str] = {
        "HOST": settings.host,
        "PORT": str(port),
        "LOG_LEVEL": settings.log_level,
        "API_KEYS_FILE": str(credentials.key_file.resolve()),
        "SHUTDOWN_DRAIN_SECONDS": "0.5",
    }
    if metrics_port is not None:
        values["METRICS_PORT"] = str(metrics_port)
    if settings.tls:
        files = settings.certificates
        values |= {
            "TLS_CERT_FILE": str(files.service_cert),
            "TLS_KEY_FILE": str(files.service_key),
            "TLS_CLIENT_CA_FILE": str(files.ca),  # mutual: only holders of a certificate of this CA
            "TLS_CA_FILE": str(files.ca),
        }
    return {prefix + key: value for key, value in values.items()}


def stack_redis_url(settings: StackSettings, credentials: Credentials) -> str:
    """`redis_url` when the stack uses another Redis, else its own, with the password in the URL."""
    if settings.redis_url is not None:
        return settings.redis_url
    return f"redis://:{credentials.redis_password}@{settings.host}:{settings.redis_port}/0"


def plan_processes(settings: StackSettings, credentials: Credentials) -> list[ProcessPlan]:
    state = settings.state_dir.resolve()
    python = sys.executable
    redis_url = stack_redis_url(settings, credentials)
    config_target = f"{settings.host}:{settings.config_port}"

    def database_url(name: str) -> str:
        return settings.database_url or f"sqlite:///{state / 'data' / (name + '.db')}"

    plans: list[ProcessPlan] = []
    if settings.redis_url is None:
        plans.append(
            ProcessPlan(
                "redis",
                "redis",
                redis_argv(
                    settings.redis_port,
                    state / "redis",
                    persistent=True,
                    maxmemory_mb=settings.redis_maxmemory_mb,
                    password=credentials.redis_password,
                ),
                {},
                settings.redis_port,
            )
        )

    def add(
        service: topology.ServiceInfo, name: str, port: int, metrics_port: int | None, extra: dict[str, str]
    ) -> None:
        env = _service_env(service, settings, credentials, port, metrics_port)
        env.update({f"LIVELOOP_{service.name.upper()}_{key}": value for key, value in extra.items()})
        plans.append(
            ProcessPlan(
                name,
                "service",
                [python, "-m", service.module],
                env,
                port,
                service.health_service,
                metrics_port,
            )
        )

    metrics = settings.metrics
    add(
        topology.CONFIG,
        "config",
        settings.config_port,
        settings.config_metrics_port if metrics else None,
        {
            "DATABASE_URL": database_url("config"),
            # A publish of a gated deployment asks the monitor to evaluate the candidate first.
            "MONITOR_TARGET": f"{settings.host}:{settings.monitor_port}",
            "MONITOR_API_KEY": credentials.admin_key,
        },
    )
    for index, port in enumerate(settings.predictor_ports):
        add(
            topology.PREDICTOR,
            f"predictor-{index + 1}",
            port,
            settings.predictor_metrics_ports[index] if metrics else None,
            {
                "REDIS_URL": redis_url,
                "REPLICA_ID": f"predictor-{index + 1}",
                "CONFIG_TARGET": config_target,
                # Reads its deployments and reports its state: the services' own role.
                "CONFIG_API_KEY": credentials.service_key,
                "STATE_DIR": str(state / f"predictor-{index + 1}"),
                "MODEL_DIR": str(state / "artifacts"),
            },
        )
    add(
        topology.INGEST,
        "ingest",
        settings.ingest_port,
        settings.ingest_metrics_port if metrics else None,
        {
            "DATABASE_URL": database_url("ingest"),
            "REDIS_URL": redis_url,
            "CONFIG_TARGET": config_target,
            # GenerateOptions reads the deployment it fills.
            "CONFIG_API_KEY": credentials.service_key,
            "UPLOAD_DIR": str(state / "uploads"),
        },
    )
    add(
        topology.TRAINER,
        "trainer",
        settings.trainer_port,
        settings.trainer_metrics_port if metrics else None,
        {
            "DATABASE_URL": database_url("trainer"),
            "OFFLINE_STORE_URL": database_url("ingest"),
            "ARTIFACT_DIR": str(state / "artifacts"),
            "CONFIG_TARGET": config_target,
            # Promote publishes a config revision, which takes the admin role.
            "CONFIG_API_KEY": credentials.admin_key,
        },
    )
    add(
        topology.MONITOR,
        "monitor",
        settings.monitor_port,
        settings.monitor_metrics_port if metrics else None,
        {
            "DATABASE_URL": database_url("monitor"),
            "REDIS_URL": redis_url,
            "ARCHIVE_DIR": str(state / "decisions"),
            # EvaluatePolicy reads other systems' decision logs that ingest loaded (read only).
            "OFFLINE_STORE_URL": database_url("ingest"),
            # ...and loads the model versions an evaluated candidate binds (read only).
            "ARTIFACT_DIR": str(state / "artifacts"),
            "CONFIG_TARGET": config_target,
            # Reads deployments and replica states; EvaluatePolicy reads stored revisions.
            "CONFIG_API_KEY": credentials.admin_key,
            # GetDrift compares traffic with the training reference the trainer recorded (admin role).
            "TRAINER_TARGET": f"{settings.host}:{settings.trainer_port}",
            "TRAINER_API_KEY": credentials.admin_key,
            "REPLICA_ID": "monitor-1",
            # Webhooks link to the monitoring page Envoy serves.
            "ALERT_EXTERNAL_URL": f"http://{settings.host}:{settings.envoy_port}/dashboard",
            # The error_rate rule reads each predictor replica's own RPC counters.
            "ALERT_METRICS_URLS": json.dumps(
                [f"http://{settings.host}:{port}/metrics" for port in settings.predictor_metrics_ports]
                if metrics
                else []
            ),
        },
    )
    return plans


def local_upstreams(settings: StackSettings) -> list[Upstream]:
    ports = {
        "config": [settings.config_port],
        "predictor": settings.predictor_ports,
        "ingest": [settings.ingest_port],
        "trainer": [settings.trainer_port],
        "monitor": [settings.monitor_port],
    }
    return [
        Upstream(
            service.name,
            service.grpc_services,
            service.health_service,
            tuple((settings.host, port) for port in ports[service.name]),
        )
        for service in topology.SERVICES
    ]


def envoy_plan(settings: StackSettings, write_config: bool = True) -> ProcessPlan:
    state = settings.state_dir.resolve()
    descriptor = str(REPO_DESCRIPTOR_PATH) if REPO_DESCRIPTOR_PATH.exists() else None
    config = build_envoy_config(
        local_upstreams(settings),
        listen_address=settings.host,
        listen_port=settings.envoy_port,
        admin_address=settings.host,
        admin_port=settings.envoy_admin_port,
        descriptor_path=descriptor,
        dns=False,
        # The monitoring page at GET /dashboard (its data comes from the monitor over REST).
        dashboard_dir=REPO_DASHBOARD_DIR if REPO_DASHBOARD_DIR.is_dir() else None,
        tls=_envoy_tls(settings.certificates) if settings.tls else None,
    )
    config_path = state / "envoy.yaml"
    if write_config:
        config_path.write_text(render(config))
    base_id = settings.envoy_base_id if settings.envoy_base_id is not None else settings.envoy_port
    argv = [
        envoy_binary(),
        "-c",
        str(config_path),
        "--concurrency",
        "1",
        "--base-id",
        str(base_id),
        "--log-level",
        "warning",
        "--drain-time-s",
        "1",
    ]
    return ProcessPlan("envoy", "envoy", argv, {}, settings.envoy_port)


def _envoy_tls(files: CertificateFiles) -> EnvoyTls:
    return EnvoyTls(str(files.service_cert), str(files.service_key), str(files.ca))


def envoy_upstream_health(admin_host: str, admin_port: int) -> dict[str, str]:
    """Envoy's view of every upstream host from /clusters: 'cluster/host:port' -> healthy|<flags>."""
    url = f"http://{admin_host}:{admin_port}/clusters?format=json"
    with urllib.request.urlopen(url, timeout=2) as response:
        document = json.loads(response.read())
    hosts: dict[str, str] = {}
    for cluster in document.get("cluster_statuses", []):
        for host in cluster.get("host_statuses", []):
            address = host["address"]["socket_address"]
            status = host.get("health_status", {})
            flags = [key for key, value in status.items() if value is True and key != "eds_health_status"]
            eds = status.get("eds_health_status", "HEALTHY")
            healthy = not flags and eds == "HEALTHY"
            hosts[f"{cluster['name']}/{address['address']}:{address['port_value']}"] = (
                "healthy" if healthy else ",".join(flags) or eds.lower()
            )
    return hosts


def _check_ports(settings: StackSettings, plans: list[ProcessPlan]) -> None:
    wanted = [(plan.name, plan.port) for plan in plans if plan.port is not None]
    wanted += [(f"{plan.name} metrics", plan.metrics_port) for plan in plans if plan.metrics_port is not None]
    wanted.append(("envoy admin", settings.envoy_admin_port))
    seen: dict[int, str] = {}
    for name, port in wanted:
        assert port is not None
        if port in seen:
            raise StackError(f"port {port} is configured twice: for {seen[port]} and {name}")
        seen[port] = name
        if not port_is_free(settings.host, port):
            raise PortTaken(name, settings.host, port)


Progress = Callable[[str], None]


def up(settings: StackSettings, progress: Progress = lambda _message: None) -> StackRecord:
    """Start the stack; everything it writes is private to the user (0700 directories, 0600 files)."""
    previous = os.umask(0o077)
    try:
        return _up(settings, progress)
    finally:
        os.umask(previous)


def _up(settings: StackSettings, progress: Progress) -> StackRecord:
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)  # customer data, keys, logs: the user's alone
    existing = StackRecord.load(state)
    if existing is not None and any(record.process() is not None for record in existing.processes):
        raise StackError(
            f"a stack is already running from {state} (see `liveloop status`; stop it with `liveloop down`)"
        )
    credentials = ensure_credentials(state)
    if settings.tls:
        ensure_certificates(settings.certificates.directory)
    elif settings.certificates.complete():
        # Never fall back to plaintext silently (a restart without the setting, after a reboot).
        raise StackError(
            f"this state directory ran with TLS (its certificates are in {settings.certificates.directory}): "
            "start it with LIVELOOP_STACK_TLS=true, or remove that directory to run it in plaintext"
        )
    plans = plan_processes(settings, credentials)
    envoy = envoy_plan(settings)
    _check_ports(settings, [*plans, envoy])
    record = StackRecord(
        state, settings.envoy_port, settings.envoy_admin_port, started_at=time.time(), tls=settings.tls
    )
    tls = settings.client_tls()
    logs = state / "logs"

    def launch(plan: ProcessPlan) -> None:
        progress(f"starting {plan.name}")
        env = process_environment(plan.env)
        record.processes.append(
            start_process(plan.name, plan.argv, env, logs / f"{plan.name}.log", plan.kind, plan.port)
        )
        record.save()

    try:
        for plan in plans:
            launch(plan)
            if plan.kind == "redis":
                _wait_for(
                    partial(port_accepts, settings.host, plan.port or 0),
                    plan,
                    record,
                    settings.startup_timeout_seconds,
                )
        deadline = time.monotonic() + settings.startup_timeout_seconds

        def remaining() -> float:
            return max(deadline - time.monotonic(), 1.0)

        for plan in plans:
            if plan.health_service is not None:
                target = f"{settings.host}:{plan.port}"
                _wait_for(
                    partial(_is_serving, target, plan.health_service, (), tls), plan, record, remaining()
                )
                progress(f"{plan.name} is SERVING on {target}")
        # Envoy last: its first health checks then find every upstream serving, and its load
        # balancer starts with all of them (started earlier, it kept sending everything to the
        # first host that became healthy for a few seconds).
        launch(envoy)
        front_door = f"{settings.host}:{settings.envoy_port}"
        for service in topology.SERVICES:
            pin = ((topology.SERVICE_HEADER, service.name),)
            _wait_for(
                partial(_is_serving, front_door, service.health_service, pin, tls), envoy, record, remaining()
            )
        _wait_for(
            partial(_envoy_sees_all_healthy, settings.host, settings.envoy_admin_port),
            envoy,
            record,
            remaining(),
        )
        progress(f"envoy is routing on {front_door}")
        # The supervisor plans the same processes from the same settings.
        (state / supervisor.SETTINGS_FILE).write_text(settings.model_dump_json())
        record.processes.append(
            start_process(
                "supervisor",
                [sys.executable, "-m", "libs.stack.supervisor", str(state.resolve())],
                process_environment({}),
                logs / "supervisor.log",
                "supervisor",
                None,
            )
        )
        record.save()
    except BaseException:
        stop_processes(record.processes)
        (state / STACK_FILE).unlink(missing_ok=True)
        raise
    return record


def _is_serving(
    target: str, service: str, metadata: tuple[tuple[str, str], ...] = (), tls: ChannelTls | None = None
) -> bool:
    return grpc_health(target, service, metadata=metadata, tls=tls) == "SERVING"


def _envoy_sees_all_healthy(admin_host: str, admin_port: int) -> bool:
    hosts = envoy_upstream_health(admin_host, admin_port)
    return bool(hosts) and all(view == "healthy" for view in hosts.values())


def _wait_for(condition: Callable[[], bool], plan: ProcessPlan, record: StackRecord, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    process_record = next(p for p in record.processes if p.name == plan.name)
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if condition():
                return
        if process_record.process() is None:
            raise StackError(
                f"{plan.name} exited during start; last lines of {process_record.log_path}:\n"
                + tail(Path(process_record.log_path))
            )
        time.sleep(0.1)
    raise StackError(
        f"{plan.name} was not healthy within {timeout:.0f}s; last lines of "
        f"{process_record.log_path}:\n" + tail(Path(process_record.log_path))
    )


def status(state_dir: Path, host: str = "127.0.0.1") -> dict[str, Any]:
    record = StackRecord.load(state_dir)
    if record is None:
        return {"running": False, "state_dir": str(state_dir), "processes": []}
    envoy_view: dict[str, str] = {}
    with contextlib.suppress(Exception):
        envoy_view = envoy_upstream_health(host, record.envoy_admin_port)
    tls = record.client_tls()
    rows = []
    for process_record in record.processes:
        process = process_record.process()
        health = "STOPPED"
        if process is not None:
            health = _health(process_record, host, tls)
        row: dict[str, Any] = {
            "name": process_record.name,
            "kind": process_record.kind,
            "pid": process_record.pid,
            "alive": process is not None,
            "port": process_record.port,
            "health": health,
            "restarts": process_record.restarts,
            "log": process_record.log_path,
        }
        if process is not None:
            with contextlib.suppress(Exception):
                row["rss_bytes"] = process.memory_info().rss
        matches = [view for key, view in envoy_view.items() if key.endswith(f":{process_record.port}")]
        if process_record.kind == "service":
            row["envoy"] = matches[0] if matches else "unknown"
        rows.append(row)
    return {
        "running": any(row["alive"] for row in rows),
        "state_dir": str(state_dir),
        "front_door": f"{host}:{record.envoy_port}",
        "tls": record.tls,
        "envoy_admin": f"http://{host}:{record.envoy_admin_port}",
        "processes": rows,
    }


RUNNING = "RUNNING"  # the supervisor's health: it serves nothing, it runs or not


def _health(process_record: ProcessRecord, host: str, tls: ChannelTls | None) -> str:
    if process_record.kind == "supervisor":
        return RUNNING
    if process_record.kind == "service":
        service = topology.SERVICES_BY_NAME[process_record.name.split("-")[0]]
        return grpc_health(f"{host}:{process_record.port}", service.health_service, tls=tls)
    return "SERVING" if port_accepts(host, process_record.port or 0) else "UNREACHABLE"


def is_healthy(row: dict[str, Any]) -> bool:
    return bool(row["health"] == (RUNNING if row["kind"] == "supervisor" else "SERVING"))


def restart(state_dir: Path, name: str, host: str = "127.0.0.1", timeout: float = 60.0) -> dict[str, Any]:
    """Stop one process gracefully (SIGTERM) and wait until the supervisor has started it again
    and it is healthy."""
    record = StackRecord.load(state_dir)
    if record is None:
        raise StackError(f"no stack recorded in {state_dir}")
    by_name = {p.name: p for p in record.processes}
    if name not in by_name or by_name[name].kind == "supervisor":
        names = ", ".join(p.name for p in record.processes if p.kind != "supervisor")
        raise StackError(f"no process '{name}' in this stack; it has {names}")
    if not any(p.kind == "supervisor" and p.process() is not None for p in record.processes):
        raise StackError(
            "the stack's supervisor is not running: restart the stack (`liveloop down`, `liveloop up`)"
        )
    old = by_name[name]
    requests = state_dir / supervisor.REQUESTED_RESTARTS_DIR
    requests.mkdir(exist_ok=True)
    (requests / name).touch()
    stop_processes([old])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = StackRecord.load(state_dir)
        replacement = next((p for p in current.processes if p.name == name), None) if current else None
        if replacement is not None and replacement.pid != old.pid and replacement.process() is not None:
            with contextlib.suppress(Exception):
                if _health(replacement, host, record.client_tls()) == "SERVING":
                    return {
                        "name": name,
                        "old_pid": old.pid,
                        "pid": replacement.pid,
                        "restarts": replacement.restarts,
                    }
        time.sleep(0.1)
    raise StackError(f"{name} was not healthy again within {timeout:.0f}s; see its log {old.log_path}")


def down(state_dir: Path) -> dict[str, Any]:
    record = StackRecord.load(state_dir)
    if record is None:
        return {"stopped": [], "killed": [], "message": f"no stack recorded in {state_dir}"}
    stopped, killed = [], []
    # The supervisor first, so nothing is started again; then the record as it left it.
    supervisors = [p for p in record.processes if p.kind == "supervisor"]
    stopped += [p.name for p in supervisors if p.process() is not None]
    killed += stop_processes(supervisors)
    record = StackRecord.load(state_dir) or record
    # Envoy first so no new traffic arrives, then services, Redis last.
    order = {"envoy": 0, "service": 1, "redis": 2}
    for kind in sorted(order, key=order.__getitem__):
        group = [p for p in record.processes if p.kind == kind]
        alive = [p.name for p in group if p.process() is not None]
        killed += stop_processes(group)
        stopped += alive
    leftovers = [p.name for p in record.processes if p.process() is not None]
    if leftovers:
        raise StackError(f"could not stop: {', '.join(leftovers)}")
    (state_dir / STACK_FILE).unlink(missing_ok=True)
    return {"stopped": stopped, "killed": killed, "message": "stack stopped"}
