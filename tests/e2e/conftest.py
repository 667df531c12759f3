"""A whole local stack, started with `liveloop up` on free ports, stopped with `liveloop down`."""

from __future__ import annotations

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


def stack_environment(state_dir: Path) -> tuple[dict[str, str], int, int]:
    """Environment for `liveloop` subprocesses running a stack on free ports in `state_dir`."""
    settings = StackSettings.on_free_ports(state_dir)
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIVELOOP_")}
    env.update(settings.environment())
    return env, settings.envoy_port, settings.envoy_admin_port


@pytest.fixture
def stack_config(tmp_path: Path) -> LocalStack:
    state_dir = tmp_path / "state"
    env, envoy_port, admin_port = stack_environment(state_dir)
    return LocalStack(state_dir, env, envoy_port, admin_port)


@pytest.fixture
def running_stack(stack_config: LocalStack) -> Iterator[LocalStack]:
    result = stack_config.cli("up", "--json")
    try:
        assert result.returncode == 0, f"liveloop up failed:\n{result.stdout}\n{result.stderr}"
        yield stack_config
    finally:
        stack_config.cli("down")
