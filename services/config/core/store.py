"""The config store: immutable, globally numbered revisions of deployment specs in SQL.

Every change (publish, rollback, delete) is one row under the next revision, assigned inside the
writing transaction (previous maximum + 1, under the database's write lock), so revisions are
gap-free and become visible in order. The head of a deployment is its newest row; a deleted
deployment's newest row is a delete.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from libs.common.database import write_transaction
from libs.common.deployment_spec import (
    DeploymentSpec,
    canonical_json,
    spec_checksum,
    spec_diff,
)
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.config.core.schema import (
    CHANGE_KIND_DELETE,
    CHANGE_KIND_PUBLISH,
    CHANGE_KIND_ROLLBACK,
    config_audit,
    deployment_revisions,
)

HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 1000
_POSTGRES_PUBLISH_LOCK = 0x6C6C_636F_6E66  # "llconf": serialises revision numbering on PostgreSQL


@dataclass(frozen=True)
class StoredRevision:
    """One row of the store: a deployment's spec (empty when deleted) at a revision."""

    revision: int
    deployment: str
    spec_json: str
    checksum: str
    author: str
    created_at: datetime
    change_kind: str
    message: str
    source_revision: int | None

    @property
    def deleted(self) -> bool:
        return self.change_kind == CHANGE_KIND_DELETE


@dataclass(frozen=True)
class ChangeResult:
    revision: int
    deployment: str
    diff: str
    changed: bool
    dry_run: bool
    stored: StoredRevision | None  # the new row when one was written


@dataclass(frozen=True)
class HistoryEntry:
    stored: StoredRevision
    diff: str


def _row_to_revision(row: sa.Row[tuple[object, ...]]) -> StoredRevision:
    mapping = row._mapping
    return StoredRevision(
        revision=int(mapping["revision"]),
        deployment=str(mapping["deployment"]),
        spec_json=str(mapping["spec"]),
        checksum=str(mapping["content_sha256"]),
        author=str(mapping["author"]),
        created_at=mapping["created_at"],
        change_kind=str(mapping["change_kind"]),
        message=str(mapping["message"]),
        source_revision=mapping["rolled_back_from"],
    )


class ConfigStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # Reads ---------------------------------------------------------------------------------------

    def head_revision(self) -> int:
        with self._engine.connect() as connection:
            return self._head(connection)

    @staticmethod
    def _head(connection: Connection) -> int:
        head = connection.scalar(sa.select(sa.func.max(deployment_revisions.c.revision)))
        return int(head) if head is not None else 0

    @staticmethod
    def _current(connection: Connection, deployment: str) -> StoredRevision | None:
        row = connection.execute(
            sa.select(deployment_revisions)
            .where(deployment_revisions.c.deployment == deployment)
            .order_by(deployment_revisions.c.revision.desc())
            .limit(1)
        ).first()
        return _row_to_revision(row) if row is not None else None

    def get(self, deployment: str, revision: int = 0) -> tuple[StoredRevision, int]:
        """The deployment as of `revision` (0 = head), with the store's head revision."""
        if revision < 0:
            raise InvalidArgument("must be 0 (head) or a positive revision", field="revision")
        with self._engine.connect() as connection:
            head = self._head(connection)
            query = sa.select(deployment_revisions).where(
                deployment_revisions.c.deployment == deployment,
                deployment_revisions.c.revision <= (min(revision, head) if revision else head),
            )
            row = connection.execute(query.order_by(deployment_revisions.c.revision.desc()).limit(1)).first()
        if row is None:
            at = f" at revision {revision}" if revision else ""
            raise NotFound(f"deployment '{deployment}' does not exist{at}", field="deployment")
        stored = _row_to_revision(row)
        if stored.deleted:
            raise NotFound(
                f"deployment '{deployment}' was deleted at revision {stored.revision}", field="deployment"
            )
        return stored, head

    def list_current(
        self, deployments: Sequence[str] = (), at_revision: int = 0
    ) -> tuple[list[StoredRevision], int]:
        """Every existing deployment at the head, or as of `at_revision` when given (optionally only
        the named ones), sorted by name.

        Exact under concurrent publishes at READ COMMITTED too: the head is read first and the rows
        are bounded by it, and revisions become visible in order, so a publish committed between the
        two statements is in neither (not in the rows while the head says it is not there yet)."""
        with self._engine.connect() as connection:
            head = self._head(connection)
            bound = min(at_revision, head) if at_revision else head
            newest = (
                sa.select(
                    deployment_revisions.c.deployment,
                    sa.func.max(deployment_revisions.c.revision).label("revision"),
                )
                .where(deployment_revisions.c.revision <= bound)
                .group_by(deployment_revisions.c.deployment)
                .subquery()
            )
            query = (
                sa.select(deployment_revisions)
                .join(newest, deployment_revisions.c.revision == newest.c.revision)
                .where(deployment_revisions.c.change_kind != CHANGE_KIND_DELETE)
                .order_by(deployment_revisions.c.deployment)
            )
            if deployments:
                query = query.where(deployment_revisions.c.deployment.in_(list(deployments)))
            rows = connection.execute(query).all()
        return [_row_to_revision(row) for row in rows], head

    def changes_after(
        self, revision: int, deployments: Sequence[str] = (), limit: int = 10_000
    ) -> list[StoredRevision]:
        """Rows newer than `revision`, oldest first (what a replica that has `revision` missed)."""
        query = sa.select(deployment_revisions).where(deployment_revisions.c.revision > revision)
        if deployments:
            query = query.where(deployment_revisions.c.deployment.in_(list(deployments)))
        with self._engine.connect() as connection:
            rows = connection.execute(query.order_by(deployment_revisions.c.revision).limit(limit)).all()
        return [_row_to_revision(row) for row in rows]

    def history(self, deployment: str = "", limit: int = 0, before_revision: int = 0) -> list[HistoryEntry]:
        if limit < 0 or before_revision < 0:
            raise InvalidArgument("must not be negative", field="limit" if limit < 0 else "before_revision")
        limit = min(limit or HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT)
        query = sa.select(deployment_revisions)
        if deployment:
            query = query.where(deployment_revisions.c.deployment == deployment)
        if before_revision:
            query = query.where(deployment_revisions.c.revision < before_revision)
        with self._engine.connect() as connection:
            rows = [
                _row_to_revision(row)
                for row in connection.execute(
                    query.order_by(deployment_revisions.c.revision.desc()).limit(limit)
                )
            ]
            if deployment and not rows and not before_revision:
                raise NotFound(f"deployment '{deployment}' has no history", field="deployment")
            entries = []
            for stored in rows:
                previous = connection.execute(
                    sa.select(deployment_revisions.c.spec)
                    .where(
                        deployment_revisions.c.deployment == stored.deployment,
                        deployment_revisions.c.revision < stored.revision,
                    )
                    .order_by(deployment_revisions.c.revision.desc())
                    .limit(1)
                ).scalar()
                diff = spec_diff(previous or "", stored.spec_json, "previous", f"revision {stored.revision}")
                entries.append(HistoryEntry(stored, diff))
        return entries

    # Writes --------------------------------------------------------------------------------------

    def publish(
        self,
        spec: DeploymentSpec,
        *,
        author: str,
        message: str = "",
        dry_run: bool = False,
        expected_revision: int = 0,
    ) -> ChangeResult:
        return self._write(
            spec.name,
            canonical_json(spec),
            author=author,
            message=message,
            dry_run=dry_run,
            expected_revision=expected_revision,
            change_kind=CHANGE_KIND_PUBLISH,
            source_revision=None,
        )

    def rollback(
        self, deployment: str, to_revision: int, *, author: str, message: str = "", dry_run: bool = False
    ) -> ChangeResult:
        if to_revision <= 0:
            raise InvalidArgument("must be a positive revision", field="to_revision")
        with self._engine.connect() as connection:
            if self._current(connection, deployment) is None:
                raise NotFound(f"deployment '{deployment}' does not exist", field="deployment")
            row = connection.execute(
                sa.select(deployment_revisions).where(deployment_revisions.c.revision == to_revision)
            ).first()
        if row is None:
            raise NotFound(f"revision {to_revision} does not exist", field="to_revision")
        source = _row_to_revision(row)
        if source.deployment != deployment:
            raise InvalidArgument(
                f"revision {to_revision} belongs to deployment '{source.deployment}', not '{deployment}'",
                field="to_revision",
            )
        if source.deleted:
            raise InvalidArgument(
                f"revision {to_revision} is a deletion; pick a revision with a spec", field="to_revision"
            )
        return self._write(
            deployment,
            source.spec_json,
            author=author,
            message=message or f"rollback to revision {to_revision}",
            dry_run=dry_run,
            expected_revision=0,
            change_kind=CHANGE_KIND_ROLLBACK,
            source_revision=to_revision,
        )

    def delete(self, deployment: str, *, author: str, message: str = "") -> ChangeResult:
        return self._write(
            deployment,
            "",
            author=author,
            message=message,
            dry_run=False,
            expected_revision=0,
            change_kind=CHANGE_KIND_DELETE,
            source_revision=None,
        )

    def _write(
        self,
        deployment: str,
        spec_json: str,
        *,
        author: str,
        message: str,
        dry_run: bool,
        expected_revision: int,
        change_kind: str,
        source_revision: int | None,
    ) -> ChangeResult:
        checksum = spec_checksum(spec_json) if spec_json else ""
        with write_transaction(self._engine) as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_POSTGRES_PUBLISH_LOCK)))
            current = self._current(connection, deployment)
            live = current if current is not None and not current.deleted else None
            if change_kind == CHANGE_KIND_DELETE and live is None:
                raise NotFound(f"deployment '{deployment}' does not exist", field="deployment")
            if expected_revision and (live is None or live.revision != expected_revision):
                have = live.revision if live is not None else "none"
                raise FailedPrecondition(
                    f"deployment '{deployment}' is at revision {have}, not {expected_revision}",
                    field="expected_revision",
                )
            head = self._head(connection)
            old_json = live.spec_json if live is not None else ""
            if live is not None and live.checksum == checksum:
                return ChangeResult(
                    live.revision, deployment, "", changed=False, dry_run=dry_run, stored=None
                )
            revision = head + 1
            diff = spec_diff(
                old_json,
                spec_json,
                f"{deployment}@{live.revision}" if live is not None else "/dev/null",
                f"{deployment}@{revision}" if spec_json else "/dev/null",
            )
            if dry_run:
                return ChangeResult(revision, deployment, diff, changed=True, dry_run=True, stored=None)
            created_at = datetime.now(UTC)
            connection.execute(
                sa.insert(deployment_revisions).values(
                    revision=revision,
                    deployment=deployment,
                    spec=spec_json,
                    content_sha256=checksum,
                    author=author,
                    created_at=created_at,
                    change_kind=change_kind,
                    rolled_back_from=source_revision,
                    message=message,
                )
            )
            connection.execute(
                sa.insert(config_audit).values(
                    revision=revision,
                    actor=author,
                    action=change_kind,
                    detail=json.dumps({"deployment": deployment, "message": message}),
                    created_at=created_at,
                )
            )
        stored = StoredRevision(
            revision,
            deployment,
            spec_json,
            checksum,
            author,
            created_at,
            change_kind,
            message,
            source_revision,
        )
        return ChangeResult(revision, deployment, diff, changed=True, dry_run=False, stored=stored)

    def record_refusal(self, actor: str, action: str, detail: dict[str, str]) -> None:
        """Audit a refused change (bad spec, failed precondition): who tried what, and why."""
        with self._engine.begin() as connection:
            connection.execute(
                sa.insert(config_audit).values(
                    revision=None,
                    actor=actor,
                    action=action,
                    detail=json.dumps(detail),
                    created_at=datetime.now(UTC),
                )
            )
