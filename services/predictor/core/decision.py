"""The real-time decision loop, as orchestration: Invoke resolves the deployment, reads the
customer's features and the segment's statistics from Redis, lets the shared policy
(libs/policy) choose and rank, and records the impressions and the contact; Respond joins the
contact by uuid inside the reward window, learns, and logs the response. What is decided lives in
libs/policy; what is stored, and how, in the statistics stores; what is logged, in
libs/common/decision_log.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid as uuid_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from libs.common import decision_log, redis_keys
from libs.common.config_follower import AppliedConfig, AppliedDeployment
from libs.common.deployment_spec import Offer
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from libs.policy.context import Context, derive_context, parse_number_of_offers, parse_params
from libs.policy.deployment import ELIGIBLE_OFFERS_PARAM, Choice, PreparedDeployment, RankedOffer, VariantPlan
from libs.policy.plugins import MAX_REWARD_MAGNITUDE, PluginSkip, RewardInput
from libs.policy.statistics import Statistics
from services.predictor.core import answer_in_redis, budgets
from services.predictor.core.metrics import MODEL_INPUT_DEFAULTS, PLUGIN_SKIPS, SHADOW_DECISIONS
from services.predictor.core.options_store import OptionsStore, ScriptedAnswer
from services.predictor.core.statistics_stores import Scope

logger = logging.getLogger(__name__)

CONTACT_MINIMUM_TTL_SECONDS = 24 * 3600

ServedConfig = AppliedConfig[PreparedDeployment]


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


# The longest identifier or free-text field of a request (campaign, customer, ...).
MAX_FIELD_CHARS = 256


# A plugin skipped on every request is logged once per this many seconds (the metric counts all).
SKIP_LOG_INTERVAL_SECONDS = 10.0
_skip_logged: dict[tuple[str, str, str], float] = {}

# Shadow decisions computed at once per replica, at most: past it a request gets none (counted),
# so a slow shadow never holds more than this much work behind the live traffic.
MAX_SHADOWS_IN_FLIGHT = 64

# A routed contact's field naming the router's statistics, for Respond: [router, generation,
# segment, variant, target] (only when the router ranks, and so learns); and its mark once the
# router learned from the contact (once per routed request, whatever the responses).
ROUTE_FIELD = "route"
ROUTE_LEARNED_MARK = "route_learned"


def _skipped(deployment: str, skips: Sequence[PluginSkip]) -> list[str]:
    """Plugins this request went on without: counted, logged, and a warning each for the reply."""
    warnings = []
    for skip in skips:
        PLUGIN_SKIPS.labels(deployment, skip.plugin, skip.reason).inc()
        key = (deployment, skip.plugin, skip.reason)
        now = time.monotonic()
        if now - _skip_logged.get(key, -math.inf) >= SKIP_LOG_INTERVAL_SECONDS:
            _skip_logged[key] = now
            logger.warning(
                "%s: plugin %s skipped (%s): %s", deployment, skip.plugin, skip.reason, skip.detail
            )
        warnings.append(f"plugin {skip.plugin} skipped ({skip.reason}): {skip.detail}")
    return warnings


def _encodable(*texts: str) -> bool:
    """Whether Redis can take every text as an argument (a lone surrogate, from a JSON escape such
    as "\\ud800", cannot be encoded; the Python answer logs such text escaped)."""
    try:
        for text in texts:
            text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _entity(request: InvokeInput, key: str) -> str:
    """The request's entity key for a feature view: the customer, or the userid."""
    return request.customer if key == "customer" else request.userid


def _whitelisted(listed: Any, when_missing: str) -> frozenset[str] | None:
    """The offer ids or names a whitelist entry allows (comma-separated or a JSON list); for a
    customer without one, None (every offer) or nothing, as the deployment says."""
    if listed is None:
        return None if when_missing == "all" else frozenset()
    text = _text(listed).strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            items = [text]
        if isinstance(items, list):
            return frozenset(str(item).strip() for item in items)
    return frozenset(item.strip() for item in text.split(",") if item.strip())


def _check_lengths(request: InvokeInput) -> None:
    for name in ("campaign", "subcampaign", "channel", "customer", "userid", "deployment"):
        value: str = getattr(request, name)
        if len(value) > MAX_FIELD_CHARS:
            raise InvalidArgument(f"is {len(value)} characters; the limit is {MAX_FIELD_CHARS}", field=name)


