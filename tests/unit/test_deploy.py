"""Offline checks of the container and cluster files: Dockerfile, docker-compose.yml and deploy/.

Nothing here needs Docker, a cluster, promtool or the network. The Kubernetes manifests are validated
against the JSON schemas bundled with kubernetes-validate (strict: unknown fields are errors), and every
environment variable, port, console script and probe is cross-checked against the services' settings
classes and pyproject.toml. A settings class that cannot be imported fails these tests; it never skips them.
The training Job's command is checked against the real entrypoint: torchrun's own argument parser, the
module it starts, and the task document its init container writes (run here, as the Job would run it).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prometheus_metrics import exported_series, metric_names

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ENVOY_CONFIG = DEPLOY / "envoy" / "envoy.yaml"
ENVOY_DESCRIPTOR = DEPLOY / "envoy" / "liveloop.pb"
SYNC_SCRIPT = ROOT / "tools" / "sync_k8s_envoy.py"
API_KEYS_SECRET_FILE = DEPLOY / "secrets" / "api-keys.json"  # git-ignored; created by `liveloop keys create`
API_KEYS_PATH = "/etc/liveloop/api-keys.json"


@dataclass(frozen=True)
class Service:
    name: str
    settings_module: str
    settings_class: str
    health_service: str
    # The agreed metrics port: the settings classes leave metrics off by default (None), so the deploy
    # files are the ones that turn it on, on this port.
    metrics_port: int

    @property
    def prefix(self) -> str:
        return f"LIVELOOP_{self.name.upper()}_"

    @property
    def script(self) -> str:
        return f"liveloop-{self.name}"


SERVICES = {
    service.name: service
    for service in (
        Service(
            "config", "services.config.settings", "ConfigSettings", "liveloop.config.v1.ConfigService", 9451
        ),
        Service(
            "predictor",
            "services.predictor.settings",
            "PredictorSettings",
            "liveloop.predictor.v1.PredictorService",
            9461,
        ),
        Service(
            "ingest", "services.ingest.settings", "IngestSettings", "liveloop.ingest.v1.IngestService", 9471
        ),
        Service(
            "trainer",
            "services.trainer.settings",
            "TrainerSettings",
            "liveloop.trainer.v1.TrainerService",
            9481,
        ),
        Service(
            "monitor",
            "services.monitor.settings",
            "MonitorSettings",
            "liveloop.monitor.v1.MonitorService",
            9491,
        ),
    )
}
SERVICE_NAMES = sorted(SERVICES)


# --------------------------------------------------------------------------------------------------
# helpers


def settings_class(service: Service) -> Any:
    """The service's settings class. An ImportError here is a test failure, on purpose."""
    module = importlib.import_module(service.settings_module)
    cls = getattr(module, service.settings_class)
    assert cls.model_config.get("env_prefix") == service.prefix
    return cls


def default_ports(service: Service) -> tuple[int, int]:
    """(gRPC port, metrics port) every deploy file must use for this service."""
    fields = settings_class(service).model_fields
    port = fields["port"].default
    metrics = fields["metrics_port"].default
    if metrics is None:
        metrics = service.metrics_port
    assert isinstance(port, int)
    assert port > 0, f"{service.name}: the settings class has no fixed default port"
    return port, metrics


