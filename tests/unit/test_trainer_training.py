"""Training in this process: metrics, determinism, splits, early stopping, and the artifact a predictor
loads, which must reproduce the trainer's predictions exactly (to 1e-6)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from libs.common.errors import FailedPrecondition
from libs.common.model_artifacts import MANIFEST_FILE
from libs.common.training_spec import SplitSpec
from libs.policy.models import load_model
from libs.policy.ranking import rank
from libs.policy.scorers import ModelScorer
from libs.policy.statistics import Statistics
from services.trainer.core import metrics, training
from services.trainer.core.store import manifest_bytes, sha256_file
from services.trainer.core.training_data import TrainingData
from tests.trainer_datasets import OFFERS, TrainedArtifact, take_up_spec, train_artifact

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedArtifact:
    scratch = tmp_path_factory.mktemp("trained")
    return train_artifact(scratch, scratch / "artifacts", take_up_spec(), rows=500)


def test_metrics_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300).astype(float)
    scores = np.clip((labels * 0.3 + rng.random(300) * 0.7).round(2), 0.01, 0.99)  # with ties
    assert metrics.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.log_loss(labels, scores) == pytest.approx(log_loss(labels, scores), abs=1e-12)
    assert metrics.brier_score(labels, scores) == pytest.approx(brier_score_loss(labels, scores), abs=1e-12)
    assert math.isnan(metrics.auc(np.ones(5), np.linspace(0, 1, 5)))


def test_calibration_error_is_zero_when_calibrated_and_the_gap_when_not() -> None:
    labels = np.array([1, 0, 0, 0] * 25, dtype=float)  # 25% positive
    assert metrics.expected_calibration_error(labels, np.full(100, 0.25)) == pytest.approx(0.0)
    assert metrics.expected_calibration_error(labels, np.full(100, 0.75)) == pytest.approx(0.5)


def test_same_seed_same_data_gives_the_same_model_and_another_seed_another(trained: TrainedArtifact) -> None:
    spec = take_up_spec()
    again = training.train_model(spec, trained.plan, trained.data)
    first = trained.outcome.model.state_dict()
    assert all(torch.equal(first[name], value) for name, value in again.model.state_dict().items())
    assert again.summary == trained.outcome.summary
    other = training.train_model(take_up_spec(seed=6), trained.plan, trained.data)
    assert not torch.equal(first["layers.0.weight"], other.model.state_dict()["layers.0.weight"])


def test_the_summary_holds_held_out_metrics_and_the_encoding(trained: TrainedArtifact) -> None:
    summary = trained.outcome.summary
    assert (summary.training_rows, summary.validation_rows, summary.test_rows) == (300, 100, 100)
    assert summary.test_metrics["rows"] == 100
    assert 0.5 < summary.test_metrics["auc"] <= 1.0
    assert summary.epochs_trained == 3
    assert summary.inputs == 2 + 3 + 3  # age, tenure, three regions, three offers
    preprocessing = trained.outcome.preprocessing.to_json()
    assert preprocessing["inputs"][2:] == [
        "region=east",
        "region=north",
        "region=south",
        *(f"offer_id={offer}" for offer in OFFERS),
    ]
    assert preprocessing["offer_feature"] == "offer_id"
    assert preprocessing["means"][0] > 18
    assert preprocessing["stds"][0] > 1
    assert preprocessing["means"][2:] == [0.0] * 6
    assert preprocessing["stds"][2:] == [1.0] * 6


def test_early_stopping_stops_after_patience_epochs_and_keeps_the_best_weights(
    trained: TrainedArtifact,
) -> None:
    # Nothing counts as an improvement (min_delta is huge): the best epoch stays the first.
    spec = take_up_spec(
        hyperparameters={"epochs": 50, "batch_size": 128, "hidden_sizes": [8]},
        early_stopping={"patience": 2, "min_delta": 10.0},
    )
    reports = []
    outcome = training.train_model(spec, trained.plan, trained.data, reports.append)
    assert [r.epoch for r in reports] == [1, 2, 3]
    assert outcome.summary.best_epoch == 1
    assert outcome.summary.epochs_trained == 3
    assert reports[-1].eta_seconds == 0
    assert outcome.summary.validation_metrics["log_loss"] == pytest.approx(reports[0].validation_loss)


def _data(rows: int, split_values: np.ndarray | None) -> TrainingData:
    return TrainingData(np.zeros(rows), {}, split_values, "x")


def test_a_time_split_trains_on_the_oldest_rows_and_tests_on_the_newest() -> None:
    times = np.arange(100, dtype=float)[::-1].copy()  # newest first
    split = training.split_rows(SplitSpec(time_column="t"), _data(100, times), seed=1)
    assert times[split.train].max() < times[split.validation].min()
    assert times[split.validation].max() < times[split.test].min()
    assert (split.train.size, split.validation.size, split.test.size) == (60, 20, 20)


def test_a_random_split_is_seeded_and_a_group_split_keeps_groups_together() -> None:
    first = training.split_rows(SplitSpec(), _data(50, None), seed=4)
    again = training.split_rows(SplitSpec(), _data(50, None), seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(vars(first).values(), vars(again).values(), strict=True))
    groups = np.array([f"g{i % 17}" for i in range(170)], dtype=object)
    split = training.split_rows(SplitSpec(group_column="g"), _data(170, groups), seed=4)
    seen = [set(groups[part]) for part in (split.train, split.validation, split.test)]
    assert seen[0].isdisjoint(seen[1])
    assert seen[0].isdisjoint(seen[2])
    assert seen[1].isdisjoint(seen[2])
    assert sum(part.size for part in (split.train, split.validation, split.test)) == 170


def test_the_predictor_loader_reproduces_the_trainers_prediction_for_a_test_row(
    trained: TrainedArtifact,
) -> None:
    model = load_model(trained.directory, "take-up", 1)
    preprocessing = trained.outcome.preprocessing
    rows = np.arange(trained.data.rows)[-25:]
    matrix = preprocessing.encode({name: column[rows] for name, column in trained.data.columns.items()})
    expected = training.predict(trained.outcome.model, matrix)
    for position, row in enumerate(rows):
        # As a replica sees them: online features are strings, the offer comes from the spec.
        values = {
            name: str(column[row]) for name, column in trained.data.columns.items() if name != "offer_id"
        }
        offer = str(trained.data.columns["offer_id"][row])
        served = model.predict_offers(values, [offer])
        assert abs(served[0] - expected[position]) <= 1e-6
    assert model.width == preprocessing.width
    assert model.checksum == sha256_file(trained.directory / MANIFEST_FILE)


def test_the_model_scorer_ranks_by_predicted_take_up_with_honest_propensities(
    trained: TrainedArtifact,
) -> None:
    model = load_model(trained.directory, "take-up", 1)
    scorer = ModelScorer(model)
    values = {"age": "25", "tenure_months": "60", "region": "north"}
    scores = scorer.score(list(OFFERS), np.ones(3), Statistics(), {}, values, np.random.default_rng(0))
    expected = model.predict_offers(values, list(OFFERS))
    assert np.allclose(scores.arm_reward, expected)
    best = int(np.argmax(expected))
    first = rank(scores, ["any"] * 3, epsilon=0.0, count=1, category_limit=None, rng=np.random.default_rng(0))
    assert first.first_slot.propensities.tolist() == [1.0 if i == best else 0.0 for i in range(3)]
    # An offer the model never saw scores as "no offer feature": still a number, never an error.
    unseen = scorer.score(["brand_new"], np.ones(1), Statistics(), {}, values, np.random.default_rng(0))
    assert 0 < unseen.arm_reward[0] < 1


def _copy_artifact(trained: TrainedArtifact, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in trained.directory.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_a_tampered_artifact_is_refused_by_its_checksum(trained: TrainedArtifact, tmp_path: Path) -> None:
    copy = _copy_artifact(trained, tmp_path / "take-up" / "1")
    data = bytearray((copy / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.pt").write_bytes(bytes(data))
    with pytest.raises(FailedPrecondition) as refused:
        load_model(copy, "take-up", 1)
    assert "checksum mismatch for model.pt" in refused.value.message
    with pytest.raises(FailedPrecondition, match="describes 'take-up' version 1"):
        load_model(copy, "take-up", 2)


def test_an_input_width_the_model_does_not_take_is_refused(trained: TrainedArtifact, tmp_path: Path) -> None:
    copy = _copy_artifact(trained, tmp_path / "take-up" / "1")
    document = json.loads((copy / "preprocessing.json").read_text())
    document["features"][2]["categories"].append("west")  # one more input than the model has
    document["inputs"].insert(5, "region=west")
    (copy / "preprocessing.json").write_text(json.dumps(document))
    files = {p.name: sha256_file(p) for p in copy.iterdir() if p.name != MANIFEST_FILE}
    (copy / MANIFEST_FILE).write_bytes(manifest_bytes("take-up", 1, files))  # a consistent manifest
    with pytest.raises(FailedPrecondition, match="does not accept its 9 inputs"):
        load_model(copy, "take-up", 1)
