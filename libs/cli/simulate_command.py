"""`liveloop simulate`: decision quality against seeded environments whose take-up rates are known.

Reports cumulative expected regret against the oracle (the best offer's take-up every round minus
the chosen offer's), CTR against the oracle's, and the rounds to recover after a change. Two
engines drive the same rounds: `memory` (the shared policy of libs/policy, arm statistics in
memory, a simulated clock; for long runs) and `grpc` (Invoke and Respond through a running stack's
front door, after publishing a simulation deployment with the admin key). The predictor's engine
over Redis on a simulated clock runs in bench/decision_quality.py, which checks that it chooses
exactly as the memory engine does.
"""

from __future__ import annotations

import asyncio
import enum
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value
from grpc import aio
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from libs.cli.output import console, errors, fail, front_door, front_door_tls
from libs.common.client import open_channel
from libs.common.errors import LiveloopError
from libs.common.settings import ClientSettings
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.simulation.environments import (
    Environment,
    PolicySettings,
    Round,
    deployment_name,
    make_environment,
    simulation_spec,
    simulation_spec_document,
)
from libs.simulation.runs import NEAR_BEST_TOLERANCE, SimulationReport, run_async_policy, run_in_memory

REPLICA_WAIT_SECONDS = 30.0
REPLICA_POLL_SECONDS = 0.2


class EnvironmentChoice(enum.StrEnum):
    STATIONARY = "stationary"
    REVERSED = "reversed"
    SEGMENTS = "segments"
    GRADUAL = "gradual"
    SINGLE = "single"


class AlgorithmChoice(enum.StrEnum):
    THOMPSON = "thompson"
    EPSILON_GREEDY = "epsilon_greedy"
    UNIFORM = "uniform"


class EngineChoice(enum.StrEnum):
    MEMORY = "memory"
    GRPC = "grpc"


def _parse_pair(text: str, option: str, example: str) -> tuple[float, float]:
    try:
        first, second = (float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected two numbers, e.g. {example}", param_hint=option) from None
    return first, second


@contextmanager
def _progress(total: int, description: str) -> Iterator[Any]:
    """A progress bar on stderr (stdout stays clean for --json); yields the rounds-done callback."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=errors,
        transient=True,
    )
    task = progress.add_task(description, total=total, speed="")
    started = time.perf_counter()

    def advance(done: int) -> None:
        elapsed = time.perf_counter() - started
        speed = f"{done / elapsed:,.0f} rounds/s" if elapsed > 0 else ""
        progress.update(task, completed=done, speed=speed)

    with progress:
        yield advance


def simulate(
    environment: Annotated[
        EnvironmentChoice,
        typer.Option(
            help="stationary, reversed (order flips at half time), segments, gradual (the order moves to "
            "reversed over 20k rounds from half time) or single (the worst offer becomes the best)"
        ),
    ] = EnvironmentChoice.STATIONARY,
    rounds: Annotated[int, typer.Option(min=1, max=10_000_000, help="Customers, one offer each")] = 10_000,
    seed: Annotated[int, typer.Option(min=0, help="Seeds the environment and the policy's draws")] = 1,
    algorithm: Annotated[
        AlgorithmChoice, typer.Option(help="thompson, epsilon_greedy, or uniform (random, no learning)")
    ] = AlgorithmChoice.THOMPSON,
    half_life: Annotated[
        float | None,
        typer.Option(
            "--half-life",
            min=0.001,
            metavar="SECONDS",
            help="Forget evidence with this half-life; one round is --step-seconds of simulated time",
        ),
    ] = None,
    half_life_impressions: Annotated[
        float | None,
        typer.Option(
            "--half-life-impressions",
            min=0.001,
            metavar="IMPRESSIONS",
            help="Forget evidence by traffic: halve it every this many impressions of the segment",
        ),
    ] = None,
    change_detection: Annotated[
        bool,
        typer.Option(
            "--change-detection",
            help="thompson: restart an arm's evidence when its recent take-up departs from its history",
        ),
    ] = False,
    epsilon: Annotated[float, typer.Option(min=0.0, max=1.0, help="Exploration of epsilon_greedy")] = 0.1,
    prior: Annotated[
        str,
        typer.Option(
            "--prior",
            metavar="ALPHA,BETA",
            help="thompson: Beta prior of every arm (prior successes, failures)",
        ),
    ] = "1,1",
    offers: Annotated[int, typer.Option(min=2, max=1000, help="Number of offers")] = 10,
    take_up: Annotated[
        str, typer.Option("--take-up", metavar="LOW,HIGH", help="Range of the offers' take-up rates")
    ] = "0.02,0.10",
    no_context: Annotated[
        bool, typer.Option("--no-context", help="segments: do not declare the segment as a context variable")
    ] = False,
    engine: Annotated[
        EngineChoice,
        typer.Option(help="memory (the shared policy, no Redis) or grpc (a running stack)"),
    ] = EngineChoice.MEMORY,
    step_seconds: Annotated[
        float, typer.Option("--step-seconds", min=0.001, help="Simulated seconds per round (memory)")
    ] = 1.0,
    sample_every: Annotated[
        int | None, typer.Option(min=1, help="Regret curve point every N rounds (default rounds/100)")
    ] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the run's deployment (grpc)")] = False,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="Local stack state (default .liveloop)")
    ] = None,
    target: Annotated[str | None, typer.Option("--target", help="host:port of the front door")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Run a seeded environment with known take-up rates; report regret against the oracle, CTR and
    rounds to recover after a change."""
    low, high = _parse_pair(take_up, "--take-up", "0.02,0.10")
    alpha0, beta0 = _parse_pair(prior, "--prior", "1,20")
    policy = PolicySettings(
        algorithm=algorithm.value,
        half_life_seconds=half_life,
        half_life_impressions=half_life_impressions,
        change_detection=change_detection,
        epsilon=epsilon,
        use_segment=not no_context,
        alpha0=alpha0,
        beta0=beta0,
    )
    try:
        world = make_environment(
            environment.value, rounds=rounds, seed=seed, offers=offers, low=low, high=high
        )
        simulation_spec(world, policy, "sim-check")  # the spec a run publishes must be valid
    except LiveloopError as exc:
        fail(exc.message, code=2)
    if engine is EngineChoice.GRPC and half_life:
        errors.print(
            "[yellow]warning:[/yellow] through gRPC the stack keeps time with its own clock: the "
            "half-life is in wall-clock seconds, not rounds (--half-life-impressions counts rounds)"
        )
    description = f"{world.name} / {policy.label} / {engine.value}"
    with _progress(rounds, description) as advance:
        if engine is EngineChoice.MEMORY:
            report = run_in_memory(
                world, policy, step_seconds=step_seconds, sample_every=sample_every, progress=advance
            )
        else:
            report = asyncio.run(_run_grpc(world, policy, state_dir, target, sample_every, keep, advance))
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict() | {"take_up": world.describe()}, indent=2) + "\n")
        return
    _print_report(report)


