"""A training job spec: what to train, on which data, how; typed and validated.

YAML files (`examples/training/*.yaml`) map onto it one to one, and so does the TrainingSpec
message of the trainer's API. Unknown keys are errors, and every error names the field
(`spec.features[2].encoding: ...`).
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from libs.common.deployment_spec import DEPLOYMENT_NAME_PATTERN
from libs.common.errors import InvalidArgument

COLUMN_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
MAX_SPEC_BYTES = 256 * 1024
MAX_QUERY_CHARS = 20_000
_QUERY_START = re.compile(r"^\s*(select|with)\s", re.IGNORECASE)


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelType(enum.StrEnum):
    LOGISTIC_REGRESSION = "logistic_regression"
    MLP = "mlp"


class Encoding(enum.StrEnum):
    AUTO = "auto"  # numeric columns are standardized; others are refused
    STANDARDIZE = "standardize"  # (x - mean) / std, the mean standing in for a missing value
    ONE_HOT = "one_hot"  # one input per category seen in training; unseen or missing: all zero
    # The offer column of an offer take-up model: one-hot like ONE_HOT, and at serving the predictor
    # fills it with each candidate offer in turn, so one model scores customer x offer.
    OFFER = "offer"


class FeatureSpec(SpecModel):
    name: str = Field(pattern=COLUMN_PATTERN)
    encoding: Encoding = Encoding.AUTO


class Hyperparameters(SpecModel):
    epochs: int = Field(20, ge=1, le=10_000, description="Maximum number of epochs")
    learning_rate: float = Field(0.01, gt=0, le=10)
    batch_size: int = Field(256, ge=1, le=1_000_000)
    hidden_sizes: list[int] = Field(default_factory=lambda: [32, 16], max_length=8)
    weight_decay: float = Field(0.0, ge=0, le=1)

    @field_validator("hidden_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: list[int]) -> list[int]:
        for size in sizes:
            if not 1 <= size <= 4096:
                raise ValueError(f"hidden sizes are 1 to 4096, got {size}")
        return sizes


class SplitSpec(SpecModel):
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    time_column: str = Field("", description="Split by time: oldest rows train, newest test")
    group_column: str = Field("", description="Keep all rows of one group (e.g. customer) in one split")

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> SplitSpec:
        if self.validation_fraction + self.test_fraction > 0.8:
            raise ValueError("validation_fraction + test_fraction must leave at least 20% for training")
        if self.time_column and self.group_column:
            raise ValueError("split by time_column or by group_column, not both")
        for column in (self.time_column, self.group_column):
            if column and not re.fullmatch(COLUMN_PATTERN, column):
                raise ValueError(f"'{column}' is not a column name")
        return self


class EarlyStoppingSpec(SpecModel):
    patience: int = Field(5, ge=0, le=1000, description="Epochs without improvement; 0 disables it")
    metric: Literal["log_loss", "auc"] = "log_loss"
    min_delta: float = Field(0.0, ge=0)


class TrainingJobSpec(SpecModel):
    model_name: str = Field(pattern=DEPLOYMENT_NAME_PATTERN, description="Registered model name")
    training_set: str = Field("", description="Offline-store table to train on")
    query: str = Field("", max_length=MAX_QUERY_CHARS, description="Or: a SELECT over the offline store")
    label: str = Field(pattern=COLUMN_PATTERN, description="Binary label column (0/1 or true/false)")
    features: list[FeatureSpec] = Field(
        default_factory=list, max_length=1000, description="Inputs in order; empty: every other column"
    )
    model_type: ModelType = ModelType.MLP
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    split: SplitSpec = Field(default_factory=SplitSpec)
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    max_categories: int = Field(100, ge=2, le=10_000, description="Most categories one feature may have")
    description: str = Field("", max_length=2000)
    workers: int = Field(
        1, ge=0, le=16, description="torchrun workers (DDP over gloo); 0 or 1 trains in one process"
    )

    @field_validator("query")
    @classmethod
    def _trimmed(cls, query: str) -> str:
        return query.strip()

    @field_validator("features", mode="before")
    @classmethod
    def _names_are_features(cls, features: Any) -> Any:
        if isinstance(features, list):
            return [{"name": item} if isinstance(item, str) else item for item in features]
        return features

    @model_validator(mode="after")
    def _one_source(self) -> TrainingJobSpec:
        if bool(self.training_set) == bool(self.query):
            raise ValueError("training_set: name a training_set table or give a query, not both")
        if self.training_set and not re.fullmatch(COLUMN_PATTERN, self.training_set):
            raise ValueError(f"training_set: '{self.training_set[:80]}' is not a table name")
        if self.query:
            if not _QUERY_START.match(self.query):
                raise ValueError("query: must be one SELECT (or WITH ... SELECT) statement")
            if ";" in self.query.strip().rstrip(";"):
                raise ValueError("query: must be a single statement")
        seen: set[str] = set()
        offers = 0
        for index, feature in enumerate(self.features):
            if feature.name in seen:
                raise ValueError(f"features[{index}].name: '{feature.name}' appears twice")
            if feature.name == self.label:
                raise ValueError(f"features[{index}].name: '{feature.name}' is the label")
            seen.add(feature.name)
            offers += feature.encoding is Encoding.OFFER
        if offers > 1:
            raise ValueError("features: at most one feature has encoding 'offer'")
        return self

    @property
    def source(self) -> str:
        """The table, or the query, for lineage."""
        return self.training_set or self.query

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def looks_like_query(text: str) -> bool:
    return bool(_QUERY_START.match(text))


def _field_path(location: tuple[int | str, ...]) -> str:
    path = "spec"
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def training_spec_from_mapping(document: Any) -> TrainingJobSpec:
    """Validate a decoded document; raise InvalidArgument naming the first bad field."""
    if not isinstance(document, dict):
        raise InvalidArgument("a training spec is a mapping of fields", field="spec")
    try:
        return TrainingJobSpec.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        path = _field_path(tuple(error["loc"]))
        message = str(error["msg"]).removeprefix("Value error, ")
        if path == "spec" and re.match(r"^[a-z_\[\]0-9.]+: ", message):
            where, _, message = message.partition(": ")
            path = f"spec.{where}"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InvalidArgument(message + more, field=path) from None


def parse_training_spec(text: str) -> TrainingJobSpec:
    """A YAML (or JSON) training spec file's text, validated."""
    size = len(text.encode())
    if size > MAX_SPEC_BYTES:
        raise InvalidArgument(f"spec is {size} bytes; the limit is {MAX_SPEC_BYTES}", field="spec")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"not valid YAML: {exc}".splitlines()[0], field="spec") from None
    return training_spec_from_mapping(document)
