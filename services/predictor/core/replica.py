"""What a predictor replica knows about itself and the config it serves."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.config_follower import AppliedConfig
from libs.policy.deployment import PreparedDeployment


@dataclass
class ReplicaState:
    """Identity and the config being served, swapped whole on every change (None until one is applied)."""

    replica_id: str
    config: AppliedConfig[PreparedDeployment] | None = None

    @property
    def config_revision(self) -> int:
        return self.config.revision if self.config is not None else 0
