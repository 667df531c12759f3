"""Distribution drift: what a model's inputs and predicted score looked like in training, and how far
a window of served values has moved from that.

The trainer records a `TrainingReference` with every model version it registers: for each model
input (a numeric or a categorical column of the training set, by its name there) and for the model's
predicted score, a `DistributionReference`. The monitor compares a window of served values against
it with `compare`, which returns a `DistributionDrift`: the population stability index (PSI) over the
reference's bins, for numbers also the Kolmogorov-Smirnov statistic, the means and missing rates on
both sides, and a severity.

A numeric reference keeps the training deciles as bin edges (deduplicated, so every bin holds some
training values; the first and last bins are open-ended), the share of values per bin, the mean and
a sketch of SKETCH_SIZE evenly spaced order statistics. The sketch's empirical CDF is the training
data's rounded to the nearest multiple of 1 / SKETCH_SIZE, ties and all, so a KS statistic against
it is within 1 / (2 * SKETCH_SIZE) of the one against the whole training column. A categorical reference
keeps the share of the MAX_CATEGORIES most frequent categories and of all others together.

Missing values (None, NaN, infinities, empty or unparseable text) are counted apart: shares, means,
PSI and KS describe the present values, and the missing rates are compared on their own. Served
values are text (the decision log's feature snapshot); `parse_number` and `category_text` read them
as the predictor's model encoder does, so a value the model sees as missing counts as missing here.

numpy only: no grpc, no SQL.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import pairwise
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from libs.common.model_artifacts import category_label

REFERENCE_FORMAT = "liveloop.distribution_reference/1"
TRAINING_REFERENCE_FORMAT = "liveloop.training_reference/1"
SCORE = "score"  # the name of the model's predicted score in a TrainingReference
BINS = 10  # numeric bins: the training deciles (fewer where they coincide)
SKETCH_SIZE = 100  # order statistics kept per numeric reference, for KS
MAX_CATEGORIES = 50  # categories kept by share; the rest share the "other" bin
OTHER_CATEGORY = "(other)"  # the label of a categorical reference's last bin
PSI_EPSILON = 1e-4  # the share an empty bin counts as holding, so PSI stays finite

Kind = Literal["numeric", "categorical"]
Severity = Literal["ok", "warning", "critical"]
_SEVERITY_ORDER: dict[Severity, int] = {"ok": 0, "warning": 1, "critical": 2}


# Reading values ---------------------------------------------------------------------------------


def parse_number(value: object) -> float | None:
    """A number from a raw or served value, as the predictor's model encoder reads it: numbers as
    they are, booleans and "true"/"false" (any case) as 1/0, text as a float; None for None, NaN,
    infinities, empty text and anything else ("t", "f", "n/a")."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return 1.0 if value else 0.0
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            return 1.0 if lowered == "true" else 0.0
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def category_text(value: object) -> str | None:
    """The category a raw or served value stands for (`category_label`: 34.0 -> "34", True ->
    "true"); None for None, NaN and empty text, which the model's one-hot encoding leaves all zero."""
    if isinstance(value, np.generic):
        value = value.item()
    label = category_label(value)
    return label if label else None


