"""A deployment spec prepared for serving, and the decision step every engine shares: from a
customer's context and the statistics of its segment to the ranked offers with their propensities.

The predictor's decision engine (over Redis), the simulation (in memory) and the monitor's offline
evaluation (over logged decisions) all choose through `PreparedDeployment.choose`: one
implementation of "choose and rank".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from libs.common.deployment_spec import Algorithm, DeploymentSpec, Offer, Variant
from libs.common.errors import InvalidArgument
from libs.policy.context import Context, segment_reads_features
from libs.policy.eligibility import EligibilityRules
from libs.policy.models import LoadedModel
from libs.policy.plugins import PluginChain, PluginSkip, bind_plugins, corpora_of
from libs.policy.ranking import FirstSlotCounts, rank
from libs.policy.scorers import Scorer, build_scorer
from libs.policy.statistics import ArmPolicy, Statistics


@dataclass(frozen=True)
class VariantPlan:
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
class RankedOffer:
    offer: Offer
    rank: int
    score: float
    final_score: float
    arm_reward: float
    arm_count: float
    propensity: float  # P(this offer at this rank | the offers ranked above), see ranking.py
    explored: bool
    model_score: float | None = None  # the bound model's predicted take-up for this offer
    alpha: float | None = None  # Thompson sampling: the Beta posterior this offer's score was drawn from
    beta: float | None = None


ELIGIBLE_OFFERS_PARAM = "eligible_offers"


def _requested_offers(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().startswith("["):  # a JSON list sent as text
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidArgument("is not a JSON list", field="params.eligible_offers") from None
    if isinstance(value, str):
        return frozenset(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    raise InvalidArgument(
        "must be a list of offer ids or names, or a comma-separated string", field="params.eligible_offers"
    )


@dataclass(frozen=True)
class Choice:
    """What the policy chose for one request, and everything evaluation needs to know about it."""

    explore: bool
    offers: list[RankedOffer]  # shown, in rank order
    eligible: list[Offer]  # every eligible offer, in the order scored
    scores: np.ndarray  # per eligible offer: the value it was ranked by
    first_slot: FirstSlotCounts  # per eligible offer: how likely it was to be shown first
    # Inputs of the bound model this request did not supply (scored with the training mean or no
    # category instead): train/serve skew the reply and a metric report.
    model_inputs_missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreparedDeployment:
    """A deployment spec prepared for serving (built once per config revision, off the hot path)."""

    spec: DeploymentSpec
    plans: Mapping[str, VariantPlan]
    variant_weights: tuple[tuple[str, float], ...]
    offers_by_id: Mapping[str, Offer]
    offers_by_name: Mapping[str, Offer]
    plugins: PluginChain
    rules: EligibilityRules  # the offers' eligibility rules, evaluated once per combination of values
    # Model versions this revision binds, loaded and verified: (name, version) -> model.
    models: Mapping[tuple[str, int], LoadedModel] = field(default_factory=dict)
    # Whether the segment can depend on the customer's online features (see segment_reads_features).
    segment_reads_features: bool = True
    # The model selector's plans: (variant, the selector variable's value) -> the plan binding
    # that value's model (variants with a model of their own have none).
    selected_plans: Mapping[tuple[str, str], VariantPlan] = field(default_factory=dict)
    has_budgets: bool = False  # some offer has a budget (services/predictor/core/budgets.py)

    def selected(self, plan: VariantPlan, context: Context) -> VariantPlan:
        """The plan with the model the selector binds for this request's context (the plan itself
        without a selector, or for a value it does not list); the request's epsilon is kept."""
        selector = self.spec.model_selector
        if selector is None:
            return plan
        chosen = self.selected_plans.get((plan.name, str(context.values.get(selector.variable, ""))))
        if chosen is None:
            return plan
        return chosen if chosen.epsilon == plan.epsilon else dataclasses.replace(chosen, epsilon=plan.epsilon)

    @classmethod
    def prepare(
        cls, spec: DeploymentSpec, models: Mapping[tuple[str, int], LoadedModel] | None = None
    ) -> PreparedDeployment:
        loaded = dict(models or {})

        def plan(name: str, variant: Variant | None) -> VariantPlan:
            algorithm = variant.algorithm if variant is not None and variant.algorithm else spec.algorithm
            epsilon = (
                variant.exploration_epsilon
                if variant is not None and variant.exploration_epsilon is not None
                else spec.exploration_epsilon
            )
            binding = variant.model if variant is not None and variant.model is not None else spec.model
            model = loaded.get((binding.name, binding.version)) if binding is not None else None
            return VariantPlan(
                name,
                algorithm,
                build_scorer(algorithm, model),
                epsilon,
                ArmPolicy.from_algorithm(algorithm),
                model,
            )

        plans = {"": plan("", None)} | {v.name: plan(v.name, v) for v in spec.variants}
        selected: dict[tuple[str, str], VariantPlan] = {}
        if spec.model_selector is not None:
            own_model = {v.name for v in spec.variants if v.model is not None}  # an experiment keeps it
            for name, base in plans.items():
                if name in own_model:
                    continue
                for value, binding in spec.model_selector.models.items():
                    model = loaded.get((binding.name, binding.version))
                    scorer = build_scorer(base.algorithm, model)
                    selected[(name, value)] = dataclasses.replace(base, scorer=scorer, model=model)
        return cls(
            spec=spec,
            plans=plans,
            selected_plans=selected,
            has_budgets=any(offer.budget is not None for offer in spec.offers),
            variant_weights=tuple((v.name, v.weight) for v in spec.variants),
            offers_by_id={o.id: o for o in spec.offers},
            offers_by_name={o.name: o for o in spec.offers},
            plugins=bind_plugins(spec.plugins, corpora=corpora_of(spec.corpora)),
            models=loaded,
            segment_reads_features=segment_reads_features(spec),
            rules=EligibilityRules(spec.offers),
        )

    def variant_for(self, customer: str) -> VariantPlan:
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

    def eligible(
        self,
        context: Context,
        params: Mapping[str, Any],
        *,
        customer: str = "",
        features: Mapping[str, Any] | None = None,
        skips: list[PluginSkip] | None = None,
        allowed: frozenset[str] | None = None,
    ) -> list[Offer]:
        """The offers this customer may be shown: eligibility rules, the customer's whitelist
        (`allowed`: ids or names; None: no whitelist), the request's own list when it sends one
        (param `eligible_offers`: ids or names, a list or comma-separated, as the ecosystem.Ai
        runtime takes it), then pre-score plugins (those skipped are added to `skips`)."""
        offers = self.rules.eligible(context.values)
        if allowed is not None:
            offers = [offer for offer in offers if offer.id in allowed or offer.name in allowed]
        requested = _requested_offers(params.get(ELIGIBLE_OFFERS_PARAM))
        if requested is not None:
            offers = [offer for offer in offers if offer.id in requested or offer.name in requested]
        if not self.plugins.pre_score:
            return offers
        skipped = skips if skips is not None else []
        return self.plugins.filter(self.spec.name, customer, offers, context, params, features or {}, skipped)

    def unknown_requested_offers(self, params: Mapping[str, Any]) -> list[str]:
        """Names in the request's `eligible_offers` that are no offer of this deployment."""
        requested = _requested_offers(params.get(ELIGIBLE_OFFERS_PARAM)) or frozenset()
        return sorted(
            name for name in requested if name not in self.offers_by_id and name not in self.offers_by_name
        )

    def choose(
        self,
        plan: VariantPlan,
        eligible: Sequence[Offer],
        context: Context,
        statistics: Statistics,
        rng: np.random.Generator,
        *,
        count: int,
        features: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        customer: str = "",
        skips: list[PluginSkip] | None = None,
    ) -> Choice:
        """Score the eligible offers, rank `count` of them (explore or exploit, category caps) and
        report each shown offer with its exact propensity. `features` and `params` are the
        customer's raw inputs, which a bound model reads beside the context."""
        params = params or {}
        offer_ids = [offer.id for offer in eligible]
        weights = np.array([offer.weighting for offer in eligible])
        category_limit = None
        if self.plugins.post_score:
            skipped = skips if skips is not None else []
            factors, category_limit = self.plugins.post_score_factors(
                self.spec.name, customer, eligible, context, params, skipped
            )
            weights = weights * factors
        categorical = {k: v for k, v in context.values.items() if isinstance(v, str)}
        model_inputs: Mapping[str, Any] = categorical
        if plan.model is not None or plan.scorer.reads_raw_features:
            model_inputs = {
                **(features or {}),
                **{k: str(v) for k, v in params.items() if isinstance(v, str | int | float)},
                **categorical,
            }
        scores = plan.scorer.score(
            offer_ids,
            weights,
            statistics,
            context.numeric,
            model_inputs if plan.scorer.reads_raw_features else categorical,
            rng,
            segment=context.segment,
        )
        model_scores = scores.model_score
        missing: tuple[str, ...] = ()
        if plan.model is not None:
            values = {**model_inputs, **context.numeric}
            missing = tuple(plan.model.encoder.missing(values))
            if model_scores is None:  # bound, not scored with: still reported
                model_scores = plan.model.predict_offers(values, offer_ids)
        ranking = rank(
            scores,
            [offer.category for offer in eligible],
            epsilon=plan.epsilon,
            count=count,
            category_limit=category_limit,
            rng=rng,
        )
        offers = [
            RankedOffer(
                offer=eligible[index],
                rank=position + 1,
                score=float(scores.score[index]),
                final_score=float(scores.score[index]),
                arm_reward=float(scores.arm_reward[index]),
                arm_count=float(scores.arm_count[index]),
                propensity=propensity,
                explored=ranking.explore,
                model_score=float(model_scores[index]) if model_scores is not None else None,
                alpha=float(scores.alpha[index]) if scores.alpha is not None else None,
                beta=float(scores.beta[index]) if scores.beta is not None else None,
            )
            for position, (index, propensity) in enumerate(
                zip(ranking.shown, ranking.propensities, strict=True)
            )
        ]
        return Choice(ranking.explore, offers, list(eligible), scores.score, ranking.first_slot, missing)
