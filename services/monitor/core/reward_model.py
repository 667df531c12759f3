"""The reward model behind DM and DR: mean reward per (context key, offer), shrunk, cross-fitted.

A cell (context key, offer) predicts its mean reward shrunk toward the offer's mean, and the offer's
mean is shrunk toward the global mean (additive smoothing with a prior strength in pseudo-
decisions):

    offer_mean = (sum_o + a_offer * global_mean) / (count_o + a_offer)
    cell_mean  = (sum_co + a_cell * offer_mean) / (count_co + a_cell)

so a cell never logged predicts its offer's mean and an offer never logged the global mean. Unless
given, each prior strength is estimated from the data (empirical Bayes by moments): the within-cell
variance of rewards over the variance of the group means around their parent, sigma^2 / tau^2,
kept within [MIN_PRIOR_STRENGTH, MAX_PRIOR_STRENGTH].

Cross-fitting: decisions are split into `folds` random folds, and a decision's predictions come
from the model fitted on the other folds, so DR's correction r - q(x, a) is not shrunk toward zero
by a model that has seen r. Fitting is counting (sums of r, r^2 and counts per cell), so each fold's
model is the totals minus the fold's own sums.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from libs.common.errors import InvalidArgument

DEFAULT_FOLDS = 5
# Bounds of an estimated prior strength (pseudo-decisions): even clearly different cells borrow a
# little from their offer, and cells that look alike are not averaged beyond this.
MIN_PRIOR_STRENGTH = 1.0
MAX_PRIOR_STRENGTH = 10_000.0

FloatArray = NDArray[np.float64]
IndexArray = NDArray[np.int64]


def cross_fitted_expected_rewards(
    context_keys: Sequence[Hashable],
    logged_offers: Sequence[Hashable],
    rewards: ArrayLike,
    eligible_offers: Sequence[Sequence[Hashable]],
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    prior_strength: float | None = None,
) -> FloatArray:
    """Per decision and eligible offer, the expected reward predicted by a model not fitted on it.

    context_keys: per decision, what the reward is assumed to depend on besides the offer (e.g. the
        segment). logged_offers: per decision, the offer shown first, one of its eligible offers.
    rewards: per decision, its reward. eligible_offers: per decision, its eligible offers in column
        order. prior_strength: both prior strengths, instead of estimating them.
    Returns (n, K) float64, K the longest eligible list; padding columns hold 0.
    """
    n = len(context_keys)
    reward = np.asarray(rewards, dtype=np.float64)
    if reward.shape != (n,) or len(logged_offers) != n or len(eligible_offers) != n:
        raise InvalidArgument(
            "context_keys, logged_offers, rewards and eligible_offers need one entry per decision"
        )
    if not np.all(np.isfinite(reward)):
        raise InvalidArgument("must be finite", field="rewards")
    if folds < 2:
        raise InvalidArgument("cross-fitting needs at least 2 folds", field="folds")
    if prior_strength is not None and not prior_strength > 0:
        raise InvalidArgument("must be > 0 (or None: estimated)", field="prior_strength")
    width = max((len(row) for row in eligible_offers), default=0)
    if n == 0:
        return np.zeros((0, width))
    if n < 2:
        raise InvalidArgument("cross-fitting needs at least 2 decisions", field="rewards")

    offer_codes: dict[Hashable, int] = {}
    context_codes: dict[Hashable, int] = {}
    context = np.fromiter(
        (context_codes.setdefault(key, len(context_codes)) for key in context_keys), np.int64, n
    )
    eligible = np.full((n, width), -1, dtype=np.int64)  # offer codes; -1: padding
    logged = np.empty(n, dtype=np.int64)
    for row, (offers, shown) in enumerate(zip(eligible_offers, logged_offers, strict=True)):
        codes = [offer_codes.setdefault(offer, len(offer_codes)) for offer in offers]
        eligible[row, : len(codes)] = codes
        code = offer_codes.get(shown)
        if code is None or code not in codes:
            raise InvalidArgument(
                f"decision {row}: {shown!r} is not one of its eligible offers", field="logged_offers"
            )
        logged[row] = code

    offer_count = len(offer_codes)
    cells, cell_of_decision = np.unique(context * offer_count + logged, return_inverse=True)
    totals = _Sums.of(cell_of_decision, logged, reward, cells.size, offer_count)
    fold = np.random.default_rng(seed).permutation(n) % min(folds, n)
    expected = np.zeros((n, width))
    padding = eligible < 0
    for held_out in range(min(folds, n)):
        rows = np.flatnonzero(fold == held_out)
        fitted = totals - _Sums.of(
            cell_of_decision[rows], logged[rows], reward[rows], cells.size, offer_count
        )
        cell_means, offer_means = fitted.means(prior_strength)
        columns = np.where(padding[rows], 0, eligible[rows])
        ids = context[rows, None] * offer_count + columns
        position = np.minimum(np.searchsorted(cells, ids), cells.size - 1)
        logged_cell = cells[position] == ids
        predicted = np.where(logged_cell, cell_means[position], offer_means[columns])
        expected[rows] = np.where(padding[rows], 0.0, predicted)
    return expected


@dataclass(frozen=True)
class _Sums:
    """Reward sums, squared-reward sums and counts per cell and per offer."""

    cell_sum: FloatArray
    cell_square_sum: FloatArray
    cell_count: FloatArray
    cell_offer: IndexArray  # the offer of each cell
    offer_sum: FloatArray
    offer_count: FloatArray

    @classmethod
    def of(cls, cell: IndexArray, offer: IndexArray, reward: FloatArray, cells: int, offers: int) -> _Sums:
        cell_offer = np.zeros(cells, dtype=np.int64)
        cell_offer[cell] = offer
        return cls(
            cell_sum=_float_bincount(cell, reward, cells),
            cell_square_sum=_float_bincount(cell, reward * reward, cells),
            cell_count=np.bincount(cell, minlength=cells).astype(np.float64),
            cell_offer=cell_offer,
            offer_sum=_float_bincount(offer, reward, offers),
            offer_count=np.bincount(offer, minlength=offers).astype(np.float64),
        )

    def __sub__(self, other: _Sums) -> _Sums:
        return _Sums(
            cell_sum=self.cell_sum - other.cell_sum,
            cell_square_sum=self.cell_square_sum - other.cell_square_sum,
            cell_count=self.cell_count - other.cell_count,
            cell_offer=self.cell_offer,  # a cell's offer does not depend on which decisions are counted
            offer_sum=self.offer_sum - other.offer_sum,
            offer_count=self.offer_count - other.offer_count,
        )

    def means(self, prior_strength: float | None) -> tuple[FloatArray, FloatArray]:
        """Shrunk means per cell and per offer."""
        decisions = float(self.cell_count.sum())
        global_mean = float(self.cell_sum.sum()) / decisions
        seen = self.cell_count > 0
        cell_raw = np.divide(self.cell_sum, self.cell_count, out=np.zeros_like(self.cell_sum), where=seen)
        # Pooled within-cell variance: sum (r - cell mean)^2 = sum r^2 - sum^2 / count, per cell.
        within = float(np.sum(self.cell_square_sum - cell_raw * self.cell_sum))
        within_variance = max(within, 0.0) / max(decisions - int(seen.sum()), 1.0)

        offer_seen = self.offer_count > 0
        offer_raw = np.divide(
            self.offer_sum, self.offer_count, out=np.zeros_like(self.offer_sum), where=offer_seen
        )
        offer_strength = (
            prior_strength
            if prior_strength is not None
            else _prior_strength(
                offer_raw[offer_seen],
                np.full(int(offer_seen.sum()), global_mean),
                self.offer_count[offer_seen],
                within_variance,
            )
        )
        offer_means = (self.offer_sum + offer_strength * global_mean) / (self.offer_count + offer_strength)
        parent = offer_means[self.cell_offer]
        cell_strength = (
            prior_strength
            if prior_strength is not None
            else _prior_strength(cell_raw[seen], parent[seen], self.cell_count[seen], within_variance)
        )
        cell_means = (self.cell_sum + cell_strength * parent) / (self.cell_count + cell_strength)
        return cell_means, offer_means


def _prior_strength(
    means: FloatArray, parents: FloatArray, counts: FloatArray, within_variance: float
) -> float:
    """sigma^2 / tau^2, with tau^2 from E[count (mean - parent)^2] = count tau^2 + sigma^2 per group."""
    total = float(counts.sum())
    if total == 0:
        return MAX_PRIOR_STRENGTH
    between = (float(np.sum(counts * (means - parents) ** 2)) - within_variance * means.size) / total
    if between <= 0:
        return MAX_PRIOR_STRENGTH
    return float(np.clip(within_variance / between, MIN_PRIOR_STRENGTH, MAX_PRIOR_STRENGTH))


def _float_bincount(index: IndexArray, weights: FloatArray, length: int) -> FloatArray:
    return np.bincount(index, weights=weights, minlength=length).astype(np.float64, copy=False)
