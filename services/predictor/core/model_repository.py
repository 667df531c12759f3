"""Where a replica finds the model versions a deployment binds.

A version lives in `<model_dir>/<name>/<version>/`; a binding to a version that is not there is
rejected before the deployment is applied, so the replica NACKs it and keeps serving the old one.
"""

from __future__ import annotations

from pathlib import Path

from libs.common.deployment_spec import DeploymentSpec, ModelBinding
from libs.common.errors import FailedPrecondition


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self._root = root

    def version_dir(self, binding: ModelBinding) -> Path:
        return self._root / binding.name / str(binding.version)

    def check_bindings(self, spec: DeploymentSpec) -> None:
        bindings = [spec.model] + [variant.model for variant in spec.variants]
        for binding in bindings:
            if binding is not None and not self.version_dir(binding).is_dir():
                raise FailedPrecondition(
                    f"model '{binding.name}' version {binding.version} cannot be loaded: "
                    f"{self.version_dir(binding)} does not exist",
                    field="model",
                )
