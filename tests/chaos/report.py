"""Figures of chaos scenarios, appended as JSON lines to $LIVELOOP_CHAOS_REPORT when it is set
(bench/chaos.py sets it and writes bench/results/chaos.md from them)."""

from __future__ import annotations

import json
import os


def report(scenario: str, figures: dict[str, object]) -> None:
    target = os.environ.get("LIVELOOP_CHAOS_REPORT")
    if target:
        with open(target, "a") as handle:
            handle.write(json.dumps({"scenario": scenario, **figures}) + "\n")
