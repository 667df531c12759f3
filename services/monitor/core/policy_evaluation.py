"""Offline evaluation of a candidate deployment spec on logged decisions (first slot).

For every logged contact, in time order, the candidate's first-slot distribution over the offers
comes from the shared policy package: `PreparedDeployment.eligible` and `.choose` on the context
derived from the logged features and context values, exactly as a replica would compute it. A
candidate whose choices depend on learned statistics reads them from an in-memory twin of the
options store, rebuilt by replaying the log in time order: every logged impression and every
learned reward, with the predictor's arithmetic for the candidate's kind of statistics (arm counts
for thompson and epsilon_greedy through `update_arm_fields`, the UPDATE_ARMS script's arithmetic,
with the candidate's own decay and windows; naive Bayes counts per offer and context value; linear
models' A += x x^T per impression and b += reward x per reward), each contact seen through the
candidate's own context variables (its segments, its categorical values, its feature vector). The
replay learns from what the logging policy showed, so it answers "what would the candidate have
chosen, knowing what the live system knew"; the first `warmup_share` of the decisions only warm the
statistics up and are not evaluated. A candidate ranking by a model (or with a model prior) scores
with the model versions it binds, loaded from the trainer's artifacts as a replica loads them.

The logged action is the offer shown first, its propensity the exact first-slot propensity the
contact recorded, its reward what the responses to that contact credited it (0 when nobody took
it, or took it after the reward window).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from libs.common.deployment_spec import DeploymentSpec
from libs.policy.context import Context, derive_context
from libs.policy.deployment import Choice, PreparedDeployment, VariantPlan
from libs.policy.models import LoadedModel
from libs.policy.scorers import LinearScorer
from libs.policy.statistics import ArmTable, LinearState, Statistics, parse_arms
from libs.simulation.in_memory import ArmHash, update_arm_fields
from services.monitor.core.estimators import (
    MODEL_BASED_ESTIMATORS,
    LoggedDecisions,
    PolicyEvaluation,
    estimate_policy_value,
)
from services.monitor.core.reward_model import cross_fitted_expected_rewards

ModelsByKey = Mapping[tuple[str, int], LoadedModel]
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


@dataclass(frozen=True)
class _ContactState:
    """What learning from a contact needs of it: the variant it was served by and the candidate's
    own view of its context (segment for arm counts, categorical values for naive Bayes counts,
    the feature vector for linear models)."""

    plan: VariantPlan
    segment: str
    categorical: tuple[tuple[str, str], ...] = ()
    vector: np.ndarray | None = None


class _Replay:
    """The candidate's view of its learned statistics while a log is replayed in time order: an
    in-memory twin of the options store, updated with the predictor's arithmetic for each kind of
    statistics (arm counts with their decay and windows, naive Bayes counts, linear models' A and
    b), and read as a replica reads it (arm counts: a kept copy at most `statistics_max_age` old,
    dropped by a learned response; the others: fresh every time)."""

    def __init__(self, spec: DeploymentSpec, request: EvaluationRequest, models: ModelsByKey | None) -> None:
        self.prepared = PreparedDeployment.prepare(spec, models)
        self._rng = np.random.default_rng(request.seed)
        self._arms: dict[str, ArmHash] = {}
        self._kept: dict[str, tuple[float, ArmTable]] = {}
        self._naive_bayes: dict[str, float] = {}
        self._linear: dict[str, LinearState] = {}
        self._max_age = request.statistics_max_age_seconds

    def contact(self, plan: VariantPlan, context: Context) -> _ContactState:
        kind = plan.scorer.statistics
        if kind == "naive_bayes":
            categorical = tuple((k, v) for k, v in context.values.items() if isinstance(v, str))
            return _ContactState(plan, context.segment, categorical=categorical)
        if kind == "linear" and isinstance(plan.scorer, LinearScorer):
            return _ContactState(plan, context.segment, vector=plan.scorer.vector(context.numeric))
        return _ContactState(plan, context.segment)

    def learn_impressions(self, time: float, contact: _ContactState, offers: Sequence[str]) -> None:
        kind = contact.plan.scorer.statistics
        if kind == "naive_bayes":
            for offer in offers:
                self._count(offer, contact.categorical, "n", 1.0)
        elif kind == "linear" and contact.vector is not None:
            x = contact.vector
            for offer in offers:
                self._model(offer, len(x)).a[...] += np.outer(x, x)
        else:
            arms = self._arms.setdefault(contact.segment, {})
            update_arm_fields(arms, contact.plan.policy, [(offer, 1.0, 0.0) for offer in offers], time)

    def learn_reward(self, time: float, contact: _ContactState, offers: Sequence[str], reward: float) -> None:
        """A learned response: counts take only rewards of zero or more (as the predictor's Respond)."""
        kind = contact.plan.scorer.statistics
        if kind == "naive_bayes":
            for offer in offers:
                self._count(offer, contact.categorical, "s", max(reward, 0.0))
        elif kind == "linear" and contact.vector is not None:
            x = contact.vector
            for offer in offers:
                self._model(offer, len(x)).b[...] += reward * x
        else:
            arms = self._arms.setdefault(contact.segment, {})
            update_arm_fields(
                arms, contact.plan.policy, [(offer, 0.0, max(reward, 0.0)) for offer in offers], time
            )
            self._kept.pop(contact.segment, None)  # a learned response drops every replica's copy

    def _count(self, offer: str, categorical: tuple[tuple[str, str], ...], field: str, amount: float) -> None:
        counts = self._naive_bayes
        counts[f"{offer}|{field}"] = counts.get(f"{offer}|{field}", 0.0) + amount
        for name, value in categorical:
            key = f"{offer}|{name}={value}|{field}"
            counts[key] = counts.get(key, 0.0) + amount

    def _model(self, offer: str, dimension: int) -> LinearState:
        model = self._linear.get(offer)
        if model is None or model.b.shape != (dimension,):  # another dimension starts again at zero
            model = self._linear[offer] = LinearState(np.zeros((dimension, dimension)), np.zeros(dimension))
        return model

    def choose(
        self,
        time: float,
        plan: VariantPlan,
        context: Context,
        params: dict[str, Any],
        features: dict[str, Any],
        customer: str = "",
    ) -> Choice:
        """The candidate's first-slot choice for one logged request (its plugins see the request's
        customer, params and features, as on a replica)."""
        kind = plan.scorer.statistics
        if kind == "naive_bayes":
            statistics = Statistics(naive_bayes=self._naive_bayes)
        elif kind == "linear":
            statistics = Statistics(linear=self._linear)
        else:
            copy = self._kept.get(context.segment)
            if copy is None or time - copy[0] > self._max_age:
                copy = self._kept[context.segment] = (
                    time,
                    parse_arms(self._arms.get(context.segment, {}), plan.policy, time),
                )
            statistics = Statistics(arms=copy[1])
        return self.prepared.choose(
            self.prepared.selected(plan, context),  # the model selector's, as a replica picks it
            self.prepared.eligible(context, params, customer=customer, features=features),
            context,
            statistics,
            self._rng,
            count=1,
            features=features,
            params=params,
            customer=customer,
        )


class _Decisions:
    """The evaluated decisions written into arrays over one set of offer columns, so that memory
    grows with decisions x offers, not with Python objects per decision."""

    def __init__(self, capacity: int, offers: list[str]) -> None:
        self.offers = offers
        self._column = {offer: index for index, offer in enumerate(offers)}
        width = len(offers)
        self.mask = np.zeros((capacity, width), dtype=bool)
        self.candidate = np.zeros((capacity, width))
        self.logging: np.ndarray | None = np.zeros((capacity, width))
        self.actions = np.zeros(capacity, dtype=np.intp)
        self.propensities = np.zeros(capacity)
        self.rewards = np.zeros(capacity)
        self.segments: list[str] = []
        self.n = 0

    def add(
        self,
        choice: Choice,
        shown: str,
        propensity: float | None,
        reward: float,
        segment: str,
        logged_distribution: tuple[list[str], np.ndarray] | None = None,
    ) -> None:
        """One decision: the candidate's choice, the offer shown first and its logging propensity
        (from the logged distribution when there is one, else as given; None: missing)."""
        n = self.n
        candidate_columns = [self._column[offer.id] for offer in choice.eligible]
        self.candidate[n, candidate_columns] = choice.first_slot.propensities
        self.mask[n, candidate_columns] = True
        action = self._column[shown]
        self.actions[n] = action
        self.mask[n, action] = True
        if logged_distribution is not None and self.logging is not None:
            logged_columns = [self._column[offer] for offer in logged_distribution[0]]
            self.logging[n, logged_columns] = logged_distribution[1]
            self.mask[n, logged_columns] = True
            propensity = float(self.logging[n, action]) if action in logged_columns else None
        else:
            self.logging = None  # known for every decision or for none
        self.propensities[n] = math.nan if propensity is None else propensity
        self.rewards[n] = reward
        self.segments.append(segment)
        self.n += 1

    def estimate(self, request: EvaluationRequest) -> PolicyEvaluation:
        n = self.n
        actions, rewards = self.actions[:n], self.rewards[:n]
        wants_model = any(name in MODEL_BASED_ESTIMATORS for name in request.estimators)
        expected = None
        if wants_model and n >= 2:
            expected = cross_fitted_expected_rewards(
                self.segments,
                [self.offers[a] for a in actions],
                rewards,
                [self.offers] * n,  # one shared list: every decision's columns are the same offers
                seed=request.seed,
            )
        estimators = [
            name for name in request.estimators if expected is not None or name not in MODEL_BASED_ESTIMATORS
        ]
        data = LoggedDecisions(
            eligible=self.mask[:n],
            action=actions,
            logging_propensity=self.propensities[:n],
            reward=rewards,
            candidate=self.candidate[:n],
            expected_reward=expected,
            logging_distribution=None if self.logging is None else self.logging[:n],
        )
        return estimate_policy_value(
            data,
            estimators or ("ips",),
            confidence_level=request.confidence_level,
            max_importance_weight=request.max_importance_weight,
            bootstrap_samples=request.bootstrap_samples,
            seed=request.seed,
        )


def _notes(result: PolicyEvaluation) -> list[str]:
    notes = []
    if "dm" in result.estimates:
        notes.append(
            "dm's interval holds the reward model fixed, so it understates dm's uncertainty; "
            "prefer dr's interval for a decision"
        )
    return notes


def evaluate_candidate(
    spec: DeploymentSpec,
    contacts: pa.Table,
    responses: pa.Table,
    request: EvaluationRequest,
    models: ModelsByKey | None = None,
) -> CandidateEvaluation:
    """The candidate's estimated value on these logged contacts (in time order) and their responses;
    `models` are the model versions the candidate binds, loaded."""
    replay = _Replay(spec, request, models)
    prepared = replay.prepared
    rewards = _credited_rewards(responses)
    total = contacts.num_rows
    warmup = int(total * request.warmup_share)
    decisions = _Decisions(max(total - warmup, 0), _offer_columns(spec, contacts))
    learned = _learned_rewards(responses)
    responded = {uuid for _, uuid, _, _ in learned}
    learners: dict[str, _ContactState] = {}  # the responded contacts, as the candidate saw them
    next_reward = 0
    skipped_no_shown = 0
    index = -1
    for batch in contacts.select([*CONTACT_COLUMNS, "time"]).to_batches(max_chunksize=10_000):
        for row in batch.to_pylist():
            index += 1
            time = float(row["time"])
            # Rewards learned before this contact was served (a contact goes first on a tie).
            while next_reward < len(learned) and learned[next_reward][0] < time:
                reward_time, uuid, offer, reward = learned[next_reward]
                learner = learners.get(uuid)
                if learner is not None:  # else a response to a contact before the window
                    replay.learn_reward(reward_time, learner, [offer], reward)
                next_reward += 1
            context_values = json.loads(row["context"])
            features = json.loads(row["features"])
            params = {name: value for name, value in context_values.items() if isinstance(value, str)}
            context = derive_context(spec, features, params, row["channel"])
            plan = prepared.variant_for(row["customer"])
            contact = replay.contact(plan, context)
            if row["uuid"] in responded:
                learners[row["uuid"]] = contact
            shown: list[str] = row["shown"]
            if index >= warmup and not shown:
                skipped_no_shown += 1
            elif index >= warmup:
                choice = replay.choose(time, plan, context, params, features, row["customer"])
                counts = np.asarray(row["counts"], dtype=np.float64)
                epsilon, outcomes = float(row["epsilon"]), int(row["outcomes"])
                first = epsilon / len(row["eligible"]) + (1 - epsilon) * counts / outcomes
                decisions.add(
                    choice,
                    shown[0],
                    None,
                    rewards.get((row["uuid"], shown[0]), 0.0),
                    context.segment,
                    logged_distribution=(row["eligible"], first),
                )
            if shown:
                # What the live system learned from this contact: an impression of every shown offer.
                replay.learn_impressions(time, contact, shown)
    result = decisions.estimate(request)
    notes = [
        f"the candidate's learned statistics were rebuilt by replaying {total} logged contacts and their "
        f"responses in time order; the first {warmup} only warmed them up",
        "first slot only: the logged action is the offer shown first, its reward what the responses credited it",
        *_notes(result),
    ]
    if skipped_no_shown:
        notes.append(f"{skipped_no_shown} contacts showed no offer and were left out")
    return CandidateEvaluation(decisions=total, result=result, notes=notes)


@dataclass(frozen=True)
class LoggedRow:
    """One row of another system's decision log: an offer shown at a slot, with what it earned."""

    time: float
    customer: str
    context: dict[str, Any]  # the context columns, each both a param and a feature
    offer: str
    slot: int
    propensity: float | None  # the logging system's probability of showing it there; None: missing
    reward: float


def evaluate_logged_rows(
    spec: DeploymentSpec,
    rows: Iterable[LoggedRow],
    first_slot_rows: int,
    logged_offers: Sequence[str],
    request: EvaluationRequest,
    source: str,
    models: ModelsByKey | None = None,
) -> CandidateEvaluation:
    """The candidate's estimated value on another system's log (rows in time order).

    Every row is an impression the candidate's statistics learn, with its reward, right after the
    decision it belongs to (that log says nothing of when the response came); first-slot rows are
    evaluated, once the first `warmup_share` of them have warmed the statistics up. The logging
    system's segments are unknown, so the candidate's own segment of each row's context is used.
    """
    replay = _Replay(spec, request, models)
    prepared = replay.prepared
    known = [offer.id for offer in spec.offers]
    offers = known + sorted(set(logged_offers) - set(known))
    warmup = int(first_slot_rows * request.warmup_share)
    decisions = _Decisions(max(first_slot_rows - warmup, 0), offers)
    seen = 0
    rows_read = 0
    for row in rows:
        rows_read += 1
        params = row.context  # every column is a value the request carried: a param and a feature
        context = derive_context(spec, row.context, params, str(params.get("channel", "")))
        plan = prepared.variant_for(row.customer)
        if row.slot == 1:
            if seen >= warmup:
                choice = replay.choose(row.time, plan, context, params, row.context, row.customer)
                decisions.add(choice, row.offer, row.propensity, row.reward, context.segment)
            seen += 1
        contact = replay.contact(plan, context)
        replay.learn_impressions(row.time, contact, [row.offer])
        if row.reward:  # a response without uptake changes no statistics, as in Respond
            replay.learn_reward(row.time, contact, [row.offer], row.reward)
    result = decisions.estimate(request)
    notes = [
        f"decisions logged by another system: {first_slot_rows} first-slot rows of {source} "
        f"({rows_read} rows read in time order); the first {warmup} only warmed the candidate's "
        "learned statistics up",
        "every row was learned as an impression with its reward right after its decision; segments "
        "are the candidate's own, derived from each row's context columns",
        *_notes(result),
    ]
    return CandidateEvaluation(decisions=first_slot_rows, result=result, notes=notes)


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


def _learned_rewards(responses: pa.Table) -> list[tuple[float, str, str, float]]:
    """(time, uuid, offer, reward) of every reward learned from a response, in time order."""
    if responses.num_rows == 0:
        return []
    learned = []
    for row in responses.select(["uuid", "time", "learned_offers", "credited_reward"]).to_pylist():
        for offer in row["learned_offers"]:
            learned.append((float(row["time"]), str(row["uuid"]), offer, float(row["credited_reward"])))
    learned.sort(key=lambda item: item[0])
    return learned
