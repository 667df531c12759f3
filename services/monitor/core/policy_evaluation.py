"""Offline evaluation of a candidate deployment spec on logged decisions (first slot).

For every logged contact, in time order, the candidate's first-slot distribution over the offers
comes from the shared policy package: `PreparedDeployment.eligible` and `.choose` on the context
derived from the logged features and context values, exactly as a replica would compute it. A
candidate whose choices depend on learned arm statistics (thompson, epsilon_greedy) reads them
from an in-memory twin of the options store, rebuilt by replaying the log in time order: every
logged impression and every reward (`update_arm_fields`, the UPDATE_ARMS script's arithmetic) with
the candidate's own decay and windows. The replay learns from what the logging policy showed, so it
answers "what would the candidate have chosen, knowing what the live system knew"; the first
`warmup_share` of the decisions only warm the statistics up and are not evaluated.

The logged action is the offer shown first, its propensity the exact first-slot propensity the
contact recorded, its reward what the responses to that contact credited it (0 when nobody took
it, or took it after the reward window).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from libs.common.deployment_spec import DeploymentSpec
from libs.common.errors import InvalidArgument
from libs.policy.context import derive_context
from libs.policy.deployment import PreparedDeployment
from libs.policy.statistics import ArmTable, Statistics, parse_arms
from libs.simulation.in_memory import ArmHash, update_arm_fields
from services.monitor.core.estimators import LoggedDecisions, PolicyEvaluation, estimate_policy_value
from services.monitor.core.reward_model import cross_fitted_expected_rewards

REPLAYED_ALGORITHMS = ("thompson", "epsilon_greedy")
DEFAULT_WARMUP_SHARE = 0.1
CONTACT_COLUMNS = (
    "uuid",
    "segment",
    "context",
    "features",
    "channel",
    "customer",
    "eligible",
    "counts",
    "epsilon",
    "outcomes",
    "shown",
)


@dataclass(frozen=True)
class EvaluationRequest:
    estimators: Sequence[str]
    confidence_level: float = 0.95
    max_importance_weight: float = 0.0
    bootstrap_samples: int = 0
    seed: int = 0
    warmup_share: float = DEFAULT_WARMUP_SHARE
    statistics_max_age_seconds: float = 0.1  # the predictor's default STATISTICS_MAX_AGE_MS


@dataclass(frozen=True)
class CandidateEvaluation:
    decisions: int  # logged contacts in the window
    result: PolicyEvaluation
    notes: list[str] = field(default_factory=list)


def check_candidate(spec: DeploymentSpec) -> None:
    """Refuse, naming the field, a candidate this evaluation cannot replay."""
    approaches = {spec.algorithm.approach} | {v.algorithm.approach for v in spec.variants if v.algorithm}
    unsupported = sorted(approaches - set(REPLAYED_ALGORITHMS))
    if unsupported:
        raise InvalidArgument(
            f"offline evaluation replays {', '.join(REPLAYED_ALGORITHMS)}; this candidate uses {', '.join(unsupported)}",
            field="algorithm.approach",
        )


def evaluate_candidate(
    spec: DeploymentSpec,
    contacts: pa.Table,
    responses: pa.Table,
    request: EvaluationRequest,
) -> CandidateEvaluation:
    """The candidate's estimated value on these logged contacts (in time order) and their responses."""
    check_candidate(spec)
    prepared = PreparedDeployment.prepare(spec)
    rng = np.random.default_rng(request.seed)
    rewards = _credited_rewards(responses)
    rows = contacts.select([*CONTACT_COLUMNS, "time"]).to_pylist()
    events = _events(rows, responses)
    statistics: dict[str, ArmHash] = {}
    # As a replica reads them: a kept copy at most `statistics_max_age` old, dropped by a learned response.
    kept: dict[str, tuple[float, ArmTable]] = {}
    statistics_max_age = request.statistics_max_age_seconds
    warmup = int(len(rows) * request.warmup_share)
    eligible_rows: list[list[str]] = []
    candidate_rows: list[list[float]] = []
    logging_rows: list[list[float]] = []
    actions: list[int] = []
    propensities: list[float] = []
    reward_values: list[float] = []
    segments: list[str] = []
    skipped_no_shown = 0
    for kind, time, payload in events:
        if kind == "reward":
            reward_segment, offer, reward = payload
            update_arm_fields(
                statistics.setdefault(reward_segment, {}),
                prepared.plans[""].policy,
                [(offer, 0.0, reward)],
                time,
            )
            kept.pop(reward_segment, None)  # a learned response drops every replica's copy
            continue
        index, row = payload
        context_values = json.loads(row["context"])
        features = json.loads(row["features"])
        params = {name: value for name, value in context_values.items() if isinstance(value, str)}
        context = derive_context(spec, features, params, row["channel"])
        plan = prepared.variant_for(row["customer"])
        shown: list[str] = list(row["shown"])
        if index >= warmup:
            if not shown:
                skipped_no_shown += 1
            else:
                eligible = prepared.eligible(context, params)
                copy = kept.get(context.segment)
                if copy is None or time - copy[0] > statistics_max_age:
                    copy = kept[context.segment] = (
                        time,
                        parse_arms(statistics.get(context.segment, {}), plan.policy, time),
                    )
                arms = copy[1]
                choice = prepared.choose(
                    plan,
                    eligible,
                    context,
                    Statistics(arms=arms),
                    rng,
                    count=1,
                    features=features,
                    params=params,
                )
                candidate = dict(
                    zip((offer.id for offer in choice.eligible), choice.first_slot.propensities, strict=True)
                )
                logged: list[str] = list(row["eligible"])
                columns = logged + [offer for offer in candidate if offer not in set(logged)]
                counts = row["counts"]
                epsilon, outcomes = float(row["epsilon"]), int(row["outcomes"])
                first = [epsilon / len(logged) + (1 - epsilon) * count / outcomes for count in counts]
                action = columns.index(shown[0])
                eligible_rows.append(columns)
                candidate_rows.append([candidate.get(offer, 0.0) for offer in columns])
                logging_rows.append(first + [0.0] * (len(columns) - len(logged)))
                actions.append(action)
                propensities.append(first[action] if action < len(first) else math.nan)
                reward_values.append(rewards.get((row["uuid"], shown[0]), 0.0))
                segments.append(row["segment"])
        if shown:
            # What the live system learned from this contact: an impression of every shown offer.
            update_arm_fields(
                statistics.setdefault(row["segment"], {}),
                plan.policy,
                [(offer, 1.0, 0.0) for offer in shown],
                time,
            )
    width = max((len(columns) for columns in eligible_rows), default=1)
    n = len(eligible_rows)
    mask = np.zeros((n, width), dtype=bool)
    candidate_matrix = np.zeros((n, width))
    logging_matrix = np.zeros((n, width))
    for i, columns in enumerate(eligible_rows):
        mask[i, : len(columns)] = True
        candidate_matrix[i, : len(columns)] = candidate_rows[i]
        logging_matrix[i, : len(columns)] = logging_rows[i]
    wants_model = any(name in ("dm", "dr", "sndr", "switch-dr") for name in request.estimators)
    expected = None
    if wants_model and n >= 2:
        expected = cross_fitted_expected_rewards(
            segments,
            [columns[a] for columns, a in zip(eligible_rows, actions, strict=True)],
            np.asarray(reward_values),
            eligible_rows,
            seed=request.seed,
        )
    estimators = [
        name
        for name in request.estimators
        if expected is not None or name not in ("dm", "dr", "sndr", "switch-dr")
    ]
    data = LoggedDecisions(
        eligible=mask,
        action=np.asarray(actions, dtype=np.intp),
        logging_propensity=np.asarray(propensities, dtype=np.float64),
        reward=np.asarray(reward_values, dtype=np.float64),
        candidate=candidate_matrix,
        expected_reward=expected if expected is not None else None,
        logging_distribution=logging_matrix,
    )
    result = estimate_policy_value(
        data,
        estimators or ("ips",),
        confidence_level=request.confidence_level,
        max_importance_weight=request.max_importance_weight,
        bootstrap_samples=request.bootstrap_samples,
        seed=request.seed,
    )
    notes = [
        f"the candidate's arm statistics were rebuilt by replaying {len(rows)} logged contacts and their "
        f"responses in time order; the first {warmup} only warmed them up",
        "first slot only: the logged action is the offer shown first, its reward what the responses credited it",
    ]
    if "dm" in result.estimates:
        notes.append(
            "dm's interval holds the reward model fixed, so it understates dm's uncertainty; "
            "prefer dr's interval for a decision"
        )
    if skipped_no_shown:
        notes.append(f"{skipped_no_shown} contacts showed no offer and were left out")
    return CandidateEvaluation(decisions=contacts.num_rows, result=result, notes=notes)