# A reward larger than MAX_REWARD_MAGNITUDE (libs/policy/plugins.py, which checks a reward plugin's
# against it too) is a unit error, not a value: sums of such rewards overflow a linear model's
# statistics (and Lua's JSON), which would fail a response after it marked its contact.

# A response's event time may be this far ahead of the replica's clock (clock skew), no further.
MAX_EVENT_TIME_AHEAD_SECONDS = 300.0


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
    routed_by: str = ""  # the routing deployment that chose this deployment; empty when none


@dataclass(frozen=True)
class Route:
    """A routing deployment's choice of the deployment that serves a request."""

    router: str
    target: str
    propensity: float  # P(the router chose the target | the request); 1 for a switch
    scope: Scope  # the router's statistics (it learns when it ranks)
    plan: VariantPlan
    context: Context
    ranked: bool
    warnings: list[str]


@dataclass(frozen=True)
class RespondInput:
    uuid: str
    accepted: Sequence[str]
    channel_name: str = ""
    reward: float | None = None
    event_time: float | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)  # for reward plugins


@dataclass(frozen=True)
class ResponseOutcome:
    uuid: str
    deployment: str
    learned: bool
    late: bool
    duplicate: bool
    matched_offers: list[str]
    message: str


@dataclass(frozen=True)
class _Answer:
    """What one answer to a contact did, as committed."""

    deployment: str
    accepted: list[str]
    fresh: list[str]  # accepted here for the first time
    served: bool  # the contact's deployment is served here now
    learned: bool
    late: bool
    duplicate: bool

    @property
    def message(self) -> str:
        if self.late:
            return "response logged after the reward window; not learned"
        if self.duplicate:
            return "already answered; not learned twice"
        if self.learned:
            return f"learned from {len(self.fresh)} accepted offer(s)"
        if not self.accepted:
            return "response without uptake logged"
        if self.served:
            return "logged; the contact was scored over other features than are served now, so not learned"
        return "logged; the deployment is no longer served here, so nothing was learned"


