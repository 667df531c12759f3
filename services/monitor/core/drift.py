"""GetDrift: served model inputs and model scores over a recent window against the training
reference the trainer recorded with the model version (libs/common/distribution_drift.py).

A served input's value is read from each archived contact as the predictor handed it to the model
(`model_input_value`: its context first, then its feature snapshot); the model's offer input is
compared with the offers shown. The served score is the bound
model's predicted take-up of every shown offer; shown offers are the ones ranked highest, so their
scores sit above the training rows' (customer x offer as logged in training): read score drift with
that bias in mind.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from libs.common.distribution_drift import (
    DistributionDrift,
    DriftThresholds,
    TrainingReference,
    compare,
    model_input_value,
)
from libs.common.errors import InvalidArgument

DRIFT_COLUMNS = ("features", "context", "shown", "shown_model_scores")
_SEVERITY_ORDER = {"critical": 0, "warning": 1, "ok": 2}


@dataclass(frozen=True)
class DriftReport:
    reference: TrainingReference
    features: list[DistributionDrift]  # most drifted first
    score: DistributionDrift
    contacts: int


def drift_report(
    reference: TrainingReference,
    contacts: pa.Table,
    features: Sequence[str],
    thresholds: DriftThresholds,
) -> DriftReport:
    names = list(features) or list(reference.inputs)
    unknown = [name for name in names if name not in reference.inputs]
    if unknown:
        raise InvalidArgument(
            f"'{unknown[0]}' is not an input of {reference.model_name}:{reference.model_version} "
            f"(its inputs: {', '.join(reference.inputs)})",
            field="features",
        )
    rows = contacts.select(list(DRIFT_COLUMNS)).to_pylist() if contacts.num_rows else []
    snapshots = [(json.loads(row["features"]), json.loads(row["context"])) for row in rows]
    shown_offers = [offer for row in rows for offer in row["shown"]]

    def served(name: str) -> list[object]:
        if name == reference.offer_input:
            return list(shown_offers)  # the model scores every offer; the offers shown are what was served
        return [model_input_value(name, features, context) for features, context in snapshots]

    drifts = [compare(reference.inputs[name], served(name), thresholds) for name in names]
    drifts.sort(key=lambda drift: (_SEVERITY_ORDER[drift.severity], -(drift.psi or 0.0), drift.name))
    scores = [score for row in rows for score in row["shown_model_scores"] if score is not None]
    return DriftReport(reference, drifts, compare(reference.score, scores, thresholds), len(rows))
