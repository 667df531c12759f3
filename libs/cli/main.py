"""The `liveloop` command line: run the local stack and talk to it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.table import Table

from libs.cli import decision_commands, trainer_commands
from libs.cli.config_commands import config_app
from libs.cli.ingest_commands import register as register_ingest_commands
from libs.cli.monitor_commands import monitor_app
from libs.cli.output import (
    JsonFlag,
    StateDir,
    TargetOption,
    console,
    fail,
    front_door,
    front_door_tls,
    stack_settings,
)
from libs.cli.simulate_command import simulate
from libs.common.auth import ApiKeyStore, Role, generate_api_key
from libs.common.client import open_blocking_channel
from libs.common.errors import LiveloopError
from libs.common.health_check import grpc_health
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack import launcher
from libs.stack.certificates import DEFAULT_HOSTS, CertificateFiles, ensure_certificates
from libs.stack.credentials import KEY_FILE
from libs.stack.processes import PortTaken
from libs.stack.topology import SERVICE_HEADER, SERVICES

app = typer.Typer(
    help="liveloop: decision models permanently in production.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="API keys (hashed at rest).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
tls_app = typer.Typer(help="Certificates for TLS inside the stack.", no_args_is_help=True)
app.add_typer(tls_app, name="tls")
app.add_typer(config_app, name="config")
app.add_typer(monitor_app, name="monitor")
register_ingest_commands(app)
trainer_commands.register(app)
app.command("simulate")(simulate)


@app.command()
def up(state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Start Redis, the five services (two predictor replicas) and Envoy, and wait until all are healthy."""
    settings = stack_settings(state_dir)
    try:
        if as_json:
            launcher.up(settings)
        else:
            with console.status("starting the local stack") as spinner:
                launcher.up(settings, progress=lambda message: spinner.update(message))
    except (PortTaken, launcher.StackError, LiveloopError, FileNotFoundError) as exc:
        fail(str(exc))
    _print_status(settings.state_dir, settings.host, as_json)


def _print_status(state_dir: Path, host: str, as_json: bool) -> dict[str, Any]:
    report = launcher.status(state_dir, host)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return report
    if not report["processes"]:
        console.print(f"no stack is running from {state_dir}")
        return report
    door = (
        f"{report['front_door']} (TLS only, CA {Path(report['state_dir']) / 'tls' / 'ca.pem'})"
        if report["tls"]
        else report["front_door"]
    )
    table = Table(title=f"liveloop stack: front door {door}, admin {report['envoy_admin']}")
    for column in ("process", "pid", "port", "health", "envoy", "restarts", "memory"):
        table.add_column(column)
    for row in report["processes"]:
        health = row["health"]
        colour = "green" if launcher.is_healthy(row) else "red"
        memory = f"{row['rss_bytes'] / 2**20:.0f} MiB" if "rss_bytes" in row else "-"
        table.add_row(
            row["name"],
            str(row["pid"]) if row["alive"] else "-",
            str(row["port"] or "-"),
            f"[{colour}]{health}[/{colour}]",
            row.get("envoy", "-"),
            str(row.get("restarts", 0)),
            memory,
        )
    console.print(table)
    return report


