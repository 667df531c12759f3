"""`liveloop config`: publish deployment specs, inspect revisions, roll back, and see which revision
every replica serves. Every command calls ConfigService through the front door with the admin key."""

from __future__ import annotations

import contextlib
import enum
import json
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
import yaml
from google.protobuf.timestamp_pb2 import Timestamp
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from libs.cli.corpus_files import resolve_corpus_files
from libs.cli.ingest_commands import read_table_rows
from libs.cli.output import (
    JsonFlag,
    StateDir,
    TargetOption,
    console,
    emit_json,
    errors,
    fail,
    front_door,
    front_door_tls,
    plain,
)
from libs.common.client import open_blocking_channel
from libs.common.deployment_spec import spec_diff
from libs.common.errors import InvalidArgument
from libs.common.paging import MAX_PAGE_SIZE
from libs.common.settings import ClientSettings
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc

config_app = typer.Typer(
    help="Deployment specs: publish, inspect, diff, roll back; which revision every replica serves.",
    no_args_is_help=True,
)


MessageOption = Annotated[str, typer.Option("--message", "-m", help="Reason recorded in the history")]
DryRunFlag = Annotated[bool, typer.Option("--dry-run", help="Validate and show the diff; store nothing")]
DiffFlag = Annotated[bool, typer.Option("--diff/--no-diff", help="Print the diff of the change")]

# How often `status --wait-for-head` asks again: short enough to return soon after the last ACK.
STATUS_POLL_SECONDS = 0.2
_FORMATS = {
    ".yaml": config_pb2.SPEC_FORMAT_YAML,
    ".yml": config_pb2.SPEC_FORMAT_YAML,
    ".json": config_pb2.SPEC_FORMAT_JSON,
}


def _table(title: str, columns: list[str], wrapping: tuple[str, ...] = ()) -> Table:
    """Short columns never wrap; the free-text ones in `wrapping` fold to fit the terminal."""
    table = Table(title=title)
    for column in columns:
        if column in wrapping:
            table.add_column(column, overflow="fold", ratio=1)
        else:
            table.add_column(column, no_wrap=True)
    return table


def _endpoint(state_dir: Path | None, target: str | None) -> tuple[str, str | None]:
    """The front door and admin key, resolved like every other command (flags, LIVELOOP_TARGET /
    LIVELOOP_API_KEY, then the local stack's record and credentials)."""
    return front_door(state_dir, target, role="admin")


@contextlib.contextmanager
def _config_service(
    state_dir: Path | None, target: str | None, at_least_seconds: float = 0.0
) -> Iterator[_ConfigCalls]:
    resolved_target, api_key = _endpoint(state_dir, target)
    deadline = max(ClientSettings().deadline_seconds, at_least_seconds)
    with open_blocking_channel(
        resolved_target, api_key=api_key, deadline_seconds=deadline, tls=front_door_tls(state_dir)
    ) as channel:
        yield _ConfigCalls(config_pb2_grpc.ConfigServiceStub(channel), resolved_target)


class _ConfigCalls:
    """ConfigService calls whose failures become one clear line (status and the server's message)."""

    def __init__(self, stub: Any, target: str) -> None:
        self.stub = stub
        self.target = target

    def call(self, method: str, request: Any) -> Any:
        rpc: Callable[[Any], Any] = getattr(self.stub, method)
        try:
            return rpc(request)
        except grpc.RpcError as exc:
            code = exc.code()
            hint = ""
            if code == grpc.StatusCode.UNAVAILABLE:
                hint = " (is the stack running? `liveloop up`, or pass --target)"
            fail(f"{method} via {self.target} failed: {code.name}: {exc.details()}{hint}")


def _time(value: Timestamp) -> str:
    if not value.seconds and not value.nanos:
        return ""
    return value.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _print_diff(diff: str) -> None:
    """A unified diff with + lines green and - lines red (no markup: spec text is printed as is)."""
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            style = "bold"
        elif line.startswith("+"):
            style = "green"
        elif line.startswith("-"):
            style = "red"
        elif line.startswith("@@"):
            style = "cyan"
        else:
            style = ""
        console.print(Text(line, style=style), soft_wrap=True)


