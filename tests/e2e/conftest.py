"""A whole local stack, started with `liveloop up` on free ports, stopped with `liveloop down`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from libs.stack.launcher import StackSettings

REPO = Path(__file__).resolve().parents[2]


@dataclass
class LocalStack:
    state_dir: Path
    env: dict[str, str]
    envoy_port: int
    envoy_admin_port: int

    @property
    def front_door(self) -> str:
        return f"127.0.0.1:{self.envoy_port}"

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "libs.cli.main", *args, "--state-dir", str(self.state_dir)],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def record(self) -> dict:
        return json.loads((self.state_dir / "stack.json").read_text())

    def credentials(self) -> dict[str, str]:
        return json.loads((self.state_dir / "credentials.json").read_text())

    @property
    def redis_url(self) -> str:
        """The stack's own Redis, with its password."""
        port = self.env["LIVELOOP_STACK_REDIS_PORT"]
        return f"redis://:{self.credentials()['redis']}@127.0.0.1:{port}/0"


def stack_environment(state_dir: Path) -> tuple[dict[str, str], int, int]:
    """Environment for `liveloop` subprocesses running a stack on free ports in `state_dir`."""
    settings = StackSettings.on_free_ports(state_dir)
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIVELOOP_")}
    env.update(settings.environment())
    return env, settings.envoy_port, settings.envoy_admin_port


def local_stack(state_dir: Path) -> LocalStack:
    """A stack's settings on free ports in `state_dir`, not started yet."""
    env, envoy_port, admin_port = stack_environment(state_dir)
    return LocalStack(state_dir, env, envoy_port, admin_port)


@contextlib.contextmanager
def started(local: LocalStack) -> Iterator[LocalStack]:
    """`liveloop up` on entry (it must succeed), `liveloop down` on exit whatever happened."""
    result = local.cli("up", "--json")
    try:
        assert result.returncode == 0, f"liveloop up failed:\n{result.stdout}\n{result.stderr}"
        yield local
    finally:
        local.cli("down")


@pytest.fixture
def stack_config(tmp_path: Path) -> LocalStack:
    return local_stack(tmp_path / "state")


@pytest.fixture
def running_stack(stack_config: LocalStack) -> Iterator[LocalStack]:
    with started(stack_config) as local:
        yield local
