"""`liveloop train`, `liveloop models`, `liveloop compare` and `liveloop promote`: train a model from
a spec file with a progress bar, list the registry, compare two versions (on their stored test
metrics or scored on a table of the offline store), bind a version to a deployment.

Every command calls TrainerService through the front door with the admin key.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from libs.cli.output import (
    JsonFlag,
    StateDir,
    TargetOption,
    console,
    errors,
    fail,
    front_door,
    front_door_tls,
)
from libs.common.client import open_blocking_channel
from libs.common.errors import LiveloopError
from libs.protos.liveloop.trainer.v1 import trainer_pb2, trainer_pb2_grpc

_STATE_NAMES = {
    trainer_pb2.JOB_STATE_QUEUED: "queued",
    trainer_pb2.JOB_STATE_RUNNING: "running",
    trainer_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    trainer_pb2.JOB_STATE_FAILED: "failed",
    trainer_pb2.JOB_STATE_CANCELLED: "cancelled",
}
_FINAL = {trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED}


@contextmanager
def _trainer(state_dir: Path | None, target: str | None) -> Iterator[trainer_pb2_grpc.TrainerServiceStub]:
    resolved, api_key = front_door(state_dir, target, role="admin")
    # No default deadline: WatchJob streams for as long as the job trains; unary calls set their own.
    with open_blocking_channel(
        resolved, api_key=api_key, deadline_seconds=None, tls=front_door_tls(state_dir)
    ) as channel:
        try:
            yield trainer_pb2_grpc.TrainerServiceStub(channel)
        except grpc.RpcError as exc:
            hint = " (is the stack running? `liveloop up`, or pass --target)"
            code = exc.code()
            fail(f"{code.name}: {exc.details()}{hint if code == grpc.StatusCode.UNAVAILABLE else ''}")


def _metric(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def train(
    spec_file: Annotated[
        Path, typer.Argument(help="Training spec (YAML), e.g. examples/training/take-up.yaml")
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the spec against the data only")] = False,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job until it ends")] = True,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Start a training job from a spec file and follow it with a progress bar (epochs, loss, AUC)."""
    from libs.common.training_messages import spec_message
    from libs.common.training_spec import parse_training_spec

    try:
        spec = parse_training_spec(spec_file.read_text())
    except OSError as exc:
        fail(f"cannot read {spec_file}: {exc}")
    except LiveloopError as exc:
        fail(f"{spec_file}: {exc.message}")
    with _trainer(state_dir, target) as trainer:
        started = trainer.StartTraining(
            trainer_pb2.StartTrainingRequest(spec=spec_message(spec), dry_run=dry_run), timeout=60
        )
        if dry_run:
            console.print(f"[green]ok[/green]: {spec_file} fits the training set; nothing was queued")
            return
        if not wait:
            _report({"job_id": started.job_id, "state": "queued"}, as_json)
            return
        final = _follow(trainer, started.job_id, spec.hyperparameters.epochs, quiet=as_json)
    document = MessageToDict(final, preserving_proto_field_name=True)
    if as_json:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    elif final.state == trainer_pb2.JOB_STATE_SUCCEEDED:
        metrics = final.metrics
        console.print(
            f"[green]job {started.job_id} succeeded[/green]: {final.model.name} version {final.model.version} "
            f"(test AUC {_metric(metrics.get('auc', math.nan))}, log loss {_metric(metrics.get('log_loss', math.nan))})"
        )
    if final.state != trainer_pb2.JOB_STATE_SUCCEEDED:
        fail(f"job {started.job_id} {_STATE_NAMES.get(final.state, '?')}: {final.message}")


def _follow(
    trainer: trainer_pb2_grpc.TrainerServiceStub, job_id: str, epochs: int, *, quiet: bool
) -> trainer_pb2.JobEvent:
    last = trainer_pb2.JobEvent(job_id=job_id)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=errors,
        disable=quiet,
    )
    with progress:
        task = progress.add_task(f"job {job_id}", total=epochs, detail="queued")
        epoch_detail = ""
        for event in trainer.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id, from_start=True)):
            last = event
            detail = _STATE_NAMES.get(event.state, "")
            if event.state == trainer_pb2.JOB_STATE_RUNNING and event.epoch:
                epoch_detail = (
                    f"loss {event.loss:.4f}  val {event.validation_loss:.4f}  "
                    f"AUC {_metric(event.metrics.get('auc', math.nan))}"
                )
                detail = epoch_detail
            elif event.state in _FINAL and epoch_detail:  # the final event carries no epoch figures
                detail = f"{detail}: {epoch_detail}"
            progress.update(task, completed=event.epoch, total=event.max_epochs or epochs, detail=detail)
            if event.state in _FINAL:
                break
    return last


