"""Model versions as a replica serves them: the trainer's artifact, verified, loaded and warmed up.

An artifact directory (`<model_dir>/<name>/<version>/`) is in the format libs.common.model_artifacts
describes: a TorchScript model, its preprocessing, reference rows with the trainer's predictions for
them, and a manifest of SHA-256 checksums. Loading checks every file against the manifest, loads the
model from the bytes it checked, and replays the reference rows: a model that does not reproduce the
trainer's predictions to REFERENCE_TOLERANCE, or whose input width disagrees with its preprocessing,
is refused (FailedPrecondition), so the replica NACKs the revision that binds it.

torch is imported on the first load, so a replica that serves no model never pays for it.
"""

from __future__ import annotations

import io
import json
import math
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from libs.common.deployment_spec import DeploymentSpec
from libs.common.errors import FailedPrecondition
from libs.common.model_artifacts import (
    MODEL_FILE,
    PREPROCESSING_FILE,
    PREPROCESSING_FORMAT,
    REFERENCE_FILE,
    REFERENCE_TOLERANCE,
    category_label,
    read_verified,
)

INPUT_NAME = "features"
OUTPUT_NAME = "probability"

_torch_lock = threading.Lock()


def _torch() -> Any:
    with _torch_lock:
        import torch

        # Scoring runs inline on the replica's event loop: intra-op threads would only contend.
        torch.set_num_threads(1)
        return torch


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            return 1.0 if lowered == "true" else 0.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class FeatureEncoding:
    name: str
    encoding: str  # standardize | one_hot | offer
    mean: float
    categories: tuple[str, ...]


class FeatureEncoder:
    """Raw feature values (any mix of strings and numbers) -> the model's encoded input vector."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        if document.get("format") != PREPROCESSING_FORMAT:
            raise ValueError(f"unknown preprocessing format {document.get('format')!r}")
        self.features = tuple(
            FeatureEncoding(
                str(f["name"]),
                str(f["encoding"]),
                float(f.get("mean", 0.0)),
                tuple(str(c) for c in f.get("categories", ())),
            )
            for f in document["features"]
        )
        self.inputs: list[str] = [str(name) for name in document["inputs"]]
        self.offer_feature: str = str(document.get("offer_feature") or "")
        offsets: dict[str, tuple[int, dict[str, int]]] = {}
        position = 0
        for feature in self.features:
            if feature.encoding == "standardize":
                offsets[feature.name] = (position, {})
                position += 1
            else:
                offsets[feature.name] = (position, {c: i for i, c in enumerate(feature.categories)})
                position += len(feature.categories)
        if position != len(self.inputs):
            raise ValueError(f"the features encode to {position} inputs but {len(self.inputs)} are listed")
        self._offsets = offsets

    @property
    def width(self) -> int:
        return len(self.inputs)

    @staticmethod
    def _value(values: Mapping[str, Any], name: str) -> Any:
        value = values.get(name)
        if value is None and "__" in name:
            # A training set from BuildTrainingSet names a feature <view>__<feature>; a replica
            # reads the same feature from the online store under its own name.
            value = values.get(name.split("__", 1)[1])
        return value

    def missing(self, values: Mapping[str, Any]) -> list[str]:
        """The inputs (the offer aside) these values do not supply, or supply as something that is not
        a number where a number was trained: encode() stands in the training mean or no category."""
        absent = []
        for feature in self.features:
            if feature.name == self.offer_feature:
                continue
            value = self._value(values, feature.name)
            if value is None or (feature.encoding == "standardize" and _number(value) is None):
                absent.append(feature.name)
        return absent

    def encode(self, values: Mapping[str, Any]) -> np.ndarray:
        """One row: numbers as given (missing: the training mean), one-hot 0/1 (unseen: all zero)."""
        row = np.zeros(self.width, dtype=np.float64)
        for feature in self.features:
            start, categories = self._offsets[feature.name]
            value = self._value(values, feature.name)
            if feature.encoding == "standardize":
                number = _number(value)
                row[start] = feature.mean if number is None else number
            else:
                label = category_label(value)
                index = categories.get(label) if label is not None else None
                if index is not None:
                    row[start + index] = 1.0
        return row

    def encode_offers(self, values: Mapping[str, Any], offers: Sequence[str]) -> np.ndarray:
        """One row per offer: the customer's values with the offer feature set to each offer."""
        base = self.encode({k: v for k, v in values.items() if k != self.offer_feature})
        matrix = np.tile(base, (len(offers), 1))
        if self.offer_feature:
            start, categories = self._offsets[self.offer_feature]
            for row, offer in enumerate(offers):
                index = categories.get(offer)
                if index is not None:
                    matrix[row, start + index] = 1.0
        return matrix