def numeric_column(values: Iterable[object] | np.ndarray) -> np.ndarray:
    """float64 values, NaN for missing (see `parse_number`)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        numbers = values.astype(np.float64)
    else:
        numbers = np.array(
            [math.nan if (number := parse_number(value)) is None else number for value in values],
            dtype=np.float64,
        )
    numbers[~np.isfinite(numbers)] = math.nan
    return numbers


def model_input_value(
    name: str, features: Mapping[str, object], context: Mapping[str, object] | None = None
) -> object | None:
    """The served value of the model input `name` in a decision log contact: from its context (a
    context variable the predictor derived) or its feature snapshot, the context first, as the
    predictor hands them to the model. A training set built by ingest's BuildTrainingSet names a
    feature `<view>__<feature>`; the online store, and so the snapshot, knows it as `<feature>`,
    which the model encoder falls back to, and so does this."""
    merged = {**features, **(context or {})}
    value = merged.get(name)
    if value is None and "__" in name:
        value = merged.get(name.split("__", 1)[1])
    return value


# References -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributionReference:
    """One distribution (a model input or the score) as the training data had it.

    Numeric: `bin_edges` are the ascending inner edges; value x falls in bin
    `searchsorted(bin_edges, x, side="left")`, so bin 0 is (-inf, edges[0]], bin i is
    (edges[i-1], edges[i]] and the last is (edges[-1], inf). `quantiles` is the sorted KS sketch.
    Categorical: `categories` by descending share; `bin_shares` has one share per category, then the
    share of every other category (OTHER_CATEGORY). Shares are of the present values and sum to 1;
    with no present values they, the edges, categories, sketch and mean are empty.
    """

    name: str
    kind: Kind
    count: int  # values described, missing ones included
    missing_count: int
    bin_shares: tuple[float, ...]
    bin_edges: tuple[float, ...] = ()  # numeric
    mean: float | None = None  # numeric: of the present values
    quantiles: tuple[float, ...] = ()  # numeric: order statistics at (i + 0.5) / len, i = 0, 1, ...
    categories: tuple[str, ...] = ()  # categorical

    @property
    def present_count(self) -> int:
        return self.count - self.missing_count

    @property
    def missing_rate(self) -> float:
        return self.missing_count / self.count if self.count else 0.0

    def bin_labels(self) -> list[str]:
        """A label per bin, for charts: "<= 25", "(25, 40]", "> 70"; the categories and "(other)"."""
        if not self.bin_shares:
            return []
        if self.kind == "categorical":
            return [*self.categories, OTHER_CATEGORY]
        edges = [f"{edge:g}" for edge in self.bin_edges]
        if not edges:
            return ["all"]
        inner = [f"({low}, {high}]" for low, high in pairwise(edges)]
        return [f"<= {edges[0]}", *inner, f"> {edges[-1]}"]

    def bin_counts(self, values: Iterable[object] | np.ndarray) -> tuple[np.ndarray, int, float | None]:
        """(count per bin of the present values, values missing, mean of the present values or None
        for a categorical reference or none present) of a window of raw or served values."""
        if self.kind == "numeric":
            numbers = numeric_column(values)
            present = numbers[~np.isnan(numbers)]
            positions = np.searchsorted(np.asarray(self.bin_edges, dtype=np.float64), present, side="left")
            counts = np.bincount(positions, minlength=len(self.bin_edges) + 1)
            mean = float(present.mean()) if present.size else None
            return counts, int(numbers.size - present.size), mean
        index = {category: position for position, category in enumerate(self.categories)}
        other = len(self.categories)
        counts = np.zeros(other + 1, dtype=np.int64)
        missing = 0
        for value in values:
            label = category_text(value)
            if label is None:
                missing += 1
            else:
                counts[index.get(label, other)] += 1
        return counts, missing, None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready document (REFERENCE_FORMAT); `from_json` reads it back."""
        document: dict[str, Any] = {
            "format": REFERENCE_FORMAT,
            "name": self.name,
            "kind": self.kind,
            "count": self.count,
            "missing_count": self.missing_count,
            "bin_shares": list(self.bin_shares),
        }
        if self.kind == "numeric":
            document.update(bin_edges=list(self.bin_edges), mean=self.mean, quantiles=list(self.quantiles))
        else:
            document["categories"] = list(self.categories)
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> DistributionReference:
        """ValueError (or KeyError, TypeError) when `document` is not one `to_json` writes."""
        if document.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"unknown distribution reference format {document.get('format')!r}")
        kind = str(document["kind"])
        if kind not in ("numeric", "categorical"):
            raise ValueError(f"unknown distribution kind {kind!r}")
        count, missing = int(document["count"]), int(document["missing_count"])
        shares = tuple(float(share) for share in document["bin_shares"])
        if not 0 <= missing <= count:
            raise ValueError(f"{missing} missing of {count} values")
        if shares and not math.isclose(math.fsum(shares), 1.0, abs_tol=1e-9):
            raise ValueError(f"the bin shares sum to {math.fsum(shares)}, not 1")
        if kind == "numeric":
            edges = tuple(float(edge) for edge in document["bin_edges"])
            quantiles = tuple(float(value) for value in document["quantiles"])
            mean = document.get("mean")
            if shares and len(shares) != len(edges) + 1:
                raise ValueError(f"{len(edges)} bin edges but {len(shares)} bin shares")
            if list(edges) != sorted(set(edges)) or list(quantiles) != sorted(quantiles):
                raise ValueError("the bin edges or the quantiles are not ascending")
            return cls(
                str(document["name"]),
                "numeric",
                count,
                missing,
                shares,
                bin_edges=edges,
                mean=None if mean is None else float(mean),
                quantiles=quantiles,
            )
        categories = tuple(str(category) for category in document["categories"])
        if shares and len(shares) != len(categories) + 1:
            raise ValueError(f"{len(categories)} categories but {len(shares)} bin shares")
        return cls(str(document["name"]), "categorical", count, missing, shares, categories=categories)


