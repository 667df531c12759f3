"""The statistics a scorer reads, as plain values and arrays: arm counts per offer of a segment
(decayed to now, windows applied), naive Bayes counts, and linear models. Where they are stored
and how they are updated is the statistics store's business (the predictor keeps them in Redis, a
simulation in memory); this module only reads them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from libs.common import redis_keys
from libs.common.deployment_spec import ThompsonAlgorithm

StatisticsKind = Literal["arms", "naive_bayes", "linear"]


@dataclass(frozen=True)
class ArmCounts:
    """One offer's evidence in a segment, decayed to now."""

    impressions: float = 0.0
    successes: float = 0.0
    prior_alpha: float = 0.0
    prior_beta: float = 0.0


@dataclass(frozen=True)
class LinearState:
    a: np.ndarray  # (d, d)
    b: np.ndarray  # (d,)


@dataclass
class Statistics:
    arms: Mapping[str, ArmCounts] = field(default_factory=dict)
    naive_bayes: Mapping[str, float] = field(default_factory=dict)  # "<offer>|<var>=<value>|n|s" counts
    linear: Mapping[str, LinearState] = field(default_factory=dict)


def arm_columns(
    arms: Mapping[str, ArmCounts], offers: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(impressions, successes, prior alpha, prior beta) of these offers, zeros where unknown; at
    once from the options store's column table, offer by offer from any other mapping."""
    if isinstance(arms, ArmTable):
        return arms.columns(offers)
    counts = [arms.get(offer, ArmCounts()) for offer in offers]
    return (
        np.array([c.impressions for c in counts], dtype=np.float64),
        np.array([c.successes for c in counts], dtype=np.float64),
        np.array([c.prior_alpha for c in counts], dtype=np.float64),
        np.array([c.prior_beta for c in counts], dtype=np.float64),
    )


@dataclass(frozen=True)
class ArmPolicy:
    """How evidence ages: from the Thompson parameters (other arm algorithms keep it forever)."""

    half_life_seconds: float = 0.0
    window_seconds: float = 0.0
    count_cap: float = 0.0
    # Evidence halves every this many impressions in the segment (of any offer): forgetting that
    # follows the traffic, not the clock (0: none).
    half_life_impressions: float = 0.0
    # Per arm, restart the evidence from the arm's recent impressions when they differ from its
    # history beyond chance (see CHANGE_TEST_BUCKETS): drift handling without a rate to tune.
    change_detection: bool = False

    @classmethod
    def from_algorithm(cls, algorithm: object) -> ArmPolicy:
        if isinstance(algorithm, ThompsonAlgorithm):
            return cls(
                algorithm.half_life_seconds or 0.0,
                algorithm.window_seconds or 0.0,
                algorithm.count_cap or 0.0,
                algorithm.half_life_impressions or 0.0,
                algorithm.change_detection,
            )
        half_life = getattr(algorithm, "half_life_seconds", None)
        impressions = getattr(algorithm, "half_life_impressions", None)
        return cls(half_life_seconds=half_life or 0.0, half_life_impressions=impressions or 0.0)


# Change detection: each arm fills buckets of its own impressions, one per size; a full bucket is
# compared with the arm's evidence before it by a Bernoulli likelihood-ratio test, and when the
# log-likelihood ratio passes CHANGE_TEST_THRESHOLD the arm keeps only that bucket's evidence. The
# small bucket catches a large change quickly, the large ones a small change. The threshold is a
# false alarm about once in 16,000 checks of a steady arm (2 x 8 against chi-squared with one
# degree of freedom); an arm of a steady segment checks once per 50 of its impressions at most.
# Chosen once on the benchmark's tuning seeds (bench/results/forgetting.md), not per deployment.
CHANGE_TEST_BUCKETS = (50.0, 500.0, 5000.0)
CHANGE_TEST_THRESHOLD = 8.0


def bernoulli_divergence(p: float, q: float) -> float:
    """KL(Bernoulli(p) || Bernoulli(q)), 0 log 0 taken as 0; as UPDATE_ARMS computes it in Lua."""
    value = 0.0
    if p > 0:
        value += p * math.log(p / q)
    if p < 1:
        value += (1 - p) * math.log((1 - p) / (1 - q))
    return value


def changed(bucket_n: float, bucket_s: float, before_n: float, before_s: float) -> bool:
    """Whether a bucket's take-up differs from the evidence before it beyond chance (see above)."""
    if before_n < bucket_n or bucket_n <= 0:
        return False  # too little history to tell
    pooled = (bucket_s + before_s) / (bucket_n + before_n)
    if pooled <= 0 or pooled >= 1:
        return False
    recent = min(max(bucket_s / bucket_n, 0.0), 1.0)
    old = min(max(before_s / before_n, 0.0), 1.0)
    ratio = bucket_n * bernoulli_divergence(recent, pooled) + before_n * bernoulli_divergence(old, pooled)
    return ratio > CHANGE_TEST_THRESHOLD


_ARM_FIELDS = ("n", "s", "t", "c", "pa", "pb", "wb", "wn", "ws", "pn", "ps")
# The segment's impression clock (an arm's `c` is its reading at the arm's last update).
SEGMENT_CLOCK_FIELD = redis_keys.SEGMENT_CLOCK_FIELD
_COUNT_FIELDS = ("n", "s", "pa", "pb", "wn", "ws", "pn", "ps")
_PARSE_PLANS_KEPT = 256


@dataclass(frozen=True)
class _ParsePlan:
    """Where each field of each offer sits in an arm hash's HGETALL reply (-1: absent)."""

    offers: tuple[str, ...]
    positions: dict[str, np.ndarray]  # field -> per offer, its position among the values, or -1
    clock_position: int = -1  # SEGMENT_CLOCK_FIELD's position among the values, or -1


_parse_plans: dict[tuple[bytes | str, ...], _ParsePlan] = {}


def _parse_plan(keys: tuple[bytes | str, ...]) -> _ParsePlan:
    """The plan for a hash with these fields, made once per field layout (a segment's hash keeps
    its fields; values change)."""
    plan = _parse_plans.get(keys)
    if plan is not None:
        return plan
    offers: dict[str, int] = {}
    located: list[tuple[int, str, int]] = []
    clock_position = -1
    for position, key in enumerate(keys):
        name = key.decode() if isinstance(key, bytes) else key
        if name == SEGMENT_CLOCK_FIELD:
            clock_position = position
            continue
        offer, _, part = name.rpartition("|")
        located.append((offers.setdefault(offer, len(offers)), part, position))
    positions = {field: np.full(len(offers), -1, dtype=np.intp) for field in _ARM_FIELDS}
    for index, part, position in located:
        if part in positions:
            positions[part][index] = position
    plan = _ParsePlan(tuple(offers), positions, clock_position)
    if len(_parse_plans) >= _PARSE_PLANS_KEPT:
        _parse_plans.clear()
    _parse_plans[keys] = plan
    return plan


class ArmTable(Mapping[str, ArmCounts]):
    """The arms of one segment, decayed to now, as columns; a Mapping of offer -> ArmCounts."""

    def __init__(
        self,
        offers: Sequence[str],
        impressions: np.ndarray,
        successes: np.ndarray,
        prior_alpha: np.ndarray,
        prior_beta: np.ndarray,
        *,
        index: Mapping[str, int] | None = None,
    ) -> None:
        self._index = (
            index if index is not None else {offer: position for position, offer in enumerate(offers)}
        )
        # One zero row at the end stands for every offer without statistics.
        self._columns = tuple(
            np.append(column.astype(np.float64), 0.0)
            for column in (impressions, successes, prior_alpha, prior_beta)
        )

    def __getitem__(self, offer: str) -> ArmCounts:
        position = self._index[offer]
        n, s, pa, pb = (float(column[position]) for column in self._columns)
        return ArmCounts(n, s, pa, pb)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def columns(self, offers: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(impressions, successes, prior alpha, prior beta) of these offers; zeros for unknown ones."""
        missing = len(self._index)
        rows = np.fromiter((self._index.get(offer, missing) for offer in offers), np.intp, len(offers))
        n, s, pa, pb = (column[rows] for column in self._columns)
        return n, s, pa, pb


@dataclass(frozen=True)
class ArmFields:
    """An arm hash read once (`<offer>|<field>` -> number): each field as a column over the offers,
    NaN where absent. `at` decays it to a moment, so a replica that keeps a segment's hash for a
    while parses its text once and only decays it per request."""

    offers: tuple[str, ...]
    index: Mapping[str, int]  # offer -> its row
    columns: Mapping[str, np.ndarray]  # field -> per offer
    clock: float = 0.0  # the segment's impression clock (SEGMENT_CLOCK_FIELD)
    # The last table `at` made, per policy, with its moment.
    _decayed: dict[ArmPolicy, tuple[float, ArmTable]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def read(cls, raw: Mapping[Any, Any]) -> ArmFields:
        """A field whose value is not a number is ignored."""
        plan = _parse_plan(tuple(raw))
        try:
            values = list(map(float, raw.values()))
        except ValueError:  # a field that is not a number: the careful path
            return cls.read(_numbers_only(raw))
        # Position -1 reads the padding: "absent", zero for a count and NaN for a time.
        absent_nan = np.array([*values, np.nan], dtype=np.float64)
        absent_zero = absent_nan.copy()
        absent_zero[-1] = 0.0
        if not np.isfinite(absent_zero).all():  # a count written as nan or inf: as nan_to_num reads it
            absent_zero = np.nan_to_num(absent_zero)
        index = {offer: position for position, offer in enumerate(plan.offers)}
        columns = {
            name: (absent_zero if name in _COUNT_FIELDS else absent_nan)[rows]
            for name, rows in plan.positions.items()
        }
        clock = float(absent_zero[plan.clock_position]) if plan.clock_position >= 0 else 0.0
        return cls(plan.offers, index, columns, clock)

    def at(self, policy: ArmPolicy, now: float) -> ArmTable:
        """The arms decayed to `now` (half-life, two-bucket window), vectorised over the offers. The
        previous table serves again while `now` is within DECAY_UNCHANGED of the policy's shortest
        time scale from its moment (a fresh one would differ by at most that fraction of the counts):
        with a half-life of days, requests milliseconds apart need no decay of their own."""
        previous = self._decayed.get(policy)
        if previous is not None and abs(now - previous[0]) <= _unchanged_for(policy):
            return previous[1]
        table = self._decay(policy, now)
        self._decayed[policy] = (now, table)
        return table

    def _decay(self, policy: ArmPolicy, now: float) -> ArmTable:
        field = self.columns.__getitem__
        n, s = field("n"), field("s")
        if policy.half_life_seconds > 0:
            elapsed = np.maximum(now - np.where(np.isnan(field("t")), now, field("t")), 0.0)
            factor = np.power(0.5, elapsed / policy.half_life_seconds)
            n, s = n * factor, s * factor
        if policy.half_life_impressions > 0:  # aged by the segment's impressions since the arm's update
            updated_at = field("c")
            age = np.maximum(self.clock - np.where(np.isnan(updated_at), self.clock, updated_at), 0.0)
            factor = np.power(0.5, age / policy.half_life_impressions)
            n, s = n * factor, s * factor
        if policy.window_seconds > 0:
            window = policy.window_seconds
            begun = field("wb")
            windowed = ~np.isnan(begun)
            elapsed = now - np.where(windowed, begun, 0.0)
            wn, ws, pn, ps = field("wn"), field("ws"), field("pn"), field("ps")
            expired = elapsed >= 2 * window
            previous = (elapsed >= window) & ~expired
            fading = np.maximum(0.0, 1.0 - (elapsed - window) / window)
            current = np.maximum(0.0, 1.0 - elapsed / window)
            window_n = np.where(expired, 0.0, np.where(previous, wn * fading, wn + pn * current))
            window_s = np.where(expired, 0.0, np.where(previous, ws * fading, ws + ps * current))
            n, s = np.where(windowed, window_n, n), np.where(windowed, window_s, s)
        return ArmTable(
            self.offers,
            n,
            np.minimum(s, n),
            field("pa"),
            field("pb"),
            index=self.index,
        )


# A change in the decayed counts (as a fraction of the counts) too small to matter beside a
# replica's kept copy, which misses up to statistics_max_age of impressions.
DECAY_UNCHANGED = 1e-6


def _unchanged_for(policy: ArmPolicy) -> float:
    """Seconds over which the policy's decay moves counts by at most DECAY_UNCHANGED of them."""
    scales = [scale for scale in (policy.half_life_seconds, policy.window_seconds) if scale > 0]
    return DECAY_UNCHANGED * min(scales) if scales else math.inf


def parse_arms(raw: Mapping[Any, Any], policy: ArmPolicy, now: float) -> ArmTable:
    """An arm hash (`<offer>|<field>` -> number) decayed to `now`, vectorised over its offers.
    A field whose value is not a number is ignored."""
    return ArmFields.read(raw).at(policy, now)


def _numbers_only(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    numbers: dict[str, str] = {}
    for key, value in raw.items():
        try:
            number = float(value)
        except ValueError:
            continue
        numbers[key.decode() if isinstance(key, bytes) else key] = str(number)
    return numbers