def _report(document: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        console.print(", ".join(f"{key}: {value}" for key, value in document.items()))


def models(
    name: Annotated[str | None, typer.Argument(help="A model: show its newest version in full")] = None,
    describe: Annotated[
        str | None,
        typer.Option(
            "--describe",
            help="Show this model in full (NAME or NAME:VERSION), input columns in order included",
        ),
    ] = None,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """The model registry: every model with its newest version's metrics, or one model in full."""
    if describe and name:
        fail("name one model: an argument or --describe, not both", code=2)
    name, version_number = _model_ref(describe or name or "")
    with _trainer(state_dir, target) as trainer:
        if name:
            got = trainer.GetModel(trainer_pb2.GetModelRequest(name=name, version=version_number), timeout=30)
            document = MessageToDict(got, preserving_proto_field_name=True)
            if as_json:
                sys.stdout.write(json.dumps(document, indent=2) + "\n")
                return
            version = got.model
            table = Table(title=f"{version.name} version {version.version} (versions: {list(got.versions)})")
            table.add_column("field", no_wrap=True)
            table.add_column("value", overflow="fold")
            for key, value in (
                ("AUC", _metric(version.metrics.auc)),
                ("log loss", _metric(version.metrics.log_loss)),
                ("calibration error", _metric(version.metrics.calibration_error)),
                ("test rows", str(version.metrics.rows)),
                ("features", ", ".join(f"{f.name} ({f.encoding})" for f in version.features)),
                (
                    "input columns",
                    f"{len(version.input_columns)}, in order: {', '.join(version.input_columns)}"
                    if version.input_columns
                    else "- (the artifact cannot be read)",
                ),
                ("training set", version.training_set),
                ("data fingerprint", version.data_fingerprint),
                ("code version", version.code_version),
                ("artifact", version.artifact_uri),
                ("checksum", version.checksum),
                ("deployments", ", ".join(version.deployments) or "-"),
            ):
                table.add_row(key, value)
            console.print(table)
            return
        listed = trainer.ListModels(trainer_pb2.ListModelsRequest(), timeout=15)
    if as_json:
        sys.stdout.write(json.dumps(MessageToDict(listed, preserving_proto_field_name=True), indent=2) + "\n")
        return
    table = Table(title="models")
    for column in ("model", "latest", "versions", "AUC", "log loss", "calibration", "deployments"):
        table.add_column(column, no_wrap=True)
    for model in listed.models:
        metrics = model.latest_metrics
        table.add_row(
            model.name,
            str(model.latest_version),
            str(model.version_count),
            _metric(metrics.auc),
            _metric(metrics.log_loss),
            _metric(metrics.calibration_error),
            ", ".join(f"{d.name}@v{d.revision}" for d in model.deployments) or "-",
        )
    console.print(table)


def _model_ref(text: str) -> tuple[str, int]:
    """NAME or NAME:VERSION (0: the newest); exit 2 on a version that is not a number."""
    name, _, number = text.partition(":")
    if number and not number.isdigit():
        fail(f"'{text}' is not NAME or NAME:VERSION", code=2)
    return name, int(number or 0)


_LOWER_IS_BETTER = {"log_loss", "calibration_error", "brier_score"}
_METRIC_TITLES = {
    "auc": "AUC",
    "log_loss": "log loss",
    "calibration_error": "calibration error",
    "brier_score": "Brier score",
}


def compare(
    name: Annotated[str, typer.Argument(help="Registered model name")],
    version_a: Annotated[int, typer.Argument(min=1, help="Baseline version")],
    version_b: Annotated[int, typer.Argument(min=1, help="Candidate version")],
    on: Annotated[
        str,
        typer.Option(
            "--on",
            "--evaluation-table",
            help="Score both versions on this offline-store table (at most the trainer's "
            "max_evaluation_rows rows, 1,000,000 by default) instead of comparing their stored test metrics",
        ),
    ] = "",
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", min=1, help="Deadline of the call in seconds (scoring a table takes a while)"
        ),
    ] = 600.0,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Compare two versions of a model: metrics side by side, features added or removed, same data."""
    with _trainer(state_dir, target) as trainer:
        reply = trainer.Compare(
            trainer_pb2.CompareRequest(
                name=name, version_a=version_a, version_b=version_b, evaluation_table=on
            ),
            timeout=timeout if on else min(timeout, 15.0),
        )
    if as_json:
        sys.stdout.write(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2) + "\n")
        return
    basis = f"scored on table {on} ({reply.evaluated_rows:,} rows)" if on else "stored test metrics"
    table = Table(title=escape(f"{name}: version {version_a} vs version {version_b}, {basis}"))
    for column in ("metric", f"v{version_a}", f"v{version_b}", "delta", "better"):
        table.add_column(column, no_wrap=True, justify="left" if column == "metric" else "right")
    for delta in reply.deltas:
        better = (
            f"[green]v{version_b}[/green]"
            if delta.b_better
            else ("=" if delta.delta == 0 else f"[yellow]v{version_a}[/yellow]")
        )
        arrow = "lower is better" if delta.metric in _LOWER_IS_BETTER else "higher is better"
        table.add_row(
            f"{_METRIC_TITLES.get(delta.metric, delta.metric)} ({arrow})",
            _metric(delta.a),
            _metric(delta.b),
            f"{delta.delta:+.4f}",
            better,
        )
    console.print(table)
    if not reply.deltas:
        console.print("no metric is defined for both versions")
    for label, features in (("added", reply.features_added), ("removed", reply.features_removed)):
        if features:
            console.print(f"features {label} in v{version_b}: {escape(', '.join(features))}")
    console.print(
        "trained on the same data"
        if reply.same_data
        else "trained on different data (their training-set fingerprints differ)"
    )


class ModelUseChoice(StrEnum):
    BIND = "bind"
    SCORE = "score"
    PRIOR = "prior"


_MODEL_USES = {
    ModelUseChoice.BIND: trainer_pb2.MODEL_USE_UNSPECIFIED,
    ModelUseChoice.SCORE: trainer_pb2.MODEL_USE_SCORE,
    ModelUseChoice.PRIOR: trainer_pb2.MODEL_USE_PRIOR,
}


def promote(
    model: Annotated[str, typer.Argument(help="Registered model name")],
    version: Annotated[int, typer.Argument(min=0, help="Version to bind; 0 for the newest")],
    deployment: Annotated[str, typer.Option("--deployment", "-d", help="Deployment to bind it to")],
    message: Annotated[str, typer.Option("--message", "-m", help="Reason recorded in the history")] = "",
    use: Annotated[
        ModelUseChoice,
        typer.Option(
            "--use",
            help="bind: only bind it (served over OIP); score: rank by its predicted take-up (algorithm "
            "model); prior: keep Thompson sampling, each arm starting at the model's take-up",
        ),
    ] = ModelUseChoice.BIND,
    prior_weight: Annotated[
        float,
        typer.Option("--prior-weight", min=0.0, help="With --use prior: pseudo-observations per arm (0: 20)"),
    ] = 0.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the diff; publish nothing")] = False,
    show_diff: Annotated[bool, typer.Option("--diff/--no-diff", help="Print the spec's diff")] = True,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Bind a model version to a deployment: a new config revision every replica loads."""
    with _trainer(state_dir, target) as trainer:
        reply = trainer.Promote(
            trainer_pb2.PromoteRequest(
                model=model,
                version=version,
                deployment=deployment,
                dry_run=dry_run,
                message=message,
                use=_MODEL_USES[use],
                prior_weight=prior_weight,
            ),
            timeout=30,
        )
    if as_json:
        sys.stdout.write(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2) + "\n")
        return
    verb = "would publish" if dry_run else "published"
    how = {
        ModelUseChoice.BIND: "bound",
        ModelUseChoice.SCORE: "ranking",
        ModelUseChoice.PRIOR: "as the prior",
    }
    console.print(
        f"{verb} revision {reply.config_revision} of {reply.deployment}: "
        f"{reply.model.name} version {reply.model.version} ({how[use]})"
    )
    if not show_diff:
        return
    for line in reply.diff.splitlines():
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else ""
        console.print(escape(line), style=style, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(models)
    app.command()(compare)
    app.command()(promote)
