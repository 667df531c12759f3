"""Plugins: small, named steps a deployment chains around scoring (ecosystem.Ai's pre- and
post-score plugins). Pre-score plugins remove offers; post-score plugins either scale scores
(multiplicative factors, so propensities stay exact) or arrange the final list.

Built in:
- `exclude_offers` (pre_score): drop offers listed in the spec (`offers: [...]`) or in a request
  param (`param: exclude`, a list or comma-separated ids).
- `value_weighting` (post_score): multiply each score by the offer's margin (price - cost) or price,
  raised to `power` (default 1): rank by expected value instead of take-up.
- `category_cap` (post_score): at most `max_per_category` offers of one category in the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from libs.common.deployment_spec import Offer, PluginRef, PluginStage
from libs.common.errors import InvalidArgument
from libs.policy.context import Context


@dataclass(frozen=True)
class ExcludeOffers:
    offers: frozenset[str]
    param: str

    def filter(self, offers: list[Offer], params: Mapping[str, Any]) -> list[Offer]:
        excluded = set(self.offers)
        if self.param and self.param in params:
            value = params[self.param]
            items = (
                value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
            )
            excluded |= {str(item).strip() for item in items}
        return [offer for offer in offers if offer.id not in excluded]


@dataclass(frozen=True)
class ValueWeighting:
    basis: str
    power: float

    def factors(self, offers: Sequence[Offer]) -> np.ndarray:
        values = [o.price - o.cost if self.basis == "margin" else o.price for o in offers]
        factors: np.ndarray = np.power(np.maximum(np.array(values, dtype=float), 0.0), self.power)
        return factors


@dataclass(frozen=True)
class CategoryCap:
    max_per_category: int


@dataclass
class PluginChain:
    excludes: list[ExcludeOffers] = field(default_factory=list)
    weightings: list[ValueWeighting] = field(default_factory=list)
    caps: list[CategoryCap] = field(default_factory=list)

    def filter(self, offers: list[Offer], context: Context, params: Mapping[str, Any]) -> list[Offer]:
        for plugin in self.excludes:
            offers = plugin.filter(offers, params)
        return offers

    def factors(self, offers: Sequence[Offer], context: Context, params: Mapping[str, Any]) -> np.ndarray:
        result = np.ones(len(offers))
        for plugin in self.weightings:
            result = result * plugin.factors(offers)
        return result

    @property
    def category_limit(self) -> int | None:
        """At most this many offers of one category in a result (the tightest cap); None: no cap."""
        return min(cap.max_per_category for cap in self.caps) if self.caps else None


def build_plugin_chain(plugins: Sequence[PluginRef]) -> PluginChain:
    chain = PluginChain()
    for index, plugin in enumerate(plugins):
        where = f"plugins[{index}]"
        params = plugin.params
        if plugin.name == "exclude_offers" and plugin.stage is PluginStage.PRE_SCORE:
            offers = params.get("offers", [])
            if not isinstance(offers, list):
                raise InvalidArgument("offers must be a list of offer ids", field=f"{where}.params.offers")
            chain.excludes.append(ExcludeOffers(frozenset(map(str, offers)), str(params.get("param", ""))))
        elif plugin.name == "value_weighting" and plugin.stage is PluginStage.POST_SCORE:
            basis = params.get("basis", "margin")
            if basis not in ("margin", "price"):
                raise InvalidArgument("basis must be 'margin' or 'price'", field=f"{where}.params.basis")
            chain.weightings.append(ValueWeighting(basis, float(params.get("power", 1.0))))
        elif plugin.name == "category_cap" and plugin.stage is PluginStage.POST_SCORE:
            limit = params.get("max_per_category")
            if not isinstance(limit, int) or limit < 1:
                raise InvalidArgument("max_per_category must be a positive integer", field=f"{where}.params")
            chain.caps.append(CategoryCap(limit))
        else:
            raise InvalidArgument(
                f"unknown plugin '{plugin.name}' at stage {plugin.stage.value}; this replica has "
                "exclude_offers (pre_score), value_weighting and category_cap (post_score)",
                field=f"{where}.name",
            )
    return chain
