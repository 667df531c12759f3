"""Chaos figures: the chaos test group (tests/chaos, and the front-door attacks in tests/e2e) run on
a whole local stack under load, with the figures each scenario measured written to
bench/results/chaos.json and chaos.md.

    .venv/bin/python bench/chaos.py

The tests assert the bounds (zero failed requests through Envoy for the replica and config cases,
no acknowledged response lost or learned twice); this records what was measured besides: calls
that succeeded and failed, failed Respond attempts that a retry then acknowledged, throughput and
the slowest Invoke→Respond cycle while the fault happened. The machine's load average goes with
them, since the stack, the load and the attackers share its cores.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TESTS = ["tests/chaos", "tests/e2e/test_front_door_attacks.py"]


def main() -> int:
    with tempfile.TemporaryDirectory() as work:
        figures_path = Path(work) / "chaos.jsonl"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
        load_before = os.getloadavg()
        result = subprocess.run(
            command, cwd=REPO, env={**os.environ, "LIVELOOP_CHAOS_REPORT": str(figures_path)}, check=False
        )
        load_after = os.getloadavg()
        rows = (
            [json.loads(line) for line in figures_path.read_text().splitlines()]
            if figures_path.exists()
            else []
        )
    document = {
        "command": ".venv/bin/python bench/chaos.py",
        "pytest": shlex.join(["pytest", *TESTS]),
        "tests_passed": result.returncode == 0,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in load_after],
        },
        "scenarios": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(document, indent=2) + "\n")
    (RESULTS / "chaos.md").write_text(markdown(document))
    print((RESULTS / "chaos.md").read_text())
    return result.returncode


def markdown(document: dict[str, object]) -> str:
    rows: list[dict[str, object]] = document["scenarios"]  # type: ignore[assignment]
    lines = [
        "# Chaos under load",
        "",
        f"`{document['command']}` on {document['date']} ({document['machine']}); load average "
        f"{document['load_average']}; the tests {'passed' if document['tests_passed'] else 'FAILED'}.",
        "",
        "Six clients run Invoke then Respond through Envoy in a loop (each Respond sent again until",
        "acknowledged) while the fault happens; the run goes on until every process is healthy again",
        "and 100 more cycles are done. The attack rows are 300 sequential Invokes while the attack runs.",
        "",
        "| scenario | Invokes OK | failed | Respond attempts failed (then acknowledged) | responses acknowledged | cycles/s | p99 cycle ms | slowest cycle ms | failures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row["scenario"],
            row.get("invokes_ok", "-"),
            row.get("invokes_failed", "-"),
            row.get("respond_attempts_failed", "-"),
            row.get("responses_acknowledged", "-"),
            row.get("cycles_per_second", "-"),
            row.get("p99_cycle_ms", "-"),
            row.get("max_cycle_ms", "-"),
            ", ".join(f"{k}: {v}" for k, v in dict(row.get("failures", {})).items()) or "none",  # type: ignore[call-overload]
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    extra = [row for row in rows if "restart_seconds" in row]
    for row in extra:
        lines += [
            "",
            f"{row['scenario']}: `liveloop restart redis` took {row['restart_seconds']} s until Redis answered again.",
        ]
    lines += [
        "",
        "Every acknowledged response was learned exactly once in every scenario (the tests check the",
        "decision log and the arm statistics against the acknowledgements).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
