"""Training throughput: samples per second with one process against two torchrun workers (DDP, gloo).

    .venv/bin/python bench/training_throughput.py --rows 40000 --epochs 3 --rounds 3

Each round trains the trainer's own loop (services.trainer.core.training.train_model) on the same
synthetic take-up data, once in one process and once under `torchrun --standalone
--nproc_per_node=2`; each run is a fresh process (torch imported, data generated in it), and only
the training loop is timed (samples per second as the loop reports it: training rows x epochs /
elapsed, validation included). It also records the held-out metrics of both, which should agree
(DDP averages the shards' gradients into the whole batch's). Results go to
bench/results/training_throughput.{json,md}.

On a 2-core machine shared with other work, two workers compete with everything else for the same
two cores: read the ratio, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic(rows: int, features: int, seed: int) -> tuple[Any, Any]:
    """A TrainingSetPlan and TrainingData with `features` numeric inputs and a logistic label."""
    import numpy as np

    from libs.common.training_spec import Encoding
    from services.trainer.core.training_data import ColumnInfo, ResolvedFeature, TrainingData, TrainingSetPlan

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    weights = rng.normal(size=features) / np.sqrt(features)
    labels = (rng.random(rows) < 1 / (1 + np.exp(-(x @ weights * 2.0)))).astype(np.float64)
    names = [f"f{i}" for i in range(features)]
    columns = {name: x[:, i].copy() for i, name in enumerate(names)}
    plan = TrainingSetPlan(
        columns={name: ColumnInfo(name, "numeric", "float64") for name in [*names, "label"]},
        features=tuple(ResolvedFeature(name, Encoding.STANDARDIZE, "float64") for name in names),
        label="label",
        split_column="",
        row_count=rows,
        positives=int(labels.sum()),
        in_catalog=False,
    )
    return plan, TrainingData(labels, columns, None, "synthetic")


def worker(arguments: argparse.Namespace) -> None:
    """One training run (one process, or one rank under torchrun); rank 0 writes the result."""
    import torch.distributed as dist

    from libs.common.training_spec import TrainingJobSpec
    from services.trainer.core import training

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    spec = TrainingJobSpec.model_validate(
        {
            "model_name": "bench",
            "training_set": "synthetic",
            "label": "label",
            "hyperparameters": {
                "epochs": arguments.epochs,
                "batch_size": arguments.batch_size,
                "hidden_sizes": arguments.hidden,
                "learning_rate": 0.01,
            },
            "early_stopping": {"patience": 0},
            "seed": 7,
        }
    )
    plan, data = synthetic(arguments.rows, arguments.features, seed=3)
    reports: list[Any] = []
    outcome = training.train_model(spec, plan, data, reports.append, distributed=distributed)
    rank = dist.get_rank() if distributed else 0
    if distributed:
        dist.destroy_process_group()
    if rank == 0:
        Path(arguments.result).write_text(
            json.dumps(
                {
                    "samples_per_second": reports[-1].rows_per_second,
                    "training_seconds": reports[-1].elapsed_seconds,
                    "training_rows": outcome.summary.training_rows,
                    "test_metrics": outcome.summary.test_metrics,
                }
            )
        )


def run(world: int, arguments: argparse.Namespace, scratch: Path, index: int) -> dict[str, Any]:
    result = scratch / f"result-{world}-{index}.json"
    common = [
        "--worker",
        "--result",
        str(result),
        "--rows",
        str(arguments.rows),
        "--features",
        str(arguments.features),
        "--epochs",
        str(arguments.epochs),
        "--batch-size",
        str(arguments.batch_size),
        "--hidden",
        *map(str, arguments.hidden),
    ]
    script = str(Path(__file__).resolve())
    if world == 1:
        command = [sys.executable, script, *common]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            script,
            *common,
        ]
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    outcome: dict[str, Any] = json.loads(result.read_text())
    outcome["wall_seconds"] = time.monotonic() - started
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, nargs="*", default=[64, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    arguments = parser.parse_args()
    if arguments.worker:
        worker(arguments)
        return

    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(arguments.rounds):
            for world in (1, 2):  # alternate, so drifting load hits both alike
                outcome = run(world, arguments, Path(scratch), index)
                runs[world].append(outcome)
                print(
                    f"round {index + 1}, {world} process(es): {outcome['samples_per_second']:,.0f} samples/s, "
                    f"log loss {outcome['test_metrics']['log_loss']:.6f}",
                    flush=True,
                )
    median = {world: statistics.median(r["samples_per_second"] for r in rs) for world, rs in runs.items()}
    one, two = runs[1][0]["test_metrics"], runs[2][0]["test_metrics"]
    report = {
        "benchmark": "training_throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "parameters": {
            key: getattr(arguments, key)
            for key in ("rows", "features", "epochs", "batch_size", "hidden", "rounds")
        },
        "runs": {str(world): rs for world, rs in runs.items()},
        "median_samples_per_second": {str(world): value for world, value in median.items()},
        "speedup_two_over_one": median[2] / median[1],
        "metric_difference_two_minus_one": {key: two[key] - one[key] for key in ("auc", "log_loss")},
    }
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "training_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Training throughput: one process against two torchrun workers (DDP, gloo)",
        "",
        f"`{report['command']}` on {report['date']}, {report['machine']['platform']}, "
        f"{report['machine']['cpus']} CPUs (load average at the end: "
        f"{', '.join(f'{v:.1f}' for v in report['machine']['load_average_at_end'])}).",
        "",
        f"{arguments.rows:,} rows ({int(arguments.rows * 0.6):,} training), {arguments.features} numeric features, "
        f"MLP {arguments.hidden}, batch {arguments.batch_size}, {arguments.epochs} epochs, {arguments.rounds} rounds.",
        "",
        "| processes | median samples/s | runs (samples/s) | test log loss | test AUC |",
        "|---|---|---|---|---|",
    ]
    for world, rs in runs.items():
        metrics = rs[0]["test_metrics"]
        speeds = ", ".join(f"{r['samples_per_second']:,.0f}" for r in rs)
        lines.append(
            f"| {world} | {median[world]:,.0f} | {speeds} | "
            f"{metrics['log_loss']:.6f} | {metrics['auc']:.6f} |"
        )
    lines += [
        "",
        f"Two workers over one: {report['speedup_two_over_one']:.2f}x. Metric difference (two - one): "
        f"log loss {report['metric_difference_two_minus_one']['log_loss']:.2e}, "
        f"AUC {report['metric_difference_two_minus_one']['auc']:.2e}.",
        "",
    ]
    (arguments.out / "training_throughput.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
