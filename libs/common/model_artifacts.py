"""The model artifact format: the contract between the trainer, which writes a version, and whoever
loads it back (a predictor replica, the trainer's Compare).

An artifact directory holds `model.pt` (TorchScript: encoded input (batch, inputs) float32 ->
take-up probability (batch, 1)), `preprocessing.json` (PREPROCESSING_FORMAT: feature order, one-hot
categories as `category_label` maps raw values, means and stds), `reference.json` (test rows and the
trainer's predictions for them, to be reproduced within REFERENCE_TOLERANCE) and `manifest.json`
(MANIFEST_FORMAT: the model's name and version and the SHA-256 of each file). The registry records
the SHA-256 of the manifest as the version's checksum.

No torch and no grpc here: `read_verified` checks the files and returns their bytes, and the caller
loads the model from exactly those bytes, so whatever it loads is what was checked.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.common.errors import FailedPrecondition

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "liveloop.artifact/1"
MODEL_FILE = "model.pt"
PREPROCESSING_FILE = "preprocessing.json"
PREPROCESSING_FORMAT = "liveloop.preprocessing/1"
REFERENCE_FILE = "reference.json"
REQUIRED_FILES = (MODEL_FILE, PREPROCESSING_FILE, REFERENCE_FILE)
REFERENCE_TOLERANCE = 1e-6  # a loaded model must reproduce the reference predictions this closely


def category_label(value: Any) -> str | None:
    """The one-hot category a raw value stands for, in training and in serving alike."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    return str(value)


@dataclass(frozen=True)
class VerifiedArtifact:
    name: str
    version: int
    checksum: str  # SHA-256 of the manifest, as the registry records it
    files: Mapping[str, bytes]  # every file the manifest lists, as checked

    @property
    def where(self) -> str:
        return f"model '{self.name}' version {self.version}"


def read_verified(
    directory: Path,
    name: str,
    version: int,
    *,
    field: str = "model",
    registered_checksum: str | None = None,
) -> VerifiedArtifact:
    """The artifact's files, each checked against the manifest, and the manifest against the identity
    it claims (and, given `registered_checksum`, against the registry's checksum).

    FailedPrecondition naming `field` when anything is missing, changed or unreadable. Files the
    manifest does not list are neither read nor returned.
    """
    where = f"model '{name}' version {version}"
    manifest_path = directory / MANIFEST_FILE
    try:
        manifest_bytes = manifest_path.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(
            f"{where}: cannot read {manifest_path}: {exc.strerror or exc}", field=field
        ) from None
    checksum = hashlib.sha256(manifest_bytes).hexdigest()
    if registered_checksum is not None and checksum != registered_checksum:
        raise FailedPrecondition(
            f"{where}: the manifest's checksum ({checksum[:12]}...) is not the registered one "
            f"({registered_checksum[:12]}...); the artifact was changed after registration",
            field=field,
        )
    try:
        manifest = json.loads(manifest_bytes)
        listed = {str(file): str(digest) for file, digest in manifest["files"].items()}
        identity = (manifest["format"], manifest["model"], int(manifest["version"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FailedPrecondition(f"{where}: unreadable manifest ({exc})", field=field) from None
    if identity != (MANIFEST_FORMAT, name, version):
        raise FailedPrecondition(
            f"{where}: the manifest in {directory} describes {identity[1]!r} version {identity[2]}",
            field=field,
        )
    for required in REQUIRED_FILES:
        if required not in listed:
            raise FailedPrecondition(f"{where}: the manifest lists no {required}", field=field)
    files: dict[str, bytes] = {}
    for file, expected in listed.items():
        try:
            data = (directory / Path(file).name).read_bytes()
        except OSError as exc:
            raise FailedPrecondition(
                f"{where}: cannot read {file}: {exc.strerror or exc}", field=field
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise FailedPrecondition(
                f"{where}: checksum mismatch for {file} (manifest {expected[:12]}..., file {actual[:12]}...); "
                "the artifact is corrupt or was changed after training",
                field=field,
            )
        files[file] = data
    return VerifiedArtifact(name, version, checksum, files)