def check_env(
    service: Service, env: dict[str, str | None], where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every LIVELOOP_ variable is a field of this service's settings, and the values load."""
    cls = settings_class(service)
    fields = set(cls.model_fields)
    problems = []
    for name in env:
        if not name.startswith("LIVELOOP_"):
            continue
        if not name.startswith(service.prefix):
            problems.append(f"{name}: not this service's prefix {service.prefix}")
        elif name.removeprefix(service.prefix).lower() not in fields:
            problems.append(
                f"{name}: {cls.__name__} has no field {name.removeprefix(service.prefix).lower()!r}"
            )
    assert not problems, f"{where}:\n" + "\n".join(problems)

    # The values themselves must load (an enum typo or a non-numeric port fails here, not in production).
    for name in [name for name in os.environ if name.startswith("LIVELOOP_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(service.prefix) and value is not None and "$" not in value:
            monkeypatch.setenv(name, value)
    cls()


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def project_version() -> str:
    return str(pyproject()["project"]["version"])


# --------------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages() -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name) of the root Dockerfile."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"

    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], match[1])
            current = stages[match[2]] = Stage(match[2], base)
        elif current is None:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            name, _, default = rest.partition("=")
            global_args[name] = default.strip('"')
        else:
            current.instructions.append((instruction, rest))
    return global_args, stages


def stage_chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, outermost first."""
    chain = [stages[name]]
    while chain[0].base in stages:
        chain.insert(0, stages[chain[0].base])
    return chain


def stage_env(chain: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in chain:
        for instruction, rest in stage.instructions:
            if instruction == "ENV":
                for token in shlex.split(rest):
                    name, sep, value = token.partition("=")
                    assert sep, f"use the ENV name=value form: {rest}"
                    env[name] = value
    return env


def stage_last(chain: list[Stage], wanted: str) -> str | None:
    found = None
    for stage in chain:
        for instruction, rest in stage.instructions:
            if instruction == wanted:
                found = rest
    return found


def test_dockerfile_build_stage_installs_torch_from_a_configurable_index() -> None:
    global_args, stages = dockerfile_stages()
    assert global_args["PYTHON_IMAGE"] == "python:3.11-slim"
    build = stages["build"]
    args = {
        rest.partition("=")[0]: rest.partition("=")[2] for kind, rest in build.instructions if kind == "ARG"
    }
    assert args["TORCH_INDEX_URL"] in ('""', "")
    torch_pins = [dep for dep in pyproject()["project"]["dependencies"] if dep.startswith("torch==")]
    assert torch_pins == [f"torch=={args['TORCH_VERSION']}"], "Dockerfile TORCH_VERSION != pyproject pin"
    assert not re.search(r"https?://", DOCKERFILE.read_text()), "no index host is hardcoded"
    runs = " ".join(rest for kind, rest in build.instructions if kind == "RUN")
    assert '--index-url "$TORCH_INDEX_URL"' in runs
    assert "pip install ." in runs


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_dockerfile_target_runs_its_console_script_as_non_root(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = SERVICES[name]
    _, stages = dockerfile_stages()
    assert name in stages, f"no Dockerfile target {name!r}"
    chain = stage_chain(stages, name)
    assert chain[0].base == "python:3.11-slim"
    assert "build" not in [stage.name for stage in chain], "service images must not carry the build stage"

    cmd = stage_last(chain, "CMD")
    assert cmd is not None
    assert json.loads(cmd) == [service.script]
    scripts = pyproject()["project"]["scripts"]
    assert scripts[service.script] == f"services.{name}.__main__:main"

    port, metrics = default_ports(service)
    exposed = {
        int(token.split("/")[0])
        for kind, rest in chain[-1].instructions
        if kind == "EXPOSE"
        for token in rest.split()
    }
    assert exposed == {port, metrics}

    env = stage_env(chain)
    assert env[f"{service.prefix}HOST"] == "0.0.0.0"
    assert env[f"{service.prefix}LOG_FORMAT"] == "json"
    assert env[f"{service.prefix}PORT"] == str(port)
    assert env[f"{service.prefix}METRICS_PORT"] == str(metrics)
    check_env(service, dict(env), f"Dockerfile target {name}", monkeypatch)

    user = stage_last(chain, "USER")
    assert user is not None
    assert user.split(":")[0] == "10001"


def test_dockerfile_predictor_reads_models_where_the_trainer_writes_them() -> None:
    _, stages = dockerfile_stages()
    trainer = stage_env(stage_chain(stages, "trainer"))
    predictor = stage_env(stage_chain(stages, "predictor"))
    assert predictor["LIVELOOP_PREDICTOR_MODEL_DIR"] == trainer["LIVELOOP_TRAINER_ARTIFACT_DIR"]
    assert trainer["LIVELOOP_TRAINER_ARTIFACT_DIR"].startswith("/var/lib/liveloop/")  # the uid's own tree


def test_dockerignore_keeps_everything_but_the_sources_out() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "start from nothing and allow what the build needs"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert {"pyproject.toml", "README.md", "libs", "services"} <= allowed
    assert not allowed & {"deploy", ".venv", ".git", ".liveloop", "tests"}
    copied = re.findall(r"^COPY (?!--from)(.+?) \S+$", DOCKERFILE.read_text(), re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert source in allowed, f"COPY {source} is excluded by .dockerignore"


# --------------------------------------------------------------------------------------------------
# docker-compose.yml


def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def compose_env(definition: dict[str, Any]) -> dict[str, str | None]:
    environment = definition.get("environment", {})
    if isinstance(environment, list):
        return {
            item.partition("=")[0]: (item.partition("=")[2] if "=" in item else None) for item in environment
        }
    return {name: None if value is None else str(value) for name, value in environment.items()}


def container_port(entry: Any) -> int:
    if isinstance(entry, dict):
        return int(entry["target"])
    return int(str(entry).split(":")[-1].split("/")[0])


def test_compose_file_names_every_service() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "envoy", "prometheus", *SERVICE_NAMES} <= set(services)
    assert services["redis"]["image"].startswith("redis:7")
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "liveloop"
    assert "healthcheck" in services["postgres"]
    assert services["envoy"]["image"].startswith("envoyproxy/envoy:v1.")
    assert {container_port(p) for p in services["envoy"]["ports"]} == {8080, 9902}
    assert "127.0.0.1:9902:9902" in services["envoy"]["ports"]  # probes and stats: this host only


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_compose_service_builds_its_target_and_runs_its_script(name: str) -> None:
    definition = compose()["services"][name]
    _, stages = dockerfile_stages()
    build = definition["build"]
    assert build.get("context", ".") == "."
    assert build["target"] == name
    assert build["target"] in stages
    assert json.loads(stage_last(stage_chain(stages, name), "CMD") or "[]") == [SERVICES[name].script]
    assert SERVICES[name].script in pyproject()["project"]["scripts"]
    if "command" in definition:
        command = definition["command"]
        first = command[0] if isinstance(command, list) else shlex.split(command)[0]
        assert first in pyproject()["project"]["scripts"]
    assert definition["image"] == f"liveloop/{name}:{project_version()}"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_compose_env_vars_are_settings_fields(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = SERVICES[name]
    env = compose_env(compose()["services"][name])
    assert env[f"{service.prefix}HOST"] == "0.0.0.0"
    assert env[f"{service.prefix}LOG_FORMAT"] == "json"
    assert env[f"{service.prefix}API_KEYS_FILE"] == API_KEYS_PATH
    fields = settings_class(service).model_fields
    if "config_target" in fields:
        assert env[f"{service.prefix}CONFIG_TARGET"] == f"config:{default_ports(SERVICES['config'])[0]}"
    if "trainer_target" in fields:
        assert env[f"{service.prefix}TRAINER_TARGET"] == f"trainer:{default_ports(SERVICES['trainer'])[0]}"
    if "monitor_target" in fields:
        assert env[f"{service.prefix}MONITOR_TARGET"] == f"monitor:{default_ports(SERVICES['monitor'])[0]}"
    if "redis_url" in fields:
        assert env[f"{service.prefix}REDIS_URL"] == "redis://:${REDIS_PASSWORD}@redis:6379/0"
    if "database_url" in fields:
        assert (env[f"{service.prefix}DATABASE_URL"] or "").startswith("postgresql+psycopg://")
    check_env(service, env, f"docker-compose.yml service {name}", monkeypatch)


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_compose_ports_are_the_settings_defaults(name: str) -> None:
    service = SERVICES[name]
    definition = compose()["services"][name]
    port, metrics = default_ports(service)
    env = compose_env(definition)
    assert env[f"{service.prefix}PORT"] == str(port)
    assert env[f"{service.prefix}METRICS_PORT"] == str(metrics)
    exposed = [int(str(p).split("/")[0]) for p in definition.get("expose", [])]
    exposed += [container_port(p) for p in definition.get("ports", [])]
    assert exposed, f"{name} exposes no port"
    assert set(exposed) <= {port, metrics}


def test_compose_predictor_scales() -> None:
    predictor = compose()["services"]["predictor"]
    assert "container_name" not in predictor
    assert "ports" not in predictor, "a fixed host port would make `--scale predictor=N` collide"
    assert predictor["deploy"]["replicas"] >= 2


def _compose_mounts(definition: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read-only) of a compose service's short-syntax volumes."""
    mounts = {}
    for volume in definition.get("volumes", []):
        source, target, *options = str(volume).split(":")
        mounts[target] = (source, "ro" in options)
    return mounts


def test_compose_trainer_and_predictors_share_the_artifact_volume() -> None:
    document = compose()
    trainer, predictor = document["services"]["trainer"], document["services"]["predictor"]
    artifact_dir = compose_env(trainer)["LIVELOOP_TRAINER_ARTIFACT_DIR"]
    model_dir = compose_env(predictor)["LIVELOOP_PREDICTOR_MODEL_DIR"]
    # The same path in both: the registry's artifact_uri (file://<artifact_dir>/<name>/<version>) is
    # where a predictor finds that version under its model_dir.
    assert artifact_dir == model_dir
    assert artifact_dir is not None
    trainer_source, trainer_read_only = _compose_mounts(trainer)[artifact_dir]
    predictor_source, predictor_read_only = _compose_mounts(predictor)[model_dir]
    assert trainer_source == predictor_source
    assert trainer_source in document["volumes"], "a named volume, not a bind mount"
    assert not trainer_read_only
    assert predictor_read_only


def test_compose_ingest_presents_a_config_key_and_stages_uploads_on_a_volume() -> None:
    document = compose()
    ingest = document["services"]["ingest"]
    env = compose_env(ingest)
    assert "LIVELOOP_INGEST_CONFIG_API_KEY" in env  # passed through from the shell
    upload_dir = env["LIVELOOP_INGEST_UPLOAD_DIR"]
    source, read_only = _compose_mounts(ingest)[upload_dir]
    assert source in document["volumes"]
    assert not read_only


def test_compose_trainer_reads_the_offline_store_and_presents_an_admin_key() -> None:
    services = compose()["services"]
    trainer, ingest = compose_env(services["trainer"]), compose_env(services["ingest"])
    assert trainer["LIVELOOP_TRAINER_OFFLINE_STORE_URL"] == ingest["LIVELOOP_INGEST_DATABASE_URL"]
    assert services["trainer"]["environment"]["PGPASSWORD"] == services["ingest"]["environment"]["PGPASSWORD"]
    # passed through from the shell (no value in the file), like the predictors' key
    assert "LIVELOOP_TRAINER_CONFIG_API_KEY" in trainer
    assert trainer["LIVELOOP_TRAINER_CONFIG_API_KEY"] is None


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_compose_healthcheck_asks_the_service_for_its_own_health(name: str) -> None:
    test = compose()["services"][name]["healthcheck"]["test"]
    # The check reads the service's port and TLS files from its own settings (tested in
    # tests/integration/test_service_lifecycle.py).
    assert test == ["CMD", "python", "-m", "libs.common.health_check", name]


def test_compose_dependencies_wait_on_real_health_checks() -> None:
    services = compose()["services"]
    for name, definition in services.items():
        depends_on = definition.get("depends_on", {})
        if isinstance(depends_on, list):
            depends_on = {target: {"condition": "service_started"} for target in depends_on}
        for target, condition in depends_on.items():
            assert target in services, f"{name} depends on unknown {target}"
            if condition.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], (
                    f"{name} waits for {target}, which has no healthcheck"
                )
    for name in ("config", "predictor", "ingest", "trainer", "monitor"):
        conditions = services[name]["depends_on"]
        for store in ("redis", "postgres"):
            if store in conditions:
                assert conditions[store]["condition"] == "service_healthy"


