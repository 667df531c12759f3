"""The raw decision log, kept for offline evaluation and drift: hourly Parquet partitions per
deployment, bounded by a retention in hours.

Layout: `<root>/<contacts|responses|shadows>/deployment=<name>/hour=<YYYYMMDDHH>/*.parquet` (shadow
decisions under the live deployment they shadowed). Each consumed
batch adds one `part-*.parquet` file per partition it touches (written to a temporary name and
renamed, so a reader never sees half a file); once a partition holds COMPACT_AFTER_FILES parts they
are merged into one `compact-*.parquet`. A batch that is retried after a failure may be written
twice, so readers and the compaction keep one row per stream entry id: the archive is at least
once on disk and exactly once as read.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
import uuid as uuid_module
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from libs.common.decision_log import Contact, Response
from services.monitor.core.rollup_store import StreamEntry

logger = logging.getLogger(__name__)

COMPACT_AFTER_FILES = 32
_HOUR_FORMAT = "%Y%m%d%H"

CONTACT_SCHEMA = pa.schema(
    [
        ("entry", pa.string()),
        ("uuid", pa.string()),
        ("time", pa.float64()),
        ("campaign", pa.string()),
        ("channel", pa.string()),
        ("revision", pa.int64()),
        ("variant", pa.string()),
        ("replica", pa.string()),
        ("generation", pa.string()),
        ("customer", pa.string()),
        ("segment", pa.string()),
        ("context", pa.string()),  # JSON object
        ("features", pa.string()),  # JSON object
        ("eligible", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())),  # logged rounded to 6 decimals: float32 keeps them
        ("epsilon", pa.float64()),
        ("outcomes", pa.int64()),
        ("counts", pa.list_(pa.int64())),
        ("shown", pa.list_(pa.string())),
        ("shown_scores", pa.list_(pa.float64())),
        ("shown_propensities", pa.list_(pa.float64())),
        ("shown_explored", pa.list_(pa.bool_())),
        ("shown_model_scores", pa.list_(pa.float64())),
        ("explore", pa.bool_()),
        ("model", pa.string()),
        ("latency_ms", pa.float64()),
        ("routed_by", pa.string()),  # null in files written before routing
        ("route_propensity", pa.float64()),
    ]
)

# Shadow decisions, under the live deployment they shadowed (`<root>/shadows/deployment=<live>/...`):
# a contact row of the shadow deployment (`shadow`), for the live contact `shadow_of`.
SHADOW_SCHEMA = pa.schema([*CONTACT_SCHEMA, ("shadow", pa.string()), ("shadow_of", pa.string())])

RESPONSE_SCHEMA = pa.schema(
    [
        ("entry", pa.string()),
        ("uuid", pa.string()),
        ("time", pa.float64()),
        ("accepted", pa.list_(pa.string())),
        ("new_offers", pa.list_(pa.string())),
        ("learned_offers", pa.list_(pa.string())),
        ("reward", pa.float64()),
        ("credited_reward", pa.float64()),
        ("channel", pa.string()),
        ("learned", pa.bool_()),
        ("late", pa.bool_()),
        ("duplicate", pa.bool_()),
        ("replica", pa.string()),
        ("contact_time", pa.float64()),
        ("segment", pa.string()),
        ("variant", pa.string()),
        ("revision", pa.int64()),
        ("latency_ms", pa.float64()),
    ]
)


_SCHEMAS = {"contacts": CONTACT_SCHEMA, "shadows": SHADOW_SCHEMA, "responses": RESPONSE_SCHEMA}


def _contact_row(entry_id: str, contact: Contact) -> dict[str, Any]:
    return {
        "entry": entry_id,
        "uuid": contact.uuid,
        "time": contact.time,
        "campaign": contact.campaign,
        "channel": contact.channel,
        "revision": contact.config_revision,
        "variant": contact.variant,
        "replica": contact.replica,
        "generation": contact.options_generation,
        "customer": contact.customer,
        "segment": contact.segment,
        "context": json.dumps(dict(contact.context), separators=(",", ":")),
        "features": json.dumps(dict(contact.features), separators=(",", ":")),
        "eligible": list(contact.eligible),
        "scores": list(contact.eligible_scores),
        "epsilon": contact.first_slot.epsilon,
        "outcomes": contact.first_slot.outcomes,
        "counts": list(contact.first_slot.counts),
        "shown": [row.offer for row in contact.shown],
        "shown_scores": [row.score for row in contact.shown],
        "shown_propensities": [row.propensity for row in contact.shown],
        "shown_explored": [row.explored for row in contact.shown],
        "shown_model_scores": [row.model_score for row in contact.shown],
        "explore": contact.explore,
        "model": contact.model,
        "latency_ms": contact.latency_ms,
        "routed_by": contact.routed_by,
        "route_propensity": contact.route_propensity,
    } | ({"shadow": contact.deployment, "shadow_of": contact.shadow_of} if contact.is_shadow else {})


def _response_row(entry_id: str, response: Response) -> dict[str, Any]:
    return {
        "entry": entry_id,
        "uuid": response.uuid,
        "time": response.time,
        "accepted": list(response.accepted),
        "new_offers": list(response.new_offers),
        "learned_offers": list(response.learned_offers),
        "reward": response.reward,
        "credited_reward": response.credited_reward,
        "channel": response.channel,
        "learned": response.learned,
        "late": response.late,
        "duplicate": response.duplicate,
        "replica": response.replica,
        "contact_time": response.contact_time,
        "segment": response.segment,
        "variant": response.variant,
        "revision": response.config_revision,
        "latency_ms": response.latency_ms,
    }


def hour_of(time_seconds: float) -> str:
    return datetime.fromtimestamp(time_seconds, UTC).strftime(_HOUR_FORMAT)


class DecisionArchive:
    def __init__(
        self, root: Path, retention_hours: int, compact_after_files: int = COMPACT_AFTER_FILES
    ) -> None:
        self._root = root
        self._retention_hours = retention_hours
        self._compact_after_files = compact_after_files

    @property
    def root(self) -> Path:
        return self._root

    @property
    def retention_seconds(self) -> float:
        return self._retention_hours * 3600.0

    # -- writing ---------------------------------------------------------------------------------

    def write(self, entries: Sequence[StreamEntry]) -> list[Path]:
        """One file per partition the entries fall in; returns the partitions written."""
        groups: dict[Path, list[dict[str, Any]]] = defaultdict(list)
        for entry in entries:
            record = entry.record
            if isinstance(record, Contact) and record.is_shadow:
                groups[self._partition("shadows", record.live_deployment, record.time)].append(
                    _contact_row(str(entry.id), record)
                )
            elif isinstance(record, Contact):
                groups[self._partition("contacts", record.deployment, record.time)].append(
                    _contact_row(str(entry.id), record)
                )
            else:
                groups[self._partition("responses", record.deployment, record.time)].append(
                    _response_row(str(entry.id), record)
                )
        written = []
        for partition, rows in groups.items():
            schema = _SCHEMAS[partition.parent.parent.name]
            table = pa.Table.from_pylist(rows, schema=schema)
            _write_atomically(
                table, partition, f"part-{rows[0]['entry']}-{uuid_module.uuid4().hex[:8]}.parquet"
            )
            written.append(partition)
        for partition in written:
            if sum(1 for _ in partition.glob("part-*.parquet")) >= self._compact_after_files:
                self.compact(partition)
        return written

    def compact(self, partition: Path) -> bool:
        """Merge a partition's files into one, one row per entry; False when another process is at it."""
        with _partition_lock(partition) as locked:
            if not locked:
                return False
            files = sorted(partition.glob("*.parquet"))
            if len(files) < 2:
                return True
            schema = _SCHEMAS[partition.parent.parent.name]
            table = _deduplicated(pa.concat_tables(_conformed(pq.read_table(path), schema) for path in files))
            last = table.column("entry")[-1].as_py() if table.num_rows else "0-0"
            _write_atomically(table, partition, f"compact-{last}-{uuid_module.uuid4().hex[:8]}.parquet")
            for path in files:
                path.unlink(missing_ok=True)
            return True

    def prune(self, now: float | None = None) -> int:
        """Remove the partitions older than the retention; returns how many."""
        cutoff = datetime.fromtimestamp(now if now is not None else time.time(), UTC) - timedelta(
            hours=self._retention_hours
        )
        removed = 0
        for partition in self._root.glob("*/deployment=*/hour=*"):
            try:
                hour = datetime.strptime(partition.name.removeprefix("hour="), _HOUR_FORMAT).replace(
                    tzinfo=UTC
                )
            except ValueError:
                continue
            if hour + timedelta(hours=1) <= cutoff:
                shutil.rmtree(partition, ignore_errors=True)
                removed += 1
        return removed

    # -- reading ---------------------------------------------------------------------------------

    def contacts(
        self, deployment: str, start: float, end: float, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Contacts of a deployment served in [start, end), one row per entry, in time order."""
        return self._read("contacts", CONTACT_SCHEMA, deployment, start, end, columns)

    def shadows(self, deployment: str, start: float, end: float) -> pa.Table:
        """Shadow decisions computed for a deployment's contacts in [start, end), in time order."""
        return self._read("shadows", SHADOW_SCHEMA, deployment, start, end, None)

    def responses(self, deployment: str, start: float, end: float) -> pa.Table:
        """Responses logged in [start, end), one row per entry, in time order."""
        return self._read("responses", RESPONSE_SCHEMA, deployment, start, end, None)

    def disk_bytes(self) -> int:
        return sum(path.stat().st_size for path in self._root.rglob("*.parquet"))

    def _read(
        self,
        kind: str,
        schema: pa.Schema,
        deployment: str,
        start: float,
        end: float,
        columns: Sequence[str] | None,
    ) -> pa.Table:
        wanted = None if columns is None else list(dict.fromkeys(["entry", "time", *columns]))
        tables: list[pa.Table] = []
        hour = datetime.fromtimestamp(start, UTC).replace(minute=0, second=0, microsecond=0)
        last = datetime.fromtimestamp(end, UTC)
        while hour <= last:
            partition = (
                self._root
                / kind
                / f"deployment={quote(deployment, safe='')}"
                / f"hour={hour.strftime(_HOUR_FORMAT)}"
            )
            target = schema if wanted is None else pa.schema([schema.field(name) for name in wanted])
            tables.extend(_conformed(table, target) for table in _read_partition(partition, wanted))
            hour += timedelta(hours=1)
        if not tables:
            empty_schema = schema if wanted is None else pa.schema([schema.field(name) for name in wanted])
            return empty_schema.empty_table()
        table = _deduplicated(pa.concat_tables(tables))
        times = table.column("time").to_numpy()
        keep = np.flatnonzero((times >= start) & (times < end))
        table = table.take(keep)
        return table.take(np.argsort(table.column("time").to_numpy(), kind="stable"))

    def _partition(self, kind: str, deployment: str, time_seconds: float) -> Path:
        return (
            self._root / kind / f"deployment={quote(deployment, safe='')}" / f"hour={hour_of(time_seconds)}"
        )


def _read_partition(partition: Path, columns: list[str] | None) -> list[pa.Table]:
    # A compaction may remove files between listing and reading: list again (a few times at most).
    for _attempt in range(5):
        try:
            return [pq.read_table(path, columns=columns) for path in sorted(partition.glob("*.parquet"))]
        except FileNotFoundError:
            continue
    raise RuntimeError(f"{partition} keeps changing while it is read")


def _conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A file written under an earlier version of the schema, as the current one: columns it lacks
    are null, types are cast (e.g. float64 scores to float32)."""
    if table.schema.equals(schema):
        return table
    columns = [
        table.column(field.name).cast(field.type, safe=False)
        if field.name in table.column_names
        else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _deduplicated(table: pa.Table) -> pa.Table:
    entries = table.column("entry").to_numpy(zero_copy_only=False)
    _unique, first = np.unique(entries, return_index=True)
    if len(first) == table.num_rows:
        return table
    return table.take(np.sort(first))


def _write_atomically(table: pa.Table, partition: Path, name: str) -> Path:
    partition.mkdir(parents=True, exist_ok=True)
    final = partition / name
    temporary = partition / f".{name}.tmp"
    pq.write_table(table, temporary, compression="zstd")
    temporary.replace(final)
    return final


@contextmanager
def _partition_lock(partition: Path) -> Iterator[bool]:
    partition.mkdir(parents=True, exist_ok=True)
    with open(partition / ".compaction.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
