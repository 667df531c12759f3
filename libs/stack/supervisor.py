"""The local stack's supervisor: a process that exits is started again, with back-off.

`liveloop up` starts it last, detached like the others (`python -m libs.stack.supervisor STATE_DIR`),
and records it in `stack.json` as the process of kind `supervisor`; `liveloop down` stops it first,
so nothing it restarts outlives the stack. It is the only writer of `stack.json` once the stack is
up: each restart replaces the process's record (new pid) and counts it (`restarts`), which
`liveloop status` shows. A process is started again at once the first time; one that exits again
within `STABLE_SECONDS` of its start waits 1 s, then 2, 4, ... up to `MAX_DELAY_SECONDS`, so a
service that cannot start does not spin. What happened goes to `logs/supervisor.log`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from libs.stack.processes import process_environment, start_process

logger = logging.getLogger("liveloop.supervisor")

SETTINGS_FILE = "stack-settings.json"
# `liveloop restart NAME` leaves NAME here before it stops the process: started again at once, and
# not counted as a crash in the back-off.
REQUESTED_RESTARTS_DIR = "requested-restarts"
STABLE_SECONDS = 30.0
FIRST_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 30.0
CHECK_SECONDS = 0.2


@dataclass
class Backoff:
    """When a process that exited may start again."""

    delay: float = 0.0
    not_before: float = 0.0

    def exited(self, now: float, ran_for: float) -> None:
        if ran_for >= STABLE_SECONDS:
            self.delay = 0.0
        else:
            self.delay = min(max(self.delay * 2, FIRST_DELAY_SECONDS), MAX_DELAY_SECONDS)
        self.not_before = now + self.delay


def supervise(state_dir: Path, stop: threading.Event, clock: Callable[[], float] = time.monotonic) -> None:
    """Restart the stack's processes until `stop` is set or the stack record disappears."""
    # Imported here: the launcher starts this module by name and must not import it.
    from libs.stack.credentials import ensure_credentials
    from libs.stack.launcher import StackRecord, StackSettings, envoy_plan, plan_processes

    settings = StackSettings.model_validate_json((state_dir / SETTINGS_FILE).read_text())
    plans = {plan.name: plan for plan in plan_processes(settings, ensure_credentials(state_dir))}
    plans["envoy"] = envoy_plan(settings, write_config=False)
    backoffs: dict[str, Backoff] = {}
    exited_at: dict[str, float] = {}
    started_at = {name: clock() for name in plans}
    logs = state_dir / "logs"
    while not stop.wait(CHECK_SECONDS):
        record = StackRecord.load(state_dir)
        if record is None:
            logger.info("the stack record is gone: the supervisor stops")
            return
        changed = False
        for index, process_record in enumerate(record.processes):
            plan = plans.get(process_record.name)
            if plan is None or process_record.process() is not None:
                continue
            now = clock()
            backoff = backoffs.setdefault(plan.name, Backoff())
            if plan.name not in exited_at:
                exited_at[plan.name] = now
                request = state_dir / REQUESTED_RESTARTS_DIR / plan.name
                if request.exists():
                    request.unlink()
                    backoff.not_before = now
                    logger.info("%s (pid %d) stopped by `liveloop restart`", plan.name, process_record.pid)
                else:
                    backoff.exited(now, ran_for=now - started_at[plan.name])
                    logger.warning(
                        "%s (pid %d) exited after %.1f s; starting it again in %.0f s",
                        plan.name,
                        process_record.pid,
                        now - started_at[plan.name],
                        backoff.delay,
                    )
            if now < backoff.not_before or stop.is_set():
                continue
            replacement = start_process(
                plan.name,
                plan.argv,
                process_environment(plan.env),
                logs / f"{plan.name}.log",
                plan.kind,
                plan.port,
            )
            replacement.restarts = process_record.restarts + 1
            record.processes[index] = replacement
            started_at[plan.name] = now
            del exited_at[plan.name]
            changed = True
            logger.warning(
                "%s started again as pid %d (restart %d)", plan.name, replacement.pid, replacement.restarts
            )
        if changed:
            record.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Restart the local stack's processes when they exit")
    parser.add_argument("state_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()

    def on_signal(_number: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("supervising the stack in %s", args.state_dir)
    supervise(args.state_dir, stop)
    logger.info("supervisor stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
