"""A registered version's artifact, read back and verified before anything is loaded from it.

The format, and the checks a predictor also makes before it serves a version, are
libs.common.model_artifacts'. Here the trainer adds its registry: the artifact is found through the
version's `artifact_uri`, and its manifest must be the one whose SHA-256 the registry recorded as the
version's `checksum`, so whatever is loaded afterwards is exactly what was registered. Anything
missing, changed or unreadable is FailedPrecondition, naming the request field the version came from.

No torch here: the trainer process verifies; a worker process loads (services.trainer.core.evaluation).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from libs.common.errors import FailedPrecondition
from libs.common.model_artifacts import (
    VerifiedArtifact,
    read_verified,
)
from services.trainer.core.store import ModelVersionRecord


def artifact_path(uri: str, *, field: str = "model") -> Path:
    if not uri.startswith("file://"):
        raise FailedPrecondition(f"artifact URI '{uri}' is not a file:// URI", field=field)
    return Path(unquote(urlparse(uri).path))


def read_verified_artifact(record: ModelVersionRecord, *, field: str) -> VerifiedArtifact:
    """The artifact's files, checked against its manifest and the manifest against the registry."""
    return read_verified(
        artifact_path(record.artifact_uri, field=field),
        record.name,
        record.version,
        field=field,
        registered_checksum=record.checksum,
    )
