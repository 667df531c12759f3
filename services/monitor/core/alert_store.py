"""Alerts in SQL (`schema.alerts`): each evaluation's findings turned into firing and resolved
alerts, and the listing behind ListAlerts.

An alert's id is a fingerprint of its rule, deployment and labels, so the same condition keeps the
same id while it fires and in every later episode. One evaluation's changes are written in one
transaction under the database write lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock),
so two monitor replicas evaluating at once neither fire an alert twice nor both notify it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, cast

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.engine import Connection

from libs.common.database import write_transaction
from libs.common.errors import InvalidArgument
from services.monitor.core import schema
from services.monitor.core.alert_rules import SEVERITY_RANK, Severity

_WRITE_LOCK_KEY = int.from_bytes(hashlib.sha256(b"liveloop:monitor:alerts").digest()[:8], "big", signed=True)

AlertState = Literal["firing", "resolved"]
FIRING: AlertState = "firing"
RESOLVED: AlertState = "resolved"


def alert_id(rule: str, deployment: str, labels: Mapping[str, str]) -> str:
    """The fingerprint of a condition: 16 hex digits, as Alertmanager's."""
    key = json.dumps([rule, deployment, sorted(labels.items())], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Finding:
    """A rule's condition holding now for one deployment and set of labels."""

    rule: str
    kind: str
    deployment: str
    severity: Severity
    value: float
    threshold: float
    summary: str
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return alert_id(self.rule, self.deployment, self.labels)


@dataclass(frozen=True)
class Alert:
    id: str
    rule: str
    kind: str
    deployment: str
    severity: Severity
    state: AlertState
    summary: str
    labels: dict[str, str]
    value: float
    threshold: float
    started_at: float  # epoch seconds
    resolved_at: float | None
    updated_at: float


@dataclass
class Transitions:
    """What one evaluation changed, for notifications and the gauge."""

    fired: list[Alert] = field(default_factory=list)
    resolved: list[Alert] = field(default_factory=list)
    changed_severity: list[Alert] = field(default_factory=list)  # firing, now at another severity
    firing_counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (rule, severity) -> alerts
    deleted: int = 0

    @property
    def notable(self) -> list[Alert]:
        return [*self.fired, *self.changed_severity, *self.resolved]


@dataclass(frozen=True)
class AlertPage:
    alerts: list[Alert]
    next_page_token: str  # empty on the last page
    total: int  # alerts matching the filter, over every page


class AlertStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def record(
        self,
        now: float,
        findings: Sequence[Finding],
        ready: set[str],
        *,
        rule_names: set[str],
        undecided: Callable[[Alert], bool],
        retention_seconds: float,
    ) -> Transitions:
        """Apply one evaluation: `findings` hold now; those in `ready` (their `for` has passed) fire
        when not firing yet. A firing alert whose condition no longer holds resolves, unless
        `undecided` says its rule could not tell this time; one of a rule that is gone resolves."""
        by_id = {finding.id: finding for finding in findings}
        result = Transitions()
        table = schema.alerts
        with write_transaction(self._engine) as connection:
            self._lock(connection)
            firing = [
                _alert(row)
                for row in connection.execute(sa.select(table).where(table.c.state == FIRING)).mappings()
            ]
            firing_ids = set()
            for alert in firing:
                firing_ids.add(alert.id)
                key = (table.c.id == alert.id, table.c.started_at == alert.started_at)
                finding = by_id.get(alert.id)
                if finding is not None:
                    connection.execute(
                        table.update()
                        .where(*key)
                        .values(
                            severity=finding.severity,
                            summary=finding.summary,
                            value=finding.value,
                            threshold=finding.threshold,
                            updated_at=now,
                        )
                    )
                    if finding.severity != alert.severity:
                        result.changed_severity.append(_updated(alert, finding, now))
                elif alert.rule in rule_names and undecided(alert):
                    continue
                else:
                    connection.execute(table.update().where(*key).values(state=RESOLVED, resolved_at=now))
                    result.resolved.append(_resolved(alert, now))
            for finding in findings:
                if finding.id in ready and finding.id not in firing_ids:
                    alert = _new_alert(finding, now)
                    connection.execute(table.insert().values(**_row(alert)))
                    result.fired.append(alert)
            result.deleted = int(
                connection.execute(
                    table.delete().where(
                        table.c.state == RESOLVED, table.c.resolved_at < now - retention_seconds
                    )
                ).rowcount
                or 0
            )
            counts = connection.execute(
                sa.select(table.c.rule, table.c.severity, sa.func.count())
                .where(table.c.state == FIRING)
                .group_by(table.c.rule, table.c.severity)
            ).all()
        result.firing_counts = {(str(rule), str(severity)): int(count) for rule, severity, count in counts}
        return result

    def firing(self) -> list[Alert]:
        table = schema.alerts
        with self._engine.connect() as connection:
            rows = connection.execute(
                sa.select(table).where(table.c.state == FIRING).order_by(*_NEWEST_FIRST)
            ).mappings()
            return [_alert(row) for row in rows]

    def list_alerts(
        self,
        *,
        deployment: str = "",
        include_resolved: bool = False,
        min_severity: Severity | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> AlertPage:
        """Newest first (by when they started); `page_token` from the previous page's answer."""
        table = schema.alerts
        conditions: list[sa.ColumnElement[bool]] = []
        if deployment:
            conditions.append(table.c.deployment == deployment)
        if not include_resolved:
            conditions.append(table.c.state == FIRING)
        if min_severity is not None:
            allowed = [name for name, rank in SEVERITY_RANK.items() if rank >= SEVERITY_RANK[min_severity]]
            conditions.append(table.c.severity.in_(allowed))
        after = _decode_token(page_token) if page_token else None
        page_conditions = list(conditions)
        if after is not None:
            started_at, last_id = after
            page_conditions.append(
                sa.or_(
                    table.c.started_at < started_at,
                    sa.and_(table.c.started_at == started_at, table.c.id < last_id),
                )
            )
        with self._engine.connect() as connection:
            total = int(
                connection.execute(
                    sa.select(sa.func.count()).select_from(table).where(*conditions)
                ).scalar_one()
            )
            rows = connection.execute(
                sa.select(table).where(*page_conditions).order_by(*_NEWEST_FIRST).limit(page_size + 1)
            ).mappings()
            alerts = [_alert(row) for row in rows]
        next_token = ""
        if len(alerts) > page_size:
            alerts = alerts[:page_size]
            next_token = _encode_token(alerts[-1].started_at, alerts[-1].id)
        return AlertPage(alerts, next_token, total)

    @staticmethod
    def _lock(connection: Connection) -> None:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_WRITE_LOCK_KEY)))


