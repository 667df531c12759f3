"""Where a replica finds the model versions a deployment binds, and loads them.

A version lives in `<model_dir>/<name>/<version>/` as the trainer wrote it. Loading verifies every
file against the artifact's checksum manifest, loads the TorchScript model and warms it up (see
models.py); a binding that cannot be loaded is rejected before the deployment is applied, so the
replica NACKs the revision and keeps serving the old one. Loaded versions are shared by every
revision that binds them and dropped once no applied revision does.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

from libs.common.deployment_spec import DeploymentSpec, ModelBinding
from libs.common.errors import FailedPrecondition
from libs.common.model_artifacts import MANIFEST_FILE
from libs.policy.models import LoadedModel, load_model

ModelKey = tuple[str, int]


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self._root = root
        self._loaded: weakref.WeakValueDictionary[ModelKey, LoadedModel] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def version_dir(self, binding: ModelBinding) -> Path:
        return self._root / binding.name / str(binding.version)

    def load(self, binding: ModelBinding) -> LoadedModel:
        key = (binding.name, binding.version)
        with self._lock:
            cached = self._loaded.get(key)
            if cached is not None:
                return cached
            directory = self.version_dir(binding)
            if not (directory / MANIFEST_FILE).is_file():
                reason = "is not a model artifact" if directory.is_dir() else "does not exist"
                raise FailedPrecondition(
                    f"model '{binding.name}' version {binding.version} cannot be loaded: {directory} {reason}",
                    field="model",
                )
            model = load_model(directory, binding.name, binding.version)
            self._loaded[key] = model
            return model

    def load_bindings(self, spec: DeploymentSpec) -> dict[ModelKey, LoadedModel]:
        """Every version the spec binds (deployment, variants, model selector), loaded;
        FailedPrecondition if not."""
        return {(b.name, b.version): self.load(b) for b in spec.model_bindings()}
