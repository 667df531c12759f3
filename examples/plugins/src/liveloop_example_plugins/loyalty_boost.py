"""A post-score plugin: boost the offers meant for the customer's loyalty tier. An offer carries
its tier as an attribute; the customer's tier is a context variable (a feature or a param). The
factor depends only on the offer and the context, never on the draw, so the logged propensities
stay exact.

    {"name": "loyalty_boost", "stage": "post_score",
     "params": {"boost": 3.0, "attribute": "tier", "context_variable": "tier"}}
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from libs.common.deployment_spec import PluginStage
from libs.policy.plugins import PluginParams, PostScore, PostScoreInput


class LoyaltyBoost:
    stage: ClassVar[PluginStage] = PluginStage.POST_SCORE

    class Params(PluginParams):
        boost: float = Field(
            2.0, gt=0, le=1000, allow_inf_nan=False, description="Factor for a matching offer"
        )
        attribute: str = Field("tier", min_length=1, description="The offer attribute naming its tier")
        context_variable: str = Field(
            "tier", min_length=1, description="The context variable with the customer's"
        )

    def __init__(self, params: Params) -> None:
        self._boost = params.boost
        self._attribute = params.attribute
        self._variable = params.context_variable

    def post_score(self, request: PostScoreInput) -> PostScore:
        tier = request.context.get(self._variable)
        if tier is None:
            return PostScore()
        return PostScore(
            factors=[
                self._boost if str(offer.attributes.get(self._attribute, "")) == str(tier) else 1.0
                for offer in request.offers
            ]
        )
