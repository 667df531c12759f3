"""The publish gate: before a candidate spec is stored, estimate on the logged decisions what it
would earn (the monitor's EvaluatePolicy) against what the live revision earned. A deployment whose
live spec sets `publish_gate.require_evaluation` refuses a candidate whose estimate's upper bound is
below the live value by more than `max_regression` (or that cannot be evaluated at all), unless the
publish is forced; either way the estimate goes into the audit trail with the revision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from libs.common.deployment_spec import PublishGate
from libs.common.errors import LiveloopError


@dataclass(frozen=True)
class CandidateEstimate:
    estimator: str
    value: float
    lower: float
    upper: float
    live_value: float  # what the live revision earned per decision on the same decisions
    decisions: int
    warnings: Sequence[str] = ()


class PolicyEvaluator(Protocol):
    async def estimate(self, deployment: str, spec_json: str, gate: PublishGate) -> CandidateEstimate | None:
        """The candidate's estimate; None when nothing is logged to evaluate on. Raises
        LiveloopError (with the reason) when no estimate can be made."""


@dataclass(frozen=True)
class GateOutcome:
    estimate: CandidateEstimate | None
    passed: bool
    reason: str = ""
    forced: bool = False
    warnings: list[str] = field(default_factory=list)

    def audit_text(self) -> str:
        """One line for the history."""
        verdict = "passed" if self.passed else ("forced past the gate" if self.forced else "refused")
        if self.estimate is None:
            return f"evaluation {verdict}: {self.reason}"
        e = self.estimate
        return (
            f"evaluation {verdict}: {e.estimator} {e.value:.4f} [{e.lower:.4f}, {e.upper:.4f}] vs live "
            f"{e.live_value:.4f} on {e.decisions} decisions" + (f" ({self.reason})" if self.reason else "")
        )


async def evaluate_candidate(
    evaluator: PolicyEvaluator | None, deployment: str, spec_json: str, gate: PublishGate
) -> GateOutcome:
    if evaluator is None:
        return GateOutcome(None, False, "the config service has no monitor to evaluate with (monitor_target)")
    try:
        estimate = await evaluator.estimate(deployment, spec_json, gate)
    except LiveloopError as exc:
        return GateOutcome(None, False, f"no estimate: {exc.message}")
    if estimate is None:
        return GateOutcome(None, True, "no decisions logged in the window: nothing to evaluate on")
    floor = estimate.live_value - gate.max_regression
    if estimate.upper < floor:
        return GateOutcome(
            estimate,
            False,
            f"the upper bound {estimate.upper:.4f} is below the live value {estimate.live_value:.4f}"
            + (f" minus the allowed regression {gate.max_regression:g}" if gate.max_regression else ""),
            warnings=list(estimate.warnings),
        )
    return GateOutcome(estimate, True, warnings=list(estimate.warnings))