def _change_kind(kind: int) -> str:
    return config_pb2.ChangeKind.Name(kind).removeprefix("CHANGE_KIND_").lower()


def _deployment_json(deployment: config_pb2.Deployment) -> dict[str, Any]:
    return {
        "name": deployment.name,
        "revision": deployment.revision,
        "author": deployment.author,
        "updated_at": _time(deployment.updated_at),
        "checksum": deployment.checksum,
    }


def _read_spec(
    file: Path, state_dir: Path | None = None, target: str | None = None
) -> tuple[str, config_pb2.SpecFormat]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{file} is not UTF-8 text")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    try:
        resolved = resolve_corpus_files(text, file, lambda table: read_table_rows(state_dir, target, table))
    except InvalidArgument as error:
        fail(f"{file}: {error}")
    if resolved is not None:  # corpora read from their files: the rows travel in the spec
        return resolved, config_pb2.SPEC_FORMAT_JSON
    return text, _FORMATS.get(file.suffix.lower(), config_pb2.SPEC_FORMAT_UNSPECIFIED)


def _report_change(
    deployment: str, done: str, revision: int, changed: bool, dry_run: bool, diff: str, show_diff: bool
) -> None:
    """One line saying what happened to the deployment (`done`: "published"), then the diff."""
    name = escape(deployment)
    if not changed:
        console.print(f"{name}: unchanged (revision {revision})")
    elif dry_run:
        console.print(f"{name}: dry run, nothing stored; the change would be revision {revision}")
    else:
        console.print(f"{name}: [green]{escape(done)}[/green] as revision {revision}")
    if diff and show_diff:
        _print_diff(diff)


@config_app.command()
def publish(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Deployment spec, YAML or JSON")],
    dry_run: DryRunFlag = False,
    show_diff: DiffFlag = True,
    message: MessageOption = "",
    expected_revision: Annotated[
        int, typer.Option(min=0, help="Refuse unless the deployment is at this revision (0: no check)")
    ] = 0,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--evaluate",
            help="Estimate the candidate on the logged decisions against the live revision first",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Store it even if the deployment's publish gate refuses it")
    ] = False,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Validate a spec and store it as a new immutable revision; every replica receives it."""
    text, spec_format = _read_spec(file, state_dir, target)
    request = config_pb2.PublishRequest(
        spec_text=text,
        format=spec_format,
        dry_run=dry_run,
        message=message,
        expected_revision=expected_revision,
        evaluate=evaluate,
        force=force,
    )
    # A publish may wait for the candidate's evaluation (the config service allows it 120 s).
    with _config_service(state_dir, target, at_least_seconds=130.0) as service:
        reply = service.call("Publish", request)
    if as_json:
        emit_json(
            {
                "deployment": reply.deployment,
                "revision": reply.revision,
                "changed": reply.changed,
                "dry_run": reply.dry_run,
                "diff": reply.diff,
                "warnings": list(reply.warnings),
            }
            | ({"evaluation": plain(reply.evaluation)} if reply.HasField("evaluation") else {})
        )
        return
    for warning in reply.warnings:
        errors.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    if reply.HasField("evaluation"):
        _print_evaluation(reply.evaluation)
    _report_change(
        reply.deployment, "published", reply.revision, reply.changed, reply.dry_run, reply.diff, show_diff
    )


def _print_evaluation(evaluation: config_pb2.PublishEvaluation) -> None:
    verdict = "passed" if evaluation.passed else ("forced past the gate" if evaluation.forced else "refused")
    if evaluation.estimator:
        console.print(
            f"evaluation ({verdict}): {evaluation.estimator} {evaluation.value:.4f} "
            f"[{evaluation.lower:.4f}, {evaluation.upper:.4f}] per decision against the live revision's "
            f"{evaluation.live_value:.4f}, on {evaluation.decisions} logged decisions"
        )
    if evaluation.reason:
        console.print(f"evaluation ({verdict}): {escape(evaluation.reason)}")
    for warning in evaluation.warnings:
        errors.print(f"[yellow]evaluation warning:[/yellow] {escape(warning)}", soft_wrap=True)


class SpecOutput(enum.StrEnum):
    YAML = "yaml"
    JSON = "json"


@config_app.command()
def get(
    name: Annotated[str, typer.Argument(help="Deployment name")],
    revision: Annotated[int, typer.Option(min=0, help="Revision to read (0: the head)")] = 0,
    output: Annotated[
        SpecOutput, typer.Option("--output", "-o", help="Format of the spec")
    ] = SpecOutput.YAML,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Print a deployment's spec (stdout, republishable) and its revision, author and time (stderr)."""
    request = config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name=name, revision=revision))
    with _config_service(state_dir, target) as service:
        reply = service.call("Get", request)
    deployment = reply.deployment
    spec = json.loads(deployment.spec_json)
    if as_json:
        emit_json(_deployment_json(deployment) | {"head_revision": reply.head_revision, "spec": spec})
        return
    errors.print(
        f"# {escape(deployment.name)} revision {deployment.revision} by {escape(deployment.author)} "
        f"at {_time(deployment.updated_at)} (head {reply.head_revision}), sha256 {deployment.checksum[:12]}",
        soft_wrap=True,
        highlight=False,
    )
    if output is SpecOutput.JSON:
        sys.stdout.write(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(spec, sort_keys=True, allow_unicode=True))