def describe_numeric(name: str, values: Iterable[object] | np.ndarray) -> DistributionReference:
    """The reference of a numeric column (raw or served values; see `parse_number`)."""
    numbers = numeric_column(values)
    present = numbers[~np.isnan(numbers)]
    count, missing = int(numbers.size), int(numbers.size - present.size)
    if present.size == 0:
        return DistributionReference(name, "numeric", count, missing, ())
    # "inverted_cdf" quantiles are values of the column, so bin (previous edge, edge] holds at least
    # `edge`; only the last bin can be empty (when the last decile is the maximum): that edge goes.
    deciles = np.quantile(present, np.arange(1, BINS) / BINS, method="inverted_cdf")
    edges = np.unique(deciles)
    edges = edges[edges < present.max()]
    counts = np.bincount(np.searchsorted(edges, present, side="left"), minlength=edges.size + 1)
    size = min(SKETCH_SIZE, int(present.size))
    sketch = np.quantile(present, (np.arange(size) + 0.5) / size, method="inverted_cdf")
    return DistributionReference(
        name,
        "numeric",
        count,
        missing,
        tuple(float(share) for share in counts / present.size),
        bin_edges=tuple(float(edge) for edge in edges),
        mean=float(present.mean()),
        quantiles=tuple(float(value) for value in sketch),
    )


def describe_categorical(
    name: str, values: Iterable[object] | np.ndarray, max_categories: int = MAX_CATEGORIES
) -> DistributionReference:
    """The reference of a categorical column (raw or served values; see `category_text`): the
    `max_categories` most frequent categories (ties by name) and the share of all others."""
    labels = [category_text(value) for value in values]
    present = Counter(label for label in labels if label is not None)
    total = sum(present.values())
    if total == 0:
        return DistributionReference(name, "categorical", len(labels), len(labels), ())
    kept = sorted(present.items(), key=lambda item: (-item[1], item[0]))[:max_categories]
    other = total - sum(count for _, count in kept)
    return DistributionReference(
        name,
        "categorical",
        len(labels),
        len(labels) - total,
        (*(count / total for _, count in kept), other / total),
        categories=tuple(category for category, _ in kept),
    )


@dataclass(frozen=True)
class TrainingReference:
    """What a model version's inputs and predicted score looked like on the rows it was trained
    from, as the trainer records it with the version.

    `inputs` maps each model input, by its training-set column name and in model input order, to
    its reference; `score` describes the model's predicted take-up on the same rows. `offer_input`
    names the input the predictor sets to each scored offer (an `offer`-encoded feature; "" when the
    model has none): it is in no feature snapshot; its served counterpart is the offer scored.
    """

    model_name: str
    model_version: int  # 0 until the registry numbers the version
    created_at: datetime
    rows: int  # rows described (every input and the score describe the same rows)
    inputs: Mapping[str, DistributionReference]
    score: DistributionReference
    offer_input: str = ""

    def for_version(self, model_name: str, model_version: int) -> TrainingReference:
        return replace(self, model_name=model_name, model_version=model_version)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready document (TRAINING_REFERENCE_FORMAT); `from_json` reads it back."""
        return {
            "format": TRAINING_REFERENCE_FORMAT,
            "model": {"name": self.model_name, "version": self.model_version},
            "created_at": self.created_at.astimezone(UTC).isoformat(),
            "rows": self.rows,
            "offer_input": self.offer_input,
            "inputs": [reference.to_json() for reference in self.inputs.values()],
            "score": self.score.to_json(),
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> TrainingReference:
        """ValueError (or KeyError, TypeError) when `document` is not one `to_json` writes."""
        if document.get("format") != TRAINING_REFERENCE_FORMAT:
            raise ValueError(f"unknown training reference format {document.get('format')!r}")
        inputs = [DistributionReference.from_json(entry) for entry in document["inputs"]]
        created_at = datetime.fromisoformat(str(document["created_at"]))
        if created_at.tzinfo is None:
            raise ValueError("created_at has no time zone")
        return cls(
            model_name=str(document["model"]["name"]),
            model_version=int(document["model"]["version"]),
            created_at=created_at,
            rows=int(document["rows"]),
            inputs={reference.name: reference for reference in inputs},
            score=DistributionReference.from_json(document["score"]),
            offer_input=str(document.get("offer_input") or ""),
        )


def build_reference(
    columns: Mapping[str, Sequence[object] | np.ndarray],
    scores: Sequence[float] | np.ndarray,
    *,
    categorical: Collection[str] = (),
    offer_input: str = "",
    model_name: str = "",
    model_version: int = 0,
    created_at: datetime | None = None,
) -> TrainingReference:
    """The reference of the model inputs `columns` (name -> one value per row, in model input
    order; the names in `categorical` are described by category, the others as numbers) and of the
    model's predicted `scores` for the same rows. ValueError when the lengths differ."""
    rows = len(scores)
    for name, values in columns.items():
        if len(values) != rows:
            raise ValueError(f"column '{name}' has {len(values)} values for {rows} scores")
    inputs = {
        name: describe_categorical(name, values) if name in categorical else describe_numeric(name, values)
        for name, values in columns.items()
    }
    return TrainingReference(
        model_name=model_name,
        model_version=model_version,
        created_at=created_at or datetime.now(UTC),
        rows=rows,
        inputs=inputs,
        score=describe_numeric(SCORE, scores),
        offer_input=offer_input,
    )