class _GrpcPolicy:
    """Invoke for one offer and Respond with the click, through the front door."""

    def __init__(self, stub: Any, campaign: str, world: Environment) -> None:
        self._stub = stub
        self._campaign = campaign
        self._offers = world.offers
        self._index = {offer: index for index, offer in enumerate(world.offers)}
        self._uuid = ""
        self.replicas: dict[str, int] = {}

    async def choose(self, round: Round) -> int:
        request = predictor_pb2.InvokeRequest(
            campaign=self._campaign,
            customer=round.customer,
            numberoffers=Value(number_value=1),
        )
        if round.params is not None:
            request.params.CopyFrom(json_format.ParseDict(round.params, Value()))
        reply = await self._stub.Invoke(request)
        self._uuid = reply.uuid
        self.replicas[reply.replica_id] = self.replicas.get(reply.replica_id, 0) + 1
        return self._index[reply.final_result[0].result.offer]

    async def learn(self, round: Round, offer: int, clicked: bool) -> None:
        accepted = [self._offers[offer]] if clicked else []
        await self._stub.Respond(predictor_pb2.RespondRequest(uuid=self._uuid, accepted_offers=accepted))


def _endpoints(state_dir: Path | None, target: str | None) -> tuple[str, str | None, str | None]:
    """The front door, the admin key (to publish) and the invoke key (to Invoke/Respond)."""
    resolved_target, admin_key = front_door(state_dir, target, role="admin")
    _, invoke_key = front_door(state_dir, resolved_target, role="invoke")
    return resolved_target, admin_key, invoke_key


async def _wait_for_replicas(config: Any, revision: int) -> int:
    """Until every connected predictor replica has applied the revision; returns how many there are."""
    deadline = time.monotonic() + REPLICA_WAIT_SECONDS
    while True:
        reply = await config.ReplicaStatus(config_pb2.ReplicaStatusRequest())
        predictors = [r for r in reply.replicas if r.connected and r.service in ("", "predictor")]
        if predictors and all(r.applied_revision >= revision for r in predictors):
            return len(predictors)
        if time.monotonic() > deadline:
            states = ", ".join(f"{r.replica_id}@{r.applied_revision}" for r in predictors) or "none connected"
            raise TimeoutError(
                f"replicas did not apply revision {revision} in {REPLICA_WAIT_SECONDS:.0f} s: {states}"
            )
        await asyncio.sleep(REPLICA_POLL_SECONDS)