def test_compose_mounts_point_at_files_in_the_repo() -> None:
    document = compose()
    missing = []
    for name, definition in document["services"].items():
        for volume in definition.get("volumes", []):
            if isinstance(volume, dict):
                source = volume.get("source", "") if volume.get("type") == "bind" else ""
            else:
                source = str(volume).split(":")[0]
            if source.startswith((".", "/")) and not (ROOT / source).exists():
                missing.append(f"{name}: {source}")
    for name, secret in document.get("secrets", {}).items():
        path = (ROOT / secret["file"]).resolve()
        if path != API_KEYS_SECRET_FILE.resolve() and not path.exists():
            missing.append(f"secret {name}: {secret['file']}")
    assert not missing, "missing files (run `make envoy-config` for deploy/envoy/):\n" + "\n".join(missing)


def test_compose_mounts_api_keys_and_the_envoy_descriptor_where_they_are_read() -> None:
    document = compose()
    secrets = document["secrets"]
    assert (ROOT / secrets["api-keys"]["file"]).resolve() == API_KEYS_SECRET_FILE.resolve()
    for name in SERVICE_NAMES:
        targets = [s["target"] for s in document["services"][name]["secrets"] if s["source"] == "api-keys"]
        assert targets == [API_KEYS_PATH]
    envoy_mounts = {
        str(v).split(":")[1]: str(v).split(":")[0] for v in document["services"]["envoy"]["volumes"]
    }
    assert envoy_mounts["/etc/envoy/envoy.yaml"] == "./deploy/envoy/envoy.yaml"
    envoy_config = importlib.import_module("libs.stack.envoy_config")
    assert envoy_mounts[envoy_config.CONTAINER_DESCRIPTOR_PATH] == "./deploy/envoy/liveloop.pb"