# Comparison -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftThresholds:
    """When a distribution counts as drifted.

    Each check has a warning and a critical threshold on an effect size (PSI, the KS statistic, the
    rise of the missing rate), and counts only when the effect is also beyond sampling noise at
    `significance` for the window's and the reference's sizes, so that a small window is not flagged
    for the noise of its own sampling:

    - PSI over B bins is approximately (1/n + 1/N) * chi-squared with B - 1 degrees of freedom
      when nothing changed (n present served values, N present training values); the noise bound is
      that quantile (Wilson-Hilferty approximation).
    - KS (numeric only): the two-sample critical value sqrt(-ln(significance / 2) / 2) *
      sqrt(1/n + 1/N), plus the sketch's error 1 / (2 * sketch size).
    - Missing rate: a one-sided two-proportion z-test on the rise.

    Severity is the worst of the checks: PSI and KS both contribute by default (KS catches shifts
    within bins that PSI misses); a threshold of math.inf turns a check off.
    """

    psi_warning: float = 0.1
    psi_critical: float = 0.25
    ks_warning: float = 0.1
    ks_critical: float = 0.2
    missing_rate_warning: float = 0.05  # rise of the missing rate, as a fraction of the values
    missing_rate_critical: float = 0.2
    significance: float = 0.01

    def __post_init__(self) -> None:
        for low, high in (
            (self.psi_warning, self.psi_critical),
            (self.ks_warning, self.ks_critical),
            (self.missing_rate_warning, self.missing_rate_critical),
        ):
            if not 0 < low <= high:
                raise ValueError("each warning threshold must be positive and at most its critical one")
        if not 0 < self.significance < 1:
            raise ValueError("significance must be between 0 and 1")


@dataclass(frozen=True)
class DistributionDrift:
    """How a window of served values compares with a reference."""

    name: str
    kind: Kind
    psi: float | None  # None when either side has no present values
    ks_statistic: float | None  # numeric only; None likewise
    reference_mean: float | None  # numeric only
    current_mean: float | None
    reference_missing_rate: float
    current_missing_rate: float
    reference_count: int  # training values, missing included
    current_count: int  # served values in the window, missing included
    current_bin_shares: tuple[float, ...]  # over the reference's bins; () when none present
    severity: Severity
    reasons: tuple[str, ...] = field(default=())  # why the severity is what it is, for people


def population_stability_index(
    expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray, epsilon: float = PSI_EPSILON
) -> float:
    """PSI = sum over bins of (actual - expected) * ln(actual / expected), shares of the same bins.

    A share below `epsilon` counts as `epsilon`: a bin empty on one side adds a large but finite
    term, a bin empty on both sides adds nothing.
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    if e.shape != a.shape:
        raise ValueError(f"{e.size} expected shares but {a.size} actual ones")
    return float(np.sum((a - e) * np.log(a / e)))


def ks_statistic(
    reference_quantiles: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray
) -> float:
    """The two-sample Kolmogorov-Smirnov statistic, sup |F_reference - F_values|, with F_reference
    the empirical CDF of the reference's sketch (or of any sample); both non-empty, no NaN."""
    reference = np.sort(np.asarray(reference_quantiles, dtype=np.float64))
    current = np.sort(np.asarray(values, dtype=np.float64))
    if reference.size == 0 or current.size == 0:
        raise ValueError("both samples must hold values")
    points = np.concatenate([reference, current])
    f_reference = np.searchsorted(reference, points, side="right") / reference.size
    f_current = np.searchsorted(current, points, side="right") / current.size
    return float(np.max(np.abs(f_reference - f_current)))


def _chi_squared_quantile(degrees: int, probability: float) -> float:
    """Wilson-Hilferty's approximation (within a few percent from 1 degree of freedom on)."""
    z = NormalDist().inv_cdf(probability)
    ratio = 2.0 / (9.0 * degrees)
    return float(degrees * (1.0 - ratio + z * math.sqrt(ratio)) ** 3)


