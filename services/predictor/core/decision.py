"""The real-time decision loop: Invoke (rank offers, log the contact with propensities) and Respond
(join the contact by uuid, learn within the reward window, log the response)."""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid as uuid_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from libs.common import redis_keys
from libs.common.config_follower import AppliedConfig
from libs.common.deployment_spec import (
    Algorithm,
    DeploymentSpec,
    EligibilityRule,
    Offer,
    RuleOperator,
    Variant,
)
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.predictor.core.algorithms import LinearScorer, Scorer, build_scorer
from services.predictor.core.context import Context, derive_context, parse_number_of_offers, parse_params
from services.predictor.core.models import LoadedModel
from services.predictor.core.options_store import DECISION_LOG_MAX_LENGTH, ArmPolicy, OptionsStore
from services.predictor.core.plugins import PluginChain, build_plugin_chain

CONTACT_MINIMUM_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class ServingPlan:
    """What one variant of a deployment serves with."""

    name: str
    algorithm: Algorithm
    scorer: Scorer
    epsilon: float
    policy: ArmPolicy
    # The model version this variant binds (scored or not, its output is reported per offer).
    model: LoadedModel | None = None

    @property
    def model_ref(self) -> str:
        """The bound model as "name:version"; empty when none."""
        return f"{self.model.name}:{self.model.version}" if self.model is not None else ""


