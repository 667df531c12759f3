"""A shadow deployment against the live one, on the same requests.

A deployment that names a `shadow` has, for each of its contacts, the shadow's decision for the
same request computed by the replica and logged (never served, never learned from). Joined by the
live contact's uuid, the comparison reports how often the two put the same offer first, and what
the shadow would have earned: its first offer is one draw of its policy, so
1[live's first offer == shadow's] x reward / P_live(shadow's first offer first) is an unbiased
estimate of the shadow's value per decision (IPS with the logged, exact, first-slot propensity;
SNIPS normalises it), with bootstrap intervals from the same estimators as offline evaluation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from services.monitor.core.estimators import (
    LoggedDecisions,
    PolicyValueEstimate,
    estimate_policy_value,
)

SHADOW_ESTIMATORS = ("ips", "snips")


@dataclass(frozen=True)
class ShadowComparison:
    shadow: str  # the shadow deployment
    live_decisions: int  # the live deployment's contacts in the window that showed an offer
    compared: int  # of those, the ones with a shadow decision whose first offer live could show
    not_comparable: int  # shadow decisions whose first offer was not eligible for the live decision
    agreement: float  # share of compared decisions where both put the same offer first
    live_value: float  # mean first-slot reward of the compared live decisions
    agreed_value: float | None  # mean reward of the compared decisions where both agreed
    estimates: dict[str, PolicyValueEstimate]  # the shadow's estimated value per decision
    refused: dict[str, str]
    notes: list[str]


def compare_shadows(
    contacts: pa.Table,
    responses: pa.Table,
    shadows: pa.Table,
    *,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> list[ShadowComparison]:
    """One comparison per shadow deployment seen in the window (usually one), by name."""
    rewards: dict[tuple[str, str], float] = defaultdict(float)
    for row in responses.select(["uuid", "new_offers", "credited_reward", "late"]).to_pylist():
        if not row["late"]:
            for offer in row["new_offers"]:
                rewards[(row["uuid"], offer)] += float(row["credited_reward"])
    live = {
        row["uuid"]: row
        for row in contacts.select(["uuid", "eligible", "epsilon", "outcomes", "counts", "shown"]).to_pylist()
        if row["shown"]
    }
    by_shadow: dict[str, list[tuple[str, str]]] = defaultdict(list)  # shadow -> (live uuid, its first)
    unmatched: dict[str, int] = defaultdict(int)  # shadow -> decisions without their live contact
    for row in shadows.select(["shadow", "shadow_of", "shown"]).to_pylist():
        if row["shown"] and row["shadow_of"] in live:
            by_shadow[row["shadow"]].append((row["shadow_of"], row["shown"][0]))
        else:
            unmatched[row["shadow"]] += 1
            by_shadow.setdefault(row["shadow"], [])
    return [
        _compare(name, pairs, unmatched[name], live, rewards, confidence_level, seed)
        for name, pairs in sorted(by_shadow.items())
    ]


def _compare(
    shadow: str,
    pairs: list[tuple[str, str]],
    unmatched: int,
    live: dict[str, dict[str, Any]],
    rewards: dict[tuple[str, str], float],
    confidence_level: float,
    seed: int,
) -> ShadowComparison:
    offers = sorted({offer for uuid, _ in pairs for offer in live[uuid]["eligible"]})
    column = {offer: index for index, offer in enumerate(offers)}
    rows: list[tuple[list[str], np.ndarray, str, str, float]] = []
    not_comparable = 0
    for uuid, shadow_first in dict(pairs).items():  # one shadow decision per live contact
        contact = live[uuid]
        eligible: list[str] = list(contact["eligible"])
        if shadow_first not in eligible:
            not_comparable += 1
            continue
        counts = np.asarray(contact["counts"], dtype=np.float64)
        epsilon, outcomes = float(contact["epsilon"]), float(contact["outcomes"])
        first_slot = epsilon / len(eligible) + (1 - epsilon) * counts / outcomes
        live_first = str(contact["shown"][0])
        rows.append((eligible, first_slot, live_first, shadow_first, rewards.get((uuid, live_first), 0.0)))
    n, width = len(rows), len(offers)
    mask = np.zeros((n, width), dtype=bool)
    logging = np.zeros((n, width))
    candidate = np.zeros((n, width))
    action = np.zeros(n, dtype=np.intp)
    reward = np.zeros(n)
    for i, (eligible, first_slot, live_first, shadow_first, earned) in enumerate(rows):
        columns = [column[offer] for offer in eligible]
        mask[i, columns] = True
        logging[i, columns] = first_slot
        candidate[i, column[shadow_first]] = 1.0
        action[i] = column[live_first]
        reward[i] = earned
    agreed = np.array([live_first == shadow_first for _, _, live_first, shadow_first, _ in rows], dtype=bool)
    notes = [
        "the shadow's first offer is one draw of its policy: IPS weighs the live reward where both "
        "put the same offer first by 1 / the live policy's logged probability of that offer"
    ]
    if unmatched:
        notes.append(
            f"{unmatched} shadow decisions have no live contact that showed an offer in the window (the live "
            "contact fell just outside it, or showed nothing); left out"
        )
    if not_comparable:
        notes.append(
            f"{not_comparable} shadow decisions put first an offer the live decision could not show; "
            "left out (the shadow's offers or eligibility differ)"
        )
    estimates: dict[str, PolicyValueEstimate] = {}
    refused: dict[str, str] = {}
    if n:
        data = LoggedDecisions(
            eligible=mask,
            action=action,
            logging_propensity=logging[np.arange(n), action],
            reward=reward,
            candidate=candidate,
            logging_distribution=logging,
        )
        result = estimate_policy_value(data, SHADOW_ESTIMATORS, confidence_level=confidence_level, seed=seed)
        estimates, refused = result.estimates, result.refused
    return ShadowComparison(
        shadow=shadow,
        live_decisions=len(live),
        compared=n,
        not_comparable=not_comparable,
        agreement=float(agreed.mean()) if n else 0.0,
        live_value=float(reward.mean()) if n else 0.0,
        agreed_value=float(reward[agreed].mean()) if agreed.any() else None,
        estimates=estimates,
        refused=refused,
        notes=notes,
    )