def test_compose_prometheus_loads_the_repo_rules() -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in prometheus["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    rule_files = yaml.safe_load(PROMETHEUS.read_text())["rule_files"]
    for rule_file in rule_files:
        assert mounts[rule_file] == "./deploy/prometheus/" + Path(rule_file).name


# --------------------------------------------------------------------------------------------------
# Kubernetes manifests

K8S_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
TRAINING_JOB = K8S / "training-job.yaml"
TRAINING_SPEC = K8S / "training-spec.yaml"
BATCH_ENTRYPOINT = "services.trainer.batch"


def k8s_documents(names: list[str] | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in K8S_MANIFESTS:
        if names is None or path.name in names:
            for document in load_yaml_documents(path):
                yield path, document


def k8s_objects(kind: str) -> dict[str, dict[str, Any]]:
    """Objects of one kind by name (by generateName for those created with `kubectl create`)."""
    return {
        doc["metadata"].get("name") or doc["metadata"]["generateName"]: doc
        for _, doc in k8s_documents()
        if doc["kind"] == kind
    }


def test_kubernetes_validate_has_schemas_offline() -> None:
    from kubernetes_validate import utils

    version = utils.latest_version()
    schemas = Path(utils.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
    assert (schemas / "_definitions.json").is_file()
    assert tuple(int(part) for part in version.split(".")[:2]) >= (1, 30)


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=lambda p: p.name)
def test_k8s_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    from kubernetes_validate import utils

    version = utils.latest_version()  # the newest schemas bundled with kubernetes-validate
    documents = load_yaml_documents(path)
    assert documents, f"{path.name} is empty"
    errors = []
    for document in documents:
        label = f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"
        try:
            utils.validate(document, version, strict=True)
        except utils.ValidationError as exc:
            errors.append(f"{label}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")
        except utils.SchemaNotFoundError as exc:
            errors.append(f"{label}: {exc.message}")
        if document.get("kind") != "Namespace":
            assert document["metadata"].get("namespace") == "liveloop", label
    assert not errors, f"{path.name} against Kubernetes {version} (strict):\n" + "\n".join(errors)


def test_kustomization_lists_every_manifest_but_the_example_secret_and_the_training_job() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "liveloop"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    # A Job would run on every `kubectl apply -k` and its pod template cannot change: `kubectl create -f`.
    expected = {p.name for p in K8S_MANIFESTS} - {"secret.example.yaml", TRAINING_JOB.name}
    assert set(listed) == expected
    assert listed[0] == "namespace.yaml"


def test_k8s_secret_references_match_the_example_secret() -> None:
    example = {doc["metadata"]["name"]: doc for doc in load_yaml_documents(K8S / "secret.example.yaml")}
    references = []
    for path, document in k8s_documents():
        if path.name == "secret.example.yaml":
            continue
        for found in _walk(document):
            if "secretKeyRef" in found:
                references.append((found["secretKeyRef"]["name"], found["secretKeyRef"]["key"]))
            if "secret" in found and isinstance(found["secret"], dict) and "secretName" in found["secret"]:
                for item in found["secret"].get("items", []):
                    references.append((found["secret"]["secretName"], item["key"]))
    assert references
    for name, key in references:
        assert name in example, f"Secret {name} is not shown in secret.example.yaml"
        assert key in example[name]["stringData"], f"key {key} of Secret {name} is not shown"


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_k8s_deployment_env_ports_and_probes_match_the_service(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = SERVICES[name]
    deployment = k8s_objects("Deployment")[name]
    container = _only_container(deployment)
    assert container["image"] == f"liveloop/{name}:{project_version()}"

    env: dict[str, str | None] = {item["name"]: item.get("value") for item in container["env"]}
    assert len(env) == len(container["env"]), "an env var is set twice"
    assert env[f"{service.prefix}HOST"] == "0.0.0.0"
    assert env[f"{service.prefix}LOG_FORMAT"] == "json"
    assert env[f"{service.prefix}API_KEYS_FILE"] == API_KEYS_PATH
    check_env(service, env, f"deploy/k8s/{name}.yaml", monkeypatch)
    fields = settings_class(service).model_fields
    for target, upstream in (
        ("config_target", "config"),
        ("trainer_target", "trainer"),
        ("monitor_target", "monitor"),
    ):
        if target in fields:
            expected = f"{upstream}:{default_ports(SERVICES[upstream])[0]}"
            assert env[f"{service.prefix}{target.upper()}"] == expected, target

    port, metrics = default_ports(service)
    assert env[f"{service.prefix}PORT"] == str(port)
    assert env[f"{service.prefix}METRICS_PORT"] == str(metrics)
    assert {p["containerPort"] for p in container["ports"]} == {port, metrics}

    probes = {
        kind: container[kind]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }
    assert {"readinessProbe", "livenessProbe"} <= set(probes)
    for kind, probe in probes.items():
        assert probe["grpc"]["port"] == port, kind
    # Ready means this service is SERVING; alive only that the server answers at all.
    assert probes["readinessProbe"]["grpc"]["service"] == service.health_service
    for kind in ("startupProbe", "livenessProbe"):
        if kind in probes:
            assert probes[kind]["grpc"].get("service", "") in ("", service.health_service), kind

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    keys = mounts[str(Path(API_KEYS_PATH).parent)]
    assert keys["readOnly"] is True
    secret = volumes[keys["name"]]["secret"]
    assert secret["secretName"] == "liveloop-api-keys"
    assert [item["path"] for item in secret["items"]] == [Path(API_KEYS_PATH).name]


def test_redis_refuses_clients_without_the_password_and_no_store_has_a_default_password() -> None:
    services = compose()["services"]
    redis = services["redis"]
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")  # no default
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert all(
        compose_env(definition).get("PGPASSWORD") in (None, "${POSTGRES_PASSWORD}")
        for definition in services.values()
    )
    assert '--requirepass "$$REDIS_PASSWORD"' in redis["command"][-1]
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][-1]
    users = [
        name
        for name, definition in services.items()
        if any(key.endswith("_REDIS_URL") for key in compose_env(definition))
    ]
    assert sorted(users) == ["ingest", "monitor", "predictor"]

    container = k8s_objects("StatefulSet")["redis"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:3] == ["redis-server", "--requirepass", "$(REDIS_PASSWORD)"]
    secret_env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"]}
    assert (
        secret_env["REDIS_PASSWORD"]
        == secret_env["REDISCLI_AUTH"]
        == {"name": "liveloop-redis", "key": "password"}
    )
    for name in ("predictor", "ingest", "monitor"):
        env = _only_container(k8s_objects("Deployment")[name])["env"]
        names = [item["name"] for item in env]
        url = next(item["value"] for item in env if item["name"].endswith("_REDIS_URL"))
        assert url == "redis://:$(REDIS_PASSWORD)@redis:6379/0", name
        # Kubernetes expands $(VAR) only from variables defined before it.
        assert names.index("REDIS_PASSWORD") < names.index(f"LIVELOOP_{name.upper()}_REDIS_URL"), name


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_k8s_service_exposes_the_default_ports(name: str) -> None:
    service = k8s_objects("Service")[name]
    port, metrics = default_ports(SERVICES[name])
    assert {p["port"] for p in service["spec"]["ports"]} == {port, metrics}
    deployment = k8s_objects("Deployment")[name]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_predictor_is_headless_autoscaled_and_disruption_budgeted() -> None:
    assert k8s_objects("Service")["predictor"]["spec"]["clusterIP"] == "None"
    deployment = k8s_objects("Deployment")["predictor"]
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    hpa = k8s_objects("HorizontalPodAutoscaler")["predictor"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "predictor",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = k8s_objects("PodDisruptionBudget")["predictor"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_trainer_keeps_artifacts_on_a_volume() -> None:
    claim = k8s_objects("PersistentVolumeClaim")["trainer-artifacts"]
    deployment = k8s_objects("Deployment")["trainer"]
    container = _only_container(deployment)
    artifact_dir = next(e["value"] for e in container["env"] if e["name"] == "LIVELOOP_TRAINER_ARTIFACT_DIR")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == artifact_dir)
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def _volume_at(
    pod: dict[str, Any], container: dict[str, Any], path: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volumeMount, volume) of the container's mount that holds `path`."""
    holding = [
        m
        for m in container["volumeMounts"]
        if Path(path) == Path(m["mountPath"]) or Path(m["mountPath"]) in Path(path).parents
    ]
    assert holding, f"{container['name']}: nothing is mounted at {path}"
    mount = max(holding, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return mount, volume


def test_k8s_trainer_reads_the_offline_store_and_presents_an_admin_key() -> None:
    trainer = _env(_only_container(k8s_objects("Deployment")["trainer"]))
    ingest = _env(_only_container(k8s_objects("Deployment")["ingest"]))
    assert (
        trainer["LIVELOOP_TRAINER_OFFLINE_STORE_URL"]["value"]
        == ingest["LIVELOOP_INGEST_DATABASE_URL"]["value"]
    )
    assert trainer["PGPASSWORD"] == ingest["PGPASSWORD"]
    reference = trainer["LIVELOOP_TRAINER_CONFIG_API_KEY"]["valueFrom"]["secretKeyRef"]
    predictor = _env(_only_container(k8s_objects("Deployment")["predictor"]))
    predictor_reference = predictor["LIVELOOP_PREDICTOR_CONFIG_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert reference["name"] == predictor_reference["name"] == "liveloop-api-keys"
    assert reference["key"] != predictor_reference["key"], "the trainer needs an admin key of its own"
    assert reference["optional"] is True


def test_k8s_ingest_presents_a_config_key_and_stages_uploads_on_a_volume() -> None:
    deployment = k8s_objects("Deployment")["ingest"]
    container = _only_container(deployment)
    env = _env(container)
    reference = env["LIVELOOP_INGEST_CONFIG_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert reference == {"name": "liveloop-api-keys", "key": "ingest-config-api-key", "optional": True}
    secret = next(d for d in load_yaml_documents(DEPLOY / "k8s" / "secret.example.yaml") if "stringData" in d)
    assert "ingest-config-api-key" in secret["stringData"]
    upload_dir = env["LIVELOOP_INGEST_UPLOAD_DIR"]["value"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert upload_dir in mounts, "the root filesystem is read-only: uploads need a volume"
    assert not mounts[upload_dir].get("readOnly", False)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[upload_dir]["name"]]


def test_k8s_predictors_read_the_trainer_artifacts() -> None:
    claim = k8s_objects("PersistentVolumeClaim")["trainer-artifacts"]
    # replicas on any node mount it (on a one-node cluster ReadWriteOnce would do: deploy/README.md)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    trainer = k8s_objects("Deployment")["trainer"]
    predictor = k8s_objects("Deployment")["predictor"]
    artifact_dir = _env(_only_container(trainer))["LIVELOOP_TRAINER_ARTIFACT_DIR"]["value"]
    model_dir = _env(_only_container(predictor))["LIVELOOP_PREDICTOR_MODEL_DIR"]["value"]
    assert artifact_dir == model_dir, "artifact_uri paths must mean the same files in both"
    mount, volume = _volume_at(predictor["spec"]["template"]["spec"], _only_container(predictor), model_dir)
    assert mount["mountPath"] == model_dir
    assert mount["readOnly"] is True
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}


# --------------------------------------------------------------------------------------------------
# The training Job: torchrun over the trainer's distributed entrypoint


def _training_job() -> dict[str, Any]:
    (job,) = load_yaml_documents(TRAINING_JOB)
    assert job["kind"] == "Job"
    return job


def _training_container() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, the one container: the batch training entrypoint)."""
    pod = _training_job()["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    (train,) = pod["containers"]
    return pod, train


def test_k8s_training_job_is_a_bounded_one_off_run() -> None:
    job = _training_job()
    # created (never applied) with a fresh name each time; not applied with the stack
    assert "name" not in job["metadata"]
    assert job["metadata"]["generateName"].endswith("-")
    assert TRAINING_JOB.name not in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    spec = job["spec"]
    assert 0 < spec["backoffLimit"] <= 3
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["ttlSecondsAfterFinished"] > 0
    pod, train = _training_container()
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["runAsNonRoot"] is True
    # the trainer Deployment's image, so the entrypoint is the one the trainer itself runs
    assert train["image"] == _only_container(k8s_objects("Deployment")["trainer"])["image"]
    assert train["securityContext"]["runAsUser"] == 10001
    # No Service selects the Job's pods (the trainer Service must not send RPCs to a training run).
    labels = spec["template"]["metadata"]["labels"]
    for name, service in k8s_objects("Service").items():
        assert not service["spec"]["selector"].items() <= labels.items(), f"Service {name} selects the Job"


def _batch_arguments(train: dict[str, Any]) -> argparse.Namespace:
    python, flag, module, *arguments = train["command"]
    assert (python, flag, module) == ("python", "-m", BATCH_ENTRYPOINT)
    batch = importlib.import_module(BATCH_ENTRYPOINT)
    return batch.argument_parser().parse_args(arguments)  # exits on an unknown option


def test_k8s_training_job_runs_the_batch_entrypoint_with_two_ddp_workers() -> None:
    pod, train = _training_container()
    arguments = _batch_arguments(train)
    assert arguments.author == "$(TRAINING_JOB_NAME)"
    # the spec asks for two workers: the entrypoint runs them under torchrun (DDP over gloo, loopback)
    spec_text = yaml.safe_load(TRAINING_SPEC.read_text())["data"]["spec.yaml"]
    job_spec = importlib.import_module("libs.common.training_spec")
    assert job_spec.parse_training_spec(spec_text).workers == 2
    env = _env(train)
    assert env["GLOO_SOCKET_IFNAME"]["value"] == "lo"
    # the spec file is the training-spec ConfigMap, mounted read-only
    mount, volume = _volume_at(pod, train, str(arguments.spec))
    assert mount["readOnly"] is True
    configmap = k8s_objects("ConfigMap")[volume["configMap"]["name"]]
    (item,) = [
        i
        for i in volume["configMap"]["items"]
        if Path(mount["mountPath"]) / i["path"] == Path(arguments.spec)
    ]
    assert item["key"] in configmap["data"]


def test_k8s_training_job_env_vars_are_trainer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    _, train = _training_container()
    env = {name: item.get("value") for name, item in _env(train).items()}
    check_env(SERVICES["trainer"], env, f"{TRAINING_JOB.name} container train", monkeypatch)
    # Kubernetes leaves a $(NAME) of an undefined variable as it is: every one must be defined
    for token in train["command"] + train.get("args", []):
        for name in re.findall(r"\$\((\w+)\)", token):
            assert name in env, f"$({name}) is not defined"
    train_env = _env(train)
    assert train_env["TRAINING_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/job-name']"
    )
    # the same registry as the trainer service, the offline store is ingest's database, and the
    # password reaches libpq as in the services
    trainer = _env(_only_container(k8s_objects("Deployment")["trainer"]))
    ingest = _env(_only_container(k8s_objects("Deployment")["ingest"]))
    assert train_env["LIVELOOP_TRAINER_DATABASE_URL"] == trainer["LIVELOOP_TRAINER_DATABASE_URL"]
    assert (
        train_env["LIVELOOP_TRAINER_OFFLINE_STORE_URL"]["value"]
        == ingest["LIVELOOP_INGEST_DATABASE_URL"]["value"]
    )
    assert train_env["PGPASSWORD"] == ingest["PGPASSWORD"]


def test_k8s_training_job_writes_into_the_trainer_artifacts_volume() -> None:
    pod, train = _training_container()
    trainer = k8s_objects("Deployment")["trainer"]
    artifact_dir = _env(_only_container(trainer))["LIVELOOP_TRAINER_ARTIFACT_DIR"]["value"]
    assert _env(train)["LIVELOOP_TRAINER_ARTIFACT_DIR"]["value"] == artifact_dir
    mount, volume = _volume_at(pod, train, artifact_dir)
    assert mount["mountPath"] == artifact_dir
    assert not mount.get("readOnly", False)
    assert volume["persistentVolumeClaim"]["claimName"] == "trainer-artifacts"


def test_k8s_training_job_fails_at_once_on_an_invalid_spec(tmp_path: Path) -> None:
    """The container's command, run here with its own environment on a spec that names no training
    set: exit 2 before it connects to anything, which the pod failure policy turns into a failed Job."""
    _, train = _training_container()
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("model_name: take-up\nlabel: accepted\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("LIVELOOP_")}
    env |= {name: item["value"] for name, item in _env(train).items() if "value" in item}
    _python, flag, module, _, *rest = train["command"]
    rest = [re.sub(r"\$\((\w+)\)", "training-x7k2p", token) for token in rest]
    completed = subprocess.run(
        [sys.executable, flag, module, str(spec_file), *rest],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr
    refused = json.loads(completed.stdout.splitlines()[-1])
    assert refused["event"] == "refused"
    assert "training_set" in refused["message"]
    rules = _training_job()["spec"]["podFailurePolicy"]["rules"]
    fail_job = [rule for rule in rules if rule["action"] == "FailJob"]
    assert [
        (rule["onExitCodes"]["containerName"], rule["onExitCodes"]["operator"], rule["onExitCodes"]["values"])
        for rule in fail_job
    ] == [("train", "In", [2])]


def test_k8s_every_pod_runs_non_root_read_only_and_bounded() -> None:
    problems = []
    kinds = set()
    for _, document in k8s_documents():
        if document["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        kinds.add(document["kind"])
        metadata = document["metadata"]
        name = f"{document['kind']}/{metadata.get('name') or metadata['generateName']}"
        pod = document["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        if pod_security.get("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot")
        if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile")
        containers = pod.get("initContainers", []) + pod["containers"]
        for container in containers:
            security = container.get("securityContext", {})
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: allowPrivilegeEscalation")
            if security.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}: capabilities.drop")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: readOnlyRootFilesystem")
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(part, {})):
                    problems.append(f"{name}: resources.{part}")
            if ":" not in container["image"] or container["image"].endswith(":latest"):
                problems.append(f"{name}: image without a pinned tag")
        # every pod of a liveloop image runs as the image's user
        liveloop_image = any(c["image"].startswith("liveloop/") for c in containers)
        if (metadata.get("name") in SERVICES or liveloop_image) and pod_security.get("runAsUser") != 10001:
            problems.append(f"{name}: runAsUser 10001")
    assert not problems, "\n".join(problems)
    assert kinds == {"Deployment", "StatefulSet", "Job"}


# --------------------------------------------------------------------------------------------------
# Envoy ConfigMap: a copy of deploy/envoy/ that tools/sync_k8s_envoy.py keeps current


def _envoy_configmap() -> dict[str, Any]:
    return k8s_objects("ConfigMap")["envoy"]


def test_k8s_envoy_mounts_its_configmap() -> None:
    deployment = k8s_objects("Deployment")["envoy"]
    container = _only_container(deployment)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/envoy")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "envoy"
    assert "envoy.yaml" in _envoy_configmap()["data"]
    assert "/etc/envoy/envoy.yaml" in container["args"]
    # The admin (127.0.0.1:9901) is no container port: only the front door and the probe listener.
    assert {p["containerPort"] for p in container["ports"]} == {8080, 9902}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "probes"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9902"
    config = yaml.safe_load(_envoy_configmap()["data"]["envoy.yaml"])
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_k8s_envoy_configmap_is_the_generated_config() -> None:
    if not ENVOY_CONFIG.exists():
        pytest.skip("deploy/envoy/envoy.yaml not generated yet (make envoy-config)")
    config = ENVOY_CONFIG.read_bytes()
    configmap = _envoy_configmap()
    hint = "stale: run `.venv/bin/python tools/sync_k8s_envoy.py`"
    assert configmap["data"]["envoy.yaml"].encode("utf-8") == config, hint
    descriptor = ENVOY_DESCRIPTOR.read_bytes() if ENVOY_DESCRIPTOR.exists() else None
    if descriptor is not None:
        assert base64.b64decode(configmap["binaryData"]["liveloop.pb"]) == descriptor, hint
    else:
        assert "binaryData" not in configmap, hint
    digest = hashlib.sha256(config + (descriptor or b"")).hexdigest()
    annotations = k8s_objects("Deployment")["envoy"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["liveloop.dev/envoy-config-sha256"] == digest, hint


def test_k8s_envoy_configmap_fits_kubectl_apply() -> None:
    """Client-side `kubectl apply` copies the whole object into an annotation, and annotations are
    limited to 256 KiB: the config (with the dashboard page inlined) and the descriptor must fit."""
    size = len(json.dumps(_envoy_configmap(), separators=(",", ":")))
    assert size < 200 * 1024, f"the envoy ConfigMap is {size} bytes"


def test_sync_script_copies_the_config_byte_for_byte(tmp_path: Path) -> None:
    manifest = tmp_path / "envoy.yaml"
    manifest.write_text((K8S / "envoy.yaml").read_text())
    descriptor = tmp_path / "liveloop.pb"
    descriptor.write_bytes(bytes(range(256)) * 3)
    cases = [
        "static_resources:\n  listeners: []\n",
        "admin:\n  address: {socket_address: {address: 0.0.0.0, port_value: 9901}}\n\n\n",
        "  indented first line: 1\nno: trailing newline",
        "windows: line\r\nendings: here\r\n",
        "key: 'tabs\tand # hashes and: colons'\n",
    ]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(SYNC_SCRIPT), "--config", str(config), "--descriptor", str(descriptor)]
        return subprocess.run(
            [*argv, "--manifest", str(manifest), *extra],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    config = tmp_path / "config.yaml"
    for case in cases:
        config.write_bytes(case.encode("utf-8"))
        assert run().returncode == 0
        assert run("--check").returncode == 0
        documents = load_yaml_documents(manifest)
        configmap = next(d for d in documents if d["kind"] == "ConfigMap")
        assert configmap["data"]["envoy.yaml"] == case
        assert base64.b64decode(configmap["binaryData"]["liveloop.pb"]) == descriptor.read_bytes()
        # everything above the ConfigMap survives
        assert [d["kind"] for d in documents] == ["Service", "Deployment", "ConfigMap"]
    config.write_text("changed: true\n")
    stale = run("--check")
    assert stale.returncode == 1
    assert "stale" in stale.stderr


# --------------------------------------------------------------------------------------------------
# Prometheus

# Every series the code defines (Counter, Gauge, Histogram in libs/ and services/), plus Prometheus's `up`.
ALLOWED_METRICS = exported_series() | {"up"}


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, method) (rate(foo_bucket{a="b", c=~"x|y"}[5m])))'
        " / on (job) group_left bar offset 1h > 1e3 and up"
    )
    assert metric_names(expr) == {"foo_bucket", "bar", "up"}


def test_prometheus_scrapes_every_metrics_port() -> None:
    document = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    for name in SERVICE_NAMES:
        _, metrics = default_ports(SERVICES[name])
        job = jobs[name]
        if name == "predictor":
            # every replica, however many `--scale` made
            (dns,) = job["dns_sd_configs"]
            assert dns["names"] == ["predictor"]
            assert dns["port"] == metrics
        else:
            targets = [t for group in job["static_configs"] for t in group["targets"]]
            assert targets == [f"{name}:{metrics}"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert document["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_alert_rules_use_only_the_exported_metrics() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    assert len(rules) >= 3
    used: set[str] = set()
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule.get("alert")
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric found"
        assert names <= ALLOWED_METRICS, f"{rule['alert']} uses {sorted(names - ALLOWED_METRICS)}"
        used |= names
    assert {"up", "liveloop_rpc_requests_total", "liveloop_rpc_latency_seconds_bucket"} <= used
    # the monitor's consumer and its own alert rules are watched too
    assert {
        "liveloop_monitor_decision_log_lag_entries",
        "liveloop_monitor_decision_log_trimmed_total",
        "liveloop_monitor_alerts_firing",
    } <= used


def test_exported_metrics_are_read_from_the_code() -> None:
    series = exported_series()
    # a counter, a histogram and a gauge, each with the series prometheus_client gives it
    assert {"liveloop_rpc_requests_total", "liveloop_monitor_decision_log_trimmed_total"} <= series
    assert {"liveloop_rpc_latency_seconds_bucket", "liveloop_config_propagation_seconds_count"} <= series
    assert {"liveloop_monitor_decision_log_lag_entries", "liveloop_monitor_alerts_firing"} <= series
    assert "liveloop_rpc_latency_seconds" not in series, "a histogram has no series of its bare name"


# --------------------------------------------------------------------------------------------------
# the local stack (libs/stack/launcher.py) configures the services the same way: only settings fields


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_local_stack_env_vars_are_settings_fields(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from libs.stack.credentials import ensure_credentials
    from libs.stack.launcher import StackSettings, plan_processes

    plans = [
        plan
        for plan in plan_processes(StackSettings(state_dir=tmp_path), ensure_credentials(tmp_path))
        if plan.kind == "service" and plan.name.split("-")[0] == name
    ]
    assert plans
    for plan in plans:
        env: dict[str, str | None] = dict(plan.env)
        check_env(SERVICES[name], env, f"the launcher's {plan.name}", monkeypatch)
        fields = settings_class(SERVICES[name]).model_fields
        for target in ("config_target", "trainer_target"):
            if target in fields:
                assert f"{SERVICES[name].prefix}{target.upper()}" in env, f"{plan.name}: {target} not set"


# --------------------------------------------------------------------------------------------------
# NetworkPolicy: every connection a manifest configures is allowed, and nothing else


def _pod_templates() -> dict[str, dict[str, Any]]:
    """Pod spec by the pod's app.kubernetes.io/name label (Deployments, StatefulSets, the training Job)."""
    templates = {}
    for _path, document in k8s_documents():
        if document["kind"] in ("Deployment", "StatefulSet", "Job"):
            template = document["spec"]["template"]
            templates[template["metadata"]["labels"]["app.kubernetes.io/name"]] = template["spec"]
    return templates


def _configured_connections() -> set[tuple[str, str, int]]:
    """(caller, callee, port) from every container's *_TARGET, *_URL and Envoy's upstreams."""
    service_ports = {name: default_ports(SERVICES[name])[0] for name in SERVICE_NAMES}
    connections = {("envoy", name, port) for name, port in service_ports.items()}
    address = re.compile(r"^(?:[a-z+]+://)?(?:[^@/]*@)?(?P<host>[a-z-]+):(?P<port>\d+)")
    for caller, spec in _pod_templates().items():
        for container in spec["containers"]:
            for item in container.get("env", []):
                if not item["name"].endswith(("_TARGET", "_URL")) or "value" not in item:
                    continue
                found = address.match(item["value"])
                if found and found["host"] in {*service_ports, "redis", "postgres"}:
                    connections.add((caller, found["host"], int(found["port"])))
    return connections


def _admitted_connections() -> tuple[set[tuple[str, str, int]], set[tuple[str, int]], bool]:
    """(caller, callee, port) admitted from pods of this namespace, (callee, port) open to everyone
    or the whole cluster, and whether a default-deny policy selects every pod."""
    admitted, open_ports, default_deny = set(), set(), False
    for _, policy in k8s_documents(["network-policy.yaml"]):
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        if spec["podSelector"] == {}:
            default_deny = spec.get("ingress") == []
            continue
        callee = spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for rule in spec["ingress"]:
            ports = [item["port"] for item in rule["ports"]]
            sources = rule.get("from")
            for port in ports:
                if sources is None or any("namespaceSelector" in source for source in sources):
                    open_ports.add((callee, port))
                    continue
                for source in sources:
                    admitted.add(
                        (source["podSelector"]["matchLabels"]["app.kubernetes.io/name"], callee, port)
                    )
    return admitted, open_ports, default_deny


def test_network_policies_admit_exactly_the_configured_connections() -> None:
    admitted, open_ports, default_deny = _admitted_connections()
    assert default_deny, "no policy denies ingress to every pod by default"
    configured = _configured_connections()
    assert {
        ("predictor", "redis", 6379),
        ("monitor", "trainer", 50081),
        ("config", "monitor", 50091),
    } <= configured
    assert configured - admitted == set(), "configured but blocked"
    assert admitted - configured == set(), "admitted but nobody is configured to connect"
    # From outside the namespace: Envoy's front door and probe port, and every service's metrics port.
    metrics = {(name, default_ports(SERVICES[name])[1]) for name in SERVICE_NAMES}
    assert open_ports == {("envoy", 8080), ("envoy", 9902)} | metrics
    labels = set(_pod_templates())
    assert {callee for _, callee, _ in admitted} | {callee for callee, _ in open_ports} <= labels


# --------------------------------------------------------------------------------------------------
# TLS inside the stack: docker-compose.tls.yml and the deploy/k8s/tls overlay

K8S_TLS = K8S / "tls"
COMPOSE_TLS = ROOT / "docker-compose.tls.yml"
ENVOY_TLS_CONFIG = DEPLOY / "envoy" / "envoy-tls.yaml"
TLS_DIR = "/etc/liveloop/tls"
TLS_FILES = {"ca.pem", "service.pem", "service-key.pem"}  # what `liveloop tls create` writes, in part


def _strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge, for what the TLS patches use: maps merge key by key (unless the
    patch says `$patch: replace`), lists of named things merge by name (mountPath for mounts)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        if patch.get("$patch") == "replace":
            return {key: value for key, value in patch.items() if key != "$patch"}
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _strategic_merge(base[key], value) if key in base else value
        return merged
    if isinstance(patch, list) and isinstance(base, list) and patch and isinstance(patch[0], dict):
        key = next((k for k in ("name", "mountPath") if k in patch[0]), None)
        if key is not None:
            merged_list = list(base)
            for item in patch:
                index = next(
                    (i for i, existing in enumerate(merged_list) if existing.get(key) == item[key]), None
                )
                if index is None:
                    merged_list.append(item)
                else:
                    merged_list[index] = _strategic_merge(merged_list[index], item)
            return merged_list
    return patch


def _tls_overlay() -> dict[str, dict[str, Any]]:
    """The Deployments as `kubectl apply -k deploy/k8s/tls` would make them."""
    kustomization = yaml.safe_load((K8S_TLS / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["..", "envoy-tls.yaml"]
    deployments = {name: json.loads(json.dumps(doc)) for name, doc in k8s_objects("Deployment").items()}
    patched = set()
    for entry in kustomization["patches"]:
        patch = yaml.safe_load((K8S_TLS / entry["path"]).read_text())
        name = patch["metadata"]["name"]
        deployments[name] = _strategic_merge(deployments[name], patch)
        patched.add(name)
    assert patched == {*SERVICE_NAMES, "envoy"}
    return deployments


def _mounted_secret_dirs(deployment: dict[str, Any], container: dict[str, Any], secret: str) -> set[str]:
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return {
        m["mountPath"]
        for m in container["volumeMounts"]
        if volumes[m["name"]].get("secret", {}).get("secretName") == secret
    }


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_k8s_tls_overlay_makes_each_service_mutual_tls_with_probes_that_can_speak_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes_validate import utils

    deployment = _tls_overlay()[name]
    utils.validate(deployment, utils.latest_version(), strict=True)
    service = SERVICES[name]
    container = _only_container(deployment)
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert len(env) == len(container["env"]), "an env var is set twice"
    check_env(service, env, f"deploy/k8s/tls patch of {name}", monkeypatch)
    assert _mounted_secret_dirs(deployment, container, "liveloop-tls") == {TLS_DIR}
    expected = {"TLS_CERT_FILE": "service.pem", "TLS_KEY_FILE": "service-key.pem"}
    expected |= {"TLS_CLIENT_CA_FILE": "ca.pem", "TLS_CA_FILE": "ca.pem"}
    for setting, file_name in expected.items():
        assert env[service.prefix + setting] == f"{TLS_DIR}/{file_name}"
    health = ["python", "-m", "libs.common.health_check", name, "--timeout", "3"]
    assert container["readinessProbe"] == {
        "exec": {"command": health},
        "periodSeconds": 5,
        "timeoutSeconds": 5,
        "failureThreshold": 2,
    }
    for kind in ("startupProbe", "livenessProbe"):
        assert container[kind]["exec"]["command"] == [*health, "--whole-server"]
        assert "grpc" not in container[kind]


def test_k8s_tls_overlay_gives_envoy_the_tls_config_and_the_certificates_it_names() -> None:
    from kubernetes_validate import utils

    deployment = _tls_overlay()["envoy"]
    utils.validate(deployment, utils.latest_version(), strict=True)
    container = _only_container(deployment)
    config_path = container["args"][container["args"].index("--config-path") + 1]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts[str(Path(config_path).parent)]["configMap"]["name"] == "envoy-tls"
    configmap = next(d for d in load_yaml_documents(K8S_TLS / "envoy-tls.yaml") if d["kind"] == "ConfigMap")
    assert configmap["metadata"]["name"] == "envoy-tls"
    config_text = configmap["data"]["envoy.yaml"]
    assert config_text == ENVOY_TLS_CONFIG.read_text()
    # Every file the TLS config reads is in the mounted Secret, or the base ConfigMap (descriptor).
    named = set(re.findall(r"filename: (\S+)", config_text))
    assert named == {f"{TLS_DIR}/{f}" for f in TLS_FILES}
    assert _mounted_secret_dirs(deployment, container, "liveloop-tls") == {TLS_DIR}
    assert "/etc/envoy/liveloop.pb" in config_text
    assert mounts["/etc/envoy"]["configMap"]["name"] == "envoy"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    digest = hashlib.sha256(ENVOY_TLS_CONFIG.read_bytes()).hexdigest()
    assert annotations["liveloop.dev/envoy-tls-config-sha256"] == digest


def test_committed_tls_overlay_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(SYNC_SCRIPT), "--check", "--tls-config", str(ENVOY_TLS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_compose_tls_override_makes_each_service_mutual_tls(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = SERVICES[name]
    override = yaml.safe_load(COMPOSE_TLS.read_text())["services"][name]
    env = compose_env(compose()["services"][name]) | compose_env(override)
    check_env(service, env, f"docker-compose.tls.yml service {name}", monkeypatch)
    assert f"./deploy/secrets/tls:{TLS_DIR}:ro" in override["volumes"]
    assert env[f"{service.prefix}TLS_CERT_FILE"] == f"{TLS_DIR}/service.pem"
    assert (
        env[f"{service.prefix}TLS_CLIENT_CA_FILE"]
        == env[f"{service.prefix}TLS_CA_FILE"]
        == f"{TLS_DIR}/ca.pem"
    )


def test_compose_tls_override_gives_envoy_the_tls_config() -> None:
    envoy = yaml.safe_load(COMPOSE_TLS.read_text())["services"]["envoy"]
    assert "./deploy/envoy/envoy-tls.yaml:/etc/envoy/envoy.yaml:ro" in envoy["volumes"]
    assert f"./deploy/secrets/tls:{TLS_DIR}:ro" in envoy["volumes"]
    # The base file mounts the config at the same path: the override replaces it.
    assert "./deploy/envoy/envoy.yaml:/etc/envoy/envoy.yaml:ro" in compose()["services"]["envoy"]["volumes"]