@dataclass
class DecisionEngine:
    options: OptionsStore
    replica_id: str
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    budget_ledger: budgets.BudgetLedger = field(default_factory=budgets.BudgetLedger)
    # Whether Respond may answer in Redis (answer_in_redis.py): not on a replica that follows only
    # some deployments, which answers a contact of another as Python does (logged, not learned).
    answers_in_redis: bool = True
    # Keyed by the config object itself, not id(): an id is reused once the old config is freed.
    _campaign_index: tuple[ServedConfig | None, dict[str, str]] = (None, {})
    _shadows: set[asyncio.Task[None]] = field(default_factory=set)

    def _resolve(self, config: ServedConfig, request: InvokeInput) -> AppliedDeployment[PreparedDeployment]:
        if request.deployment:
            applied = config.deployments.get(request.deployment)
            if applied is None:
                raise NotFound(f"no deployment '{request.deployment}' is served here", field="deployment")
            return applied
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
        return config.deployments[served_by]

    async def invoke(self, request: InvokeInput, config: ServedConfig) -> Decision:
        started = time.perf_counter()
        _check_lengths(request)
        applied = self._resolve(config, request)
        if not request.customer:
            raise InvalidArgument("must name the customer", field="customer")
        params = {**parse_params(request.in_param, "in_param"), **parse_params(request.params, "params")}
        route: Route | None = None
        if applied.prepared.spec.routing is not None:
            applied, route = await self._route(applied, request, params, config)
        prepared = applied.prepared
        spec = prepared.spec
        count = parse_number_of_offers(request.numberoffers, spec.default_number_of_offers, len(spec.offers))
        plan, override_warnings = _with_call_overrides(prepared.variant_for(request.customer), params)
        generation = await self.options.generation(spec.name)
        skips: list[PluginSkip] = []
        activator_warnings: list[str] = [] if route is None else list(route.warnings)
        found, features, context, eligible, statistics = await self._inputs(
            prepared, plan, generation, request, params, skips, activator_warnings
        )
        warnings = [*context.warnings, *override_warnings, *activator_warnings]
        shadow = config.deployments.get(spec.shadow) if spec.shadow is not None else None
        if spec.shadow is not None and (shadow is None or shadow.spec.routing is not None):
            SHADOW_DECISIONS.labels(spec.name, spec.shadow, "not_served").inc()
            warnings.append(
                f"shadow '{spec.shadow}' "
                + ("is not served here" if shadow is None else "routes (a shadow decides offers)")
                + "; no shadow decision"
            )
            shadow = None
        plan = prepared.selected(plan, context)  # the model selector's model for this context
        unknown = prepared.unknown_requested_offers(params)
        if unknown:
            warnings.append(f"params.eligible_offers names no offer of '{spec.name}': {', '.join(unknown)}")
        if spec.feature_lookup is not None and not found:
            warnings.append(
                f"no features for '{request.customer}' in '{spec.feature_lookup.feature_view}'; defaults used"
            )
        uuid = str(uuid_module.uuid4())
        now = self.options.now()
        if prepared.has_budgets:  # offers this replica knows to be used up this period
            eligible = self._within_budget(spec.name, eligible, now, warnings)
        ranking_skips: list[PluginSkip] = []  # the post-score plugins skipped by the last ranking

        def nothing_eligible() -> Decision:
            return Decision(
                uuid,
                spec.name,
                applied.revision,
                plan.name,
                False,
                context.segment,
                context.values,
                [],
                [
                    *warnings,
                    *_skipped(spec.name, [*skips, *ranking_skips]),
                    "no offer is eligible for this customer",
                ],
                routed_by=route.router if route is not None else "",
            )

        if not eligible:
            return nothing_eligible()
        if count > len(eligible):
            warnings.append(f"{count} offers asked for, {len(eligible)} eligible")
            count = len(eligible)

        def ranked() -> Choice:
            ranking_skips.clear()
            return prepared.choose(
                plan,
                eligible,
                context,
                statistics,
                self.rng,
                count=min(count, len(eligible)),
                features=features,
                params=params,
                customer=request.customer,
                skips=ranking_skips,
            )

        choice = ranked()
        while prepared.has_budgets and await self._budget_refused(spec.name, choice, now, warnings):
            # Another replica used the last of a shown offer's budget: rank again without it.
            eligible = self._within_budget(spec.name, eligible, now, [])
            if not eligible:
                return nothing_eligible()
            choice = ranked()
        warnings += _skipped(spec.name, [*skips, *ranking_skips])
        if choice.model_inputs_missing:
            warnings.append(
                f"model {plan.model_ref} has no value for {', '.join(choice.model_inputs_missing)}: "
                "scored with the training mean (numbers) or no category instead"
            )
            for name in choice.model_inputs_missing:
                MODEL_INPUT_DEFAULTS.labels(spec.name, plan.model_ref, name).inc()
        decision = Decision(
            uuid,
            spec.name,
            applied.revision,
            plan.name,
            choice.explore,
            context.segment,
            context.values,
            choice.offers,
            warnings,
            plan.model_ref,
            route.router if route is not None else "",
        )
        scope = Scope(spec.name, generation, context.segment)
        await self._record_contact(
            decision,
            choice,
            plan,
            scope,
            context,
            features,
            request,
            prepared,
            config.revision,
            started,
            route,
        )
        if shadow is not None:
            self._start_shadow(shadow, decision, request, params)
        return decision

    async def _route(
        self,
        router: AppliedDeployment[PreparedDeployment],
        request: InvokeInput,
        params: Mapping[str, Any],
        config: ServedConfig,
    ) -> tuple[AppliedDeployment[PreparedDeployment], Route]:
        """The deployment a routing deployment sends this request to: the route of its switch
        variable's value, or the top of its own ranking of the deployments it routes to (served here)."""
        prepared = router.prepared
        spec = prepared.spec
        routing = spec.routing
        assert routing is not None
        plan = prepared.variant_for(request.customer)
        generation = await self.options.generation(spec.name)
        skips: list[PluginSkip] = []
        warnings: list[str] = []
        propensity = 1.0
        if routing.by == "switch":  # the context alone: no statistics to read
            assert routing.variable is not None
            lookup = spec.feature_lookup
            features: dict[str, Any] = {}
            if lookup is not None:
                raw = await self.options.read_features(lookup.feature_view, _entity(request, lookup.key))
                features = {**lookup.defaults, **{_text(k): _text(v) for k, v in raw.items()}}
            context = derive_context(spec, features, params, request.channel)
            warnings += context.warnings
            value = str(context.values.get(routing.variable, ""))
            target = routing.routes.get(value, routing.default or spec.offers[0].id)
        else:
            # The call's own offer list names the serving deployment's offers, not the router's.
            own = {name: value for name, value in params.items() if name != ELIGIBLE_OFFERS_PARAM}
            _, features, context, eligible, statistics = await self._inputs(
                prepared, plan, generation, request, own, skips, warnings
            )
            served = [
                offer
                for offer in eligible
                if offer.id in config.deployments and config.deployments[offer.id].spec.routing is None
            ]
            if not served:
                raise FailedPrecondition(
                    f"'{spec.name}' has no deployment to route this request to: of its eligible routes "
                    f"({', '.join(offer.id for offer in eligible) or 'none'}) none is served here "
                    "without routing itself",
                    field="routing",
                )
            choice = prepared.choose(
                plan,
                served,
                context,
                statistics,
                self.rng,
                count=1,
                features=features,
                params=own,
                customer=request.customer,
                skips=skips,
            )
            target, propensity = choice.offers[0].offer.id, choice.offers[0].propensity
        warnings += _skipped(spec.name, skips)
        applied = config.deployments.get(target)
        if applied is None:
            raise FailedPrecondition(
                f"'{spec.name}' routes to '{target}', which is not served here", field="routing"
            )
        if applied.prepared.spec.routing is not None:
            raise FailedPrecondition(
                f"'{spec.name}' routes to '{target}', which routes too (one level of routing)",
                field="routing",
            )
        scope = Scope(spec.name, generation, context.segment)
        return applied, Route(
            spec.name, target, propensity, scope, plan, context, routing.by == "ranking", warnings
        )

    def _start_shadow(
        self,
        shadow: AppliedDeployment[PreparedDeployment],
        live: Decision,
        request: InvokeInput,
        params: Mapping[str, Any],
    ) -> None:
        """Compute and log the shadow's decision for this request after the live reply, off its path."""
        if len(self._shadows) >= MAX_SHADOWS_IN_FLIGHT:
            SHADOW_DECISIONS.labels(live.deployment, shadow.prepared.spec.name, "busy").inc()
            return
        task = asyncio.get_running_loop().create_task(self._shadow(shadow, live, request, params))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def drain_shadows(self) -> None:
        """Wait for the shadow decisions in flight (a replica stopping, a test)."""
        while self._shadows:
            await asyncio.gather(*list(self._shadows), return_exceptions=True)

    async def _shadow(
        self,
        applied: AppliedDeployment[PreparedDeployment],
        live: Decision,
        request: InvokeInput,
        params: Mapping[str, Any],
    ) -> None:
        """The shadow's decision for the live request, logged as a contact of the shadow marked
        `shadow_of` the live one: no impressions, no contact for Respond, no budget consumed."""
        started = time.perf_counter()
        prepared = applied.prepared
        spec = prepared.spec
        outcome = "failed"
        try:
            plan, _ = _with_call_overrides(prepared.variant_for(request.customer), params)
            generation = await self.options.generation(spec.name)
            skips: list[PluginSkip] = []
            _, features, context, eligible, statistics = await self._inputs(
                prepared, plan, generation, request, params, skips, []
            )
            plan = prepared.selected(plan, context)
            now = self.options.now()
            if prepared.has_budgets:
                eligible = self._within_budget(spec.name, eligible, now, [])
            if not eligible:
                outcome = "nothing_eligible"
                return
            count = parse_number_of_offers(
                request.numberoffers, spec.default_number_of_offers, len(spec.offers)
            )
            choice = prepared.choose(
                plan,
                eligible,
                context,
                statistics,
                self.rng,
                count=min(count, len(eligible)),
                features=features,
                params=params,
                customer=request.customer,
                skips=skips,
            )
            _skipped(spec.name, skips)
            decision = Decision(
                str(uuid_module.uuid4()),
                spec.name,
                applied.revision,
                plan.name,
                choice.explore,
                context.segment,
                context.values,
                choice.offers,
                [],
                plan.model_ref,
            )
            record = self._contact_record(decision, choice, generation, features, request, now, started)
            record = dataclasses.replace(record, shadow_of=live.uuid, live_deployment=live.deployment)
            pipeline = self.options.pipeline()
            self.options.queue_log(pipeline, record)
            await self.options.send(pipeline)
            outcome = "logged"
        except Exception as error:  # a shadow never fails the live request, which has its reply
            key = (live.deployment, spec.name, "shadow")
            moment = time.monotonic()
            if moment - _skip_logged.get(key, -math.inf) >= SKIP_LOG_INTERVAL_SECONDS:
                _skip_logged[key] = moment
                logger.warning(
                    "%s: shadow %s failed: %s: %s", live.deployment, spec.name, type(error).__name__, error
                )
        finally:
            SHADOW_DECISIONS.labels(live.deployment, spec.name, outcome).inc()

    def _within_budget(
        self, deployment: str, offers: list[Offer], now: float, warnings: list[str]
    ) -> list[Offer]:
        """The offers whose budget this replica does not know to be used up (a warning for each other)."""
        kept = []
        for offer in offers:
            if self.budget_ledger.exhausted(deployment, offer, now):
                assert offer.budget is not None
                warnings.append(
                    f"offer '{offer.id}' left out: its budget ({budgets.describe(offer.budget)}) is used up"
                )
            else:
                kept.append(offer)
        return kept

    async def _budget_refused(self, deployment: str, choice: Choice, now: float, warnings: list[str]) -> bool:
        """Consume the budgets of the shown offers, all or none (one round trip, only when a shown
        offer has a budget); True when one was used up (remembered, with a warning)."""
        budgeted = [row.offer for row in choice.offers if row.offer.budget is not None]
        if not budgeted:
            return False
        pipeline = self.options.pipeline()
        self.budget_ledger.queue_consume(pipeline, deployment, budgeted, now)
        (refused,) = await self.options.send(pipeline)
        for index in refused:
            offer = budgeted[int(index) - 1]
            self.budget_ledger.remember(deployment, offer, now)
        self._within_budget(deployment, budgeted, now, warnings)
        return bool(refused)

    async def _inputs(
        self,
        prepared: PreparedDeployment,
        plan: VariantPlan,
        generation: str,
        request: InvokeInput,
        params: Mapping[str, Any],
        skips: list[PluginSkip],
        warnings: list[str],
    ) -> tuple[bool, dict[str, Any], Context, list[Offer], Statistics]:
        """Whether the customer's features were found, the features (the lookup's defaults where
        one is missing), the context, the eligible offers and the statistics:
        in one round trip when the statistics' keys do not depend on the features (naive Bayes
        counts always; arm statistics when the segment comes from the request alone), in two
        otherwise (the segment or, for linear models, the eligible offers must be known first)."""
        spec = prepared.spec
        store = self.options.statistics[plan.scorer.statistics]
        now = self.options.now()
        lookup, whitelist = spec.feature_lookup, spec.whitelist
        statistics: Statistics | None = None
        raw: dict[Any, Any] = {}
        listed: Any = None  # the customer's whitelist entry, as Redis holds it (None: no row)
        if lookup is not None or whitelist is not None:
            together: Scope | None = None  # statistics to fetch in the same round trip
            if store.keyed_by == "deployment" or (
                store.keyed_by == "segment" and not prepared.segment_reads_features
            ):  # the statistics' key is known from the request
                segment = derive_context(spec, {}, params, request.channel).segment
                together = Scope(spec.name, generation, segment)
                if store.kept(together, plan.policy, now) is not None:
                    together = None  # this replica's copy will do
            pipeline = self.options.pipeline()
            if lookup is not None:
                self.options.queue_features(pipeline, lookup.feature_view, _entity(request, lookup.key))
            if whitelist is not None:
                entity = _entity(request, whitelist.key)
                self.options.queue_whitelist(pipeline, whitelist.feature_view, entity, whitelist.column)
            reader = (
                store.queue_read(pipeline, together, (), plan.policy, now) if together is not None else None
            )
            replies = iter(await self.options.send(pipeline))
            raw = next(replies) if lookup is not None else {}
            listed = next(replies) if whitelist is not None else None
            statistics = reader(replies) if reader is not None else None
        defaults = lookup.defaults if lookup is not None else {}
        features = {**defaults, **{_text(k): _text(v) for k, v in raw.items()}}
        context = derive_context(spec, features, params, request.channel)
        allowed = None
        if whitelist is not None:
            allowed = _whitelisted(listed, whitelist.when_missing)
            entity = _entity(request, whitelist.key)
            if listed is None:
                warnings.append(
                    f"no whitelist for '{entity}' in '{whitelist.feature_view}': "
                    + ("every offer stays eligible" if allowed is None else "no offer is eligible")
                )
            elif allowed is not None and not any(
                offer.id in allowed or offer.name in allowed for offer in spec.offers
            ):  # a list in another form than ids or names, comma-separated or JSON
                warnings.append(
                    f"the whitelist for '{entity}' in '{whitelist.feature_view}' names no offer of "
                    f"'{spec.name}': {_text(listed)[:120]!r}"
                )
        eligible = prepared.eligible(
            context, params, customer=request.customer, features=features, skips=skips, allowed=allowed
        )
        if statistics is None:
            scope = Scope(spec.name, generation, context.segment)
            offers = [offer.id for offer in eligible]
            statistics = await self.options.read_statistics(store.kind, scope, offers, plan.policy)
        return bool(raw), features, context, eligible, statistics

    async def _record_contact(
        self,
        decision: Decision,
        choice: Choice,
        plan: VariantPlan,
        scope: Scope,
        context: Context,
        features: Mapping[str, Any],
        request: InvokeInput,
        prepared: PreparedDeployment,
        served_revision: int,
        started: float,
        route: Route | None = None,
    ) -> None:
        """One round trip: the impressions, the contact for Respond, the decision log entry (and,
        for a request a ranking router routed here, the router's impression)."""
        reward = prepared.spec.reward
        spec_name = decision.deployment
        now = self.options.now()
        store = self.options.statistics[plan.scorer.statistics]
        shown = [row.offer.id for row in decision.offers]
        pipeline = self.options.pipeline()
        store.queue_impressions(pipeline, scope, shown, plan, context, now)
        categorical = {k: v for k, v in context.values.items() if isinstance(v, str)}
        fields = {
            "deployment": spec_name,
            "revision": decision.config_revision,
            "variant": decision.variant,
            "generation": scope.generation,
            "segment": decision.segment,
            "customer": request.customer,
            "time": now,
            "offers": json.dumps(shown),
            "context": json.dumps(categorical),
            **store.contact_fields(plan, context),
        }
        if route is not None and route.ranked:  # the router learns from this contact's response too
            router_store = self.options.statistics[route.plan.scorer.statistics]
            router_store.queue_impressions(
                pipeline, route.scope, [route.target], route.plan, route.context, now
            )
            fields[ROUTE_FIELD] = json.dumps(
                [route.router, route.scope.generation, route.scope.segment, route.plan.name, route.target]
            )
        elif store.kind == "arms" and not prepared.plugins.reward:  # what Respond needs to answer in Redis
            statistics_key = redis_keys.arm_statistics(scope.deployment, scope.generation, scope.segment)
            fields[answer_in_redis.FACTS_FIELD] = answer_in_redis.contact_facts(
                served_revision, reward, plan.policy, statistics_key
            )
        ttl = max(2 * reward.window_seconds, CONTACT_MINIMUM_TTL_SECONDS)
        self.options.queue_contact(pipeline, decision.uuid, fields, ttl)
        record = self._contact_record(decision, choice, scope.generation, features, request, now, started)
        if route is not None:
            record = dataclasses.replace(record, routed_by=route.router, route_propensity=route.propensity)
        self.options.queue_log(pipeline, record)
        await self.options.send(pipeline)

    def _contact_record(
        self,
        decision: Decision,
        choice: Choice,
        generation: str,
        features: Mapping[str, Any],
        request: InvokeInput,
        now: float,
        started: float,
    ) -> decision_log.Contact:
        first_slot = choice.first_slot
        return decision_log.Contact(
            uuid=decision.uuid,
            time=now,
            deployment=decision.deployment,
            campaign=request.campaign,
            channel=request.channel,
            config_revision=decision.config_revision,
            variant=decision.variant,
            replica=self.replica_id,
            options_generation=generation,
            customer=request.customer,
            segment=decision.segment,
            context=decision.context,
            features={name: str(value) for name, value in features.items()},
            eligible=[offer.id for offer in choice.eligible],
            eligible_scores=choice.scores.tolist(),
            first_slot=decision_log.FirstSlot(
                first_slot.epsilon, first_slot.outcomes, first_slot.counts.tolist()
            ),
            shown=[
                decision_log.ShownOffer(
                    row.offer.id, row.rank, row.score, row.propensity, row.explored, row.model_score
                )
                for row in decision.offers
            ],
            explore=decision.explore,
            model=decision.model,
            latency_ms=(time.perf_counter() - started) * 1000,
            subcampaign=request.subcampaign,
            userid=request.userid,
        )

    async def respond(self, request: RespondInput, config: ServedConfig | None) -> ResponseOutcome:
        started = time.perf_counter()
        # Uuids are handed out in lower case; a client may send one back in capitals or padded.
        request = dataclasses.replace(request, uuid=request.uuid.strip().lower())
        if not request.uuid:
            raise InvalidArgument("must be the uuid of an earlier Invoke", field="uuid")
        if len(request.uuid) > 64:
            raise InvalidArgument("is not a uuid", field="uuid")
        if len(request.channel_name) > MAX_FIELD_CHARS:
            raise InvalidArgument(
                f"is {len(request.channel_name)} characters; the limit is {MAX_FIELD_CHARS}",
                field="channel_name",
            )
        now = self.options.now()
        event_time = request.event_time if request.event_time is not None else now
        if event_time > now + MAX_EVENT_TIME_AHEAD_SECONDS:
            # Not "late": a clock or unit error on the client, which would lose the reward silently.
            raise InvalidArgument(
                f"is {event_time - now:.0f} s in the future (more than {MAX_EVENT_TIME_AHEAD_SECONDS:.0f} s "
                "ahead of this server's clock); send seconds since the epoch or an RFC 3339 time",
                field="event_time",
            )
        if request.reward is not None and not (
            math.isfinite(request.reward) and abs(request.reward) <= MAX_REWARD_MAGNITUDE
        ):
            raise InvalidArgument(
                f"must be a finite number of magnitude at most {MAX_REWARD_MAGNITUDE:g}, got {request.reward}",
                field="reward",
            )

        skips: list[PluginSkip] = []

        def answer(contact: dict[str, str], pipeline: Any) -> _Answer:
            """What answering the contact as it is now writes, queued for the guarded commit."""
            skips.clear()  # an answer read again starts over
            deployment = contact["deployment"]
            shown: list[str] = json.loads(contact["offers"])
            applied = config.deployments.get(deployment) if config is not None else None
            prepared = applied.prepared if applied is not None else None
            accepted = self._match_offers(request.accepted, shown, prepared)
            plan = prepared.plans.get(contact.get("variant", ""), prepared.plans[""]) if prepared else None
            if (
                request.reward is not None
                and request.reward < 0
                and plan is not None
                and not self.options.statistics[plan.scorer.statistics].takes_negative_rewards
            ):
                # Success counts cannot go down: a negative count makes the Beta posterior invalid.
                raise InvalidArgument(
                    f"must not be negative for '{plan.algorithm.approach}' (it counts successes)",
                    field="reward",
                )
            window = prepared.spec.reward.window_seconds if prepared is not None else 0.0
            late = event_time - float(contact["time"]) > window
            fresh = [offer for offer in dict.fromkeys(accepted) if f"accepted|{offer}" not in contact]
            duplicate = (bool(accepted) and not fresh) or (not accepted and contact.get("responded") == "1")
            learned = False
            reward = request.reward
            if reward is None:
                reward = prepared.spec.reward.default_reward if prepared is not None else 1.0
            weight = 1.0
            if prepared is not None and plan is not None and prepared.plugins.reward:
                takes_negative = self.options.statistics[plan.scorer.statistics].takes_negative_rewards
                asked = RewardInput(
                    deployment,
                    request.uuid,
                    accepted,
                    reward,
                    request.payload,
                    request.channel_name,
                    json.loads(contact.get("context", "{}")),
                    contact["segment"],
                )
                reward, weight = prepared.plugins.rewarded(asked, takes_negative, skips)
            if prepared is not None and plan is not None and not late and fresh:
                scope = Scope(deployment, contact.get("generation", "0"), contact["segment"])
                store = self.options.statistics[plan.scorer.statistics]
                learned = store.queue_rewards(pipeline, scope, contact, fresh, reward * weight, plan, now)
            route_marks: dict[str, str] = {}
            if (
                learned
                and ROUTE_FIELD in contact
                and ROUTE_LEARNED_MARK not in contact
                and config is not None
            ):
                self._queue_route_reward(pipeline, contact, reward * weight, config, now)
                route_marks[ROUTE_LEARNED_MARK] = "1"
            record = decision_log.Response(
                uuid=request.uuid,
                time=now,
                deployment=deployment,
                accepted=accepted,
                learned_offers=fresh if learned else [],
                reward=request.reward,
                channel=request.channel_name,
                learned=learned,
                late=late,
                duplicate=duplicate,
                replica=self.replica_id,
                new_offers=fresh,
                credited_reward=reward,
                contact_time=float(contact["time"]),
                segment=contact["segment"],
                variant=contact.get("variant", ""),
                config_revision=int(contact.get("revision", 0)),
                latency_ms=(time.perf_counter() - started) * 1000,
                learning_weight=weight,
            )
            self.options.queue_log(pipeline, record)
            # The marks last: a command that fails stops the ones after it, and a contact left
            # unmarked is answered again by the retry, where one marked would never be learned.
            self.options.queue_answer_marks(pipeline, request.uuid, fresh, contact, route_marks)
            return _Answer(deployment, accepted, fresh, plan is not None, learned, late, duplicate)

        def answered_in_redis(reply: Sequence[Any]) -> _Answer:
            done = answer_in_redis.read_answered(reply)
            if done.learned:
                self.options.arms.learned(done.statistics_key)
            return _Answer(
                done.deployment, done.accepted, done.fresh, True, done.learned, done.late, done.duplicate
            )

        in_redis: ScriptedAnswer[_Answer] | None = None
        if (
            config is not None
            and self.answers_in_redis
            and _encodable(request.channel_name, *request.accepted)
        ):
            script_input = answer_in_redis.Respond(
                config.revision,
                request.uuid,
                now,
                event_time,
                request.reward,
                request.channel_name,
                self.replica_id,
                request.accepted,
            )
            in_redis = ScriptedAnswer(
                lambda pipeline, key: script_input.queue(
                    pipeline, key, (time.perf_counter() - started) * 1000
                ),
                answered_in_redis,
            )
        answered = await self.options.answer_contact(request.uuid, answer, in_redis)
        if answered is None:
            raise NotFound(
                f"no contact with uuid '{request.uuid}' (unknown, or older than its reward window)",
                field="uuid",
            )
        message = "; ".join([answered.message, *_skipped(answered.deployment, skips)])
        return ResponseOutcome(
            request.uuid,
            answered.deployment,
            answered.learned,
            answered.late,
            answered.duplicate,
            answered.fresh if answered.learned else [],
            message,
        )

    def _queue_route_reward(
        self, pipeline: Any, contact: Mapping[str, str], reward: float, config: ServedConfig, now: float
    ) -> None:
        """The router that chose this contact's deployment learns the reward the deployment learned
        from its first learned response (a router counts successes: a negative reward teaches it 0)."""
        router, generation, segment, variant, target = json.loads(contact[ROUTE_FIELD])
        applied = config.deployments.get(router)
        if applied is None:
            return  # no longer served here: the deployment still learns
        plan = applied.prepared.plans.get(variant, applied.prepared.plans[""])
        store = self.options.statistics[plan.scorer.statistics]
        if not store.takes_negative_rewards:
            reward = max(reward, 0.0)
        store.queue_rewards(
            pipeline, Scope(router, generation, segment), contact, [target], reward, plan, now
        )

    @staticmethod
    def _match_offers(
        names: Sequence[str], shown: Sequence[str], prepared: PreparedDeployment | None
    ) -> list[str]:
        matched: list[str] = []
        for name in names:
            if name in shown:
                offer_id = name
            elif (
                prepared is not None
                and name in prepared.offers_by_name
                and prepared.offers_by_name[name].id in shown
            ):
                offer_id = prepared.offers_by_name[name].id
            else:
                raise InvalidArgument(
                    f"'{name}' was not among the offers of this contact: {', '.join(shown)}",
                    field="offers_accepted",
                )
            if offer_id not in matched:
                matched.append(offer_id)
        return matched


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _with_call_overrides(plan: VariantPlan, params: Mapping[str, Any]) -> tuple[VariantPlan, list[str]]:
    """The plan with this call's `mab` override (the ecosystem.Ai runtime's per-call
    {"class": ..., "epsilon": ...}): its epsilon explores this call instead of the deployment's (the
    logged propensities use it, so they stay exact); a class cannot switch the algorithm per call
    and is named in a warning."""
    override = params.get("mab")
    if override is None:
        return plan, []
    if not isinstance(override, Mapping):
        raise InvalidArgument('must be an object such as {"epsilon": 0.1}', field="params.mab")
    warnings = []
    if "class" in override:
        warnings.append(
            f"params.mab.class '{override['class']}' ignored: the deployment's algorithm "
            f"'{plan.algorithm.approach}' serves every call"
        )
    if "epsilon" in override:
        epsilon = override["epsilon"]
        try:
            value = float(epsilon)
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"must be a number in [0, 1], got {epsilon!r}", field="params.mab.epsilon"
            ) from None
        if isinstance(epsilon, bool) or not 0.0 <= value <= 1.0:
            raise InvalidArgument(f"must be a number in [0, 1], got {epsilon!r}", field="params.mab.epsilon")
        plan = dataclasses.replace(plan, epsilon=value)
    return plan, warnings