async def _run_grpc(
    world: Environment,
    policy: PolicySettings,
    state_dir: Path | None,
    target: str | None,
    sample_every: int | None,
    keep: bool,
    advance: Any,
) -> SimulationReport:
    resolved_target, admin_key, invoke_key = _endpoints(state_dir, target)
    name = deployment_name(world)
    document = simulation_spec_document(world, policy, name)
    deadline = ClientSettings().deadline_seconds
    tls = front_door_tls(state_dir)
    admin = open_channel(resolved_target, api_key=admin_key, deadline_seconds=deadline, tls=tls)
    invoke = open_channel(resolved_target, api_key=invoke_key, deadline_seconds=deadline, tls=tls)
    config = config_pb2_grpc.ConfigServiceStub(admin)
    published = False
    try:
        reply = await config.Publish(
            config_pb2.PublishRequest(
                spec_text=json.dumps(document),
                format=config_pb2.SPEC_FORMAT_JSON,
                message=f"liveloop simulate: {world.name} seed {world.seed}",
            )
        )
        published = True
        replicas = await _wait_for_replicas(config, reply.revision)
        driver = _GrpcPolicy(predictor_pb2_grpc.PredictorServiceStub(invoke), name, world)
        report = await run_async_policy(
            world,
            driver,
            engine="grpc",
            label=policy.label,
            sample_every=sample_every,
            progress=advance,
            settings={
                **policy.__dict__,
                "deployment": name,
                "revision": reply.revision,
                "target": resolved_target,
                "replicas_connected": replicas,
            },
        )
        report.settings["invokes_per_replica"] = dict(sorted(driver.replicas.items()))
        return report
    except aio.AioRpcError as exc:
        hint = (
            " (is the stack running? `liveloop up`, or pass --target)"
            if exc.code() == grpc.StatusCode.UNAVAILABLE
            else ""
        )
        fail(f"{exc.code().name}: {exc.details()}{hint}")
        raise
    except TimeoutError as exc:
        fail(str(exc))
        raise
    finally:
        if published and not keep:
            try:
                await config.Delete(
                    config_pb2.DeleteRequest(deployment=name, message="liveloop simulate: done")
                )
            except aio.AioRpcError as exc:
                errors.print(f"[yellow]warning:[/yellow] could not delete {name}: {exc.details()}")
        await admin.close()
        await invoke.close()


def _count(value: int | None, missing: str) -> str:
    return f"{value:,}" if value is not None else missing


def _print_report(report: SimulationReport) -> None:
    share = report.regret / report.oracle_expected_clicks if report.oracle_expected_clicks else 0.0
    table = Table(title=f"simulation: {report.environment}, {report.policy}, engine {report.engine}")
    table.add_column("measure", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    rows = [
        ("seed", str(report.seed)),
        ("rounds", f"{report.rounds:,}"),
        ("clicks (sampled)", f"{report.clicks:,}"),
        ("CTR / oracle CTR", f"{report.ctr:.4f} / {report.oracle_ctr:.4f}"),
        ("expected clicks / oracle", f"{report.expected_clicks:,.1f} / {report.oracle_expected_clicks:,.1f}"),
        ("regret (expected)", f"{report.regret:,.1f} ({share:.1%} of the oracle)"),
    ]
    if report.change_round is not None:
        rows += [
            ("change at round", f"{report.change_round:,}"),
            (
                "regret before / after",
                f"{report.regret_before_change:,.1f} / {report.regret_after_change:,.1f}",
            ),
            ("rounds to recover", _count(report.recovery_rounds, "not recovered")),
            (
                f"  within {NEAR_BEST_TOLERANCE * 100:g} pt of the best",
                _count(report.near_best_recovery_rounds, "not recovered"),
            ),
        ]
    rows += [
        ("rounds to converge", _count(report.convergence_rounds, "not converged")),
        (
            f"  within {NEAR_BEST_TOLERANCE * 100:g} pt of the best",
            _count(report.near_best_convergence_rounds, "not converged"),
        ),
        ("best offer, last 500 rounds", f"{report.best_share_last_window:.1%}"),
        ("wall time", f"{report.wall_seconds:,.1f} s ({report.rounds_per_second:,.0f} rounds/s)"),
    ]
    for measure, value in rows:
        table.add_row(measure, value)
    console.print(table)
    curve = Table(title="cumulative regret")
    curve.add_column("rounds", justify="right")
    curve.add_column("regret", justify="right")
    points = report.regret_curve
    step = max(1, len(points) // 10)
    for rounds_done, regret in [*points[step - 1 :: step][:-1], points[-1]] if points else []:
        curve.add_row(f"{rounds_done:,}", f"{regret:,.1f}")
    console.print(curve)
    console.print(
        "regret is expected regret: the best offer's take-up minus the chosen offer's, summed over rounds; "
        "rounds to recover: the end of the first 500-round window after the change in which at least 90% "
        f"of choices were the new best offer (or, in the looser line, an offer whose take-up is within "
        f"{NEAR_BEST_TOLERANCE * 100:g} percentage point of it); rounds to converge: the same rule from round 0",
        style="dim",
    )