@dataclass(frozen=True)
class DeploymentRuntime:
    """A deployment spec prepared for serving (built once per config revision, off the hot path)."""

    spec: DeploymentSpec
    plans: Mapping[str, ServingPlan]
    variant_weights: tuple[tuple[str, float], ...]
    offers_by_id: Mapping[str, Offer]
    offers_by_name: Mapping[str, Offer]
    plugins: PluginChain
    # Model versions this revision binds, loaded and verified: (name, version) -> model.
    models: Mapping[tuple[str, int], LoadedModel] = field(default_factory=dict)

    @classmethod
    def prepare(
        cls, spec: DeploymentSpec, models: Mapping[tuple[str, int], LoadedModel] | None = None
    ) -> DeploymentRuntime:
        loaded = dict(models or {})

        def plan(name: str, variant: Variant | None) -> ServingPlan:
            algorithm = variant.algorithm if variant is not None and variant.algorithm else spec.algorithm
            epsilon = (
                variant.exploration_epsilon
                if variant is not None and variant.exploration_epsilon is not None
                else spec.exploration_epsilon
            )
            binding = variant.model if variant is not None and variant.model is not None else spec.model
            model = loaded.get((binding.name, binding.version)) if binding is not None else None
            return ServingPlan(
                name,
                algorithm,
                build_scorer(algorithm, model),
                epsilon,
                ArmPolicy.from_algorithm(algorithm),
                model,
            )

        plans = {"": plan("", None)} | {v.name: plan(v.name, v) for v in spec.variants}
        return cls(
            spec=spec,
            plans=plans,
            variant_weights=tuple((v.name, v.weight) for v in spec.variants),
            offers_by_id={o.id: o for o in spec.offers},
            offers_by_name={o.name: o for o in spec.offers},
            plugins=build_plugin_chain(spec.plugins),
            models=loaded,
        )

    def variant_for(self, customer: str) -> ServingPlan:
        """Sticky assignment: the same customer always lands in the same variant."""
        if not self.variant_weights:
            return self.plans[""]
        digest = hashlib.sha256(f"{self.spec.name}:{customer}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64 * sum(w for _, w in self.variant_weights)
        for name, weight in self.variant_weights:
            point -= weight
            if point < 0:
                return self.plans[name]
        return self.plans[self.variant_weights[-1][0]]


@dataclass(frozen=True)
class InvokeInput:
    campaign: str
    subcampaign: str
    channel: str
    customer: str
    userid: str
    numberoffers: Any
    params: Any
    in_param: Any
    deployment: str = ""


@dataclass(frozen=True)
class RankedOffer:
    offer: Offer
    rank: int
    score: float
    final_score: float
    arm_reward: float
    arm_count: float
    propensity: float
    explored: bool
    model_score: float | None = None  # the bound model's predicted take-up for this offer


@dataclass(frozen=True)
class Decision:
    uuid: str
    deployment: str
    config_revision: int
    variant: str
    explore: bool
    segment: str
    context: Mapping[str, str | float]
    offers: list[RankedOffer]
    warnings: list[str]
    model: str = ""  # the bound model as "name:version"; empty when none


@dataclass(frozen=True)
class RespondInput:
    uuid: str
    accepted: Sequence[str]
    channel_name: str = ""
    reward: float | None = None
    event_time: float | None = None


@dataclass(frozen=True)
class ResponseOutcome:
    uuid: str
    deployment: str
    learned: bool
    late: bool
    duplicate: bool
    matched_offers: list[str]
    message: str


def _rule_holds(rule: EligibilityRule, value: str | float | None) -> bool:
    if value is None:
        return False
    target = rule.value
    if rule.operator in (RuleOperator.IN, RuleOperator.NOT_IN):
        assert isinstance(target, list)
        inside = any(str(value) == str(t) or _same_number(value, t) for t in target)
        return inside if rule.operator is RuleOperator.IN else not inside
    if rule.operator in (RuleOperator.EQ, RuleOperator.NE):
        equal = str(value) == str(target) or _same_number(value, target)
        return equal if rule.operator is RuleOperator.EQ else not equal
    try:
        number, bound = float(value), float(target)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return {
        RuleOperator.GT: number > bound,
        RuleOperator.GE: number >= bound,
        RuleOperator.LT: number < bound,
        RuleOperator.LE: number <= bound,
    }[rule.operator]


def _same_number(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


@dataclass
class DecisionEngine:
    store: OptionsStore
    replica_id: str
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    # Keyed by the config object itself, not id(): an id is reused once the old config is freed.
    _campaign_index: tuple[AppliedConfig | None, dict[str, str]] = (None, {})

    def _resolve(self, config: AppliedConfig, request: InvokeInput) -> DeploymentRuntime:
        if request.deployment:
            applied = config.deployments.get(request.deployment)
            if applied is None:
                raise NotFound(f"no deployment '{request.deployment}' is served here", field="deployment")
        else:
            if not request.campaign:
                raise InvalidArgument("must name a campaign", field="campaign")
            if self._campaign_index[0] is not config:
                index: dict[str, str] = {}
                for name, item in sorted(config.deployments.items()):
                    for campaign in item.spec.campaigns:
                        index.setdefault(campaign, name)
                self._campaign_index = (config, index)
            served_by = self._campaign_index[1].get(request.campaign)
            if served_by is None:
                raise NotFound(f"no deployment serves campaign '{request.campaign}'", field="campaign")
            applied = config.deployments[served_by]
        runtime = applied.prepared
        if not isinstance(runtime, DeploymentRuntime):
            raise FailedPrecondition(f"deployment '{applied.name}' is not prepared for serving")
        return runtime

    async def invoke(self, request: InvokeInput, config: AppliedConfig) -> Decision:
        started = time.perf_counter()
        runtime = self._resolve(config, request)
        spec = runtime.spec
        applied = config.deployments[spec.name]
        if not request.customer:
            raise InvalidArgument("must name the customer", field="customer")
        if len(request.customer) > 256:
            raise InvalidArgument("is longer than 256 characters", field="customer")
        params = {**parse_params(request.in_param, "in_param"), **parse_params(request.params, "params")}
        count = parse_number_of_offers(request.numberoffers, spec.default_number_of_offers, len(spec.offers))
        plan = runtime.variant_for(request.customer)
        generation = await self.store.generation(spec.name)

        features: dict[str, Any] = {}
        raw: dict[Any, Any] = {}
        if spec.feature_lookup is not None:
            entity = request.customer if spec.feature_lookup.key == "customer" else request.userid
            feature_key = redis_keys.online_features(spec.feature_lookup.feature_view, entity)
            raw = await self.store.redis.hgetall(feature_key)
            features = {**spec.feature_lookup.defaults, **{_text(k): _text(v) for k, v in raw.items()}}
        context = derive_context(spec, features, params, request.channel)
        warnings = list(context.warnings)
        if spec.feature_lookup is not None and not raw:
            warnings.append(
                f"no features for '{request.customer}' in '{spec.feature_lookup.feature_view}'; defaults used"
            )

        eligible = [
            offer
            for offer in spec.offers
            if offer.weighting > 0
            and all(_rule_holds(rule, context.values.get(rule.variable)) for rule in offer.eligibility)
        ]
        eligible = runtime.plugins.filter(eligible, context, params)
        if not eligible:
            return Decision(
                str(uuid_module.uuid4()),
                spec.name,
                applied.revision,
                plan.name,
                False,
                context.segment,
                context.values,
                [],
                [*warnings, "no offer is eligible for this customer"],
            )
        if count > len(eligible):
            warnings.append(f"{count} offers asked for, {len(eligible)} eligible")
            count = len(eligible)

        offer_ids = [offer.id for offer in eligible]
        statistics, _ = await self.store.read(
            deployment=spec.name,
            generation=generation,
            segment=context.segment,
            kind=plan.scorer.statistics,
            offers=offer_ids,
            policy=plan.policy,
            feature_key=None,
        )
        weights = np.array([offer.weighting for offer in eligible]) * runtime.plugins.factors(
            eligible, context, params
        )
        categorical = {k: v for k, v in context.values.items() if isinstance(v, str)}
        model_inputs = categorical  # a model reads the customer's raw features and params too
        if plan.model is not None or plan.scorer.reads_raw_features:
            model_inputs = {
                **features,
                **{k: str(v) for k, v in params.items() if isinstance(v, str | int | float)},
                **categorical,
            }
        scores = plan.scorer.score(
            offer_ids,
            weights,
            statistics,
            context.numeric,
            model_inputs if plan.scorer.reads_raw_features else categorical,
            self.rng,
            segment=context.segment,
        )
        model_scores = scores.model_score
        if model_scores is None and plan.model is not None:  # bound, not scored with: still reported
            model_scores = plan.model.predict_offers({**model_inputs, **context.numeric}, offer_ids)
        explore = bool(self.rng.random() < plan.epsilon)
        order = self.rng.permutation(len(eligible)) if explore else np.argsort(-scores.score, kind="stable")
        propensity = (1.0 - plan.epsilon) * scores.top_probability + plan.epsilon / len(eligible)
        # Made as the plugins take them: only the offers shown (and those a category cap skips).
        candidates = (
            RankedOffer(
                offer=eligible[i],
                rank=0,
                score=float(scores.score[i]),
                final_score=float(scores.score[i]),
                arm_reward=float(scores.arm_reward[i]),
                arm_count=float(scores.arm_count[i]),
                propensity=float(propensity[i]),
                explored=explore,
                model_score=float(model_scores[i]) if model_scores is not None else None,
            )
            for i in order.tolist()
        )
        ranked = [
            replace(row, rank=position + 1)
            for position, row in enumerate(runtime.plugins.arrange(candidates, count))
        ]
        decision = Decision(
            str(uuid_module.uuid4()),
            spec.name,
            applied.revision,
            plan.name,
            explore,
            context.segment,
            context.values,
            ranked,
            warnings,
            plan.model_ref,
        )
        await self._record_contact(decision, runtime, plan, generation, context, request, started)
        return decision

    async def _record_contact(
        self,
        decision: Decision,
        runtime: DeploymentRuntime,
        plan: ServingPlan,
        generation: str,
        context: Context,
        request: InvokeInput,
        started: float,
    ) -> None:
        spec = runtime.spec
        now = self.store.now()
        pipeline = self.store.redis.pipeline(transaction=False)
        shown = [row.offer.id for row in decision.offers]
        categorical = {k: v for k, v in context.values.items() if isinstance(v, str)}
        vector: list[float] = []
        if plan.scorer.statistics == "arms":
            key = redis_keys.arm_statistics(spec.name, generation, decision.segment)
            await self.store.queue_arm_update(
                pipeline, key, plan.policy, [(offer, 1.0, 0.0) for offer in shown], now
            )
        elif plan.scorer.statistics == "naive_bayes":
            key = redis_keys.naive_bayes_counts(spec.name, generation)
            for offer in shown:
                self.store.queue_naive_bayes_update(pipeline, key, offer, categorical, "n", 1.0)
        elif isinstance(plan.scorer, LinearScorer):
            vector = plan.scorer.vector(context.numeric).tolist()
            for offer in shown:
                await self.store.queue_linear_update(
                    pipeline, redis_keys.linear_model(spec.name, generation, offer), vector, 0.0
                )
        offers_logged = [
            {"offer": row.offer.id, "rank": row.rank, "score": row.score, "propensity": row.propensity}
            | ({"model_score": row.model_score} if row.model_score is not None else {})
            for row in decision.offers
        ]
        contact_key = redis_keys.contact(decision.uuid)
        pipeline.hset(
            contact_key,
            mapping={
                "deployment": spec.name,
                "revision": decision.config_revision,
                "variant": decision.variant,
                "generation": generation,
                "segment": decision.segment,
                "customer": request.customer,
                "time": now,
                "offers": json.dumps([row.offer.id for row in decision.offers]),
                "context": json.dumps(categorical),
                "vector": json.dumps(vector),
            },
        )
        pipeline.expire(contact_key, int(max(2 * spec.reward.window_seconds, CONTACT_MINIMUM_TTL_SECONDS)))
        pipeline.xadd(
            redis_keys.DECISION_STREAM,
            {
                "kind": "contact",
                "uuid": decision.uuid,
                "body": json.dumps(
                    {
                        "uuid": decision.uuid,
                        "deployment": spec.name,
                        "revision": decision.config_revision,
                        "variant": decision.variant,
                        "replica": self.replica_id,
                        "customer": request.customer,
                        "campaign": request.campaign,
                        "channel": request.channel,
                        "segment": decision.segment,
                        "explore": decision.explore,
                        "model": decision.model,
                        "offers": offers_logged,
                        "time": now,
                        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                    }
                ),
            },
            maxlen=DECISION_LOG_MAX_LENGTH,
            approximate=True,
        )
        await pipeline.execute()

    async def respond(self, request: RespondInput, config: AppliedConfig | None) -> ResponseOutcome:
        if not request.uuid:
            raise InvalidArgument("must be the uuid of an earlier Invoke", field="uuid")
        if len(request.uuid) > 64:
            raise InvalidArgument("is not a uuid", field="uuid")
        contact_key = redis_keys.contact(request.uuid)
        raw = await self.store.redis.hgetall(contact_key)
        if not raw:
            raise NotFound(
                f"no contact with uuid '{request.uuid}' (unknown, or older than its reward window)",
                field="uuid",
            )
        contact = {_text(k): _text(v) for k, v in raw.items()}
        deployment = contact["deployment"]
        shown: list[str] = json.loads(contact["offers"])
        applied = config.deployments.get(deployment) if config is not None else None
        runtime = applied.prepared if applied is not None else None
        accepted = self._match_offers(
            request.accepted, shown, runtime if isinstance(runtime, DeploymentRuntime) else None
        )
        plan = (
            runtime.plans.get(contact.get("variant", ""), runtime.plans[""])
            if isinstance(runtime, DeploymentRuntime)
            else None
        )
        if request.reward is not None:
            # Checked before the response is marked: a refused one can be sent again, corrected.
            if not math.isfinite(request.reward):
                raise InvalidArgument(f"must be a finite number, got {request.reward}", field="reward")
            if request.reward < 0 and plan is not None and plan.scorer.statistics != "linear":
                # Success counts cannot go down: a negative count makes the Beta posterior invalid.
                raise InvalidArgument(
                    f"must not be negative for '{plan.algorithm.approach}' (it counts successes)",
                    field="reward",
                )
        now = self.store.now()
        event_time = request.event_time if request.event_time is not None else now
        window = runtime.spec.reward.window_seconds if isinstance(runtime, DeploymentRuntime) else 0.0
        late = event_time - float(contact["time"]) > window
        fresh = await self.store.mark_responses(request.uuid, accepted)
        if fresh is None:
            raise NotFound(f"the contact '{request.uuid}' expired", field="uuid")
        duplicate = (bool(accepted) and not fresh) or (not accepted and contact.get("responded") == "1")
        learned = False
        fits = None  # for linear models: whether the contact's vector fits them
        pipeline = self.store.redis.pipeline(transaction=False)
        if isinstance(runtime, DeploymentRuntime) and plan is not None and not late and fresh:
            reward = request.reward if request.reward is not None else runtime.spec.reward.default_reward
            generation = contact.get("generation", "0")
            if plan.scorer.statistics == "arms":
                key = redis_keys.arm_statistics(deployment, generation, contact["segment"])
                await self.store.queue_arm_update(
                    pipeline, key, plan.policy, [(o, 0.0, reward) for o in fresh], now
                )
            elif plan.scorer.statistics == "naive_bayes":
                key = redis_keys.naive_bayes_counts(deployment, generation)
                for offer in fresh:
                    self.store.queue_naive_bayes_update(
                        pipeline, key, offer, json.loads(contact["context"]), "s", reward
                    )
            else:
                vector = json.loads(contact["vector"])
                # A contact scored before the algorithm or its features changed has no vector that
                # fits the linear models now served: logged, not learned.
                fits = isinstance(plan.scorer, LinearScorer) and len(vector) == plan.scorer.dimension
                for offer in fresh if fits else []:
                    key = redis_keys.linear_model(deployment, generation, offer)
                    # A already counted the impression; add the reward to b only.
                    pipeline.eval(_ADD_TO_B, 1, key, reward, *vector)
            learned = plan.scorer.statistics != "linear" or bool(fits)
        pipeline.xadd(
            redis_keys.DECISION_STREAM,
            {
                "kind": "response",
                "uuid": request.uuid,
                "body": json.dumps(
                    {
                        "uuid": request.uuid,
                        "deployment": deployment,
                        "accepted": accepted,
                        "learned_offers": fresh if learned else [],
                        "reward": request.reward,
                        "late": late,
                        "duplicate": duplicate,
                        "channel": request.channel_name,
                        "replica": self.replica_id,
                        "time": now,
                    }
                ),
            },
            maxlen=DECISION_LOG_MAX_LENGTH,
            approximate=True,
        )
        await pipeline.execute()
        if late:
            message = "response logged after the reward window; not learned"
        elif duplicate:
            message = "already answered; not learned twice"
        elif learned:
            message = f"learned from {len(fresh)} accepted offer(s)"
        elif not accepted:
            message = "response without uptake logged"
        elif plan is not None:
            message = "logged; the contact was scored over other features than are served now, so not learned"
        else:
            message = "logged; the deployment is no longer served here, so nothing was learned"
        return ResponseOutcome(
            request.uuid, deployment, learned, late, duplicate, fresh if learned else [], message
        )

    @staticmethod
    def _match_offers(
        names: Sequence[str], shown: Sequence[str], runtime: DeploymentRuntime | None
    ) -> list[str]:
        matched: list[str] = []
        for name in names:
            if name in shown:
                offer_id = name
            elif (
                runtime is not None
                and name in runtime.offers_by_name
                and runtime.offers_by_name[name].id in shown
            ):
                offer_id = runtime.offers_by_name[name].id
            else:
                raise InvalidArgument(
                    f"'{name}' was not among the offers of this contact: {', '.join(shown)}",
                    field="offers_accepted",
                )
            if offer_id not in matched:
                matched.append(offer_id)
        return matched


_ADD_TO_B = """
local raw = redis.call('HGET', KEYS[1], 'b')
if not raw then return 0 end
local b = cjson.decode(raw)
if #b ~= #ARGV - 1 then return 0 end  -- a model of other features: this contact does not fit it
local reward = tonumber(ARGV[1])
for i = 1, #b do b[i] = b[i] + reward * tonumber(ARGV[1 + i]) end
redis.call('HSET', KEYS[1], 'b', cjson.encode(b))
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