@dataclass(eq=False)
class LoadedModel:
    """One verified model version in memory. Immutable once loaded; safe to share across revisions."""

    name: str
    version: int
    checksum: str  # SHA-256 of the manifest, as the registry records it
    encoder: FeatureEncoder
    module: Any  # torch.jit.ScriptModule

    @property
    def width(self) -> int:
        return self.encoder.width

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """(rows, width) -> (rows,) float32 take-up probabilities."""
        torch = _torch()
        with torch.inference_mode():
            output = self.module(torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)))
        result: np.ndarray = output.numpy().reshape(-1)
        return result

    def predict_offers(self, values: Mapping[str, Any], offers: Sequence[str]) -> np.ndarray:
        return self.predict(self.encoder.encode_offers(values, offers)).astype(np.float64)


def load_model(directory: Path, name: str, version: int) -> LoadedModel:
    """Verify, load and warm up one version; FailedPrecondition says why it cannot serve."""
    artifact = read_verified(directory, name, version)
    where = artifact.where
    try:
        encoder = FeatureEncoder(json.loads(artifact.files[PREPROCESSING_FILE]))
        reference = json.loads(artifact.files[REFERENCE_FILE])
        rows: list[dict[str, Any]] = list(reference["rows"])
        expected = np.asarray(reference["predictions"], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(f"{where}: bad preprocessing or reference ({exc})", field="model") from None
    torch = _torch()
    try:
        with warnings.catch_warnings():  # TorchScript is the artifact format; torch 2.13 deprecates it
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(artifact.files[MODEL_FILE]), map_location="cpu")
        module.eval()
    except Exception as exc:
        raise FailedPrecondition(f"{where}: cannot load {MODEL_FILE}: {exc}", field="model") from None
    model = LoadedModel(name, version, artifact.checksum, encoder, module)
    # Warm-up: the first inference of a TorchScript module compiles it; do it here, off the hot
    # path, on the trainer's own test rows, and require the trainer's predictions back.
    matrix = np.stack([encoder.encode(row) for row in rows]) if rows else np.zeros((1, encoder.width))
    try:
        predicted = model.predict(matrix).astype(np.float64)
    except Exception as exc:
        raise FailedPrecondition(
            f"{where}: the model does not accept its {encoder.width} inputs: {str(exc).splitlines()[0]}",
            field="model",
        ) from None
    if predicted.shape != (matrix.shape[0],):
        raise FailedPrecondition(
            f"{where}: the model returns shape {tuple(predicted.shape)} for {matrix.shape[0]} rows",
            field="model",
        )
    if rows and not np.allclose(predicted, expected, rtol=0, atol=REFERENCE_TOLERANCE):
        worst = float(np.max(np.abs(predicted - expected)))
        raise FailedPrecondition(
            f"{where}: does not reproduce the trainer's predictions (off by up to {worst:.2e})",
            field="model",
        )
    return model


def unsupplied_inputs(
    model: LoadedModel, spec: DeploymentSpec, view_columns: Sequence[str] | None
) -> list[str]:
    """The model's inputs (the offer aside) this deployment cannot supply: not a context variable
    (nor the feature or param one reads), not a default of its feature lookup, not a column of the
    feature view it reads (`view_columns`; None: the view was never materialized). A model scored
    without them uses training means on every request: train/serve skew."""
    supplied = {variable.name for variable in spec.context_variables}
    supplied |= {variable.field for variable in spec.context_variables if variable.field}
    if spec.feature_lookup is not None:
        supplied |= set(spec.feature_lookup.defaults)
        supplied |= set(view_columns or ())
    encoder = model.encoder
    missing = []
    for feature in encoder.features:
        name = feature.name
        if name == encoder.offer_feature:
            continue
        if name in supplied or ("__" in name and name.split("__", 1)[1] in supplied):
            continue
        missing.append(name)
    return missing