_NEWEST_FIRST = (schema.alerts.c.started_at.desc(), schema.alerts.c.id.desc())


def _encode_token(started_at: float, last_id: str) -> str:
    return base64.urlsafe_b64encode(f"{started_at!r}|{last_id}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        started_at, last_id = text.split("|", 1)
        return float(started_at), last_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("is not a token from a previous page", field="page.page_token") from None


def _alert(row: sa.RowMapping) -> Alert:
    resolved_at = row["resolved_at"]
    return Alert(
        id=str(row["id"]),
        rule=str(row["rule"]),
        kind=str(row["kind"]),
        deployment=str(row["deployment"]),
        severity=cast(Severity, str(row["severity"])),
        state=cast(AlertState, str(row["state"])),
        summary=str(row["summary"]),
        labels={str(k): str(v) for k, v in json.loads(str(row["labels"])).items()},
        value=float(cast(float, row["value"])),
        threshold=float(cast(float, row["threshold"])),
        started_at=float(cast(float, row["started_at"])),
        resolved_at=None if resolved_at is None else float(cast(float, resolved_at)),
        updated_at=float(cast(float, row["updated_at"])),
    )


def _row(alert: Alert) -> dict[str, object]:
    return {
        "id": alert.id,
        "started_at": alert.started_at,
        "rule": alert.rule,
        "kind": alert.kind,
        "deployment": alert.deployment,
        "severity": alert.severity,
        "state": alert.state,
        "summary": alert.summary,
        "labels": json.dumps(dict(sorted(alert.labels.items())), separators=(",", ":")),
        "value": alert.value,
        "threshold": alert.threshold,
        "resolved_at": alert.resolved_at,
        "updated_at": alert.updated_at,
    }


def _new_alert(finding: Finding, now: float) -> Alert:
    return Alert(
        id=finding.id,
        rule=finding.rule,
        kind=finding.kind,
        deployment=finding.deployment,
        severity=finding.severity,
        state=FIRING,
        summary=finding.summary,
        labels=dict(finding.labels),
        value=finding.value,
        threshold=finding.threshold,
        started_at=now,
        resolved_at=None,
        updated_at=now,
    )


def _updated(alert: Alert, finding: Finding, now: float) -> Alert:
    return replace(
        alert,
        severity=finding.severity,
        summary=finding.summary,
        value=finding.value,
        threshold=finding.threshold,
        updated_at=now,
    )


def _resolved(alert: Alert, now: float) -> Alert:
    return replace(alert, state=RESOLVED, resolved_at=now)
