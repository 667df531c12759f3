"""The training loop: split, fit the encoding, train with early stopping, measure, save the artifact.

Imports torch: only training worker processes (and tests) import this module. Everything is
seeded and runs single-threaded with deterministic algorithms, so the same spec on the same data
gives the same weights, bit for bit.
"""

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from libs.common.distribution_drift import TrainingReference, build_reference
from libs.common.errors import InvalidArgument
from libs.common.model_artifacts import MODEL_FILE, PREPROCESSING_FILE, REFERENCE_FILE
from libs.common.training_spec import Encoding, ModelType, SplitSpec, TrainingJobSpec
from services.trainer.core.jobs import TRAINING_REFERENCE_FILE, EpochReport, TrainingSummary
from services.trainer.core.metrics import binary_metrics
from services.trainer.core.preprocessing import Preprocessing, fit_preprocessing
from services.trainer.core.training_data import TrainingData, TrainingSetPlan

REFERENCE_ROWS = 8
INPUT_NAME = "features"
OUTPUT_NAME = "probability"


class TakeUpModel(nn.Module):
    """Predicted take-up: sigmoid of a logistic regression or an MLP over the standardised input."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, means: np.ndarray, stds: np.ndarray, hidden_sizes: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(means, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(stds, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = int(means.shape[0])
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.layers((x - self.mean) / self.std)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, inputs) float32 -> (batch, 1) probability of take-up."""
        return torch.sigmoid(self.logits(x))


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split_rows(split: SplitSpec, data: TrainingData, seed: int) -> Split:
    """Row indices of the three sets: at random (seeded), by time (oldest train), or by group."""
    rows = data.rows
    n_test = max(1, round(rows * split.test_fraction))
    n_validation = max(1, round(rows * split.validation_fraction))
    if rows - n_test - n_validation < 1:
        raise InvalidArgument(f"{rows} rows are too few to split three ways", field="spec.split")
    rng = np.random.default_rng(seed)
    if split.time_column:
        assert data.split_values is not None
        times = np.where(np.isnan(data.split_values), -np.inf, data.split_values)
        order = np.argsort(times, kind="stable")
        n_train = rows - n_test - n_validation
        return Split(
            order[:n_train], order[n_train : n_train + n_validation], order[n_train + n_validation :]
        )
    if split.group_column:
        assert data.split_values is not None
        groups, inverse = np.unique(data.split_values.astype(str), return_inverse=True)
        if groups.size < 3:
            raise InvalidArgument(
                f"'{split.group_column}' has {groups.size} groups; a group split needs at least 3",
                field="spec.split.group_column",
            )
        shuffled = rng.permutation(groups.size)
        sizes = np.bincount(inverse, minlength=groups.size)[shuffled]
        cumulative = np.cumsum(sizes) / rows
        assignment = np.empty(groups.size, dtype=np.int64)  # 0 test, 1 validation, 2 train
        test_end = split.test_fraction
        validation_end = split.test_fraction + split.validation_fraction
        for position, group in enumerate(shuffled):
            before = cumulative[position] - sizes[position] / rows
            assignment[group] = 0 if before < test_end else 1 if before < validation_end else 2
        which = assignment[inverse]
        parts = [np.flatnonzero(which == part) for part in (2, 1, 0)]
        if any(part.size == 0 for part in parts):
            raise InvalidArgument(
                "the groups are too few or too uneven to fill all three sets", field="spec.split.group_column"
            )
        return Split(*parts)
    order = rng.permutation(rows)
    return Split(order[n_test + n_validation :], order[n_test : n_test + n_validation], order[:n_test])


@dataclass
class TrainingOutcome:
    model: TakeUpModel
    preprocessing: Preprocessing
    summary: TrainingSummary
    reference: dict[str, Any]  # raw test rows and the trainer's predictions for them
    training_reference: TrainingReference  # what drift monitoring compares served values with


