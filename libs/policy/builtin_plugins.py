"""The built-in plugins, ordinary plugins of libs/policy/plugins.py's interface:

- `exclude_offers` (pre_score): drop offers listed in the spec (`offers: [...]`) or in a request
  param (`param: exclude`, a list or comma-separated ids).
- `value_weighting` (post_score): multiply each score by the offer's margin (price - cost) or price,
  raised to `power` (default 1): rank by expected value instead of take-up.
- `category_cap` (post_score): at most `max_per_category` offers of one category in the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from libs.common.deployment_spec import Offer, PluginStage
from libs.policy.plugins import PluginParams, PostScore, PostScoreInput, PreScoreInput


class ExcludeOffers:
    stage: ClassVar[PluginStage] = PluginStage.PRE_SCORE

    class Params(PluginParams):
        offers: list[str] = Field(default_factory=list, description="Offer ids never shown")
        param: str = Field("", description="A request param listing more ids to leave out")

    def __init__(self, params: Params) -> None:
        self._offers = frozenset(params.offers)
        self._param = params.param

    def pre_score(self, request: PreScoreInput) -> Sequence[Offer]:
        excluded = set(self._offers)
        if self._param and self._param in request.params:
            value = request.params[self._param]
            items = (
                value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
            )
            excluded |= {str(item).strip() for item in items}
        return [offer for offer in request.offers if offer.id not in excluded]


class ValueWeighting:
    stage: ClassVar[PluginStage] = PluginStage.POST_SCORE

    class Params(PluginParams):
        basis: Literal["margin", "price"] = "margin"
        power: float = Field(1.0, ge=0, allow_inf_nan=False)

    def __init__(self, params: Params) -> None:
        self._basis = params.basis
        self._power = params.power

    def post_score(self, request: PostScoreInput) -> PostScore:
        values = [o.price - o.cost if self._basis == "margin" else o.price for o in request.offers]
        factors = np.power(np.maximum(np.array(values, dtype=float), 0.0), self._power)
        return PostScore(factors=factors.tolist())


class CategoryCap:
    stage: ClassVar[PluginStage] = PluginStage.POST_SCORE

    class Params(PluginParams):
        max_per_category: int = Field(ge=1, strict=True)

    def __init__(self, params: Params) -> None:
        self._cap = PostScore(max_per_category=params.max_per_category)

    def post_score(self, request: PostScoreInput) -> PostScore:
        return self._cap


BUILTIN: dict[str, type[ExcludeOffers] | type[ValueWeighting] | type[CategoryCap]] = {
    "exclude_offers": ExcludeOffers,
    "value_weighting": ValueWeighting,
    "category_cap": CategoryCap,
}
