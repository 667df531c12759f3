"""Benchmark: decision quality of the decision core against environments with known take-up rates.

    .venv/bin/python bench/decision_quality.py

Goals (from the issue):
  stationary  10 offers, take-up 2%..10%, 100k rounds: expected regret <= 300 (about 3% of the oracle)
  reversed    the same, order reversed at half time: regret <= 1,100 and recovery <= 8,000 rounds
  segments    4 segments x 10 offers, matrix redrawn at half time, 40k rounds: regret <= 1,100

Protocol: the half-lives are tuned on separate seeds (--tuning-seeds) with a fixed sweep, chosen by
a stated rule, and only then evaluated on --seeds, so the reported numbers are not the tuning runs.
Long runs use the in-memory engine (the shared policy of libs/policy, parse_arms, and a twin of
the UPDATE_ARMS Lua script). In the same run the benchmark checks that the in-memory engine makes the
same choices as the real DecisionEngine over Redis on the same seeds, and drives shorter runs through
a whole local stack (Envoy, two predictor replicas, Redis) over gRPC. Baselines: uniform random
and epsilon-greedy (0.1). Results go to bench/results/decision_quality.{json,md}.

Regret is expected regret: each round, the best offer's take-up (for that customer's segment, in
that phase) minus the chosen offer's take-up; it does not include click noise. CTR is sampled.
Rounds to recover: the end of the first 500-round window after the change in which >= 90% of the
choices were the new best offer (so at least 500).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from libs.simulation.environments import PolicySettings, make_environment, policy_rng, simulation_spec  # noqa: E402
from libs.simulation.in_memory import InMemoryPolicy  # noqa: E402
from libs.simulation.runs import run_in_memory, run_policy  # noqa: E402
from libs.stack.launcher import StackSettings  # noqa: E402
from libs.stack.processes import free_port, redis_argv, wait_until  # noqa: E402
from services.predictor.core.engine_simulation import run_with_redis  # noqa: E402

ROUNDS = {"stationary": 100_000, "reversed": 100_000, "segments": 40_000}
GOALS: dict[str, dict[str, float]] = {
    "stationary": {"regret": 300},
    "reversed": {"regret": 1_100, "recovery_rounds": 8_000},
    "segments": {"regret": 1_100},
}
REVERSED_HALF_LIVES = (4_000.0, 6_000.0, 8_000.0, 10_000.0, 12_000.0, 16_000.0)
SEGMENTS_HALF_LIVES = (5_000.0, 10_000.0, 20_000.0, 40_000.0)
EPSILON = 0.1
# Thompson priors: the default Beta(1, 1), and one centred near the offers' typical take-up (mean
# 1/21, about 5%) with the weight of 20 impressions, as ingest would seed it from historical take-up.
# The weight 20 was picked from {10, 20, 40} on the tuning seeds.
PRIORS = ((1.0, 1.0), (1.0, 20.0))


def prior_text(prior: Sequence[float]) -> str:
    return f"Beta({prior[0]:g}, {prior[1]:g})"


@dataclass(frozen=True)
class Job:
    group: str  # "tuning" or "evaluation"
    environment: str
    rounds: int
    seed: int
    policy: PolicySettings
    step_seconds: float = 1.0  # simulated seconds per round: 0.5 is twice the traffic

    @property
    def cost(self) -> float:
        """Rough relative run time: Thompson draws 512 posterior samples per round for propensities."""
        return self.rounds * (1.0 if self.policy.algorithm == "thompson" else 0.15)


def run_job(job: Job) -> dict[str, Any]:
    environment = make_environment(job.environment, rounds=job.rounds, seed=job.seed)
    report = run_in_memory(environment, job.policy, step_seconds=job.step_seconds)
    return {"group": job.group, "step_seconds": job.step_seconds, **report.to_dict()}


def run_jobs(jobs: Sequence[Job], workers: int, label: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    ordered = sorted(jobs, key=lambda job: -job.cost)  # longest first packs the workers best
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_job, job): job for job in ordered}
        for done, future in enumerate(as_completed(futures), start=1):
            result = future.result()
            results.append(result)
            log(
                f"[{label} {done}/{len(jobs)} {time.perf_counter() - started:6.0f} s] {result['environment']:<10} "
                f"{result['policy']:<32} seed {result['seed']:<4} regret {result['regret']:8.1f} "
                f"recovery {result['recovery_rounds']} ({result['wall_seconds']:.0f} s)"
            )
    return results


def log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


# Summaries ----------------------------------------------------------------------------------------


def select(results: Iterable[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    def matches(result: dict[str, Any]) -> bool:
        for key, value in where.items():
            actual = result["settings"].get(key, result.get(key))
            if actual != value:
                return False
        return True

    return sorted((r for r in results if matches(r)), key=lambda r: r["seed"])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    regrets = [r["regret"] for r in runs]
    recoveries = [r["recovery_rounds"] for r in runs]
    recovered = [value for value in recoveries if value is not None]
    oracle = statistics.mean(r["oracle_expected_clicks"] for r in runs)
    return {
        "seeds": [r["seed"] for r in runs],
        "rounds": runs[0]["rounds"],
        "regret_mean": round(statistics.mean(regrets), 1),
        "regret_max": round(max(regrets), 1),
        "regret_min": round(min(regrets), 1),
        "regret_by_seed": [round(value, 1) for value in regrets],
        "regret_share_of_oracle": round(statistics.mean(regrets) / oracle, 4),
        "regret_before_change_mean": round(statistics.mean(r["regret_before_change"] for r in runs), 1),
        "regret_after_change_mean": round(statistics.mean(r["regret_after_change"] for r in runs), 1),
        "recovery_rounds": recoveries,
        "recovery_mean": round(statistics.mean(recovered)) if recovered else None,
        "recovery_max": None if None in recoveries or not recovered else max(recovered),
        "convergence_rounds": [r["convergence_rounds"] for r in runs],
        "near_best_recovery_rounds": [r["near_best_recovery_rounds"] for r in runs],
        "near_best_convergence_rounds": [r["near_best_convergence_rounds"] for r in runs],
        "ctr_mean": round(statistics.mean(r["ctr"] for r in runs), 5),
        "expected_ctr_mean": round(statistics.mean(r["expected_clicks"] / r["rounds"] for r in runs), 5),
        "oracle_ctr_mean": round(statistics.mean(r["oracle_ctr"] for r in runs), 5),
        "best_share_last_500_mean": round(statistics.mean(r["best_share_last_window"] for r in runs), 3),
        "wall_seconds_mean": round(statistics.mean(r["wall_seconds"] for r in runs), 1),
    }


def choose_half_life(sweep: dict[float, dict[str, Any]], goal: dict[str, float]) -> tuple[float, str]:
    """The half-life with the most tuning runs meeting every goal (regret, and recovery where there
    is one); among those, the lowest mean regret."""

    def runs_meeting(summary: dict[str, Any]) -> int:
        met = 0
        for regret, recovery in zip(summary["regret_by_seed"], summary["recovery_rounds"], strict=True):
            recovered = "recovery_rounds" not in goal or (
                recovery is not None and recovery <= goal["recovery_rounds"]
            )
            met += regret <= goal["regret"] and recovered
        return met

    best = min(sweep, key=lambda h: (-runs_meeting(sweep[h]), sweep[h]["regret_mean"]))
    rule = (
        f"most tuning runs meeting every goal ({runs_meeting(sweep[best])} of {len(sweep[best]['seeds'])}), "
        "then the lowest mean regret"
    )
    return best, rule


# Engine agreement: in memory vs DecisionEngine over Redis -----------------------------------------


def engine_agreement(seeds: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    """Same seed, same rounds, through both engines: every choice must be the same."""
    cases = [
        ("stationary", PolicySettings()),
        ("reversed", PolicySettings(half_life_seconds=rounds / 4)),
        ("segments", PolicySettings(half_life_seconds=rounds / 2)),
        ("stationary", PolicySettings(algorithm="epsilon_greedy", epsilon=EPSILON)),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="liveloop-bench-redis-") as work:
        port = free_port()
        process = subprocess.Popen(
            redis_argv(port, Path(work), persistent=False),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            import redis as redis_sync

            probe = redis_sync.Redis(port=port, socket_connect_timeout=0.2)

            def answers() -> bool:
                try:
                    return bool(probe.ping())
                except redis_sync.RedisError:
                    return False

            if not wait_until(answers, timeout=15):
                raise RuntimeError("redis-server did not start")
            for name, policy in cases:
                for seed in seeds:
                    environment = make_environment(name, rounds=rounds, seed=seed)

                    async def in_redis() -> Any:
                        client = Redis(port=port)
                        try:
                            return await run_with_redis(environment, policy, client, sample_every=1)  # noqa: B023
                        finally:
                            await client.aclose()

                    through_redis = asyncio.run(in_redis())
                    spec = simulation_spec(environment, policy, "sim-agreement")
                    in_memory = run_policy(
                        environment,
                        InMemoryPolicy(spec, policy_rng(seed)),
                        engine="memory",
                        label=policy.label,
                        sample_every=1,
                    )
                    identical = through_redis.regret_curve == in_memory.regret_curve
                    rows.append(
                        {
                            "environment": name,
                            "policy": policy.label,
                            "seed": seed,
                            "rounds": rounds,
                            "regret_redis": round(through_redis.regret, 4),
                            "regret_memory": round(in_memory.regret, 4),
                            "identical_choices": identical,
                            "redis_rounds_per_second": round(through_redis.rounds_per_second),
                            "memory_rounds_per_second": round(in_memory.rounds_per_second),
                        }
                    )
                    log(
                        f"[agreement] {name:<10} {policy.label:<28} seed {seed}: redis {through_redis.regret:.2f} "
                        f"memory {in_memory.regret:.2f} identical={identical}"
                    )
        finally:
            process.terminate()
            process.wait(timeout=10)
    return rows


# Through the gRPC API of a whole local stack ------------------------------------------------------


def _cli(
    env: dict[str, str], state_dir: Path, *args: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "libs.cli.main", *args, "--state-dir", str(state_dir)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def through_grpc(
    seeds: Sequence[int],
    rounds: int,
    comparison_seeds: int,
    environment_name: str = "stationary",
    policy: PolicySettings | None = None,
    flags: Sequence[str] = (),
) -> dict[str, Any]:
    """`liveloop simulate --engine grpc` on a fresh local stack (free ports), compared with the
    in-memory engine on the same seeds and on a spread of other seeds (`flags`: the simulate options
    that make `policy`)."""
    policy = policy or PolicySettings()
    with tempfile.TemporaryDirectory(prefix="liveloop-bench-stack-") as work:
        state_dir = Path(work) / "state"
        env = {key: value for key, value in os.environ.items() if not key.startswith("LIVELOOP_")}
        env.update(StackSettings.on_free_ports(state_dir).environment())
        started = _cli(env, state_dir, "up", "--json", timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"liveloop up failed:\n{started.stdout}\n{started.stderr}")
        runs = []
        try:
            for seed in seeds:
                args = [
                    "simulate",
                    "--environment",
                    environment_name,
                    "--rounds",
                    str(rounds),
                    "--seed",
                    str(seed),
                    *flags,
                ]
                result = _cli(env, state_dir, *args, "--engine", "grpc", "--json", timeout=900)
                if result.returncode != 0:
                    raise RuntimeError(f"simulate --engine grpc failed:\n{result.stdout}\n{result.stderr}")
                grpc_report = json.loads(result.stdout)
                memory_report = run_in_memory(
                    make_environment(environment_name, rounds=rounds, seed=seed), policy
                ).to_dict()
                runs.append(
                    {
                        "seed": seed,
                        "regret_grpc": grpc_report["regret"],
                        "regret_memory": memory_report["regret"],
                        "ctr_grpc": grpc_report["ctr"],
                        "ctr_memory": memory_report["ctr"],
                        "best_share_last_500_grpc": grpc_report["best_share_last_window"],
                        "best_share_last_500_memory": memory_report["best_share_last_window"],
                        "grpc_rounds_per_second": round(grpc_report["rounds_per_second"]),
                        "invokes_per_replica": grpc_report["settings"]["invokes_per_replica"],
                        "regret_curve_grpc": grpc_report["regret_curve"],
                        "regret_curve_memory": memory_report["regret_curve"],
                    }
                )
                log(
                    f"[grpc] seed {seed}: grpc regret {grpc_report['regret']:.1f} "
                    f"({grpc_report['rounds_per_second']:.0f} rounds/s), memory {memory_report['regret']:.1f}"
                )
        finally:
            _cli(env, state_dir, "down", timeout=120)
    spread = [
        run_in_memory(make_environment(environment_name, rounds=rounds, seed=seed), policy).regret
        for seed in range(1_000, 1_000 + comparison_seeds)
    ]
    return {
        "environment": environment_name,
        "policy": policy.label,
        "rounds": rounds,
        "runs": runs,
        "memory_spread": {
            "seeds": f"1000..{1_000 + comparison_seeds - 1}",
            "regret_mean": round(statistics.mean(spread), 1),
            "regret_p10": round(float(np.percentile(spread, 10)), 1),
            "regret_p90": round(float(np.percentile(spread, 90)), 1),
        },
    }


# Report -------------------------------------------------------------------------------------------


def policy_row(
    label: str, summary: dict[str, Any], goal: dict[str, float] | None, has_change: bool
) -> list[str]:
    # Without a change, the same rule from round 0: rounds to converge (in italics).
    if has_change:
        recovery_text = rounds_list(summary["recovery_rounds"])
        near_best_text = rounds_list(summary["near_best_recovery_rounds"])
    else:
        recovery_text = f"*{rounds_list(summary['convergence_rounds'])}*"
        near_best_text = f"*{rounds_list(summary['near_best_convergence_rounds'])}*"
    met = ""
    if goal is not None:
        checks = [summary["regret_max"] <= goal["regret"]]
        if "recovery_rounds" in goal:
            checks.append(
                summary["recovery_max"] is not None and summary["recovery_max"] <= goal["recovery_rounds"]
            )
        met = "yes" if all(checks) else "**no**"
    return [
        label,
        f"{summary['regret_mean']:,.1f}",
        f"{summary['regret_max']:,.1f}",
        f"{summary['regret_share_of_oracle']:.1%}",
        recovery_text,
        near_best_text,
        f"{summary['ctr_mean']:.4f} / {summary['expected_ctr_mean']:.4f} / {summary['oracle_ctr_mean']:.4f}",
        f"{summary['best_share_last_500_mean']:.0%}",
        met,
    ]


def rounds_list(values: Sequence[int | None]) -> str:
    return ", ".join("never" if value is None else f"{value:,}" for value in values)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(document: dict[str, Any], path: Path) -> None:
    out: list[str] = []
    out.append("# Decision quality: regret against the oracle\n")
    out.append(f"Command: `{document['command']}`\n")
    machine = document["machine"]
    out.append(
        f"Machine: {machine['cpus']} CPUs, Python {machine['python']}, numpy {machine['numpy']}, "
        f"{machine['platform']}. Total wall time {document['wall_seconds'] / 60:.1f} min.\n"
    )
    out.append(
        "**Definitions.** *Regret* is expected regret, summed over rounds: the best offer's take-up for "
        "that customer's segment and phase minus the chosen offer's take-up (not sampled clicks, so it "
        "carries no click noise). *CTR* is sampled clicks / rounds; *expected CTR* is the chosen offers' "
        "mean take-up; *oracle CTR* the best offers' mean take-up. *Rounds to recover*: the end of the "
        "first 500-round window after the change in which at least 90% of choices were the new best "
        "offer (at least 500; `never` if no such window before the run ends); *within 1 pt*: the same rule "
        "counting any offer whose take-up is within 1 percentage point of the best (in `reversed` the two "
        "best offers are 0.9 points apart). In `stationary`, which has no change, those columns hold (in "
        "italics) the rounds to *converge*: the same rules counted from round 0. One round = one customer: "
        "Invoke for one offer, the click drawn from the environment, Respond with it; the simulated clock "
        "advances 1 s per round, so a half-life of h s forgets half the evidence every h rounds. "
        f"Seeds: evaluation {document['seeds']}, tuning {document['tuning_seeds']} (disjoint).\n"
    )
    out.append("## Goals\n")
    header = [
        "environment / policy",
        "mean regret",
        "max regret",
        "regret / oracle clicks",
        "rounds to recover (per seed)",
        "within 1 pt of the best",
        "CTR / expected CTR / oracle CTR",
        "best offer, last 500",
        "goal met",
    ]
    for environment, block in document["evaluation"].items():
        goal = GOALS[environment]
        goal_text = f"regret <= {goal['regret']:,.0f}"
        if "recovery_rounds" in goal:
            goal_text += f", recovery <= {goal['recovery_rounds']:,.0f} rounds"
        out.append(f"### {environment} ({block['rounds']:,} rounds; goal: {goal_text})\n")
        rows = []
        for label, entry in block["policies"].items():
            goal_here = goal if entry["goal_policy"] else None
            rows.append(policy_row(label, entry["summary"], goal_here, environment != "stationary"))
        out.append(markdown_table(header, rows) + "\n")
        out.append(
            "Regret per seed: "
            + "; ".join(
                f"{label}: {', '.join(f'{v:,.1f}' for v in entry['summary']['regret_by_seed'])}"
                for label, entry in block["policies"].items()
            )
            + "\n"
        )
    out.append("## Half-life tuning (tuning seeds only)\n")
    for title, tuning in document["tuning"].items():
        out.append(f"### {title}\n")
        rows = []
        for half_life, summary in tuning["sweep"].items():
            rows.append(
                [
                    f"{float(half_life):,.0f} s",
                    f"{summary['regret_mean']:,.1f}",
                    f"{summary['regret_max']:,.1f}",
                    f"{summary['regret_before_change_mean']:,.1f} / {summary['regret_after_change_mean']:,.1f}",
                    rounds_list(summary["recovery_rounds"]),
                    rounds_list(summary["near_best_recovery_rounds"]),
                ]
            )
        out.append(
            markdown_table(
                [
                    "half-life",
                    "mean regret",
                    "max regret",
                    "regret before / after change",
                    "rounds to recover",
                    "within 1 pt",
                ],
                rows,
            )
            + "\n"
        )
        out.append(f"Chosen: **{tuning['chosen']:,.0f} s** ({tuning['rule']}).\n")
    out.append("## The in-memory engine makes the DecisionEngine's choices\n")
    out.append(
        "Same seed, same rounds, through the real `DecisionEngine` over Redis (contact join by uuid, "
        "`UPDATE_ARMS` Lua, decay on the simulated clock, decision log) and through the in-memory "
        "engine; `identical` means the regret curve sampled every round is equal, i.e. every choice was "
        "the same.\n"
    )
    rows = [
        [
            r["environment"],
            r["policy"],
            str(r["seed"]),
            f"{r['rounds']:,}",
            f"{r['regret_redis']:.2f}",
            f"{r['regret_memory']:.2f}",
            "yes" if r["identical_choices"] else "**no**",
            f"{r['redis_rounds_per_second']:,} / {r['memory_rounds_per_second']:,}",
        ]
        for r in document["engine_agreement"]
    ]
    out.append(
        markdown_table(
            [
                "environment",
                "policy",
                "seed",
                "rounds",
                "regret (redis)",
                "regret (memory)",
                "identical",
                "rounds/s redis / memory",
            ],
            rows,
        )
        + "\n"
    )
    grpc_block = document.get("grpc")
    if grpc_block:
        out.append("## Through the gRPC API (whole local stack)\n")
        out.append(
            f"`liveloop simulate --engine grpc`: a fresh local stack (Envoy, two predictor replicas, config "
            f"service, Redis), a simulation deployment published with the admin key, every round an Invoke "
            f"and a Respond with the invoke key through Envoy. {grpc_block['environment']}, "
            f"{grpc_block['policy']}, {grpc_block['rounds']:,} rounds. The replicas' random draws are not "
            "seeded, so the gRPC run follows a different path from the in-memory run on the same seed; "
            f"the in-memory spread over {grpc_block['memory_spread']['seeds']} shows the range to expect "
            f"(mean {grpc_block['memory_spread']['regret_mean']}, p10 {grpc_block['memory_spread']['regret_p10']}, "
            f"p90 {grpc_block['memory_spread']['regret_p90']}).\n"
        )
        rows = [
            [
                str(r["seed"]),
                f"{r['regret_grpc']:.1f}",
                f"{r['regret_memory']:.1f}",
                f"{r['ctr_grpc']:.4f} / {r['ctr_memory']:.4f}",
                f"{r['best_share_last_500_grpc']:.0%} / {r['best_share_last_500_memory']:.0%}",
                f"{r['grpc_rounds_per_second']:,}",
                ", ".join(f"{k}: {v:,}" for k, v in r["invokes_per_replica"].items()),
            ]
            for r in grpc_block["runs"]
        ]
        out.append(
            markdown_table(
                [
                    "seed",
                    "regret (grpc)",
                    "regret (memory)",
                    "CTR grpc / memory",
                    "best offer, last 500, grpc / memory",
                    "rounds/s (grpc)",
                    "Invokes per replica",
                ],
                rows,
            )
            + "\n"
        )
        if all(len(r["invokes_per_replica"]) == 1 for r in grpc_block["runs"]):
            out.append(
                "Every Invoke went to one replica: Envoy's round robin alternates the two replicas per "
                "request and the simulator alternates Invoke and Respond, so every Respond went to the other "
                "replica, and every response the policy learned from crossed replicas through Redis.\n"
            )
    if document.get("discussion"):
        out.append("## Discussion\n")
        out.append("\n".join(document["discussion"]) + "\n")
    path.write_text("\n".join(out))


def discussion(document: dict[str, Any]) -> list[str]:
    """Statements derived from the numbers: each goal met or missed and by how much, and the facts
    that explain it (convergence without a change, the half-life trade-off, the baselines)."""
    notes = []
    evaluation = document["evaluation"]
    for environment, block in evaluation.items():
        goal = GOALS[environment]
        for label, entry in block["policies"].items():
            if not entry["goal_policy"]:
                continue
            summary = entry["summary"]
            missed = []
            if summary["regret_max"] > goal["regret"]:
                over = [v for v in summary["regret_by_seed"] if v > goal["regret"]]
                missed.append(
                    f"regret over {goal['regret']:,.0f} on {len(over)} of {len(summary['seeds'])} seeds "
                    f"(max {summary['regret_max']:,.1f}, {summary['regret_max'] - goal['regret']:,.1f} over; "
                    f"mean {summary['regret_mean']:,.1f})"
                )
            if "recovery_rounds" in goal:
                late = [v for v in summary["recovery_rounds"] if v is None or v > goal["recovery_rounds"]]
                if late:
                    missed.append(
                        f"recovery later than {goal['recovery_rounds']:,.0f} rounds on {len(late)} of "
                        f"{len(summary['seeds'])} seeds ({rounds_list(summary['recovery_rounds'])}; within "
                        f"1 pt of the best: {rounds_list(summary['near_best_recovery_rounds'])})"
                    )
            status = "missed: " + "; ".join(missed) if missed else "met on every seed"
            notes.append(f"- **{environment}, {label}**: goal {status}.")
    stationary = evaluation.get("stationary", {}).get("policies", {}).get("thompson")
    if stationary:
        notes.append(
            "- Settling on the exact best offer is slow when the two best offers are 0.9 points apart: in "
            "`stationary`, starting fresh and never forgetting, Thompson sampling's rounds to converge under "
            f"the strict 90% rule were {rounds_list(stationary['summary']['convergence_rounds'])} (within 1 pt "
            f"of the best: {rounds_list(stationary['summary']['near_best_convergence_rounds'])}). Recovering in `reversed` "
            "needs the same discrimination after first unlearning the old best, and a half-life also caps "
            "how much evidence the sampler can hold about the top two offers."
        )
    sweep = document["tuning"].get(f"reversed, prior {prior_text(PRIORS[0])}", {}).get("sweep", {})
    if sweep:
        shortest, longest = min(sweep, key=float), max(sweep, key=float)
        notes.append(
            f"- The half-life trade-off (tuning seeds, prior Beta(1, 1)): {float(shortest):,.0f} s gives regret "
            f"{sweep[shortest]['regret_before_change_mean']:,.1f} before the change against "
            f"{sweep[longest]['regret_before_change_mean']:,.1f} with {float(longest):,.0f} s: forgotten "
            "evidence returns each arm towards the Beta(1, 1) prior (mean 0.5, far above take-up of 2-10%), "
            "so the sampler keeps re-exploring the losing offers. Longer half-lives forget less but hold on "
            f"to the old best longer after the change (recovery {rounds_list(sweep[shortest]['recovery_rounds'])} "
            f"vs {rounds_list(sweep[longest]['recovery_rounds'])})."
        )
    for environment in ("reversed", "segments"):
        default = document["tuning"].get(f"{environment}, prior {prior_text(PRIORS[0])}")
        informed = document["tuning"].get(f"{environment}, prior {prior_text(PRIORS[1])}")
        if default and informed:
            pairs = "; ".join(
                f"{float(h):,.0f} s: {default['sweep'][h]['regret_mean']:,.1f} / "
                f"{informed['sweep'][h]['regret_mean']:,.1f}"
                for h in default["sweep"]
                if h in informed["sweep"]
            )
            notes.append(
                f"- The prior ({environment}, tuning seeds), mean regret by half-life with "
                f"{prior_text(PRIORS[0])} / {prior_text(PRIORS[1])}: {pairs}."
            )
    for environment, block in evaluation.items():
        policies = block["policies"]
        goal_label = next((label for label, entry in policies.items() if entry["goal_policy"]), None)
        uniform = policies.get("uniform random")
        if goal_label is None or uniform is None:
            continue
        others = ", ".join(
            f"{label} {entry['summary']['regret_mean']:,.1f}"
            for label, entry in policies.items()
            if label != goal_label
        )
        notes.append(
            f"- {environment}: mean regret of {goal_label} {policies[goal_label]['summary']['regret_mean']:,.1f}; "
            f"baselines and variants: {others}."
        )
    return notes


# Forgetting (issue: drift without tuning). (a) By traffic: the tuned half-life in seconds against
# the same number in impressions, at half, the same and twice the traffic it was tuned at (reversed
# environment). (b) Without tuning: change detection with its defaults against plain Thompson
# sampling and the tuned half-life, in every environment, with the rounds to recover.
TRAFFIC_STEPS = (2.0, 1.0, 0.5)  # simulated seconds per round
DRIFT_ROUNDS = {**ROUNDS, "gradual": 100_000, "single": 100_000}


def forgetting(seeds: Sequence[int], workers: int, scale: int, half_life: float) -> dict[str, Any]:
    traffic_policies = {
        f"half-life {half_life:,.0f} s": PolicySettings(half_life_seconds=half_life),
        f"half-life {half_life:,.0f} impressions": PolicySettings(half_life_impressions=half_life),
    }
    drift_policies = {
        "thompson": PolicySettings(),
        f"thompson, half-life {half_life:,.0f} s (tuned)": PolicySettings(half_life_seconds=half_life),
        "thompson, change detection (defaults)": PolicySettings(change_detection=True),
    }
    rounds = {name: value // scale for name, value in DRIFT_ROUNDS.items()}
    jobs = [
        Job("traffic", "reversed", rounds["reversed"], seed, policy, step)
        for policy in traffic_policies.values()
        for step in TRAFFIC_STEPS
        if step != 1.0 or policy.half_life_impressions  # 1x, half-life in seconds: a drift job below
        for seed in seeds
    ] + [
        Job("drift", environment, rounds[environment], seed, policy)
        for environment in DRIFT_ROUNDS
        for policy in drift_policies.values()
        for seed in seeds
    ]
    results = run_jobs(jobs, workers, "forgetting")
    traffic = {
        label: {
            f"{1 / step:g}x traffic": summarise(
                select(results, environment="reversed", step_seconds=step, **asdict(policy))
            )
            for step in TRAFFIC_STEPS
        }
        for label, policy in traffic_policies.items()
    }
    drift = {
        environment: {
            label: summarise(select(results, environment=environment, step_seconds=1.0, **asdict(policy)))
            for label, policy in drift_policies.items()
        }
        for environment in DRIFT_ROUNDS
    }
    return {
        "rounds": rounds,
        "tuned_half_life": half_life,
        "seeds": list(seeds),
        "traffic": traffic,
        "drift": drift,
    }


def forgetting_markdown(block: dict[str, Any]) -> str:
    steps = [f"{1 / step:g}x traffic" for step in TRAFFIC_STEPS]
    traffic_rows = [
        [label] + [f"{row[s]['regret_mean']:,.1f} ({rounds_list(row[s]['recovery_rounds'])})" for s in steps]
        for label, row in block["traffic"].items()
    ]
    drift_rows = []
    for environment, policies in block["drift"].items():
        for label, summary in policies.items():
            drift_rows.append(
                [
                    environment,
                    label,
                    f"{summary['regret_mean']:,.1f}",
                    ", ".join(f"{value:,.1f}" for value in summary["regret_by_seed"]),
                    rounds_list(summary["recovery_rounds"]),
                    rounds_list(summary["near_best_recovery_rounds"]),
                ]
            )
    half_life = block["tuned_half_life"]
    return "\n".join(
        [
            "# Forgetting: by traffic, and without tuning",
            "",
            f"Seeds {block['seeds']}; rounds {block['rounds']}. Regret and rounds to recover as in "
            "decision_quality.md (recovery: the end of the first 500-round window after the change with 90% "
            "best-offer choices, in `gradual` after the rates cross, half way through the drift; near-best: "
            "any offer within 1 point of the best).",
            "",
            "## By traffic",
            "",
            f"The reversed environment's half-life tuned at one round a second ({half_life:,.0f} s), against the "
            "same number as a half-life in impressions (`half_life_impressions`), each at half, the same and "
            "twice the traffic (simulated seconds per round 2, 1, 0.5). Mean regret (rounds to recover per seed).",
            "",
            markdown_table(["policy", *steps], traffic_rows),
            "",
            "## Without tuning",
            "",
            "Plain Thompson sampling, the tuned half-life and change detection with its defaults "
            "(`change_detection: true`), one round a second.",
            "",
            markdown_table(
                [
                    "environment",
                    "policy",
                    "mean regret",
                    "regret by seed",
                    "rounds to recover",
                    "within 1 pt",
                ],
                drift_rows,
            ),
            "",
            *_grpc_lines(block.get("grpc")),
        ]
    )


def _grpc_lines(block: dict[str, Any] | None) -> list[str]:
    if not block:
        return []
    rows = [
        [
            str(run["seed"]),
            f"{run['regret_grpc']:,.1f}",
            f"{run['regret_memory']:,.1f}",
            f"{run['grpc_rounds_per_second']:,}",
        ]
        for run in block["runs"]
    ]
    spread = block["memory_spread"]
    return [
        "## Through the gRPC API",
        "",
        "`liveloop simulate --engine grpc --change-detection` on a local stack (two replicas behind Envoy), "
        f"the {block['environment']} environment, {block['rounds']:,} rounds (the reversal at half time), "
        "against the in-memory engine on the same seeds (the replicas draw from their own generators, so "
        f"runs match in distribution, not draw for draw); in memory over seeds {spread['seeds']}: mean "
        f"{spread['regret_mean']:,.1f}, 10th to 90th percentile {spread['regret_p10']:,.1f} to "
        f"{spread['regret_p90']:,.1f}.",
        "",
        markdown_table(["seed", "regret, gRPC", "regret, in memory", "rounds/s, gRPC"], rows),
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--tuning-seeds", type=int, nargs="+", default=[101, 102, 103])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--agreement-rounds", type=int, default=2_000, help="0 skips the Redis check")
    parser.add_argument("--grpc-rounds", type=int, default=5_000, help="0 skips the gRPC runs")
    parser.add_argument("--grpc-seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--quick", action="store_true", help="a tenth of the rounds: a smoke test of this script"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--forgetting-grpc-rounds",
        type=int,
        default=0,
        help="with --forgetting-only: also change detection on the reversed environment through the "
        "gRPC API (a local stack), this many rounds per seed (0: none)",
    )
    parser.add_argument(
        "--forgetting-only",
        type=float,
        metavar="HALF_LIFE",
        help="Only the forgetting comparisons (by traffic, and change detection against this tuned "
        "half-life): bench/results/forgetting.*",
    )
    parser.add_argument(
        "--render-only",
        type=Path,
        metavar="JSON",
        help="Only rewrite the discussion and the markdown of an earlier results file",
    )
    args = parser.parse_args()
    if args.render_only is not None:
        earlier: dict[str, Any] = json.loads(args.render_only.read_text())
        earlier["discussion"] = discussion(earlier)
        args.render_only.write_text(json.dumps(earlier, indent=1) + "\n")
        write_markdown(earlier, args.render_only.with_suffix(".md"))
        log(f"rewrote {args.render_only.with_suffix('.md')}")
        return 0
    started = time.perf_counter()
    scale = 10 if args.quick else 1
    rounds = {name: value // scale for name, value in ROUNDS.items()}
    if args.forgetting_only is not None:
        block = forgetting(args.seeds, args.workers, scale, args.forgetting_only / scale)
        if args.forgetting_grpc_rounds:
            block["grpc"] = through_grpc(
                args.grpc_seeds,
                args.forgetting_grpc_rounds,
                comparison_seeds=10,
                environment_name="reversed",
                policy=PolicySettings(change_detection=True),
                flags=("--change-detection",),
            )
        block["command"] = " ".join(
            [".venv/bin/python", "bench/decision_quality.py", *map(shlex.quote, sys.argv[1:])]
        )
        block["wall_seconds"] = round(time.perf_counter() - started, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "forgetting" + ("_quick" if args.quick else "")
        (args.out / f"{stem}.json").write_text(json.dumps(block, indent=1) + "\n")
        text = (
            forgetting_markdown(block)
            + f"\nCommand: `{block['command']}` ({block['wall_seconds']:,.0f} s).\n"
        )
        (args.out / f"{stem}.md").write_text(text)
        log(f"wrote {args.out / (stem + '.md')}")
        return 0

    # 1. Tune the half-lives on the tuning seeds, for the default prior and a take-up-like prior.
    sweeps = (("reversed", REVERSED_HALF_LIVES), ("segments", SEGMENTS_HALF_LIVES))
    tuning_jobs = [
        Job(
            "tuning",
            environment,
            rounds[environment],
            seed,
            PolicySettings(half_life_seconds=h / scale, alpha0=alpha0, beta0=beta0),
        )
        for environment, half_lives in sweeps
        for alpha0, beta0 in PRIORS
        for h in half_lives
        for seed in args.tuning_seeds
    ]
    tuning_results = run_jobs(tuning_jobs, args.workers, "tuning")
    tuning: dict[str, Any] = {}
    chosen_half_life: dict[tuple[str, tuple[float, float]], float] = {}
    for environment, half_lives in sweeps:
        goal = {
            key: value / scale if key == "recovery_rounds" else value
            for key, value in GOALS[environment].items()
        }
        for alpha0, beta0 in PRIORS:
            sweep = {
                h / scale: summarise(
                    select(
                        tuning_results,
                        environment=environment,
                        half_life_seconds=h / scale,
                        alpha0=alpha0,
                        beta0=beta0,
                    )
                )
                for h in half_lives
            }
            chosen, rule = choose_half_life(sweep, goal)
            chosen_half_life[environment, (alpha0, beta0)] = chosen
            tuning[f"{environment}, prior {prior_text((alpha0, beta0))}"] = {
                "environment": environment,
                "prior": [alpha0, beta0],
                "sweep": {str(h): s for h, s in sweep.items()},
                "chosen": chosen,
                "rule": rule,
            }
            log(
                f"[tuning] {environment}, prior {prior_text((alpha0, beta0))}: half-life {chosen:g} s ({rule})"
            )

    # 2. Evaluate on the evaluation seeds: the goal policies, variants and baselines.
    default, informed = PRIORS
    reversed_h = chosen_half_life["reversed", default]
    reversed_informed_h = chosen_half_life["reversed", informed]
    segments_h = chosen_half_life["segments", default]
    segments_informed_h = chosen_half_life["segments", informed]
    a, b = informed
    plans: dict[str, list[tuple[str, PolicySettings, bool]]] = {
        "stationary": [
            ("thompson", PolicySettings(), True),
            (f"thompson, prior {prior_text(informed)}", PolicySettings(alpha0=a, beta0=b), True),
            ("epsilon_greedy 0.1", PolicySettings("epsilon_greedy", epsilon=EPSILON), False),
            ("uniform random", PolicySettings("uniform"), False),
        ],
        "reversed": [
            (f"thompson, half-life {reversed_h:,.0f} s", PolicySettings(half_life_seconds=reversed_h), True),
            (
                f"thompson, prior {prior_text(informed)}, half-life {reversed_informed_h:,.0f} s",
                PolicySettings(half_life_seconds=reversed_informed_h, alpha0=a, beta0=b),
                True,
            ),
            ("thompson, no half-life", PolicySettings(), False),
            (
                f"epsilon_greedy 0.1, half-life {reversed_h:,.0f} s",
                PolicySettings("epsilon_greedy", half_life_seconds=reversed_h, epsilon=EPSILON),
                False,
            ),
            ("epsilon_greedy 0.1, no half-life", PolicySettings("epsilon_greedy", epsilon=EPSILON), False),
            ("uniform random", PolicySettings("uniform"), False),
        ],
        "segments": [
            (
                f"thompson + segment, half-life {segments_h:,.0f} s",
                PolicySettings(half_life_seconds=segments_h),
                True,
            ),
            ("thompson + segment, no half-life", PolicySettings(), True),
            (
                f"thompson + segment, prior {prior_text(informed)}, half-life {segments_informed_h:,.0f} s",
                PolicySettings(half_life_seconds=segments_informed_h, alpha0=a, beta0=b),
                True,
            ),
            (
                f"thompson without the segment, half-life {segments_h:,.0f} s",
                PolicySettings(half_life_seconds=segments_h, use_segment=False),
                False,
            ),
            (
                f"epsilon_greedy 0.1 + segment, half-life {segments_h:,.0f} s",
                PolicySettings("epsilon_greedy", half_life_seconds=segments_h, epsilon=EPSILON),
                False,
            ),
            ("uniform random", PolicySettings("uniform"), False),
        ],
    }
    evaluation_jobs = [
        Job("evaluation", environment, rounds[environment], seed, policy)
        for environment, entries in plans.items()
        for _, policy, _ in entries
        for seed in args.seeds
    ]
    evaluation_results = run_jobs(evaluation_jobs, args.workers, "evaluation")
    evaluation: dict[str, Any] = {}
    for environment, entries in plans.items():
        policies = {}
        for label, policy, goal_policy in entries:
            runs = select(evaluation_results, environment=environment, **asdict(policy))
            policies[label] = {
                "settings": asdict(policy),
                "goal_policy": goal_policy,
                "summary": summarise(runs),
                "runs": runs,
            }
        evaluation[environment] = {
            "rounds": rounds[environment],
            "goal": GOALS[environment],
            "policies": policies,
        }

    # 3. The in-memory engine against the DecisionEngine over Redis; 4. through the gRPC API.
    agreement = engine_agreement(args.seeds, args.agreement_rounds) if args.agreement_rounds else []
    grpc_block = (
        through_grpc(args.grpc_seeds, args.grpc_rounds, comparison_seeds=20) if args.grpc_rounds else None
    )

    document: dict[str, Any] = {
        "benchmark": "decision_quality",
        "command": " ".join(
            [".venv/bin/python", "bench/decision_quality.py", *map(shlex.quote, sys.argv[1:])]
        ),
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
        "seeds": args.seeds,
        "tuning_seeds": args.tuning_seeds,
        "regret": "expected: the best offer's take-up minus the chosen offer's, summed over rounds",
        "recovery_rule": "end of the first 500-round window after the change with >= 90% best-offer choices",
        "tuning": tuning,
        "evaluation": evaluation,
        "engine_agreement": agreement,
        "grpc": grpc_block,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    document["discussion"] = discussion(document)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "decision_quality" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(document, indent=1) + "\n")
    write_markdown(document, args.out / f"{stem}.md")
    log(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