def _level(value: float, warning: float, critical: float, noise: float) -> Severity:
    if value <= noise:
        return "ok"
    return "critical" if value >= critical else "warning" if value >= warning else "ok"


def compare(
    reference: DistributionReference,
    values: Iterable[object] | np.ndarray,
    thresholds: DriftThresholds | None = None,
) -> DistributionDrift:
    """How far `values` (a window of raw or served values of the same input, text or numbers) have
    moved from `reference`; see DriftThresholds for how the severity is decided."""
    thresholds = thresholds or DriftThresholds()
    materialised = values if isinstance(values, np.ndarray) else list(values)
    if reference.kind == "numeric":
        materialised = numeric_column(materialised)
    counts, missing, current_mean = reference.bin_counts(materialised)
    count = len(materialised)
    present = count - missing
    reference_present = reference.present_count
    levels: list[Severity] = ["ok"]
    reasons: list[str] = []
    psi = ks = None
    current_shares: tuple[float, ...] = ()
    if present:
        current_shares = tuple(float(share) for share in counts / present)
    if present and reference_present:
        psi = population_stability_index(reference.bin_shares, current_shares)
        bins = len(reference.bin_shares)
        noise = (
            _chi_squared_quantile(bins - 1, 1 - thresholds.significance)
            * (1 / present + 1 / reference_present)
            if bins > 1
            else math.inf
        )
        level = _level(psi, thresholds.psi_warning, thresholds.psi_critical, noise)
        levels.append(level)
        if level != "ok":
            reasons.append(
                f"psi {psi:.3f} ({level}; threshold {thresholds.psi_warning:g}/{thresholds.psi_critical:g})"
            )
        elif psi >= thresholds.psi_warning:
            reasons.append(f"psi {psi:.3f} is within the sampling noise of {present} values ({noise:.3f})")
        if reference.kind == "numeric":
            assert isinstance(materialised, np.ndarray)
            ks = ks_statistic(reference.quantiles, materialised[~np.isnan(materialised)])
            noise = math.sqrt(-math.log(thresholds.significance / 2) / 2) * math.sqrt(
                1 / present + 1 / reference_present
            ) + 1 / (2 * len(reference.quantiles))
            level = _level(ks, thresholds.ks_warning, thresholds.ks_critical, noise)
            levels.append(level)
            if level != "ok":
                reasons.append(
                    f"ks {ks:.3f} ({level}; threshold {thresholds.ks_warning:g}/{thresholds.ks_critical:g})"
                )
            elif ks >= thresholds.ks_warning:
                reasons.append(f"ks {ks:.3f} is within the sampling noise of {present} values ({noise:.3f})")
    current_missing_rate = missing / count if count else 0.0
    if count:
        rise = current_missing_rate - reference.missing_rate
        pooled = (missing + reference.missing_count) / (count + reference.count) if reference.count else 0.0
        spread = math.sqrt(
            pooled * (1 - pooled) * (1 / count + (1 / reference.count if reference.count else 0))
        )
        noise = NormalDist().inv_cdf(1 - thresholds.significance) * spread
        level = _level(rise, thresholds.missing_rate_warning, thresholds.missing_rate_critical, noise)
        levels.append(level)
        if level != "ok":
            reasons.append(
                f"missing rate {current_missing_rate:.3f}, {reference.missing_rate:.3f} in training ({level})"
            )
    else:
        reasons.append("no values in the window")
    return DistributionDrift(
        name=reference.name,
        kind=reference.kind,
        psi=psi,
        ks_statistic=ks,
        reference_mean=reference.mean,
        current_mean=current_mean,
        reference_missing_rate=reference.missing_rate,
        current_missing_rate=current_missing_rate,
        reference_count=reference.count,
        current_count=count,
        current_bin_shares=current_shares,
        severity=max(levels, key=_SEVERITY_ORDER.__getitem__),
        reasons=tuple(reasons),
    )


__all__ = [
    "BINS",
    "MAX_CATEGORIES",
    "OTHER_CATEGORY",
    "PSI_EPSILON",
    "REFERENCE_FORMAT",
    "SCORE",
    "SKETCH_SIZE",
    "TRAINING_REFERENCE_FORMAT",
    "DistributionDrift",
    "DistributionReference",
    "DriftThresholds",
    "TrainingReference",
    "build_reference",
    "category_text",
    "compare",
    "describe_categorical",
    "describe_numeric",
    "ks_statistic",
    "model_input_value",
    "numeric_column",
    "parse_number",
    "population_stability_index",
]
