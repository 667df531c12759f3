"""A registered version's artifact, read back and verified before anything is loaded from it.

An artifact directory holds `model.pt` (TorchScript), `preprocessing.json`, `reference.json` and
`manifest.json` (the SHA-256 of each file), and the registry records the SHA-256 of the manifest as
the version's `checksum`. Reading checks the manifest against the registry, every file against the
manifest and the identity the manifest claims, the checks a predictor makes before it serves a
version (services/predictor/core/models.py), and keeps the bytes it checked, so whatever is loaded
afterwards is exactly what was registered. Anything missing, changed or unreadable is
FailedPrecondition, naming the request field the version came from.

No torch here: the trainer process verifies; a worker process loads (services.trainer.core.evaluation).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from libs.common.errors import FailedPrecondition
from services.trainer.core.store import MANIFEST_FILE, MANIFEST_FORMAT, ModelVersionRecord

MODEL_FILE = "model.pt"
PREPROCESSING_FILE = "preprocessing.json"
REFERENCE_FILE = "reference.json"
REQUIRED_FILES = (MODEL_FILE, PREPROCESSING_FILE, REFERENCE_FILE)


@dataclass(frozen=True)
class VerifiedArtifact:
    name: str
    version: int
    checksum: str  # SHA-256 of the manifest, equal to the registry's
    files: Mapping[str, bytes]  # every file the manifest lists, as checked

    @property
    def where(self) -> str:
        return f"model '{self.name}' version {self.version}"


def artifact_path(uri: str, *, field: str = "model") -> Path:
    if not uri.startswith("file://"):
        raise FailedPrecondition(f"artifact URI '{uri}' is not a file:// URI", field=field)
    return Path(unquote(urlparse(uri).path))


def read_verified_artifact(record: ModelVersionRecord, *, field: str) -> VerifiedArtifact:
    """The artifact's files, checked against its manifest and the manifest against the registry."""
    where = f"model '{record.name}' version {record.version}"
    directory = artifact_path(record.artifact_uri, field=field)
    manifest_path = directory / MANIFEST_FILE
    try:
        manifest_bytes = manifest_path.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(
            f"{where}: cannot read {manifest_path}: {exc.strerror}", field=field
        ) from None
    checksum = hashlib.sha256(manifest_bytes).hexdigest()
    if checksum != record.checksum:
        raise FailedPrecondition(
            f"{where}: the manifest's checksum ({checksum[:12]}...) is not the registered one "
            f"({record.checksum[:12]}...); the artifact was changed after registration",
            field=field,
        )
    try:
        manifest = json.loads(manifest_bytes)
        listed = {str(name): str(digest) for name, digest in manifest["files"].items()}
        identity = (manifest["format"], manifest["model"], int(manifest["version"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FailedPrecondition(f"{where}: unreadable manifest ({exc})", field=field) from None
    if identity != (MANIFEST_FORMAT, record.name, record.version):
        raise FailedPrecondition(
            f"{where}: the manifest in {directory} describes {identity[1]!r} version {identity[2]}",
            field=field,
        )
    for required in REQUIRED_FILES:
        if required not in listed:
            raise FailedPrecondition(f"{where}: the manifest lists no {required}", field=field)
    files: dict[str, bytes] = {}
    for name, expected in listed.items():
        try:
            data = (directory / Path(name).name).read_bytes()
        except OSError as exc:
            raise FailedPrecondition(f"{where}: cannot read {name}: {exc.strerror}", field=field) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise FailedPrecondition(
                f"{where}: checksum mismatch for {name} (manifest {expected[:12]}..., file {actual[:12]}...); "
                "the artifact is corrupt or was changed after training",
                field=field,
            )
        files[name] = data
    return VerifiedArtifact(record.name, record.version, checksum, files)
