"""`liveloop monitor summary|drift|alerts|evaluate`: what the deployed loop is doing, from the
monitor service through the front door with the admin key. Tables for people, `--json` for scripts."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
import yaml
from google.protobuf.duration_pb2 import Duration
from rich.markup import escape
from rich.table import Table

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
from libs.common.errors import InvalidArgument
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.monitor.v1 import monitor_pb2, monitor_pb2_grpc

monitor_app = typer.Typer(
    help="Monitoring: summaries, drift, alerts and offline evaluation of a candidate.", no_args_is_help=True
)

WindowOption = Annotated[
    str | None, typer.Option("--window", "-w", help="Window length: 90s, 15m, 1h, 7d (default: the server's)")
]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SEVERITY = {0: "-", 1: "ok", 2: "warning", 3: "critical"}
_ESTIMATORS = {"ips": 1, "snips": 2, "dr": 3, "dm": 4}
_ESTIMATOR_NAMES = {value: name for name, value in _ESTIMATORS.items()}

Reply = TypeVar("Reply")


def parse_window(text: str | None) -> Duration | None:
    """'15m' -> 900 s; None stays None (the server's default). Exit 2 on anything else."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        fail(f"--window: '{text}' is not a duration such as 90s, 15m, 1h or 7d", code=2)
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _call(
    state_dir: Path | None,
    target: str | None,
    what: str,
    call: Callable[[monitor_pb2_grpc.MonitorServiceStub], Reply],
) -> Reply:
    resolved, api_key = front_door(state_dir, target, role="admin")
    channel = open_blocking_channel(
        resolved, api_key=api_key, deadline_seconds=120, tls=front_door_tls(state_dir)
    )
    with channel:
        try:
            return call(monitor_pb2_grpc.MonitorServiceStub(channel))
        except grpc.RpcError as exc:
            fail(f"{what} via {resolved} failed: {exc.code().name}: {exc.details()}")


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


@monitor_app.command()
def summary(
    deployment: Annotated[str, typer.Argument(help="Deployment to summarise")],
    window: WindowOption = None,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Invocations, responses, uptake by offer and segment, explore share, latency, replicas."""
    request = monitor_pb2.GetSummaryRequest(deployment=deployment, window=parse_window(window))
    reply = _call(state_dir, target, "GetSummary", lambda stub: stub.GetSummary(request))
    if as_json:
        emit_json(plain(reply))
        return
    seconds = reply.window_end.seconds - reply.window_start.seconds
    console.print(
        f"[bold]{reply.deployment}[/bold] over the last {seconds / 60:.0f} min: {reply.invocations} invocations, "
        f"{reply.responses} responses ({reply.late_responses} late, {reply.duplicate_responses} duplicate), "
        f"uptake {_percent(reply.uptake_rate)} ({reply.accepted}/{reply.impressions}), "
        f"explore share {_percent(reply.explore_share)}, head revision {reply.head_revision}"
    )
    for title, rows, key in (
        ("by offer", reply.by_offer, "offer"),
        ("by segment", reply.by_segment, "segment"),
        ("by variant", reply.by_variant, "variant"),
    ):
        if not rows or (key == "variant" and len(rows) == 1 and not rows[0].variant):
            continue
        table = Table(title=f"uptake {title}")
        for column in (key, "impressions", "accepted", "uptake", "reward", "explored"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                getattr(row, key) or "(none)",
                str(row.impressions),
                str(row.accepted),
                _percent(row.uptake_rate),
                f"{row.reward_sum:g}",
                str(row.explored_impressions),
            )
        console.print(table)
    if reply.latency:
        table = Table(title="latency inside the predictor (ms)")
        for column in ("method", "calls", "p50", "p90", "p99", "max"):
            table.add_column(column)
        for latency in reply.latency:
            table.add_row(
                latency.method.rsplit("/", 1)[-1],
                str(latency.count),
                *(
                    f"{1000 * value:.2f}"
                    for value in (
                        latency.p50_seconds,
                        latency.p90_seconds,
                        latency.p99_seconds,
                        latency.max_seconds,
                    )
                ),
            )
        console.print(table)
    if reply.replicas:
        table = Table(title="replicas")
        for column in ("replica", "revision", "invocations", "stale"):
            table.add_column(column)
        for replica in reply.replicas:
            table.add_row(
                replica.replica_id,
                str(replica.config_revision),
                str(replica.invocations),
                "[red]stale[/red]" if replica.stale else "current",
            )
        console.print(table)
    status = reply.decision_log
    lag = "unknown" if status.lag < 0 else str(status.lag)
    console.print(f"decision log: lag {lag}, trimmed before read {status.trimmed_entries}")


@monitor_app.command()
def drift(
    deployment: Annotated[str, typer.Argument(help="Deployment whose served inputs to compare")],
    window: WindowOption = None,
    feature: Annotated[list[str] | None, typer.Option("--feature", "-f", help="Only these inputs")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Reference model NAME:VERSION (default: the bound one)")
    ] = None,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """PSI and Kolmogorov-Smirnov of every model input and of the score against the training reference."""
    request = monitor_pb2.GetDriftRequest(
        deployment=deployment, window=parse_window(window), features=feature or []
    )
    if model:
        name, _, version = model.partition(":")
        if not version.isdigit():
            fail(f"--model: '{model}' is not NAME:VERSION", code=2)
        request.reference_model.CopyFrom(common_pb2.ModelRef(name=name, version=int(version)))
    reply = _call(state_dir, target, "GetDrift", lambda stub: stub.GetDrift(request))
    if as_json:
        emit_json(plain(reply))
        return
    table = Table(
        title=f"drift of {deployment} against {reply.reference_model.name}:{reply.reference_model.version}"
    )
    for column in (
        "input",
        "severity",
        "PSI",
        "KS",
        "mean (train -> now)",
        "missing (train -> now)",
        "values",
    ):
        table.add_column(column)
    for row in [*reply.features, reply.score]:
        severity = _SEVERITY[row.severity]
        colour = {"critical": "red", "warning": "yellow"}.get(severity, "green")
        table.add_row(
            row.name,
            f"[{colour}]{severity}[/{colour}]",
            f"{row.psi:.3f}",
            f"{row.ks_statistic:.3f}",
            f"{row.reference_mean:.3g} -> {row.current_mean:.3g}",
            f"{_percent(row.reference_missing_rate)} -> {_percent(row.current_missing_rate)}",
            str(row.current_count),
        )
    console.print(table)


@monitor_app.command()
def shadow(
    deployment: Annotated[str, typer.Argument(help="Live deployment whose shadow to compare")],
    window: WindowOption = None,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """The shadow's decisions against the live ones on the same requests: agreement, estimated value."""
    request = monitor_pb2.CompareShadowRequest(deployment=deployment, window=parse_window(window))
    reply = _call(state_dir, target, "CompareShadow", lambda stub: stub.CompareShadow(request))
    if as_json:
        emit_json(plain(reply))
        return
    if not reply.shadows:
        console.print(f"{escape(deployment)}: no shadow decisions logged in the window")
        return
    for row in reply.shadows:
        agreed = f"{row.agreed_value:.4f}" if row.HasField("agreed_value") else "n/a"
        console.print(
            f"[bold]{escape(row.shadow)}[/bold] shadowing [bold]{escape(deployment)}[/bold]: "
            f"{row.compared} of {row.live_decisions} live decisions compared "
            f"({row.not_comparable} not comparable), same first offer {_percent(row.agreement)}; "
            f"live value {row.live_value:.4f} per decision, {agreed} where they agreed"
        )
        table = Table(title=f"estimated value of {row.shadow} per decision")
        for column in ("estimator", "value", "interval", "lift"):
            table.add_column(column)
        for estimate in row.estimates:
            table.add_row(
                monitor_pb2.Estimator.Name(estimate.estimator).removeprefix("ESTIMATOR_").lower(),
                f"{estimate.value:.4f}",
                f"[{estimate.lower:.4f}, {estimate.upper:.4f}]",
                f"{estimate.lift:+.4f}",
            )
        console.print(table)
        for reason in row.refused:
            errors.print(f"[yellow]refused:[/yellow] {escape(reason)}", soft_wrap=True)


@monitor_app.command()
def alerts(
    deployment: Annotated[str, typer.Option("--deployment", "-d", help="Only this deployment's")] = "",
    include_resolved: Annotated[bool, typer.Option("--all", help="Resolved alerts too")] = False,
    severity: Annotated[str, typer.Option("--severity", help="At least: warning or critical")] = "",
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Firing (and with --all resolved) alerts, newest first."""
    levels = {"": 0, "ok": 1, "warning": 2, "critical": 3}
    if severity not in levels:
        fail(f"--severity: '{severity}' is not warning or critical", code=2)
    request = monitor_pb2.ListAlertsRequest(
        deployment=deployment,
        include_resolved=include_resolved,
        min_severity=levels[severity],  # type: ignore[arg-type]
    )
    reply = _call(state_dir, target, "ListAlerts", lambda stub: stub.ListAlerts(request))
    if as_json:
        emit_json(plain(reply))
        return
    if not reply.alerts:
        console.print("no alerts" + ("" if include_resolved else " firing"))
        return
    table = Table(title="alerts")
    for column in ("state", "severity", "rule", "deployment", "summary", "since"):
        table.add_column(column)
    for alert in reply.alerts:
        state = "firing" if alert.state == monitor_pb2.ALERT_STATE_FIRING else "resolved"
        table.add_row(
            f"[red]{state}[/red]" if state == "firing" else state,
            _SEVERITY[alert.severity],
            alert.rule,
            alert.deployment or "-",
            escape(alert.summary),
            alert.started_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


def candidate_spec_json(path: Path, state_dir: Path | None = None, target: str | None = None) -> str:
    """A spec file (YAML or JSON) as the JSON EvaluatePolicy and Publish take, its corpora read
    from their files or tables as `liveloop config publish` reads them."""
    try:
        text = path.read_text()
        document = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        fail(f"cannot read {path}: {exc}", code=2)
    try:
        resolved = resolve_corpus_files(text, path, lambda table: read_table_rows(state_dir, target, table))
    except InvalidArgument as error:
        fail(f"{path}: {error}", code=2)
    return resolved if resolved is not None else json.dumps(document, default=str)


@monitor_app.command()
def evaluate(
    deployment: Annotated[str, typer.Argument(help="Deployment whose logged decisions to replay")],
    spec: Annotated[Path | None, typer.Option("--spec", help="Candidate spec file (YAML or JSON)")] = None,
    revision: Annotated[
        int, typer.Option("--revision", min=0, show_default=False, help="Or a stored config revision")
    ] = 0,
    window: WindowOption = None,
    estimator: Annotated[
        list[str] | None, typer.Option("--estimator", "-e", help="ips, snips, dm, dr (default all)")
    ] = None,
    confidence: Annotated[
        float, typer.Option("--confidence", min=0.5, max=0.999, help="Interval level")
    ] = 0.95,
    clip: Annotated[
        float, typer.Option("--clip", min=0, help="Clip importance weights at this (0: no clipping)")
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the candidate's draws and the bootstrap")] = 0,
    logged_table: Annotated[
        str,
        typer.Option(
            "--logged-table",
            help="Evaluate on another system's decisions instead: a table ingested into the offline store "
            "(columns offer, slot, propensity, reward, optional time and customer, the rest context); "
            "without --window, the whole table",
        ),
    ] = "",
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Estimate what a candidate spec (or stored revision) would have earned on the logged decisions."""
    if spec is not None and revision:
        fail("name one candidate, not both: --spec FILE or --revision N", code=2)
    if spec is None and not revision:
        fail("name a candidate: --spec FILE or --revision N", code=2)
    unknown = [name for name in estimator or [] if name not in _ESTIMATORS]
    if unknown:
        fail(f"--estimator: '{unknown[0]}' is not one of {', '.join(_ESTIMATORS)}", code=2)
    request = monitor_pb2.EvaluatePolicyRequest(
        deployment=deployment,
        window=parse_window(window),
        estimators=[_ESTIMATORS[name] for name in estimator or []],  # type: ignore[misc]
        confidence_level=confidence,
        max_importance_weight=clip,
        seed=seed,
        logged_table=logged_table,
    )
    if spec is not None:
        request.candidate_spec_json = candidate_spec_json(spec, state_dir, target)
    else:
        request.candidate_revision = revision
    reply = _call(state_dir, target, "EvaluatePolicy", lambda stub: stub.EvaluatePolicy(request, timeout=600))
    if as_json:
        emit_json(evaluation_document(reply))
        return
    source = f" on table {logged_table}" if logged_table else ""
    print_evaluation(reply, title=f"candidate for {deployment}{source}")


def evaluation_document(reply: monitor_pb2.EvaluatePolicyResponse) -> dict[str, Any]:
    document = plain(reply)
    for row in document["estimates"]:
        row["estimator"] = _ESTIMATOR_NAMES.get(row["estimator"], str(row["estimator"]))
    return document


def print_evaluation(reply: monitor_pb2.EvaluatePolicyResponse, title: str) -> None:
    console.print(
        f"{reply.usable_decisions} of {reply.decisions} logged decisions usable; logged policy earned "
        f"{reply.logged_value:.4f} per decision; effective sample size {reply.effective_sample_size:.0f}, "
        f"largest weight {reply.max_weight:.2f}"
    )
    table = Table(
        title=f"{title}: estimated value per decision ({100 * reply.confidence_level:.0f}% intervals)"
    )
    for column in ("estimator", "value", "interval", "lift vs logged"):
        table.add_column(column)
    for row in reply.estimates:
        table.add_row(
            _ESTIMATOR_NAMES.get(row.estimator, str(row.estimator)),
            f"{row.value:.4f}",
            f"[{row.lower:.4f}, {row.upper:.4f}]",
            f"{row.lift:+.4f}",
        )
    console.print(table)
    for refused in reply.refused:
        console.print(f"[red]refused:[/red] {escape(refused)}")
    for warning in reply.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    for note in reply.notes:
        console.print(f"note: {escape(note)}")
