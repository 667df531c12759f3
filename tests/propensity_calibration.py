"""Calibration of logged first-slot propensities, shared by the policy and the engine tests.

Pairs (logged first-slot propensity of an eligible offer, whether it was shown first), bucketed by
propensity: in every bucket the count shown first must lie within 4 standard errors of the sum of
the propensities (the square root of the sum of p (1 - p); the indicators of one decision are
negatively correlated, which only narrows the spread)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

EDGES = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0 + 1e-9])
STANDARD_ERRORS = 4.0


class Calibration:
    def __init__(self) -> None:
        self.shown_first = np.zeros(len(EDGES) - 1)
        self.expected = np.zeros(len(EDGES) - 1)
        self.variance = np.zeros(len(EDGES) - 1)
        self.decisions = 0

    def add(self, propensities: Sequence[float] | np.ndarray, first: int) -> None:
        """One decision: every eligible offer's first-slot propensity, and which came first."""
        values = np.asarray(propensities, dtype=float)
        assert values[first] > 0  # the offer shown first could have been
        buckets = np.searchsorted(EDGES, values, side="right") - 1
        np.add.at(self.expected, buckets, values)
        np.add.at(self.variance, buckets, values * (1 - values))
        self.shown_first[buckets[first]] += 1
        self.decisions += 1

    def check(self, what: str) -> None:
        assert math.isclose(self.expected.sum(), self.decisions, rel_tol=1e-9)  # each sums to 1
        for bucket in range(len(EDGES) - 1):
            tolerance = STANDARD_ERRORS * math.sqrt(self.variance[bucket]) + 1e-9
            assert abs(self.shown_first[bucket] - self.expected[bucket]) <= tolerance, (
                f"{what}: propensities in [{EDGES[bucket]:.2f}, {EDGES[bucket + 1]:.2f}): shown first "
                f"{self.shown_first[bucket]:.0f} times, expected {self.expected[bucket]:.1f} +- {tolerance:.1f}"
            )
        assert (self.expected > 0).sum() >= 2, f"{what}: the propensities fell in a single bucket"
