"""The drift the alert rules read: GetDrift's report of each deployment's bound model, kept for a
while (a day of archived contacts is not re-read every evaluation)."""

from __future__ import annotations

import time
from collections.abc import Callable

from libs.common.errors import FailedPrecondition
from services.monitor.core.alert_engine import FeatureDrift
from services.monitor.core.monitor_service import MonitorService

DRIFT_REFRESH_SECONDS = 600.0


class MonitorDriftSource:
    """Implements alert_engine.DriftSource over MonitorService.drift."""

    def __init__(
        self,
        service: MonitorService,
        refresh_seconds: float = DRIFT_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service = service
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._kept: dict[str, tuple[float, list[FeatureDrift]]] = {}

    async def drift(self, deployment: str) -> list[FeatureDrift]:
        kept = self._kept.get(deployment)
        if kept is not None and self._clock() - kept[0] < self._refresh_seconds:
            return kept[1]
        try:
            _window, report = await self._service.drift(deployment)
        except FailedPrecondition:
            drifts: list[FeatureDrift] = []  # no bound model: nothing to compare
        else:
            drifts = [
                FeatureDrift(row.name, row.psi or 0.0, row.severity)
                for row in [*report.features, report.score]
            ]
        self._kept[deployment] = (self._clock(), drifts)
        return drifts