@app.command()
def status(state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Show every process of the local stack: pid, port, health, Envoy's view of it, and how many
    times the supervisor started it again. Exit code 0 only when all are healthy."""
    settings = stack_settings(state_dir)
    report = _print_status(settings.state_dir, settings.host, as_json)
    healthy = report["processes"] and all(launcher.is_healthy(row) for row in report["processes"])
    raise typer.Exit(0 if healthy else 1)


@app.command()
def restart(
    name: Annotated[str, typer.Argument(help="A process of the stack (`liveloop status`), e.g. predictor-1")],
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait until it is healthy again")] = 60.0,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Restart one process of the local stack: a graceful stop (SIGTERM, in-flight calls finish),
    then the supervisor starts it again; returns once it is healthy."""
    settings = stack_settings(state_dir)
    try:
        if as_json:
            result = launcher.restart(settings.state_dir, name, settings.host, timeout)
        else:
            with console.status(f"restarting {name}"):
                result = launcher.restart(settings.state_dir, name, settings.host, timeout)
    except launcher.StackError as exc:
        fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        console.print(
            f"{name} restarted: pid {result['old_pid']} -> {result['pid']} (restart {result['restarts']})"
        )


@app.command()
def down(state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Stop every process `liveloop up` started (by pid), leaving nothing behind."""
    settings = stack_settings(state_dir)
    try:
        result = launcher.down(settings.state_dir)
    except launcher.StackError as exc:
        fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        console.print(result["message"] + (f": {', '.join(result['stopped'])}" if result["stopped"] else ""))
        if result["killed"]:
            console.print(f"[yellow]had to kill: {', '.join(result['killed'])}[/yellow]")


@app.command()
def ping(
    count: Annotated[int, typer.Option(min=1, max=100000, help="How many calls")] = 4,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Call PredictorService.Ping through the front door and show which replica answered."""
    resolved_target, api_key = front_door(state_dir, target)
    with open_blocking_channel(
        resolved_target, api_key=api_key, deadline_seconds=5, tls=front_door_tls(state_dir)
    ) as channel:
        stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        replies = []
        for _ in range(count):
            started = time.perf_counter()
            try:
                reply = stub.Ping(predictor_pb2.PingRequest())
            except grpc.RpcError as exc:
                fail(f"Ping through {resolved_target} failed: {exc.code().name}: {exc.details()}")
            replies.append(
                {
                    "replica_id": reply.replica_id,
                    "config_revision": reply.config_revision,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                }
            )
    if as_json:
        sys.stdout.write(json.dumps(replies, indent=2) + "\n")
        return
    for reply in replies:
        console.print(
            f"Ping via {resolved_target}: replica {reply['replica_id']}, "
            f"config revision {reply['config_revision']}, {reply['latency_ms']:.1f} ms"
        )


@app.command()
def health(state_dir: StateDir = None, target: TargetOption = None, as_json: JsonFlag = False) -> None:
    """Ask every service for its gRPC health through the front door."""
    resolved_target, _key = front_door(state_dir, target)
    report = {
        service.name: grpc_health(
            resolved_target,
            service.health_service,
            timeout=3,
            metadata=((SERVICE_HEADER, service.name),),
            tls=front_door_tls(state_dir),
        )
        for service in SERVICES
    }
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        for name, state in report.items():
            colour = "green" if state == "SERVING" else "red"
            console.print(f"{name:<10} [{colour}]{state}[/{colour}] (through {resolved_target})")
    raise typer.Exit(0 if all(state == "SERVING" for state in report.values()) else 1)


def _key_file(out: Path | None, state_dir: Path | None) -> Path:
    """--out, else the key file of the local stack in --state-dir (what its services read)."""
    return out if out is not None else stack_settings(state_dir).state_dir / KEY_FILE


@keys_app.command("create")
def keys_create(
    out: Annotated[
        Path | None,
        typer.Option(help="Key file (hashes only) to create or extend; default: the local stack's"),
    ] = None,
    role: Annotated[
        Role, typer.Option(help="invoke (applications), service (liveloop's services) or admin")
    ] = Role.INVOKE,
    name: Annotated[str, typer.Option(help="Who or what uses the key")] = "client",
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an API key: its hash is added to the key file, the key itself is printed once. Running
    services read the file again within a second: the key works without a restart."""
    path = _key_file(out, state_dir)
    try:
        store = ApiKeyStore.load(path) if path.exists() else ApiKeyStore([])
    except LiveloopError as exc:
        fail(exc.message)
    api_key, record = generate_api_key(role, name)
    store.add(record)
    try:
        store.save(path)
    except OSError as exc:
        fail(f"cannot write the key file {path}: {exc.strerror or exc}")
    if as_json:
        sys.stdout.write(json.dumps({"key_id": record.key_id, "role": role.value, "api_key": api_key}) + "\n")
    else:
        console.print(f"created {role.value} key {record.key_id} in {path}; it is shown only now:")
        console.print(api_key, soft_wrap=True)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="Id of the key (`liveloop keys list`)")],
    file: Annotated[Path | None, typer.Option("--file", help="Key file; default: the local stack's")] = None,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Revoke a key: it is refused within a second, without a restart."""
    path = _key_file(file, state_dir)
    try:
        store = ApiKeyStore.load(path)
        record = store.remove(key_id)
    except LiveloopError as exc:
        fail(exc.message)
    store.save(path)
    if as_json:
        sys.stdout.write(json.dumps({"key_id": record.key_id, "revoked": True}) + "\n")
    else:
        console.print(f"revoked {record.role.value} key {record.key_id} ({record.name}) in {path}")


@keys_app.command("list")
def keys_list(
    file: Annotated[Path | None, typer.Argument(help="Key file; default: the local stack's")] = None,
    file_option: Annotated[
        Path | None,
        typer.Option("--file", help="Key file (as `keys revoke --file`); default: the local stack's"),
    ] = None,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """List key ids, roles and names (never the keys)."""
    try:
        store = ApiKeyStore.load(_key_file(file or file_option, state_dir))
    except LiveloopError as exc:
        fail(exc.message)
    rows = [
        {"key_id": r.key_id, "role": r.role.value, "name": r.name, "created_at": r.created_at}
        for r in store.records
    ]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table("key id", "role", "name", "created")
    for row in rows:
        table.add_row(row["key_id"], row["role"], row["name"], row["created_at"])
    console.print(table)


@tls_app.command("create")
def tls_create(
    out: Annotated[Path, typer.Option(help="Directory for the certificates and keys (created, mode 0700)")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Another name or address the services are reached by (repeatable)"),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a certificate authority, a certificate for the services and Envoy (server and client:
    mutual TLS) and one for command-line clients, for docker compose or a cluster. The services'
    certificate names 127.0.0.1, localhost, envoy and every service; add others with --host."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a directory")
    if CertificateFiles(out).complete():
        fail(f"{out} already holds certificates; remove them first to create new ones")
    try:
        files = ensure_certificates(out, (*DEFAULT_HOSTS, *(host or [])))
    except OSError as exc:
        fail(f"cannot write certificates to {out}: {exc.strerror or exc}")
    paths = {
        "ca": str(files.ca),
        "service_cert": str(files.service_cert),
        "service_key": str(files.service_key),
        "client_cert": str(files.client_cert),
        "client_key": str(files.client_key),
    }
    if as_json:
        sys.stdout.write(json.dumps(paths, indent=2) + "\n")
    else:
        console.print(f"created a certificate authority and certificates in {out}:")
        for name, path in paths.items():
            console.print(f"  {name:<13} {path}")


app.command()(decision_commands.invoke)
app.command()(decision_commands.respond)


if __name__ == "__main__":
    app()
