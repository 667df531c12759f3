"""The training job spec: YAML files and TrainingSpec messages map onto it; errors name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from libs.common.errors import InvalidArgument
from libs.common.training_messages import spec_from_message, spec_message
from libs.common.training_spec import (
    Encoding,
    ModelType,
    parse_training_spec,
    training_spec_from_mapping,
)
from libs.protos.liveloop.trainer.v1 import trainer_pb2

pytestmark = pytest.mark.timeout(10)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "training" / "take-up.yaml"


def base(**overrides: Any) -> dict[str, Any]:
    return {"model_name": "take-up", "training_set": "take_up", "label": "label", **overrides}


def refusal(document: dict[str, Any]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        training_spec_from_mapping(document)
    return raised.value


def test_the_example_file_is_a_valid_spec() -> None:
    spec = parse_training_spec(EXAMPLE.read_text())
    assert spec.model_name == "take-up"
    assert spec.label == "accepted"
    assert spec.model_type is ModelType.MLP
    assert [f.encoding for f in spec.features][-2:] == [Encoding.ONE_HOT, Encoding.OFFER]
    assert spec.hyperparameters.hidden_sizes == [32, 16]
    assert spec.split.time_column == "event_time"
    assert spec.early_stopping.patience == 4


def test_defaults_fill_what_a_spec_leaves_out() -> None:
    spec = training_spec_from_mapping(base(features=["age"]))
    assert spec.features[0].name == "age"
    assert spec.features[0].encoding is Encoding.AUTO
    assert spec.hyperparameters.epochs == 20
    assert spec.split.test_fraction == 0.2
    assert spec.early_stopping.metric == "log_loss"
    assert spec.seed == 0


@pytest.mark.parametrize(
    ("document", "field", "words"),
    [
        (base(hyperparameters={"learning_rate": 0}), "spec.hyperparameters.learning_rate", "greater than 0"),
        (base(hyperparameters={"hidden_sizes": [8, 0]}), "spec.hyperparameters.hidden_sizes", "1 to 4096"),
        (base(features=["age", "age"]), "spec.features[1].name", "appears twice"),
        (base(features=["label"]), "spec.features[0].name", "is the label"),
        (base(query="SELECT 1"), "spec.training_set", "not both"),
        (base(training_set="", query="DELETE FROM t"), "spec.query", "one SELECT"),
        (base(training_set="", query="SELECT 1; DROP TABLE t"), "spec.query", "single statement"),
        (
            base(features=[{"name": "a", "encoding": "offer"}, {"name": "b", "encoding": "offer"}]),
            "spec.features",
            "at most one",
        ),
        (base(split={"validation_fraction": 0.5, "test_fraction": 0.4}), "spec.split", "20%"),
        (base(early_stopping={"metric": "accuracy"}), "spec.early_stopping.metric", "log_loss"),
        (base(workers=17), "spec.workers", "less than or equal to 16"),
        (base(colour="blue"), "spec.colour", "Extra inputs"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_field(document: dict[str, Any], field: str, words: str) -> None:
    error = refusal(document)
    assert error.field == field, error.message
    assert words in error.message


def test_bad_yaml_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="not valid YAML"):
        parse_training_spec("model_name: [")


def _value(value: Any) -> struct_pb2.Value:
    return json_format.ParseDict(value, struct_pb2.Value())


def test_a_training_spec_message_maps_onto_the_spec_and_back() -> None:
    message = trainer_pb2.TrainingSpec(
        model_name="take-up",
        training_set="  select * from take_up where age > 18",
        label="label",
        features=["age", "region:one_hot", "offer_id:offer"],
        model_type=trainer_pb2.MODEL_TYPE_LOGISTIC_REGRESSION,
        hyperparameters={"learning_rate": _value(0.1), "hidden_sizes": _value([4.0])},
        split=trainer_pb2.Split(time_column="event_time"),
        early_stopping=trainer_pb2.EarlyStopping(patience=0),
        max_epochs=7,
        seed=3,
    )
    spec = spec_from_message(message)
    assert spec.query.strip().startswith("select")
    assert spec.training_set == ""
    assert [(f.name, f.encoding.value) for f in spec.features] == [
        ("age", "auto"),
        ("region", "one_hot"),
        ("offer_id", "offer"),
    ]
    assert spec.model_type is ModelType.LOGISTIC_REGRESSION
    assert spec.hyperparameters.epochs == 7
    assert spec.hyperparameters.hidden_sizes == [4]
    assert spec.split.time_column == "event_time"
    assert spec.split.test_fraction == 0.2
    assert spec.early_stopping.patience == 0  # set, and 0: early stopping off
    assert spec_from_message(spec_message(spec)) == spec


def test_max_epochs_and_hyperparameters_epochs_must_agree() -> None:
    message = trainer_pb2.TrainingSpec(
        model_name="m", training_set="t", label="y", max_epochs=3, hyperparameters={"epochs": _value(4)}
    )
    with pytest.raises(InvalidArgument) as raised:
        spec_from_message(message)
    assert raised.value.field == "spec.max_epochs"
    unset = spec_from_message(trainer_pb2.TrainingSpec(model_name="m", training_set="t", label="y"))
    assert unset.early_stopping.patience == 5
    assert unset.model_type is ModelType.MLP
