"""`liveloop config` against a whole local stack: publish, diff, history, rollback, delete, and every
predictor replica following each change over Watch (ReplicaStatus and Ping say which revision)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import REPO, LocalStack, local_stack, started

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

EXAMPLE = REPO / "examples" / "deployments" / "telco-offers.yaml"
REPLICAS = {"predictor-1", "predictor-2"}


@pytest.fixture(scope="module")
def config_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One stack for the whole module (like `running_stack`, which starts one per test)."""
    with started(local_stack(tmp_path_factory.mktemp("config-cli") / "state")) as stack:
        yield stack


def run_cli(
    stack: LocalStack, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Like `stack.cli`, with no terminal on stdin and optionally more environment."""
    return subprocess.run(
        [sys.executable, "-m", "libs.cli.main", *args, "--state-dir", str(stack.state_dir)],
        env={**stack.env, **(extra_env or {})},
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    result = stack.cli(*args)
    assert result.returncode == 0, f"liveloop {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def ok_json(stack: LocalStack, *args: str) -> Any:
    return json.loads(ok(stack, *args, "--json").stdout)


def head_revision(stack: LocalStack) -> int:
    return int(ok_json(stack, "config", "list")["head_revision"])


def assert_replicas_on(stack: LocalStack, revision: int, deployments: dict[str, int]) -> None:
    status = stack.cli("config", "status", "--wait-for-head", "10", "--json")
    report = json.loads(status.stdout)
    assert status.returncode == 0, report
    assert report["on_head"] is True
    assert report["head_revision"] == revision
    connected = {r["replica_id"]: r for r in report["replicas"] if r["connected"]}
    assert set(connected) == REPLICAS, report
    for replica in connected.values():
        assert replica["applied_revision"] == revision, replica
        assert replica["revisions_behind"] == 0, replica
        assert replica["last_nack_revision"] == 0, replica
        assert replica["deployments"] == deployments, replica


def test_publish_diff_rollback_delete_reach_every_replica(config_stack: LocalStack, tmp_path: Path) -> None:
    stack = config_stack
    example = str(EXAMPLE)

    first = ok_json(stack, "config", "publish", example, "--message", "first version")
    assert first == {
        "deployment": "telco-offers",
        "revision": 1,
        "changed": True,
        "dry_run": False,
        "diff": first["diff"],
        "warnings": [],
    }
    assert first["diff"].startswith("--- /dev/null\n+++ telco-offers@1\n")
    again = ok(stack, "config", "publish", example)
    assert "unchanged (revision 1)" in again.stdout
    assert head_revision(stack) == 1

    assert_replicas_on(stack, 1, {"telco-offers": 1})
    # --target: `liveloop ping` on its own calls 127.0.0.1:8080, not the port in the stack's record.
    pings = ok_json(stack, "ping", "--count", "8", "--target", stack.front_door)
    assert {p["config_revision"] for p in pings} == {1}, pings
    assert {p["replica_id"] for p in pings} <= REPLICAS

    original = EXAMPLE.read_text()
    assert "exploration_epsilon: 0.05\n" in original
    modified = tmp_path / "telco-offers.yaml"
    modified.write_text(original.replace("exploration_epsilon: 0.05\n", "exploration_epsilon: 0.1\n"))
    dry = ok_json(stack, "config", "publish", str(modified), "--dry-run")
    assert (dry["revision"], dry["changed"], dry["dry_run"]) == (2, True, True)
    assert head_revision(stack) == 1
    second = ok(stack, "config", "publish", str(modified), "-m", "explore more")
    assert "as revision 2" in second.stdout
    assert '-  "exploration_epsilon": 0.05,' in second.stdout
    assert '+  "exploration_epsilon": 0.1,' in second.stdout

    diff = ok_json(stack, "config", "diff", "telco-offers", "1")
    assert (diff["from_revision"], diff["to_revision"], diff["changed"]) == (1, 2, True)
    changed_lines = [
        line for line in diff["diff"].splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed_lines == ['-  "exploration_epsilon": 0.05,', '+  "exploration_epsilon": 0.1,']
    readable = ok(stack, "config", "diff", "telco-offers", "1", "2")
    assert "+++ telco-offers@2" in readable.stdout

    history = ok_json(stack, "config", "history", "telco-offers")
    assert [(e["revision"], e["kind"], e["message"]) for e in history] == [
        (2, "publish", "explore more"),
        (1, "publish", "first version"),
    ]
    table = ok(stack, "config", "history", "telco-offers", "--diff")
    assert "explore more" in table.stdout
    assert '+  "exploration_epsilon": 0.1,' in table.stdout

    rolled = ok_json(stack, "config", "rollback", "telco-offers", "--to", "1")
    assert (rolled["revision"], rolled["changed"]) == (3, True)
    restored = ok_json(stack, "config", "get", "telco-offers")
    at_one = ok_json(stack, "config", "get", "telco-offers", "--revision", "1")
    assert restored["revision"] == 3
    assert restored["spec"]["exploration_epsilon"] == 0.05
    assert restored["spec"] == at_one["spec"]
    assert restored["checksum"] == at_one["checksum"]
    yaml_text = ok(stack, "config", "get", "telco-offers").stdout
    assert "exploration_epsilon: 0.05" in yaml_text
    assert_replicas_on(stack, 3, {"telco-offers": 3})
    pings = ok_json(stack, "ping", "--count", "4", "--target", stack.front_door)
    assert {p["config_revision"] for p in pings} == {3}, pings

    # An invalid spec is refused with the field named, and nothing is stored.
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(original.replace("price: 5.0,", "price: -1,", 1))
    refused = stack.cli("config", "publish", str(invalid))
    assert refused.returncode == 1, refused.stdout
    assert "INVALID_ARGUMENT" in refused.stderr
    assert "offers[0].price" in refused.stderr
    assert head_revision(stack) == 3
    assert len(ok_json(stack, "config", "history")) == 3

    unknown = stack.cli("config", "get", "no-such-deployment")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr
    assert "no-such-deployment" in unknown.stderr

    # Without a terminal to ask on, delete needs --yes.
    unconfirmed = run_cli(stack, "config", "delete", "telco-offers")
    assert unconfirmed.returncode == 2
    assert "--yes" in unconfirmed.stderr
    assert head_revision(stack) == 3

    deleted = ok_json(stack, "config", "delete", "telco-offers", "--yes")
    assert deleted == {"deployment": "telco-offers", "revision": 4}
    listing = ok_json(stack, "config", "list")
    assert listing == {"head_revision": 4, "deployments": []}
    assert_replicas_on(stack, 4, {})
    gone = stack.cli("config", "get", "telco-offers")
    assert gone.returncode == 1
    assert "NOT_FOUND" in gone.stderr


def test_the_invoke_key_cannot_publish(config_stack: LocalStack) -> None:
    stack = config_stack
    before = head_revision(stack)
    invoke_key = stack.credentials()["invoke"]
    result = run_cli(stack, "config", "publish", str(EXAMPLE), extra_env={"LIVELOOP_API_KEY": invoke_key})
    assert result.returncode == 1
    assert "PERMISSION_DENIED" in result.stderr
    assert head_revision(stack) == before
