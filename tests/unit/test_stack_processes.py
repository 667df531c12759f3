"""Stopping the stack's processes: real processes, started detached as `liveloop up` starts them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from libs.stack.processes import start_process, stop_processes, wait_exited, wait_until

pytestmark = pytest.mark.timeout(60)

# Waits for a signal (SIGTERM ends it) and does nothing else.
SLEEPER = [sys.executable, "-c", "import signal\nsignal.pause()"]
# Ignores SIGTERM; says so on its output once it does, so the test knows the handler is set.
STUBBORN = [
    sys.executable,
    "-c",
    "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
    "while True: signal.pause()",
]


def test_stopped_processes_are_stopped_without_a_kill(tmp_path: Path) -> None:
    records = [start_process(f"p{i}", SLEEPER, {}, tmp_path / f"p{i}.log", "service", None) for i in range(3)]
    assert stop_processes(records) == []  # none needed SIGKILL
    assert all(record.process() is None for record in records)


def test_a_process_that_ignores_sigterm_is_killed_and_named(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    stubborn = start_process("stubborn", STUBBORN, {}, log, "service", None)
    polite = start_process("polite", SLEEPER, {}, tmp_path / "polite.log", "service", None)
    assert wait_until(lambda: "ready" in log.read_text(), timeout=30)
    assert stop_processes([stubborn, polite], timeout=1.0) == ["stubborn"]
    assert stubborn.process() is None
    assert polite.process() is None


def test_wait_exited_reaps_its_own_children() -> None:
    child = subprocess.Popen(SLEEPER)
    process = psutil.Process(child.pid)
    child.kill()
    assert wait_exited([process], timeout=10) == []
    assert not psutil.pid_exists(child.pid) or process.status() != psutil.STATUS_ZOMBIE
