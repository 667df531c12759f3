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
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    """The candidate's estimated value on these logged contacts (in time order) and their responses.

    Contacts are read in batches and every decision is written into arrays over one set of offer
    columns (the spec's offers and any other logged one), so memory grows with decisions x offers,
    not with Python objects per decision."""
    check_candidate(spec)
    prepared = PreparedDeployment.prepare(spec)
    rng = np.random.default_rng(request.seed)
    rewards = _credited_rewards(responses)
    offers = _offer_columns(spec, contacts)
    column_of = {offer: index for index, offer in enumerate(offers)}
    total = contacts.num_rows
    warmup = int(total * request.warmup_share)
    n_max, width = max(total - warmup, 0), len(offers)
    mask = np.zeros((n_max, width), dtype=bool)
    candidate_matrix = np.zeros((n_max, width))
    logging_matrix = np.zeros((n_max, width))
    actions = np.zeros(n_max, dtype=np.intp)
    propensities = np.zeros(n_max)
    reward_values = np.zeros(n_max)
    segments: list[str] = []
    learned = _learned_rewards(contacts, responses)
    next_reward = 0
    statistics: dict[str, ArmHash] = {}
    # As a replica reads them: a kept copy at most `statistics_max_age` old, dropped by a learned response.
    kept: dict[str, tuple[float, ArmTable]] = {}
    statistics_max_age = request.statistics_max_age_seconds
    reward_policy = prepared.plans[""].policy
    n = 0
    skipped_no_shown = 0
    index = -1
    for batch in contacts.select([*CONTACT_COLUMNS, "time"]).to_batches(max_chunksize=10_000):
        for row in batch.to_pylist():
            index += 1
            time = float(row["time"])
            # Rewards learned before this contact was served (a contact goes first on a tie).
            while next_reward < len(learned) and learned[next_reward][0] < time:
                reward_time, reward_segment, offer, reward = learned[next_reward]
                update_arm_fields(
                    statistics.setdefault(reward_segment, {}),
                    reward_policy,
                    [(offer, 0.0, reward)],
                    reward_time,
                )
                kept.pop(reward_segment, None)  # a learned response drops every replica's copy
                next_reward += 1
            context_values = json.loads(row["context"])
            features = json.loads(row["features"])
            params = {name: value for name, value in context_values.items() if isinstance(value, str)}
            context = derive_context(spec, features, params, row["channel"])
            plan = prepared.variant_for(row["customer"])
            shown: list[str] = row["shown"]
            if index >= warmup and not shown:
                skipped_no_shown += 1
            elif index >= warmup:
                copy = kept.get(context.segment)
                if copy is None or time - copy[0] > statistics_max_age:
                    copy = kept[context.segment] = (
                        time,
                        parse_arms(statistics.get(context.segment, {}), plan.policy, time),
                    )
                choice = prepared.choose(
                    plan,
                    prepared.eligible(context, params),
                    context,
                    Statistics(arms=copy[1]),
                    rng,
                    count=1,
                    features=features,
                    params=params,
                )
                candidate_columns = [column_of[offer.id] for offer in choice.eligible]
                candidate_matrix[n, candidate_columns] = choice.first_slot.propensities
                mask[n, candidate_columns] = True
                logged_columns = [column_of[offer] for offer in row["eligible"]]
                counts = np.asarray(row["counts"], dtype=np.float64)
                epsilon, outcomes = float(row["epsilon"]), int(row["outcomes"])
                first = epsilon / len(logged_columns) + (1 - epsilon) * counts / outcomes
                logging_matrix[n, logged_columns] = first
                mask[n, logged_columns] = True
                action = column_of[shown[0]]
                actions[n] = action
                propensities[n] = logging_matrix[n, action] if action in logged_columns else math.nan
                reward_values[n] = rewards.get((row["uuid"], shown[0]), 0.0)
                segments.append(row["segment"])
                n += 1
            if shown:
                # What the live system learned from this contact: an impression of every shown offer.
                update_arm_fields(
                    statistics.setdefault(row["segment"], {}),
                    plan.policy,
                    [(offer, 1.0, 0.0) for offer in shown],
                    time,
                )
    mask, candidate_matrix, logging_matrix = mask[:n], candidate_matrix[:n], logging_matrix[:n]
    actions, propensities, reward_values = actions[:n], propensities[:n], reward_values[:n]
    wants_model = any(name in ("dm", "dr", "sndr", "switch-dr") for name in request.estimators)
    expected = None
    if wants_model and n >= 2:
        expected = cross_fitted_expected_rewards(
            segments,
            [offers[a] for a in actions],
            reward_values,
            [offers] * n,  # one shared list: every decision's columns are the same offers
            seed=request.seed,
        )
    estimators = [
        name
        for name in request.estimators
        if expected is not None or name not in ("dm", "dr", "sndr", "switch-dr")
    ]
    data = LoggedDecisions(
        eligible=mask,
        action=actions,
        logging_propensity=propensities,
        reward=reward_values,
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
        f"the candidate's arm statistics were rebuilt by replaying {total} logged contacts and their "
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


def _offer_columns(spec: DeploymentSpec, contacts: pa.Table) -> list[str]:
    """The spec's offers, then any other offer the log holds as eligible (retired since)."""
    logged = pc.unique(pc.list_flatten(contacts.column("eligible"))).to_pylist() if contacts.num_rows else []
    known = [offer.id for offer in spec.offers]
    return known + sorted(set(logged) - set(known))


def _learned_rewards(contacts: pa.Table, responses: pa.Table) -> list[tuple[float, str, str, float]]:
    """(time, segment, offer, reward) of every reward learned from a response to these contacts, in time order."""
    if responses.num_rows == 0 or contacts.num_rows == 0:
        return []
    segment_of = dict(
        zip(contacts.column("uuid").to_pylist(), contacts.column("segment").to_pylist(), strict=True)
    )
    learned = []
    for row in responses.select(["uuid", "time", "learned_offers", "credited_reward"]).to_pylist():
        segment = segment_of.get(row["uuid"])
        if segment is None:
            continue
        for offer in row["learned_offers"]:
            learned.append((float(row["time"]), segment, offer, float(row["credited_reward"])))
    learned.sort(key=lambda item: item[0])
    return learned
