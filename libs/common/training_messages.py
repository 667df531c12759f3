"""The trainer's TrainingSpec message <-> the domain spec (libs.common.training_spec.TrainingJobSpec):
the trainer's servicer reads it, the CLI writes it.

Where the message has no field of its own:
- `features` entries are `name` or `name:encoding` (`standardize`, `one_hot`, or `offer` for the
  offer-id column of an offer take-up model);
- `training_set` holding a SELECT (or WITH ... SELECT) statement instead of a table name is the
  spec's `query` (a table name can never start with "select ");
- `max_epochs` is `hyperparameters.epochs`; an unset `early_stopping` or `split` takes the defaults.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from libs.common.errors import InvalidArgument
from libs.common.training_spec import Encoding, TrainingJobSpec, looks_like_query, training_spec_from_mapping
from libs.protos.liveloop.trainer.v1 import trainer_pb2

_MODEL_TYPES = {
    trainer_pb2.MODEL_TYPE_UNSPECIFIED: "mlp",
    trainer_pb2.MODEL_TYPE_LOGISTIC_REGRESSION: "logistic_regression",
    trainer_pb2.MODEL_TYPE_MLP: "mlp",
}
MODEL_TYPE_VALUES = {
    "logistic_regression": trainer_pb2.MODEL_TYPE_LOGISTIC_REGRESSION,
    "mlp": trainer_pb2.MODEL_TYPE_MLP,
}


def struct_value(value: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    json_format.ParseDict(value, message)
    return message


def spec_from_message(message: trainer_pb2.TrainingSpec) -> TrainingJobSpec:
    """The domain spec of a TrainingSpec; InvalidArgument names the field (spec.<field>)."""
    document: dict[str, Any] = {
        "model_name": message.model_name,
        "label": message.label,
        "seed": message.seed,
        "description": message.description,
        "workers": message.workers,
    }
    if message.model_type not in _MODEL_TYPES:
        raise InvalidArgument(f"unknown model type {message.model_type}", field="spec.model_type")
    document["model_type"] = _MODEL_TYPES[message.model_type]
    if looks_like_query(message.training_set):
        document["query"] = message.training_set
    else:
        document["training_set"] = message.training_set
    features = []
    for index, entry in enumerate(message.features):
        name, _, encoding = entry.partition(":")
        if encoding and encoding not in {e.value for e in Encoding}:
            raise InvalidArgument(
                f"'{encoding}' is not an encoding (use {', '.join(e.value for e in Encoding)})",
                field=f"spec.features[{index}]",
            )
        features.append({"name": name, "encoding": encoding or "auto"})
    document["features"] = features
    hyperparameters: dict[str, Any] = {
        key: json_format.MessageToDict(value) for key, value in message.hyperparameters.items()
    }
    if message.max_epochs:
        if "epochs" in hyperparameters and hyperparameters["epochs"] != message.max_epochs:
            raise InvalidArgument(
                "differs from hyperparameters.epochs; set one of them", field="spec.max_epochs"
            )
        hyperparameters["epochs"] = message.max_epochs
    for key in ("epochs", "batch_size"):  # Struct numbers are doubles
        value = hyperparameters.get(key)
        if isinstance(value, float) and value.is_integer():
            hyperparameters[key] = int(value)
    if isinstance(hyperparameters.get("hidden_sizes"), list):
        hyperparameters["hidden_sizes"] = [
            int(v) if isinstance(v, float) and v.is_integer() else v for v in hyperparameters["hidden_sizes"]
        ]
    document["hyperparameters"] = hyperparameters
    if message.HasField("split"):
        split: dict[str, Any] = {
            "time_column": message.split.time_column,
            "group_column": message.split.group_column,
        }
        if message.split.validation_fraction:
            split["validation_fraction"] = message.split.validation_fraction
        if message.split.test_fraction:
            split["test_fraction"] = message.split.test_fraction
        document["split"] = split
    if message.HasField("early_stopping"):
        stopping = message.early_stopping
        document["early_stopping"] = {
            "patience": stopping.patience,
            "metric": stopping.metric or "log_loss",
            "min_delta": stopping.min_delta,
        }
    return training_spec_from_mapping(document)


def spec_message(spec: TrainingJobSpec) -> trainer_pb2.TrainingSpec:
    hyperparameters = spec.hyperparameters.model_dump(mode="json")
    return trainer_pb2.TrainingSpec(
        model_name=spec.model_name,
        training_set=spec.source,
        label=spec.label,
        features=[
            f.name if f.encoding is Encoding.AUTO else f"{f.name}:{f.encoding.value}" for f in spec.features
        ],
        model_type=MODEL_TYPE_VALUES[spec.model_type.value],
        hyperparameters={key: struct_value(value) for key, value in hyperparameters.items()},
        split=trainer_pb2.Split(
            validation_fraction=spec.split.validation_fraction,
            test_fraction=spec.split.test_fraction,
            time_column=spec.split.time_column,
            group_column=spec.split.group_column,
        ),
        seed=spec.seed,
        early_stopping=trainer_pb2.EarlyStopping(
            patience=spec.early_stopping.patience,
            metric=spec.early_stopping.metric,
            min_delta=spec.early_stopping.min_delta,
        ),
        max_epochs=spec.hyperparameters.epochs,
        description=spec.description,
        workers=spec.workers,
    )
