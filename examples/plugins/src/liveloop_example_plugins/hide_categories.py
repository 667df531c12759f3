"""A pre-score plugin: leave out offers of some categories, always or only when a request param
says so (for example a channel where those offers cannot be fulfilled).

    {"name": "hide_categories", "stage": "pre_score",
     "params": {"categories": ["roaming"], "when_param": "travelling"}}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from libs.common.deployment_spec import Offer, PluginStage
from libs.policy.plugins import PluginParams, PreScoreInput


class HideCategories:
    stage: ClassVar[PluginStage] = PluginStage.PRE_SCORE

    class Params(PluginParams):
        categories: list[str] = Field(min_length=1, description="Offer categories to leave out")
        when_param: str = Field(
            "", description="Only when this request param is set and not false/0/no; empty: always"
        )

    def __init__(self, params: Params) -> None:
        self._categories = frozenset(params.categories)
        self._when = params.when_param

    def pre_score(self, request: PreScoreInput) -> Sequence[Offer]:
        if self._when and str(request.params.get(self._when, "")).strip().lower() in ("", "false", "0", "no"):
            return request.offers
        return [offer for offer in request.offers if offer.category not in self._categories]
