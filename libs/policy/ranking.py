"""The ranking step: explore or exploit, the top k under the category caps, and the exact
probability of what was shown.

The logging policy of one request: with probability epsilon it explores (each slot is filled
uniformly at random among the offers still allowed), otherwise it exploits (each slot takes the
highest-valued offer still allowed, by the scorer's values; a randomised scorer's values are one of
its equally likely outcomes, a deterministic scorer's exact ties are broken uniformly at random).
"Allowed" means not shown yet and not in a category that reached its cap.

What is logged, per request:
- `first_slot`: for every eligible offer, the probability that this policy, in the state it
  served the request with, shows it first. This is what evaluating the first slot needs (IPS,
  SNIPS and DR divide by the logged offer's entry; DM and DR weigh a candidate's choice by it).
- per shown offer at position j, `propensity`: the probability that the policy puts this offer at
  position j given the offers it put at positions 1..j-1. For j = 1 it is the first-slot
  propensity; the product over positions 1..j is the probability of the whole logged prefix.

Both are exact: exploration is counted in closed form, a randomised scorer by counting its
outcomes, a deterministic one by its ties. A shown offer's propensity is never 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from libs.policy.scorers import Scores


@dataclass(frozen=True)
class FirstSlotCounts:
    """The exploiting branch's first slot as whole numbers: offer i comes first in counts[i] of
    `outcomes` equally likely outcomes (a randomised scorer's draws, or a deterministic scorer's
    tied best offers). With exploration: P(i first) = epsilon / K + (1 - epsilon) counts[i] / outcomes."""

    epsilon: float
    counts: np.ndarray  # (eligible offers,) integers
    outcomes: int

    @property
    def propensities(self) -> np.ndarray:
        """Per eligible offer, P(it is shown first)."""
        result: np.ndarray = (
            self.epsilon / len(self.counts) + (1.0 - self.epsilon) * self.counts / self.outcomes
        )
        return result


@dataclass(frozen=True)
class Ranking:
    explore: bool
    shown: list[int]  # indices of the eligible offers shown, in rank order
    propensities: list[float]  # per shown offer: P(it at this position | the positions above)
    first_slot: FirstSlotCounts


def rank(
    scores: Scores,
    categories: Sequence[str],
    *,
    epsilon: float,
    count: int,
    category_limit: int | None,
    rng: np.random.Generator,
) -> Ranking:
    """Rank the eligible offers (in the order `scores` has them) and say how likely that was."""
    width = len(categories)
    if width == 0:
        raise ValueError("nothing to rank: no eligible offer")
    values = scores.score
    if scores.outcomes is None:  # a draw is never NaN; a model's value might be: it ranks last
        values = np.where(np.isnan(values), -np.inf, values)
    explore = bool(rng.random() < epsilon)
    if explore:
        order = rng.permutation(width)
    elif scores.outcomes is not None:
        order = np.argsort(-values, kind="stable")  # argmax's rule for ties: the first offer
    else:
        order = np.lexsort((rng.random(width), -values))
    shown = _arrange(order, categories, count, category_limit)
    propensities, first_slot = _propensities(
        shown, values, scores.outcomes, categories, epsilon, category_limit
    )
    return Ranking(explore, shown, propensities, first_slot)


def _arrange(order: np.ndarray, categories: Sequence[str], count: int, limit: int | None) -> list[int]:
    """The first `count` offers of the order (read no further than needed) within the caps."""
    shown: list[int] = []
    if count <= 0:
        return shown
    per_category: dict[str, int] = {}
    for index in order.tolist():
        if limit is not None:
            category = categories[index]
            if per_category.get(category, 0) >= limit:
                continue
            per_category[category] = per_category.get(category, 0) + 1
        shown.append(index)
        if len(shown) == count:
            break
    return shown


def _propensities(
    shown: Sequence[int],
    values: np.ndarray,
    outcomes: np.ndarray | None,
    categories: Sequence[str],
    epsilon: float,
    limit: int | None,
) -> tuple[list[float], FirstSlotCounts]:
    """Slot by slot: the exploring and the exploiting branch's probability of each shown offer
    given the slots above, mixed by the posterior weight of each branch given those slots."""
    width = len(values)
    if outcomes is not None:
        winners = outcomes.argmax(axis=1)
        first_slot = FirstSlotCounts(epsilon, np.bincount(winners, minlength=width), len(outcomes))
    else:
        top = (values == values.max()).astype(np.int64)
        first_slot = FirstSlotCounts(epsilon, top, int(top.sum()))
    labels = np.asarray(categories) if limit is not None else None
    allowed = np.ones(width, dtype=bool)
    rows = np.arange(len(outcomes)) if outcomes is not None else None
    propensities: list[float] = []
    likelihood_explore = likelihood_exploit = 1.0
    for slot, chosen in enumerate(shown):
        if slot == 0:
            count = int(first_slot.counts[chosen])
            # The same arithmetic as FirstSlotCounts.propensities, so the two agree to the bit.
            propensities.append(epsilon / width + (1.0 - epsilon) * count / first_slot.outcomes)
            likelihood_explore, likelihood_exploit = 1.0 / width, count / first_slot.outcomes
            if rows is not None:
                rows = rows[winners == chosen]
        else:
            candidates = np.flatnonzero(allowed)
            q_explore = 1.0 / len(candidates)
            q_exploit = 0.0
            if likelihood_exploit > 0 and rows is not None and outcomes is not None:
                slot_winners = candidates[outcomes[rows[:, None], candidates].argmax(axis=1)]
                matching = slot_winners == chosen
                q_exploit = int(matching.sum()) / len(rows)
                rows = rows[matching]
            elif likelihood_exploit > 0:
                remaining = values[candidates]
                tied = candidates[remaining == remaining.max()]
                q_exploit = 1.0 / len(tied) if chosen in tied else 0.0
            total = epsilon * likelihood_explore + (1.0 - epsilon) * likelihood_exploit
            mixed = (
                epsilon * likelihood_explore * q_explore + (1.0 - epsilon) * likelihood_exploit * q_exploit
            )
            propensities.append(min(1.0, mixed / total))
            likelihood_explore *= q_explore
            likelihood_exploit *= q_exploit
        allowed[chosen] = False
        if labels is not None and limit is not None:
            category = labels[chosen]
            if int(np.count_nonzero(labels[shown[: slot + 1]] == category)) >= limit:
                allowed &= labels != category
    return propensities, first_slot