def configure_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def predict(model: TakeUpModel, matrix: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        result: np.ndarray = model(torch.from_numpy(matrix)).numpy()[:, 0].astype(np.float64)
    return result


def _better(metric: str, value: float, best: float, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    if metric == "auc":
        return value > best + min_delta
    return value < best - min_delta


class _Logits(nn.Module):
    """What the optimiser trains: the model's logits (DistributedDataParallel wraps `forward`)."""

    def __init__(self, model: TakeUpModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)


def train_model(
    spec: TrainingJobSpec,
    plan: TrainingSetPlan,
    data: TrainingData,
    report: Callable[[EpochReport], None] = lambda _report: None,
    *,
    distributed: bool = False,
) -> TrainingOutcome:
    """Train with early stopping; the model holds the best epoch's weights.

    With `distributed` (under torchrun, the gloo process group initialised), every process reads
    the same rows and draws the same batches; each computes the gradient of its share of a batch and
    DistributedDataParallel averages them, which is the gradient of the whole batch: the model
    matches one process's up to floating-point summation order.
    """
    configure_determinism(spec.seed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    split = split_rows(spec.split, data, spec.seed)
    if np.unique(data.labels[split.train]).size < 2:
        raise InvalidArgument("the training split holds one class only", field="spec.split")
    preprocessing = fit_preprocessing(plan.features, data.columns, split.train, spec.label)
    if preprocessing.width == 0:
        raise InvalidArgument("the features encode to no inputs (no categories seen)", field="spec.features")
    matrix = preprocessing.encode(data.columns)
    labels = data.labels.astype(np.float32)
    means, stds = preprocessing.scaling()
    hidden = spec.hyperparameters.hidden_sizes if spec.model_type is ModelType.MLP else []
    model = TakeUpModel(means, stds, hidden)
    network: nn.Module = _Logits(model)
    if world > 1:
        network = DistributedDataParallel(network)
    parameters = spec.hyperparameters
    optimizer = torch.optim.Adam(
        model.parameters(), lr=parameters.learning_rate, weight_decay=parameters.weight_decay
    )
    loss_function = nn.BCEWithLogitsLoss(reduction="sum")
    generator = torch.Generator().manual_seed(spec.seed)
    train_x = torch.from_numpy(matrix[split.train])
    train_y = torch.from_numpy(labels[split.train]).reshape(-1, 1)
    validation_x = matrix[split.validation]
    validation_y = data.labels[split.validation]
    stopping = spec.early_stopping
    if stopping.patience and stopping.metric == "auc" and np.unique(validation_y).size < 2:
        raise InvalidArgument(
            "the validation split holds one class, so AUC cannot guide early stopping; use log_loss",
            field="spec.early_stopping.metric",
        )
    best = -math.inf if stopping.metric == "auc" else math.inf
    best_state = copy.deepcopy(model.state_dict())
    best_epoch = 0
    stale = 0
    started = time.monotonic()
    epochs = parameters.epochs
    epoch = 0
    for epoch in range(1, epochs + 1):
        network.train()
        order = torch.randperm(train_x.shape[0], generator=generator)
        total = torch.zeros(())
        for start in range(0, train_x.shape[0], parameters.batch_size):
            batch = order[start : start + parameters.batch_size]
            shard = batch[rank::world]
            optimizer.zero_grad()
            loss = loss_function(network(train_x[shard]), train_y[shard])
            # Summed over this shard; x world / batch: the ranks' average is the batch's mean loss.
            (loss * world / batch.shape[0]).backward()
            optimizer.step()
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
        network.eval()
        validation_p = predict(model, validation_x)
        metrics = binary_metrics(validation_y, validation_p)
        watched = metrics[stopping.metric]
        if epoch == 1 or _better(stopping.metric, watched, best, stopping.min_delta):
            best, best_epoch, stale = watched, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        elapsed = time.monotonic() - started
        finishing = bool(stopping.patience) and stale >= stopping.patience
        report(
            EpochReport(
                epoch=epoch,
                max_epochs=epochs,
                loss=float(total) / train_x.shape[0],
                validation_loss=metrics["log_loss"],
                metrics=metrics,
                eta_seconds=0.0 if finishing else elapsed / epoch * (epochs - epoch),
                elapsed_seconds=elapsed,
                rows_per_second=train_x.shape[0] * epoch / elapsed if elapsed > 0 else 0.0,
            )
        )
        if finishing:
            break
    model.load_state_dict(best_state)
    model.eval()
    test_p = predict(model, matrix[split.test])
    test_metrics = {**binary_metrics(data.labels[split.test], test_p), "rows": float(split.test.size)}
    validation_metrics = binary_metrics(validation_y, predict(model, validation_x))
    summary = TrainingSummary(
        test_metrics=test_metrics,
        validation_metrics=validation_metrics,
        epochs_trained=epoch,
        best_epoch=best_epoch,
        training_rows=int(split.train.size),
        validation_rows=int(split.validation.size),
        test_rows=int(split.test.size),
        data_fingerprint=data.fingerprint,
        features=[
            {"name": f.name, "dtype": f.dtype, "encoding": f.encoding.value} for f in preprocessing.features
        ],
        inputs=preprocessing.width,
    )
    reference_rows = split.test[:REFERENCE_ROWS]
    reference = {
        "rows": [_raw_row(data.columns, preprocessing, int(row)) for row in reference_rows],
        "predictions": test_p[: reference_rows.size].tolist(),
    }
    return TrainingOutcome(
        model,
        preprocessing,
        summary,
        reference,
        describe_training_data(spec, preprocessing, data, model, matrix),
    )


def describe_training_data(
    spec: TrainingJobSpec,
    preprocessing: Preprocessing,
    data: TrainingData,
    model: TakeUpModel,
    matrix: np.ndarray,
) -> TrainingReference:
    """The reference drift monitoring compares served values with: every model input's raw values
    as read from the training set (before encoding) and the trained model's predicted take-up, over
    every row of the training set (all three splits: the population the model was built from)."""
    return build_reference(
        {feature.name: data.columns[feature.name] for feature in preprocessing.features},
        predict(model, matrix),
        categorical={f.name for f in preprocessing.features if f.encoding is not Encoding.STANDARDIZE},
        offer_input=preprocessing.offer_feature,
        model_name=spec.model_name,
    )


def _raw_row(columns: Mapping[str, np.ndarray], preprocessing: Preprocessing, row: int) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for feature in preprocessing.features:
        value = columns[feature.name][row]
        if isinstance(value, float | np.floating):
            values[feature.name] = None if math.isnan(value) else float(value)
        else:
            values[feature.name] = value
    return values


def script(model: TakeUpModel) -> torch.jit.ScriptModule:
    # TorchScript is the artifact format predictors load; torch 2.13 marks it deprecated in favour
    # of torch.export, which does not change what is saved.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(model)


def write_artifact(outcome: TrainingOutcome, directory: Path) -> None:
    """model.pt (TorchScript), preprocessing.json and reference.json; the registry adds the manifest.
    Beside them the training reference, which the registry stores and takes out (see jobs.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    scripted = script(outcome.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, str(directory / MODEL_FILE))
    (directory / PREPROCESSING_FILE).write_text(json.dumps(outcome.preprocessing.to_json(), indent=2))
    (directory / REFERENCE_FILE).write_text(json.dumps(outcome.reference, indent=2))
    (directory / TRAINING_REFERENCE_FILE).write_text(
        json.dumps(outcome.training_reference.to_json(), allow_nan=False)
    )
