"""The training reference a training run records (in this process, no worker): every model input's
raw values and the model's predicted score over every training-set row, and what the registry's
sealing leaves out of the artifact."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from libs.common.distribution_drift import SCORE, TrainingReference, compare
from libs.common.model_artifacts import MANIFEST_FILE, MODEL_FILE, PREPROCESSING_FILE, REFERENCE_FILE
from libs.policy.models import load_model
from services.trainer.core import training
from services.trainer.core.jobs import TRAINING_REFERENCE_FILE
from services.trainer.core.store import read_training_reference
from tests.trainer_datasets import (
    OFFERS,
    REGIONS,
    TrainedArtifact,
    take_up_rows,
    take_up_spec,
    train_artifact,
)

pytestmark = pytest.mark.timeout(60)

ROWS = 400


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedArtifact:
    scratch = tmp_path_factory.mktemp("trained")
    return train_artifact(scratch, scratch / "artifacts", take_up_spec(), rows=ROWS)


def test_the_reference_describes_every_input_and_the_score_over_every_row(trained: TrainedArtifact) -> None:
    reference = trained.outcome.training_reference
    rows = take_up_rows(ROWS)
    assert list(reference.inputs) == ["age", "tenure_months", "region", "offer_id"]  # model input order
    assert (reference.rows, reference.model_name, reference.offer_input) == (ROWS, "take-up", "offer_id")
    for name in ("age", "tenure_months"):
        numeric = reference.inputs[name]
        assert numeric.kind == "numeric"
        assert (numeric.count, numeric.missing_rate) == (ROWS, 0.0)
        assert numeric.mean == pytest.approx(float(np.mean([row[name] for row in rows])), abs=1e-9)
        assert math.isclose(sum(numeric.bin_shares), 1.0)
        assert 5 <= len(numeric.bin_shares) <= 10
        assert min(numeric.quantiles) == min(row[name] for row in rows)
        assert max(numeric.quantiles) == max(row[name] for row in rows)
    for name, categories in (("region", REGIONS), ("offer_id", OFFERS)):
        categorical = reference.inputs[name]
        assert categorical.kind == "categorical"
        assert sorted(categorical.categories) == sorted(categories)
        counts = Counter(row[name] for row in rows)
        shares = dict(zip(categorical.categories, categorical.bin_shares, strict=False))
        assert shares == {category: counts[category] / ROWS for category in categories}
        assert categorical.bin_shares[-1] == 0.0  # no "other" category in training
    score = reference.score
    assert (score.name, score.kind, score.count, score.missing_count) == (SCORE, "numeric", ROWS, 0)
    matrix = trained.outcome.preprocessing.encode(trained.data.columns)
    predicted = training.predict(trained.outcome.model, matrix)
    assert score.mean == pytest.approx(float(predicted.mean()), abs=1e-12)
    assert 0 < min(score.quantiles) <= max(score.quantiles) < 1
    # The training data compared with itself has not drifted.
    assert compare(score, predicted).severity == "ok"
    assert compare(reference.inputs["age"], [str(row["age"]) for row in rows]).psi == pytest.approx(0.0)


def test_the_same_run_records_the_same_reference_but_for_its_time(trained: TrainedArtifact) -> None:
    again = training.train_model(take_up_spec(), trained.plan, trained.data).training_reference
    first = trained.outcome.training_reference
    assert again.inputs == first.inputs
    assert again.score == first.score


def test_the_worker_leaves_the_reference_beside_the_artifact_and_sealing_takes_it_out(
    trained: TrainedArtifact, tmp_path_factory: pytest.TempPathFactory
) -> None:
    staging = tmp_path_factory.mktemp("staging") / "job"
    training.write_artifact(trained.outcome, staging)
    written = read_training_reference(staging)
    assert written == trained.outcome.training_reference
    assert TrainingReference.from_json(json.loads((staging / TRAINING_REFERENCE_FILE).read_text())) == written
    # The sealed artifact (train_artifact seals as the registry does) is in the format predictors know.
    assert sorted(path.name for path in trained.directory.iterdir()) == sorted(
        [MANIFEST_FILE, MODEL_FILE, PREPROCESSING_FILE, REFERENCE_FILE]
    )
    manifest = json.loads((trained.directory / MANIFEST_FILE).read_text())
    assert TRAINING_REFERENCE_FILE not in manifest["files"]
    load_model(trained.directory, "take-up", 1)
    assert read_training_reference(trained.directory) is None  # none left: an older worker's case
    (staging / TRAINING_REFERENCE_FILE).write_text('{"format": "liveloop.training_reference/1"}')
    with pytest.raises(ValueError, match="not a training reference"):
        read_training_reference(staging)