@config_app.command("list")
def list_deployments(
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """The deployments that exist at the head revision."""
    with _config_service(state_dir, target) as service:
        reply = service.call(
            "List", config_pb2.ListRequest(page=common_pb2.PageRequest(page_size=MAX_PAGE_SIZE))
        )
        while reply.page.next_page_token:  # every page, in order
            following = service.call(
                "List",
                config_pb2.ListRequest(
                    page=common_pb2.PageRequest(
                        page_size=MAX_PAGE_SIZE, page_token=reply.page.next_page_token
                    )
                ),
            )
            reply.deployments.extend(following.deployments)
            reply.page.CopyFrom(following.page)
    if as_json:
        emit_json(
            {
                "head_revision": reply.head_revision,
                "deployments": [_deployment_json(d) for d in reply.deployments],
            }
        )
        return
    if not reply.deployments:
        console.print(f"no deployments (head revision {reply.head_revision})")
        return
    table = _table(
        f"deployments at head revision {reply.head_revision}",
        ["name", "revision", "author", "updated", "checksum"],
        wrapping=("name", "author"),
    )
    for d in reply.deployments:
        table.add_row(escape(d.name), str(d.revision), escape(d.author), _time(d.updated_at), d.checksum[:12])
    console.print(table)


@config_app.command()
def history(
    name: Annotated[str, typer.Argument(help="Deployment (default: every deployment)")] = "",
    limit: Annotated[int, typer.Option(min=0, help="Most entries to show (0: the server's default)")] = 0,
    show_diff: Annotated[bool, typer.Option("--diff", help="Also print each change's diff")] = False,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """The audit trail, newest first: who changed what, when, and why."""
    with _config_service(state_dir, target) as service:
        reply = service.call("History", config_pb2.HistoryRequest(deployment=name, limit=limit))
    entries = list(reply.entries)
    if as_json:
        emit_json(
            [
                {
                    "revision": e.revision,
                    "deployment": e.deployment,
                    "kind": _change_kind(e.kind),
                    "source_revision": e.source_revision,
                    "author": e.author,
                    "time": _time(e.time),
                    "message": e.message,
                    "diff": e.diff,
                }
                for e in entries
            ]
        )
        return
    if not entries:
        console.print("no history")
        return
    table = _table(
        f"history of {escape(name)}" if name else "history",
        ["revision", "deployment", "kind", "author", "time", "message"],
        wrapping=("deployment", "author", "message"),
    )
    for e in entries:
        kind = _change_kind(e.kind)
        if e.source_revision:
            kind += f" (to {e.source_revision})"
        table.add_row(
            str(e.revision), escape(e.deployment), kind, escape(e.author), _time(e.time), escape(e.message)
        )
    console.print(table)
    if show_diff:
        for e in entries:
            console.print(
                f"\n[bold]revision {e.revision}[/bold] {escape(e.deployment)} ({_change_kind(e.kind)})"
            )
            if e.diff:
                _print_diff(e.diff)
            else:
                console.print("(no change to the spec)")


@config_app.command()
def diff(
    name: Annotated[str, typer.Argument(help="Deployment name")],
    from_revision: Annotated[int, typer.Argument(min=1, help="Older revision")],
    to_revision: Annotated[int, typer.Argument(min=0, help="Newer revision (default: the head)")] = 0,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Unified diff of a deployment's spec between two stored revisions."""
    with _config_service(state_dir, target) as service:
        old = service.call(
            "Get",
            config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name=name, revision=from_revision)),
        ).deployment
        new = service.call(
            "Get", config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name=name, revision=to_revision))
        ).deployment
    text = spec_diff(old.spec_json, new.spec_json, f"{name}@{old.revision}", f"{name}@{new.revision}")
    if as_json:
        emit_json(
            {
                "deployment": name,
                "from_revision": old.revision,
                "to_revision": new.revision,
                "changed": bool(text),
                "diff": text,
            }
        )
        return
    if not text:
        console.print(
            f"{escape(name)}: no difference between revision {old.revision} and revision {new.revision}"
        )
        return
    _print_diff(text)