def _credited_rewards(responses: pa.Table) -> dict[tuple[str, str], float]:
    """(uuid, offer) -> reward credited within the reward window."""
    credited: dict[tuple[str, str], float] = {}
    if responses.num_rows == 0:
        return credited
    for row in responses.select(["uuid", "new_offers", "credited_reward", "late"]).to_pylist():
        if row["late"]:
            continue
        for offer in row["new_offers"]:
            credited[(row["uuid"], offer)] = credited.get((row["uuid"], offer), 0.0) + float(
                row["credited_reward"]
            )
    return credited


def _events(rows: Sequence[Mapping[str, Any]], responses: pa.Table) -> list[tuple[str, float, Any]]:
    """Contacts and learned rewards, merged in time order (a contact before a reward at the same time)."""
    events: list[tuple[str, float, Any]] = [
        ("contact", float(row["time"]), (i, row)) for i, row in enumerate(rows)
    ]
    segment_of = {row["uuid"]: row["segment"] for row in rows}
    if responses.num_rows:
        for row in responses.select(["uuid", "time", "learned_offers", "credited_reward"]).to_pylist():
            segment = segment_of.get(row["uuid"])
            if segment is None:
                continue
            for offer in row["learned_offers"]:
                events.append(("reward", float(row["time"]), (segment, offer, float(row["credited_reward"]))))
    events.sort(key=lambda event: (event[1], event[0] == "reward"))
    return events
