"""Off-policy estimates of a candidate policy's value from the decision log (the first slot).

Every logged decision has its eligible offers (padded to K columns, with a mask), the offer the
logging policy showed first (`action`), that offer's exact logging propensity, the reward, the
candidate policy's first-slot distribution over the eligible offers and, for the model-based
estimators, a reward model's prediction per eligible offer (services.monitor.core.reward_model
gives cross-fitted ones). With importance weights w = candidate[i, action] / propensity:

- ips:       mean(min(w, lambda) r)
- snips:     sum(w r) / sum(w)                                (never clipped, as in obp)
- dm:        mean(sum_k candidate[i, k] q[i, k])
- dr:        dm_i + min(w, lambda) (r - q[i, action]), averaged
- sndr:      dm_i + w (r - q[i, action]) / mean(w), averaged  (never clipped, as in obp)
- switch-dr: dm_i + [w <= lambda] w (r - q[i, action]), averaged

These are Open Bandit Pipeline 0.5.7's InverseProbabilityWeighting, SelfNormalizedInverse-
ProbabilityWeighting, DirectMethod, DoublyRobust, SelfNormalizedDoublyRobust and SwitchDoublyRobust
on the same arrays (tests/unit/test_monitor_estimators_obp.py checks it). lambda is obp's
`lambda_`: `max_importance_weight`, where 0 means none (obp's default, infinity; obp's own 0 would
zero every weight).

Refusals. A point estimate that cannot mean anything is left out of the result, and `refused` and
`warnings` say why:
- no usable decision (a decision without a propensity is not usable): every estimate;
- an effective sample size under MIN_EFFECTIVE_SAMPLE_FRACTION of the usable decisions: the
  weight-based estimates (a handful of decisions would carry the whole estimate);
- more than MAX_UNSUPPORTED_MASS of the candidate's mass on offers the logging policy showed first
  with probability under SUPPORT_FLOOR: the weight-based estimates (the log holds too little
  evidence about those offers, and what it holds comes with huge weights).
DM does not use the weights, so it is still reported under both; under poor support it rests on
the reward model's extrapolation to offers the log has hardly any rewards for, and a warning says
so. Missing propensities above MAX_MISSING_PROPENSITY_FRACTION only warn: the estimates cover the
usable decisions, which are a biased sample if what went missing depends on the decision.

Intervals are percentile bootstraps over the usable decisions (the reward model is held fixed, so
DM's interval leaves out its fitting error); std_error is the bootstrap replicates' standard
deviation. Each resample is a vector of draw counts per decision (one bincount) times the matrix of
per-decision terms, so memory stays O(decisions): 1M decisions x 200 resamples take about 2 s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from libs.common.errors import InvalidArgument

ESTIMATORS = ("ips", "snips", "dm", "dr", "sndr", "switch-dr")
DEFAULT_ESTIMATORS = ("ips", "snips", "dm", "dr")
WEIGHT_BASED_ESTIMATORS = frozenset({"ips", "snips", "dr", "sndr", "switch-dr"})
MODEL_BASED_ESTIMATORS = frozenset({"dm", "dr", "sndr", "switch-dr"})

# Weight-based estimates are refused under this effective sample size, as a share of usable decisions.
MIN_EFFECTIVE_SAMPLE_FRACTION = 0.01
# An offer the logging policy shows first with a probability under this is "almost never shown".
SUPPORT_FLOOR = 0.001
# Weight-based estimates are refused when the candidate puts more of its mass than this on such offers.
MAX_UNSUPPORTED_MASS = 0.05
# Without logging_distribution that mass is estimated from the logged actions; it must exceed the
# limit by this many standard errors before estimates are refused, so that noise refuses nothing.
UNSUPPORTED_MASS_STANDARD_ERRORS = 2.0
# More missing propensities than this share of the decisions is warned about.
MAX_MISSING_PROPENSITY_FRACTION = 0.05
DEFAULT_BOOTSTRAP_SAMPLES = 500
# Rows of candidate and logging_distribution must sum to 1 within this.
DISTRIBUTION_TOLERANCE = 1e-6

FloatArray = NDArray[np.float64]
Rows = slice | NDArray[np.intp]  # the usable decisions


@dataclass(frozen=True)
class LoggedDecisions:
    """n logged decisions, first slot, over K columns of eligible offers (arrays are coerced).

    eligible: (n, K) bool, which columns hold an eligible offer (the rest is padding).
    action: (n,) int, the column of the offer shown first.
    logging_propensity: (n,) the logging policy's probability of that offer; NaN or 0: missing.
    reward: (n,) the reward of the decision.
    candidate: (n, K) the candidate policy's first-slot distribution, 0 on padding, rows sum to 1.
    expected_reward: (n, K) a reward model's prediction per eligible offer (padding ignored);
        needed by dm, dr, sndr and switch-dr.
    logging_distribution: (n, K) the logging policy's first-slot distribution over the eligible
        offers; when given it decides the support check exactly instead of estimating it.
    """

    eligible: NDArray[np.bool_]
    action: NDArray[np.intp]
    logging_propensity: FloatArray
    reward: FloatArray
    candidate: FloatArray
    expected_reward: FloatArray | None = None
    logging_distribution: FloatArray | None = None

    def __post_init__(self) -> None:
        eligible = np.asarray(self.eligible)
        if eligible.ndim != 2 or eligible.dtype != np.bool_:
            raise InvalidArgument("must be a 2-d boolean array (decisions x columns)", field="eligible")
        n, width = eligible.shape
        action = _vector(self.action, n, "action")
        if action.size and not np.issubdtype(action.dtype, np.integer):
            raise InvalidArgument("must hold column indices (integers)", field="action")
        action = action.astype(np.intp)
        if np.any((action < 0) | (action >= width)):
            raise InvalidArgument(f"every index must lie in [0, {width})", field="action")
        if not np.all(eligible[np.arange(n), action]):
            raise InvalidArgument("every logged action must be an eligible column", field="action")
        propensity = _vector(self.logging_propensity, n, "logging_propensity").astype(np.float64)
        present = propensity[~np.isnan(propensity)]
        if np.any((present < 0) | (present > 1 + DISTRIBUTION_TOLERANCE)):
            raise InvalidArgument("must lie in [0, 1] (NaN or 0: missing)", field="logging_propensity")
        reward = _vector(self.reward, n, "reward").astype(np.float64)
        if not np.all(np.isfinite(reward)):
            raise InvalidArgument("must be finite", field="reward")
        candidate = _distribution(self.candidate, eligible, "candidate")
        object.__setattr__(self, "eligible", eligible)
        object.__setattr__(self, "action", action)
        object.__setattr__(self, "logging_propensity", propensity)
        object.__setattr__(self, "reward", reward)
        object.__setattr__(self, "candidate", candidate)
        if self.expected_reward is not None:
            expected = np.asarray(self.expected_reward, dtype=np.float64)
            if expected.shape != eligible.shape:
                raise InvalidArgument(f"must have shape {eligible.shape}", field="expected_reward")
            if not np.all(np.isfinite(expected[eligible])):
                raise InvalidArgument("must be finite on eligible columns", field="expected_reward")
            object.__setattr__(self, "expected_reward", np.where(eligible, expected, 0.0))
        if self.logging_distribution is not None:
            distribution = _distribution(self.logging_distribution, eligible, "logging_distribution")
            object.__setattr__(self, "logging_distribution", distribution)

    @property
    def decisions(self) -> int:
        return int(self.eligible.shape[0])


@dataclass(frozen=True)
class PolicyValueEstimate:
    estimator: str
    value: float
    lower: float  # percentile bootstrap interval at the evaluation's confidence level
    upper: float
    std_error: float  # standard deviation of the bootstrap replicates
    lift: float  # value minus the logged value


@dataclass(frozen=True)
class PolicyEvaluation:
    estimates: dict[str, PolicyValueEstimate]  # in the order asked for, refused ones left out
    refused: dict[str, str]  # estimator -> why it has no estimate
    decisions: int
    usable_decisions: int  # those with a logging propensity
    logged_value: float | None  # mean reward of the usable decisions; None without any
    effective_sample_size: float  # (sum w)^2 / sum w^2 over usable decisions, unclipped weights
    max_weight: float  # largest importance weight, before clipping
    unsupported_mass: float  # candidate's mean mass on offers shown first with p < SUPPORT_FLOOR
    confidence_level: float
    bootstrap_samples: int
    warnings: list[str] = field(default_factory=list)


def estimate_policy_value(
    data: LoggedDecisions,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    *,
    confidence_level: float = 0.95,
    max_importance_weight: float = 0.0,
    bootstrap_samples: int = 0,
    seed: int = 0,
) -> PolicyEvaluation:
    """Estimate the candidate's value with each estimator (see the module doc for the formulas).

    max_importance_weight: obp's lambda_ (0: none): ips and dr clip weights to it, switch-dr drops
    the correction of decisions whose weight exceeds it; snips and sndr ignore it, as obp does.
    bootstrap_samples: resamples for the interval (0: DEFAULT_BOOTSTRAP_SAMPLES).
    """
    names = _checked_estimators(estimators, data)
    if not 0.0 < confidence_level < 1.0:
        raise InvalidArgument("must lie in (0, 1)", field="confidence_level")
    if math.isnan(max_importance_weight) or max_importance_weight < 0:
        raise InvalidArgument("must be >= 0 (0: no clipping)", field="max_importance_weight")
    if bootstrap_samples < 0:
        raise InvalidArgument(f"must be >= 0 (0: {DEFAULT_BOOTSTRAP_SAMPLES})", field="bootstrap_samples")
    resamples = bootstrap_samples or DEFAULT_BOOTSTRAP_SAMPLES
    weight_limit = max_importance_weight if max_importance_weight > 0 else math.inf

    n = data.decisions
    usable = data.logging_propensity > 0  # NaN compares False
    usable_count = int(usable.sum())
    warnings: list[str] = []
    refused: dict[str, str] = {}
    missing = n - usable_count
    if missing > MAX_MISSING_PROPENSITY_FRACTION * n:
        warnings.append(
            f"missing-propensities: {missing} of {n} decisions have no logging propensity and are left "
            "out; the estimates cover the rest, a biased sample if what is missing depends on the decision"
        )
    if usable_count == 0:
        reason = "no-usable-decisions: no decision has a logging propensity"
        warnings.append(reason)
        return PolicyEvaluation(
            estimates={},
            refused=dict.fromkeys(names, reason),
            decisions=n,
            usable_decisions=0,
            logged_value=None,
            effective_sample_size=0.0,
            max_weight=0.0,
            unsupported_mass=0.0,
            confidence_level=confidence_level,
            bootstrap_samples=resamples,
            warnings=warnings,
        )

    # A slice when every decision is usable: the (n, K) arrays are then read, not copied.
    rows: Rows = slice(None) if usable_count == n else np.flatnonzero(usable)
    terms = _DecisionTerms.of(data, rows, weight_limit)
    weights = terms.weight
    weight_square_sum = float(np.dot(weights, weights))
    effective_sample_size = float(weights.sum()) ** 2 / weight_square_sum if weight_square_sum > 0 else 0.0
    unsupported_mass, unsupported_margin = _unsupported_mass(data, rows, weights)

    weight_based = [name for name in names if name in WEIGHT_BASED_ESTIMATORS]
    if effective_sample_size < MIN_EFFECTIVE_SAMPLE_FRACTION * usable_count:
        reason = (
            f"low-effective-sample-size: {effective_sample_size:.1f} effective of {usable_count} usable "
            f"decisions (under {MIN_EFFECTIVE_SAMPLE_FRACTION:.0%}): the candidate rarely agrees with "
            "what was logged, and a few decisions would carry the whole estimate"
        )
        warnings.append(_refusing(reason, weight_based))
        refused.update(dict.fromkeys(weight_based, reason))
    if unsupported_mass - unsupported_margin > MAX_UNSUPPORTED_MASS:
        reason = (
            f"poor-support: the candidate puts {unsupported_mass:.1%} of its mass on offers the logging "
            f"policy shows first with probability under {SUPPORT_FLOOR} (limit {MAX_UNSUPPORTED_MASS:.0%})"
        )
        warnings.append(_refusing(reason, weight_based))
        for name in weight_based:
            refused.setdefault(name, reason)
        if "dm" in names:
            warnings.append(
                "dm-extrapolates: dm is still reported, but for those offers it rests on the reward "
                "model's extrapolation, not on logged rewards"
            )

    logged_value = float(np.mean(terms.reward))
    kept = [name for name in names if name not in refused]
    sums = terms.sums
    values = {name: STATISTICS[name][0](sums) for name in kept}
    replicates = _bootstrap(terms, kept, resamples, seed)
    tail = 100.0 * (1.0 - confidence_level) / 2.0
    estimates: dict[str, PolicyValueEstimate] = {}
    for name in kept:
        value = float(values[name][0])
        lower, upper = np.nanpercentile(replicates[name], [tail, 100.0 - tail])
        spread = np.nanstd(replicates[name], ddof=1) if resamples > 1 else 0.0
        estimates[name] = PolicyValueEstimate(
            estimator=name,
            value=value,
            lower=float(lower),
            upper=float(upper),
            std_error=float(spread),
            lift=value - logged_value,
        )
    return PolicyEvaluation(
        estimates=estimates,
        refused=refused,
        decisions=n,
        usable_decisions=usable_count,
        logged_value=logged_value,
        effective_sample_size=effective_sample_size,
        max_weight=float(weights.max()),
        unsupported_mass=unsupported_mass,
        confidence_level=confidence_level,
        bootstrap_samples=resamples,
        warnings=warnings,
    )


Statistic = Callable[[Mapping[str, FloatArray]], FloatArray]


@dataclass(frozen=True)
class _DecisionTerms:
    """Per usable decision, the columns whose (resampled) sums every estimator is a function of."""

    reward: FloatArray
    weight: FloatArray  # unclipped
    columns: dict[str, FloatArray]

    @classmethod
    def of(cls, data: LoggedDecisions, rows: Rows, weight_limit: float) -> _DecisionTerms:
        action = data.action[rows]
        index = np.arange(action.size)
        reward = data.reward[rows]
        candidate = data.candidate[rows]
        weight = candidate[index, action] / data.logging_propensity[rows]
        columns = {
            "one": np.ones(action.size),
            "weight": weight,
            "ips": reward * np.minimum(weight, weight_limit),
            "weighted_reward": reward * weight,
        }
        if data.expected_reward is not None:
            expected = data.expected_reward[rows]
            # obp's np.average(q, weights=candidate): divided by the row sum, which is 1 up to rounding
            direct = np.einsum("ik,ik->i", expected, candidate) / candidate.sum(axis=1)
            residual = reward - expected[index, action]
            columns["dm"] = direct
            columns["dr"] = direct + np.minimum(weight, weight_limit) * residual
            columns["weighted_residual"] = weight * residual
            columns["switch-dr"] = direct + (weight <= weight_limit) * weight * residual
        return cls(reward=reward, weight=weight, columns=columns)

    @property
    def sums(self) -> dict[str, FloatArray]:
        return {name: np.array([column.sum()]) for name, column in self.columns.items()}


def _mean_of(column: str) -> Statistic:
    return lambda sums: sums[column] / sums["one"]


def _ratio(numerator: str, denominator: str) -> Statistic:
    return lambda sums: _divide(sums[numerator], sums[denominator])


# Each estimator as a function of column sums over decisions, with the columns it reads.
STATISTICS: dict[str, tuple[Statistic, tuple[str, ...]]] = {
    "ips": (_mean_of("ips"), ("one", "ips")),
    "snips": (_ratio("weighted_reward", "weight"), ("weighted_reward", "weight")),
    "dm": (_mean_of("dm"), ("one", "dm")),
    "dr": (_mean_of("dr"), ("one", "dr")),
    "sndr": (
        lambda sums: sums["dm"] / sums["one"] + _divide(sums["weighted_residual"], sums["weight"]),
        ("one", "dm", "weighted_residual", "weight"),
    ),
    "switch-dr": (_mean_of("switch-dr"), ("one", "switch-dr")),
}


def _bootstrap(
    terms: _DecisionTerms, names: Sequence[str], resamples: int, seed: int
) -> dict[str, FloatArray]:
    """Replicates of each named estimator over `resamples` resamples (with replacement) of the decisions."""
    if not names:
        return {}
    columns = sorted({column for name in names for column in STATISTICS[name][1]})
    matrix = np.column_stack([terms.columns[column] for column in columns])
    n = matrix.shape[0]
    random = np.random.default_rng(seed)
    sums = np.empty((resamples, len(columns)))
    for resample in range(resamples):
        # How often each decision is drawn: O(n) memory, and one pass over the terms per resample.
        counts = np.bincount(random.integers(0, n, size=n), minlength=n)
        sums[resample] = counts @ matrix
    by_column = {column: sums[:, position] for position, column in enumerate(columns)}
    with np.errstate(invalid="ignore", divide="ignore"):
        return {name: STATISTICS[name][0](by_column) for name in names}


def _unsupported_mass(data: LoggedDecisions, rows: Rows, weights: FloatArray) -> tuple[float, float]:
    """The candidate's mean mass on offers shown first with p < SUPPORT_FLOOR, and a noise margin.

    With logging_distribution it is exact (margin 0). Without it, the logged actions estimate it:
    E[w 1{p >= floor}] is the candidate's mass on well-supported offers, so one minus its mean is
    the rest (offers never shown included), with UNSUPPORTED_MASS_STANDARD_ERRORS of its standard
    error as the margin.
    """
    if data.logging_distribution is not None:
        rare = data.logging_distribution[rows] < SUPPORT_FLOOR
        mass = np.einsum("ik,ik->i", data.candidate[rows], rare)
        return float(mass.mean()), 0.0
    supported = weights * (data.logging_propensity[rows] >= SUPPORT_FLOOR)
    error = float(supported.std(ddof=1) / math.sqrt(supported.size)) if supported.size > 1 else 0.0
    return max(0.0, 1.0 - float(supported.mean())), UNSUPPORTED_MASS_STANDARD_ERRORS * error


def _checked_estimators(estimators: Sequence[str], data: LoggedDecisions) -> list[str]:
    if isinstance(estimators, str):
        estimators = (estimators,)
    names = list(dict.fromkeys(estimators))
    unknown = [name for name in names if name not in ESTIMATORS]
    if unknown or not names:
        raise InvalidArgument(
            f"choose from {', '.join(ESTIMATORS)} (got {unknown or 'none'})", field="estimators"
        )
    model_based = [name for name in names if name in MODEL_BASED_ESTIMATORS]
    if model_based and data.expected_reward is None:
        raise InvalidArgument(
            f"needed by {', '.join(model_based)}: give a reward model's predictions or leave those out",
            field="expected_reward",
        )
    return names


def _refusing(reason: str, names: Sequence[str]) -> str:
    return f"{reason}; no estimate from {', '.join(names)}" if names else reason


def _divide(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
    with np.errstate(invalid="ignore", divide="ignore"):
        result: FloatArray = numerator / denominator
    return result


def _vector(values: Any, n: int, name: str) -> NDArray[Any]:
    array = np.asarray(values)
    if array.shape != (n,):
        raise InvalidArgument(f"must have shape ({n},), one per decision", field=name)
    return array


def _distribution(values: Any, eligible: NDArray[np.bool_], name: str) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != eligible.shape:
        raise InvalidArgument(f"must have shape {eligible.shape}", field=name)
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise InvalidArgument("must hold finite non-negative probabilities", field=name)
    if np.any(array[~eligible] != 0):
        raise InvalidArgument("must be 0 on columns that are not eligible", field=name)
    if not np.allclose(array.sum(axis=1), 1.0, rtol=0.0, atol=DISTRIBUTION_TOLERANCE):
        raise InvalidArgument("every row must sum to 1 over the eligible columns", field=name)
    return array