@config_app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Deployment name")],
    to: Annotated[int, typer.Option("--to", min=1, help="Revision whose spec becomes current again")],
    dry_run: DryRunFlag = False,
    show_diff: DiffFlag = True,
    message: MessageOption = "",
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Re-publish the spec a deployment had at an older revision, under a new revision."""
    request = config_pb2.RollbackRequest(deployment=name, to_revision=to, dry_run=dry_run, message=message)
    with _config_service(state_dir, target) as service:
        reply = service.call("Rollback", request)
    if as_json:
        emit_json(
            {
                "deployment": reply.deployment,
                "revision": reply.revision,
                "changed": reply.changed,
                "dry_run": dry_run,
                "diff": reply.diff,
            }
        )
        return
    done = f"rolled back to revision {to}"
    _report_change(reply.deployment, done, reply.revision, reply.changed, dry_run, reply.diff, show_diff)


@config_app.command()
def delete(
    name: Annotated[str, typer.Argument(help="Deployment name")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    message: MessageOption = "",
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Remove a deployment from the head; every replica stops serving it.

    Its history is kept: roll back to one of its revisions to restore it."""
    if not yes:
        if not sys.stdin.isatty():
            fail(
                f"refusing to delete '{name}' without confirmation: no terminal to ask on; pass --yes", code=2
            )
        if not typer.confirm(f"Delete deployment '{name}'? Every replica stops serving it.", default=False):
            fail(f"'{name}' not deleted")
    request = config_pb2.DeleteRequest(deployment=name, message=message)
    with _config_service(state_dir, target) as service:
        reply = service.call("Delete", request)
    if as_json:
        emit_json({"deployment": name, "revision": reply.revision})
        return
    console.print(f"[green]deleted[/green] {escape(name)} at revision {reply.revision}")


def _on_head(reply: config_pb2.ReplicaStatusResponse) -> tuple[bool, str]:
    """Whether every connected replica serves the head revision, and a line saying so."""
    connected = [r for r in reply.replicas if r.connected]
    if not connected:
        return False, "no replica is connected to the config service"
    lagging = [
        r.replica_id for r in connected if r.revisions_behind or r.applied_revision < reply.head_revision
    ]
    if lagging:
        return False, f"not on head revision {reply.head_revision}: {', '.join(lagging)}"
    return True, f"all {len(connected)} connected replicas on head revision {reply.head_revision}"


