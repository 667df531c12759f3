"""What a predictor replica knows about itself."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReplicaState:
    """Identity and the config revision being served (0 until a config is applied)."""

    replica_id: str
    config_revision: int = 0
