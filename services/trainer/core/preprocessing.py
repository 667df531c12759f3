"""From raw training-set columns to the model's input matrix, and the JSON that lets a predictor do
exactly the same to a serving row.

The encoded matrix holds, in model input order, each numeric feature as is (missing: the training
mean) and one 0/1 column per category of each one-hot feature (unseen or missing: all zero).
Standardisation ((x - mean) / std) happens inside the saved model, so OIP clients send the
encoded, unscaled vector; the means and stds are recorded here too, for drift monitoring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from libs.common.model_artifacts import PREPROCESSING_FORMAT
from libs.common.training_spec import Encoding
from services.trainer.core.training_data import ResolvedFeature

_MIN_STD = 1e-12


@dataclass(frozen=True)
class EncodedFeature:
    name: str
    encoding: Encoding  # STANDARDIZE, ONE_HOT or OFFER
    dtype: str
    mean: float = 0.0
    std: float = 1.0
    categories: tuple[str, ...] = ()

    @property
    def inputs(self) -> list[str]:
        if self.encoding is Encoding.STANDARDIZE:
            return [self.name]
        return [f"{self.name}={category}" for category in self.categories]


@dataclass(frozen=True)
class Preprocessing:
    features: tuple[EncodedFeature, ...]
    label: str

    @property
    def inputs(self) -> list[str]:
        return [name for feature in self.features for name in feature.inputs]

    @property
    def width(self) -> int:
        return len(self.inputs)

    @property
    def offer_feature(self) -> str:
        return next((f.name for f in self.features if f.encoding is Encoding.OFFER), "")

    def scaling(self) -> tuple[np.ndarray, np.ndarray]:
        """Per input column: the mean and std the model standardises with (0 and 1 for one-hot)."""
        means: list[float] = []
        stds: list[float] = []
        for feature in self.features:
            count = len(feature.inputs)
            means += [feature.mean] * count if feature.encoding is Encoding.STANDARDIZE else [0.0] * count
            stds += [feature.std] * count if feature.encoding is Encoding.STANDARDIZE else [1.0] * count
        return np.array(means, dtype=np.float64), np.array(stds, dtype=np.float64)

    def encode(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """The (rows, width) float32 input matrix of raw columns (as read_training_set returns them)."""
        rows = len(next(iter(columns.values()))) if columns else 0
        blocks: list[np.ndarray] = []
        for feature in self.features:
            values = columns[feature.name]
            if feature.encoding is Encoding.STANDARDIZE:
                numbers = np.asarray(values, dtype=np.float64)
                blocks.append(np.where(np.isnan(numbers), feature.mean, numbers).reshape(rows, 1))
            else:
                index = {category: position for position, category in enumerate(feature.categories)}
                block = np.zeros((rows, len(feature.categories)), dtype=np.float64)
                for row, value in enumerate(values):
                    position = index.get(value) if value is not None else None
                    if position is not None:
                        block[row, position] = 1.0
                blocks.append(block)
        matrix = np.concatenate(blocks, axis=1) if blocks else np.zeros((rows, 0))
        return matrix.astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        means, stds = self.scaling()
        return {
            "format": PREPROCESSING_FORMAT,
            "label": self.label,
            "features": [
                {
                    "name": f.name,
                    "encoding": f.encoding.value,
                    "dtype": f.dtype,
                    **(
                        {"mean": f.mean, "std": f.std}
                        if f.encoding is Encoding.STANDARDIZE
                        else {"categories": list(f.categories)}
                    ),
                }
                for f in self.features
            ],
            "inputs": self.inputs,
            "means": means.tolist(),
            "stds": stds.tolist(),
            "offer_feature": self.offer_feature or None,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Preprocessing:
        """The preprocessing an artifact's preprocessing.json records (`to_json`'s output).

        ValueError (or KeyError, TypeError) when the document is not one: an unknown format, an
        unknown encoding, or an input list that disagrees with the features'.
        """
        if document.get("format") != PREPROCESSING_FORMAT:
            raise ValueError(f"unknown preprocessing format {document.get('format')!r}")
        features = []
        for entry in document["features"]:
            encoding = Encoding(str(entry["encoding"]))
            if encoding is Encoding.AUTO:
                raise ValueError(f"feature {entry['name']!r} has no resolved encoding")
            if encoding is Encoding.STANDARDIZE:
                features.append(
                    EncodedFeature(
                        str(entry["name"]),
                        encoding,
                        str(entry["dtype"]),
                        mean=float(entry["mean"]),
                        std=float(entry["std"]),
                    )
                )
            else:
                categories = tuple(str(category) for category in entry["categories"])
                features.append(
                    EncodedFeature(str(entry["name"]), encoding, str(entry["dtype"]), categories=categories)
                )
        preprocessing = cls(tuple(features), str(document["label"]))
        listed = [str(name) for name in document["inputs"]]
        if listed != preprocessing.inputs:
            raise ValueError(
                f"the features encode to {preprocessing.width} inputs but {len(listed)} are listed"
            )
        return preprocessing


def fit_preprocessing(
    features: Sequence[ResolvedFeature], columns: Mapping[str, np.ndarray], rows: np.ndarray, label: str
) -> Preprocessing:
    """Means, stds and category lists from the training rows only (`rows`: their indices)."""
    fitted: list[EncodedFeature] = []
    for feature in features:
        values = columns[feature.name][rows]
        if feature.encoding is Encoding.STANDARDIZE:
            numbers = np.asarray(values, dtype=np.float64)
            present = numbers[~np.isnan(numbers)]
            mean = float(present.mean()) if present.size else 0.0
            std = float(present.std()) if present.size else 1.0
            fitted.append(
                EncodedFeature(
                    feature.name,
                    feature.encoding,
                    feature.dtype,
                    mean=mean,
                    std=std if std > _MIN_STD and math.isfinite(std) else 1.0,
                )
            )
        else:
            categories = tuple(sorted({value for value in values if value is not None}))
            fitted.append(
                EncodedFeature(feature.name, feature.encoding, feature.dtype, categories=categories)
            )
    return Preprocessing(tuple(fitted), label)