def _replica_json(replica: config_pb2.ReplicaState) -> dict[str, Any]:
    return {
        "replica_id": replica.replica_id,
        "service": replica.service,
        "version": replica.version,
        "connected": replica.connected,
        "applied_revision": replica.applied_revision,
        "revisions_behind": replica.revisions_behind,
        "staleness_seconds": replica.staleness_seconds,
        "last_nack_revision": replica.last_nack_revision,
        "last_nack_reason": replica.last_nack_reason,
        "last_seen": _time(replica.last_seen),
        "peer": replica.peer,
        "deployments": {d.name: d.revision for d in replica.deployments},
        "plugins": dict(sorted(replica.plugins.items())),
    }


@config_app.command()
def status(
    wait_for_head: Annotated[
        float,
        typer.Option(
            "--wait-for-head",
            min=0,
            max=600,
            metavar="SECONDS",
            help="Poll until every connected replica is on the head revision, or this many seconds pass",
        ),
    ] = 0.0,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Which revision every replica serves, what it rejected, how far behind it is.

    Exit code 0 only when every connected replica is on the head revision."""
    started = time.monotonic()
    deadline = started + wait_for_head
    with _config_service(state_dir, target) as service, contextlib.ExitStack() as waiting:
        if wait_for_head and not as_json:
            waiting.enter_context(errors.status("waiting for every replica to reach the head revision"))
        while True:
            reply = service.call("ReplicaStatus", config_pb2.ReplicaStatusRequest())
            current, summary = _on_head(reply)
            remaining = deadline - time.monotonic()
            if current or remaining <= 0:
                break
            time.sleep(min(STATUS_POLL_SECONDS, remaining))
    waited = round(time.monotonic() - started, 3)
    if as_json:
        emit_json(
            {
                "head_revision": reply.head_revision,
                "on_head": current,
                "summary": summary,
                "waited_seconds": waited,
                "replicas": [_replica_json(r) for r in reply.replicas],
            }
        )
        raise typer.Exit(0 if current else 1)
    table = _table(
        f"replicas (head revision {reply.head_revision})",
        [
            "replica",
            "service",
            "connected",
            "applied",
            "behind",
            "staleness",
            "last NACK",
            "deployments",
            "plugins",
        ],
        wrapping=("last NACK", "deployments", "plugins"),
    )
    for r in reply.replicas:
        ok = r.connected and not r.revisions_behind and r.applied_revision >= reply.head_revision
        colour = "green" if ok else ("red" if r.connected else "yellow")
        nack = f"{r.last_nack_revision}: {r.last_nack_reason}" if r.last_nack_revision else "-"
        table.add_row(
            escape(r.replica_id),
            escape(r.service) or "-",
            "yes" if r.connected else "no",
            f"[{colour}]{r.applied_revision}[/{colour}]",
            str(r.revisions_behind),
            f"{r.staleness_seconds:.1f} s",
            escape(nack),
            escape("\n".join(f"{d.name}@{d.revision}" for d in r.deployments)) or "-",
            escape(
                "\n".join(
                    f"{name} {version}" for name, version in sorted(r.plugins.items()) if version != "builtin"
                )
            )
            or "built-in only",
        )
    console.print(table)
    colour = "green" if current else "red"
    console.print(f"[{colour}]{escape(summary)}[/{colour}]")
    raise typer.Exit(0 if current else 1)


@config_app.command()
def refresh(
    replica: Annotated[
        str, typer.Option("--replica", help="Replica id (default: every connected replica)")
    ] = "",
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Ask replicas to resynchronise: the config service sends them a full snapshot."""
    with _config_service(state_dir, target) as service:
        reply = service.call("Refresh", config_pb2.RefreshRequest(replica_id=replica))
    if as_json:
        emit_json({"replicas_notified": reply.replicas_notified, "head_revision": reply.head_revision})
    else:
        console.print(
            f"sent a snapshot of head revision {reply.head_revision} to {reply.replicas_notified} replica(s)"
        )
