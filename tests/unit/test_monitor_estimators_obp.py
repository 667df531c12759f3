"""The monitor's off-policy estimators equal Open Bandit Pipeline 0.5.7's on identical arrays.

obp 0.5.7 pins versions that do not install on Python 3.11, so it lives in its own venv, in the
user's cache (`~/.cache/liveloop/venv-obp`, or under $LIVELOOP_CACHE_DIR), so that a new checkout on
the same machine (CI's) finds it built: built here on first use from OBP_RECIPE under a file lock
(parallel runs wait for one build; about a minute) and rebuilt when the recipe changes or a build
was cut short. The
reference values come from a script run in that venv: arrays in via .npz, values out via JSON.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.monitor.core.estimators import ESTIMATORS, LoggedDecisions, estimate_policy_value

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the first run builds the venv

CACHE_DIR = Path(os.environ.get("LIVELOOP_CACHE_DIR") or Path.home() / ".cache" / "liveloop")
OBP_VENV = CACHE_DIR / "venv-obp"
# pip install steps, in order: obp itself without its pins, then what it imports (torch 2.13.0 is
# a local CPU wheel on our machines).
OBP_RECIPE = (
    ("--no-deps", "--ignore-requires-python", "obp==0.5.7"),
    (
        "torch==2.13.0",
        "numpy",
        "scipy",
        "scikit-learn",
        "matplotlib",
        "seaborn",
        "tqdm",
        "pyyaml",
        "pandas<3",
    ),
)
PIP_TIMEOUT_SECONDS = 700
TOLERANCE = 1e-9
CLIPPED_WEIGHT = 3.0

REFERENCE_SCRIPT = """
import json, sys
import numpy as np
from obp.ope import (
    DirectMethod, DoublyRobust, InverseProbabilityWeighting, SelfNormalizedDoublyRobust,
    SelfNormalizedInverseProbabilityWeighting, SwitchDoublyRobust,
)

arrays = np.load(sys.argv[1])
inputs = dict(
    reward=arrays["reward"],
    action=arrays["action"],
    pscore=arrays["pscore"],
    action_dist=arrays["candidate"][:, :, None],
    estimated_rewards_by_reg_model=arrays["expected_reward"][:, :, None],
)
values = {}
for label, lambda_ in (("unclipped", np.inf), ("clipped", float(arrays["clipped_weight"]))):
    estimators = {
        "ips": InverseProbabilityWeighting(lambda_=lambda_),
        "snips": SelfNormalizedInverseProbabilityWeighting(lambda_=lambda_),
        "dm": DirectMethod(),
        "dr": DoublyRobust(lambda_=lambda_),
        "sndr": SelfNormalizedDoublyRobust(lambda_=lambda_),
        "switch-dr": SwitchDoublyRobust(lambda_=lambda_),
    }
    values[label] = {name: float(e.estimate_policy_value(**inputs)) for name, e in estimators.items()}
json.dump(values, open(sys.argv[2], "w"))
"""


def obp_python() -> Path:
    """The venv's python, building the venv first if it is missing, stale or half built."""
    python = OBP_VENV / "bin" / "python"
    ready = OBP_VENV / ".liveloop-ready"
    lock = OBP_VENV / ".lock"
    recipe = json.dumps(OBP_RECIPE)
    OBP_VENV.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        if ready.exists() and ready.read_text() == recipe and python.exists():
            return python
        for entry in OBP_VENV.iterdir():  # a build cut short or an older recipe: start over
            if entry == lock:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        run_step([sys.executable, "-m", "venv", str(OBP_VENV)], timeout=120)
        for arguments in OBP_RECIPE:
            run_step(
                [str(python), "-m", "pip", "install", "--quiet", *arguments], timeout=PIP_TIMEOUT_SECONDS
            )
        ready.write_text(recipe)
    return python


def run_step(command: list[str], timeout: float, env: dict[str, str] | None = None) -> None:
    finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if finished.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {finished.returncode}:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}"
        )


def random_decisions(seed: int, decisions: int = 3_000, width: int = 6) -> LoggedDecisions:
    """Random eligibility (at least two offers), softmax logging and candidate policies, Gaussian
    rewards, arbitrary reward predictions (padding included: it must not count)."""
    rng = np.random.default_rng(seed)
    eligible = rng.random((decisions, width)) < 0.7
    eligible[:, :2] = True
    rng.permuted(eligible, axis=1, out=eligible)

    def softmax(scale: float) -> np.ndarray:
        logits = np.where(eligible, rng.normal(0.0, scale, (decisions, width)), -np.inf)
        exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
        return np.asarray(exponentials / exponentials.sum(axis=1, keepdims=True))

    logging = softmax(1.0)
    candidate = softmax(1.5)
    action = (logging.cumsum(axis=1) > rng.random((decisions, 1))).argmax(axis=1)
    propensity = logging[np.arange(decisions), action]
    propensity[rng.random(decisions) < 0.01] = np.nan  # a few missing: left out here, not given to obp
    return LoggedDecisions(
        eligible=eligible,
        action=action,
        logging_propensity=propensity,
        reward=rng.normal(1.0, 2.0, decisions),
        candidate=candidate,
        expected_reward=rng.uniform(-1.0, 3.0, (decisions, width)),
        logging_distribution=logging,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_estimators_equal_obp(seed: int, tmp_path: Path) -> None:
    data = random_decisions(seed)
    usable = data.logging_propensity > 0
    assert data.expected_reward is not None
    inputs = tmp_path / "inputs.npz"
    np.savez(
        inputs,
        reward=data.reward[usable],
        action=data.action[usable],
        pscore=data.logging_propensity[usable],
        candidate=data.candidate[usable],
        expected_reward=np.asarray(data.expected_reward)[usable],
        clipped_weight=np.array(CLIPPED_WEIGHT),
    )
    script = tmp_path / "obp_reference.py"
    script.write_text(REFERENCE_SCRIPT)
    outputs = tmp_path / "obp_values.json"
    environment = os.environ | {"MPLBACKEND": "Agg", "MPLCONFIGDIR": str(tmp_path / "matplotlib")}
    run_step([str(obp_python()), str(script), str(inputs), str(outputs)], timeout=300, env=environment)
    reference = json.loads(outputs.read_text())

    for label, max_importance_weight in (("unclipped", 0.0), ("clipped", CLIPPED_WEIGHT)):
        evaluation = estimate_policy_value(
            data, ESTIMATORS, max_importance_weight=max_importance_weight, bootstrap_samples=20
        )
        assert evaluation.refused == {}
        assert evaluation.usable_decisions == int(usable.sum()) < data.decisions
        ours = {name: estimate.value for name, estimate in evaluation.estimates.items()}
        assert set(ours) == set(reference[label])
        for name, value in reference[label].items():
            assert abs(ours[name] - value) <= TOLERANCE, (label, name, ours[name], value)
    # Clipping changes what it should, so the comparison above saw it at work.
    assert reference["clipped"]["ips"] != reference["unclipped"]["ips"]
    assert reference["clipped"]["switch-dr"] != reference["unclipped"]["dr"]
    assert reference["clipped"]["snips"] == reference["unclipped"]["snips"]
