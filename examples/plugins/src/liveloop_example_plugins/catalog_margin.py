"""A post-score plugin that reads a corpus: weigh each offer by its margin from a product catalog
the deployment names (a lookup table versioned with the revision; `liveloop config publish` reads
it from a CSV beside the spec). An offer the catalog does not list keeps its score (factor
`missing`); a margin that is not a number, or is negative, is an error (the deployment's on_error
says whether the request skips the plugin or fails).

    "corpora": {"catalog": {"key": "offer", "file": "catalog.csv"}},
    "plugins": [{"name": "catalog_margin", "stage": "post_score",
                 "params": {"corpus": "catalog", "column": "margin"}}]
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from libs.common.deployment_spec import PluginStage
from libs.policy.plugins import PluginParams, PostScore, PostScoreInput


class CatalogMargin:
    stage: ClassVar[PluginStage] = PluginStage.POST_SCORE

    class Params(PluginParams):
        corpus: str = Field("catalog", min_length=1, description="The deployment's corpus to read")
        column: str = Field("margin", min_length=1, description="The column holding each offer's margin")
        missing: float = Field(1.0, ge=0, allow_inf_nan=False, description="Factor of an unlisted offer")

    def __init__(self, params: Params) -> None:
        self._params = params

    def post_score(self, request: PostScoreInput) -> PostScore:
        catalog = request.corpora.get(self._params.corpus)
        if catalog is None:
            raise LookupError(f"the deployment has no corpus '{self._params.corpus}'")
        factors = []
        for offer in request.offers:
            row = catalog.get(offer.id)
            if row is None or row.get(self._params.column) is None:
                factors.append(self._params.missing)
                continue
            margin = float(row[self._params.column])
            if not math.isfinite(margin) or margin < 0:
                raise ValueError(f"{offer.id}: margin {margin} is not a finite number >= 0")
            factors.append(margin)
        return PostScore(factors=factors)
