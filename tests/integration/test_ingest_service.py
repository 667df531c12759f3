"""The ingest service end to end, over SQLite and PostgreSQL, with a real Redis.

An in-process ingest server (the same `build_server` its `__main__` runs, auth on, port 0) talks to
an in-process config service (for GenerateOptions), a fresh database per test and the session's
redis-server. Every bad input of the issue is sent through the RPCs; after each one the test checks
that nothing was committed (catalog, row counts, no staging table left behind) and that the service
still serves. Then: append and replace, loading the same file twice, schema overrides, JSON lines,
Parquet, SQL sources (SQLite and PostgreSQL, and queries that fail half way), Upload, materialization
(full and incremental), online reads, options generation (generate, then update keeping what was
learned), a public scikit-learn data set through the whole pipeline, and the generated 1M-row file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
import sqlalchemy as sa
import yaml
from google.protobuf import json_format
from grpc import aio

from bench.ingest_throughput import write_customer_csv
from libs.common import redis_keys
from libs.common.client import open_channel
from libs.common.database import create_database_engine
from libs.common.deployment_spec import deployment_spec_from_mapping
from libs.common.server import RunningServer
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.ingest.core import online_store
from tests.conftest import ApiKeys
from tests.grpc.conftest import SERVICES_UNDER_TEST, health_status, target

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_SPEC = REPO / "examples" / "deployments" / "telco-offers.yaml"
SAMPLE_DATA = REPO / "examples" / "data"
INGEST_SERVICE = "liveloop.ingest.v1.IngestService"
CUSTOMERS = "customer,age,gender,trips_per_year\nc1,30,female,2\nc2,45,male,0\nc3,61,female,5\n"


def unique(prefix: str) -> str:
    """Names that never meet another test's keys in the shared Redis."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@dataclass
class IngestStack:
    server: RunningServer
    config: RunningServer
    stub: ingest_pb2_grpc.IngestServiceStub
    engine: sa.Engine
    redis: redis.Redis
    deployment: str
    data: Path

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.data / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    async def ingest(
        self,
        path: Path | str,
        table: str,
        *,
        key: Sequence[str] = (),
        mode: int = ingest_pb2.WRITE_MODE_APPEND,
        max_rows: int = 0,
        overrides: dict[str, int] | None = None,
        event_time: str = "",
        file_format: int = ingest_pb2.FILE_FORMAT_UNSPECIFIED,
    ) -> list[ingest_pb2.IngestProgress]:
        request = ingest_pb2.IngestRequest(
            file=ingest_pb2.FileSource(path=str(path), format=file_format),
            target=load_target(
                table, key=key, mode=mode, max_rows=max_rows, overrides=overrides, event_time=event_time
            ),
        )
        return [message async for message in self.stub.Ingest(request)]

    async def ingest_sql(
        self, url: str, query: str, table: str, *, key: Sequence[str] = (), chunk_rows: int = 0
    ) -> list[ingest_pb2.IngestProgress]:
        request = ingest_pb2.IngestRequest(
            sql=ingest_pb2.SqlSource(url=url, query=query),
            target=load_target(table, key=key),
            chunk_rows=chunk_rows,
        )
        return [message async for message in self.stub.Ingest(request)]

    def rows(self, table: str) -> int:
        with self.engine.connect() as connection:
            return int(connection.scalar(sa.select(sa.func.count()).select_from(sa.table(table))) or 0)

    async def state(self) -> dict[str, Any]:
        """Everything a failed load must leave as it was."""
        listed = await self.stub.ListTables(ingest_pb2.ListTablesRequest())
        physical = sorted(sa.inspect(self.engine).get_table_names())
        with self.engine.connect() as connection:
            loads = connection.execute(
                sa.text("SELECT table_name, fingerprint FROM ll_loads ORDER BY id")
            ).all()
        return {
            "catalog": [
                (t.name, t.row_count, t.fingerprint, t.column_count, list(t.key)) for t in listed.tables
            ],
            "tables": physical,
            "rows": {t.name: self.rows(t.name) for t in listed.tables},
            "loads": [tuple(row) for row in loads],
        }

    async def serving(self) -> bool:
        await self.stub.ListTables(ingest_pb2.ListTablesRequest())
        return await health_status(self.server, INGEST_SERVICE) == "SERVING"


def load_target(
    table: str,
    *,
    key: Sequence[str] = (),
    mode: int = ingest_pb2.WRITE_MODE_APPEND,
    max_rows: int = 0,
    overrides: dict[str, int] | None = None,
    event_time: str = "",
) -> ingest_pb2.LoadTarget:
    return ingest_pb2.LoadTarget(
        table=table,
        key=list(key),
        mode=mode,
        schema_overrides=overrides or {},
        reject_budget=ingest_pb2.RejectBudget(max_rows=max_rows),
        event_time_column=event_time,
    )


def summary_of(messages: list[ingest_pb2.IngestProgress]) -> ingest_pb2.LoadSummary:
    assert messages, "no progress at all"
    assert messages[-1].HasField("summary"), messages
    return messages[-1].summary


def rejects_of(messages: list[ingest_pb2.IngestProgress]) -> list[tuple[int, str, str]]:
    return [(r.row_number, r.column, r.reason) for m in messages for r in m.rejects]


async def failure(awaitable: Any) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await awaitable
    return caught.value


def spec_document(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE_SPEC.read_text())
    document["name"] = name
    document["campaigns"] = [name]
    return document


@pytest.fixture
async def stack(
    database_url: str, redis_url: str, api_keys: ApiKeys, tmp_path: Path
) -> AsyncIterator[IngestStack]:
    config = await SERVICES_UNDER_TEST["config"].build(
        SERVICES_UNDER_TEST["config"].settings(tmp_path, api_keys, None)
    )
    deployment = unique("telco").replace("_", "-")
    channels: list[aio.Channel] = []
    ingest: RunningServer | None = None
    engine = create_database_engine(database_url)
    client = redis.Redis.from_url(redis_url)
    try:
        admin = open_channel(target(config), api_key=api_keys.admin)
        channels.append(admin)
        await config_pb2_grpc.ConfigServiceStub(admin).Publish(
            config_pb2.PublishRequest(spec_text=json.dumps(spec_document(deployment)))
        )
        ingest = await SERVICES_UNDER_TEST["ingest"].build(
            SERVICES_UNDER_TEST["ingest"].settings(
                tmp_path,
                api_keys,
                redis_url,
                database_url=database_url,
                config_target=target(config),
                config_api_key=api_keys.service,
                upload_dir=tmp_path / "uploads",
                chunk_rows=1000,
            )
        )
        channel = open_channel(target(ingest), api_key=api_keys.admin, deadline_seconds=120)
        channels.append(channel)
        data = tmp_path / "data"
        data.mkdir()
        yield IngestStack(
            ingest, config, ingest_pb2_grpc.IngestServiceStub(channel), engine, client, deployment, data
        )
    finally:
        for open_ in channels:
            await open_.close()
        if ingest is not None:
            await ingest.stop()
        await config.stop()
        engine.dispose()
        client.close()


# Bad input -----------------------------------------------------------------------------------

# (what, file content, key, code, words the message must hold): appended to a loaded `customers`.
BAD_FILES: list[tuple[str, bytes, tuple[str, ...], grpc.StatusCode, str]] = [
    (
        "a wrong type",
        b"customer,age,gender,trips_per_year\nc7,thirty,male,1\n",
        ("customer",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "row 1 age: 'thirty' is not a whole number",
    ),
    (
        "a missing key column",
        b"age,gender,trips_per_year\n30,male,1\n",
        ("customer",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "key column 'customer' is missing",
    ),
    (
        "a ragged row",
        b"customer,age,gender,trips_per_year\nc7,30,male,1\nc8,31\n",
        ("customer",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "row 2 : expected 4 fields, found 2",
    ),
    (
        "bytes that are not UTF-8",
        b"customer,age,gender,trips_per_year\nc7,30,caf\xe9,1\n",
        ("customer",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not UTF-8",
    ),
    ("an empty file", b"", ("customer",), grpc.StatusCode.INVALID_ARGUMENT, "is empty"),
    (
        "a header and no rows",
        b"customer,age,gender,trips_per_year\n",
        ("customer",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no rows",
    ),
    (
        "duplicate keys in the file",
        b"customer,age,gender,trips_per_year\nc7,30,male,1\nc7,31,male,1\n",
        ("customer",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "duplicate key customer='c7'",
    ),
    (
        "a key the table holds",
        b"customer,age,gender,trips_per_year\nc1,30,male,1\n",
        ("customer",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "duplicate key customer='c1'",
    ),
    (
        "an empty key",
        b"customer,age,gender,trips_per_year\n ,30,male,1\n",
        ("customer",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the key is empty",
    ),
    (
        "a hostile column name",
        b'customer,"age; DROP TABLE customers",gender,trips_per_year\nc7,1,male,1\n',
        ("customer",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a valid name",
    ),
    (
        "a reserved column name",
        b"customer,ll_age,gender,trips_per_year\nc7,1,male,1\n",
        ("customer",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "reserved prefix",
    ),
    (
        "repeated column names",
        b"customer,age,AGE,trips_per_year\nc7,1,2,1\n",
        ("customer",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "repeat",
    ),
    (
        "another schema",
        b"customer,age,gender\nc7,1,male\n",
        ("customer",),
        grpc.StatusCode.FAILED_PRECONDITION,
        "same names in the same order",
    ),
    (
        "another key",
        b"customer,age,gender,trips_per_year\nc7,1,male,1\n",
        ("age",),
        grpc.StatusCode.FAILED_PRECONDITION,
        "has key ['customer']",
    ),
]
HOSTILE_TABLES = ["customers; DROP TABLE customers", 'x"y', "ll_tables", "1st", "a" * 64, "tables--", "ça"]


async def test_bad_input_is_refused_and_nothing_is_committed(stack: IngestStack) -> None:
    await stack.ingest(stack.write("customers.csv", CUSTOMERS), "customers", key=["customer"])
    before = await stack.state()
    assert before["rows"] == {"customers": 3}

    for what, content, key, code, words in BAD_FILES:
        path = stack.write(f"bad-{len(content)}-{uuid.uuid4().hex[:6]}.csv", content)
        error = await failure(stack.ingest(path, "customers", key=key))
        assert error.code() == code, (what, error.details())
        assert words in (error.details() or ""), (what, error.details())
        assert await stack.state() == before, what
        assert await stack.serving(), what

    for name in HOSTILE_TABLES:
        error = await failure(stack.ingest(stack.write("ok.csv", CUSTOMERS), name, key=["customer"]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "target.table" in (error.details() or ""), name
    error = await failure(stack.ingest(stack.data / "missing.csv", "customers"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not exist" in (error.details() or "")
    error = await failure(stack.ingest(stack.data, "customers"))
    assert "is not a file" in (error.details() or "")
    for bad_target in (
        ingest_pb2.LoadTarget(),
        ingest_pb2.LoadTarget(table="t", reject_budget=ingest_pb2.RejectBudget(max_rows=-1)),
    ):
        request = ingest_pb2.IngestRequest(
            file=ingest_pb2.FileSource(path=str(stack.data / "ok.csv")), target=bad_target
        )
        error = await failure(_drain(stack.stub.Ingest(request)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await stack.state() == before
    assert not [t for t in before["tables"] if t.startswith("ll_staging")]
    assert await stack.serving()


async def _drain(call: Any) -> list[Any]:
    return [message async for message in call]


async def test_rejects_within_the_budget_are_reported_by_row(stack: IngestStack) -> None:
    content = (
        "customer,age,gender,trips_per_year\n"
        "c1,30,female,2\n"
        "c2,forty,male,0\n"  # row 2: wrong type
        "c3,61,female\n"  # row 3: ragged
        "c1,50,male,1\n"  # row 4: duplicate key
        ",22,male,1\n"  # row 5: no key
        "c6,22,male,1\n"
    )
    messages = await stack.ingest(
        stack.write("c.csv", content),
        "people",
        key=["customer"],
        max_rows=4,
        overrides={"age": ingest_pb2.COLUMN_TYPE_INT64},
    )
    summary = summary_of(messages)
    assert (summary.rows_read, summary.rows_written, summary.rows_rejected, summary.table_rows) == (
        6,
        2,
        4,
        2,
    )
    assert sorted(rejects_of(messages)) == [
        (2, "age", "'forty' is not a whole number"),
        (3, "", "expected 4 fields, found 3"),
        (4, "customer", "duplicate key customer='c1'"),
        (5, "customer", "the key is empty"),
    ]
    # One more reject than the budget: nothing of the file is written.
    error = await failure(
        stack.ingest(
            stack.write("d.csv", content),
            "people2",
            key=["customer"],
            max_rows=3,
            overrides={"age": ingest_pb2.COLUMN_TYPE_INT64},
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4 rows rejected, over the budget of 3 rows; nothing was written" in (error.details() or "")
    assert "people2" not in sa.inspect(stack.engine).get_table_names()


async def test_row_numbers_and_duplicates_across_chunks(stack: IngestStack) -> None:
    """A file of several reader blocks: rejects keep their row numbers, duplicates are found
    against rows written by earlier chunks, and over the budget nothing is written."""
    lines = ["id,value"]
    for row in range(1, 150_001):
        if row == 100_000:
            lines.append("100000")  # ragged
        elif row == 120_000:
            lines.append("5,dup")  # duplicates row 5, written two chunks earlier
        elif row == 130_000:
            lines.append("130000,caf\udce9")  # not UTF-8 (written below as the raw byte)
        else:
            lines.append(f"{row},value-{row}")
    content = ("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape")
    assert len(content) > 2 * (1 << 20)  # more than one block of the CSV reader
    path = stack.write("long.csv", content)
    messages = await stack.ingest(path, "long", key=["id"], max_rows=3)
    summary = summary_of(messages)
    assert (summary.rows_read, summary.rows_written, summary.rows_rejected) == (150_000, 149_997, 3)
    assert [(row, column) for row, column, _ in sorted(rejects_of(messages))] == [
        (100_000, ""),
        (120_000, "id"),
        (130_000, "value"),
    ]
    assert stack.rows("long") == 149_997
    with stack.engine.connect() as connection:
        assert (
            connection.execute(sa.text("SELECT value FROM long WHERE id = 149999")).scalar() == "value-149999"
        )
    error = await failure(stack.ingest(path, "long_strict", key=["id"], max_rows=2))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "long_strict" not in sa.inspect(stack.engine).get_table_names()


# Append, replace, loading twice, schema ------------------------------------------------------


async def test_append_replace_and_the_same_source_twice(stack: IngestStack) -> None:
    first = stack.write("first.csv", CUSTOMERS)
    more = stack.write("more.csv", "customer,age,gender,trips_per_year\nc4,25,male,1\nc5,33,female,0\n")
    assert summary_of(await stack.ingest(first, "customers", key=["customer"])).table_rows == 3
    again = summary_of(await stack.ingest(first, "customers", key=["customer"]))
    assert (again.rows_read, again.rows_written, again.table_rows) == (0, 0, 3)  # already loaded
    same_bytes = stack.write("copy-of-first.csv", CUSTOMERS)  # the content decides, not the name
    assert summary_of(await stack.ingest(same_bytes, "customers", key=["customer"])).rows_written == 0
    assert summary_of(await stack.ingest(more, "customers", key=["customer"])).table_rows == 5
    assert stack.rows("customers") == 5

    replaced = summary_of(
        await stack.ingest(first, "customers", key=["customer"], mode=ingest_pb2.WRITE_MODE_REPLACE)
    )
    assert (replaced.rows_written, replaced.table_rows) == (3, 3)
    # After a replace, what the earlier append wrote is gone: loading it again writes it again.
    assert summary_of(await stack.ingest(more, "customers", key=["customer"])).table_rows == 5
    # Replacing with the same content the table holds writes nothing.
    replaced_again = summary_of(
        await stack.ingest(more, "customers", key=["customer"], mode=ingest_pb2.WRITE_MODE_REPLACE)
    )
    assert replaced_again.table_rows == 2
    assert (
        summary_of(
            await stack.ingest(more, "customers", key=["customer"], mode=ingest_pb2.WRITE_MODE_REPLACE)
        ).rows_written
        == 0
    )
    # Replace changes the schema; append then converts to the table's own types.
    wider = stack.write("wider.csv", "customer,age,gender,trips_per_year,score\nc9,40,male,1,0.5\n")
    summary = summary_of(
        await stack.ingest(wider, "customers", key=["customer"], mode=ingest_pb2.WRITE_MODE_REPLACE)
    )
    assert [c.name for c in summary.columns][-1] == "score"
    whole = stack.write("whole.csv", "customer,age,gender,trips_per_year,score\nc10,41,female,2,3\n")
    summary = summary_of(await stack.ingest(whole, "customers", key=["customer"]))
    assert {c.name: c.type for c in summary.columns}["score"] == ingest_pb2.COLUMN_TYPE_FLOAT64
    assert summary.table_rows == 2
    assert not [t for t in sa.inspect(stack.engine).get_table_names() if t.startswith("ll_staging")]


async def test_types_are_inferred_and_overridden(stack: IngestStack) -> None:
    content = (
        "customer,age,score,vip,seen_at,born,code,note\n"
        "c1,30,1.5,true,2024-03-01T10:00:00Z,1990-01-02,007,hello\n"
        "c2,45,2,false,2024-03-02 11:30:00,1980-05-06,010,\n"
    )
    path = stack.write("typed.csv", content)
    summary = summary_of(await stack.ingest(path, "typed", key=["customer"]))
    inferred = {c.name: c.type for c in summary.columns}
    assert inferred == {
        "customer": ingest_pb2.COLUMN_TYPE_STRING,
        "age": ingest_pb2.COLUMN_TYPE_INT64,
        "score": ingest_pb2.COLUMN_TYPE_FLOAT64,
        "vip": ingest_pb2.COLUMN_TYPE_BOOL,
        "seen_at": ingest_pb2.COLUMN_TYPE_TIMESTAMP,
        "born": ingest_pb2.COLUMN_TYPE_DATE,
        "code": ingest_pb2.COLUMN_TYPE_INT64,
        "note": ingest_pb2.COLUMN_TYPE_STRING,
    }
    overrides = {
        "code": ingest_pb2.COLUMN_TYPE_STRING,  # keeps the leading zeros
        "born": ingest_pb2.COLUMN_TYPE_STRING,
        "age": ingest_pb2.COLUMN_TYPE_FLOAT64,
    }
    summary = summary_of(
        await stack.ingest(path, "typed2", key=["customer"], overrides=overrides, event_time="seen_at")
    )
    assert {c.name: c.type for c in summary.columns} == inferred | overrides
    described = await stack.stub.Describe(ingest_pb2.DescribeRequest(table="typed2", top_values=2))
    assert described.table.event_time_column == "seen_at"
    stats = {s.column: s for s in described.stats}
    assert (stats["age"].min, stats["age"].max, stats["age"].mean) == (30.0, 45.0, 37.5)
    assert {v.value for v in stats["code"].top_values} == {"007", "010"}
    assert (stats["vip"].min_text, stats["vip"].max_text) == ("false", "true")
    assert stats["born"].min_text == "1980-05-06"  # as text now
    assert stats["note"].null_count == 0
    assert stats["note"].count == 2
    assert stats["seen_at"].min_text.startswith("2024-03-01 10:00:00")
    error = await failure(stack.ingest(path, "typed3", overrides={"nope": ingest_pb2.COLUMN_TYPE_STRING}))
    assert "schema_overrides" in (error.details() or "")

    # ReadRows (a corpus): every row in key order, times as text; a table over the limit is refused.
    read = await stack.stub.ReadRows(ingest_pb2.ReadRowsRequest(table="typed2"))
    assert read.table.fingerprint == described.table.fingerprint
    rows = [json_format.MessageToDict(row) for row in read.rows]
    assert [row["customer"] for row in rows] == ["c1", "c2"]
    assert (rows[0]["age"], rows[0]["code"], rows[0]["vip"], rows[1]["note"]) == (30.0, "007", True, "")
    assert rows[0]["seen_at"].startswith("2024-03-01T10:00:00")
    refused = await failure(stack.stub.ReadRows(ingest_pb2.ReadRowsRequest(table="typed2", limit=1)))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'typed2' holds 2 rows; at most 1" in (refused.details() or "")
    missing = await failure(stack.stub.ReadRows(ingest_pb2.ReadRowsRequest(table="nope")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert {c.name: c.type for c in read.columns}["age"] == ingest_pb2.COLUMN_TYPE_FLOAT64
    big = stack.write("big.csv", "id,count\n9007199254740993,5\n12,7\n")
    await stack.ingest(big, "big_ids", key=["id"])
    read = await stack.stub.ReadRows(ingest_pb2.ReadRowsRequest(table="big_ids"))
    # A double cannot hold 2^53 + 1: it comes as text, the small one as a number.
    assert [json_format.MessageToDict(row)["id"] for row in read.rows] == [12.0, "9007199254740993"]


# JSON lines, Parquet, SQL --------------------------------------------------------------------


async def test_json_lines_and_parquet(stack: IngestStack) -> None:
    lines = [
        {"customer": "c1", "age": 30, "tags": ["a", "b"], "vip": True},
        "not json",
        {"customer": "c2", "age": 41, "tags": [], "vip": False},
        {"customer": "c3", "age": 52, "tags": None, "vip": None, "extra": 1},
        {"customer": "c4", "age": "old", "vip": True},
    ]
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n"
    messages = await stack.ingest(
        stack.write("people.jsonl", text),
        "people",
        key=["customer"],
        max_rows=3,
        overrides={"tags": ingest_pb2.COLUMN_TYPE_JSON, "age": ingest_pb2.COLUMN_TYPE_INT64},
    )
    summary = summary_of(messages)
    assert (summary.rows_written, summary.rows_rejected) == (2, 3)
    assert sorted((row, column) for row, column, _ in rejects_of(messages)) == [
        (2, ""),
        (4, "extra"),
        (5, "age"),
    ]
    types = {c.name: c.type for c in summary.columns}
    assert types["vip"] == ingest_pb2.COLUMN_TYPE_BOOL
    assert types["tags"] == ingest_pb2.COLUMN_TYPE_JSON

    table = pa.table(
        {
            "customer": pa.array([f"p{i}" for i in range(2500)]),
            "amount": pa.array(np.linspace(0, 1, 2500)),
            "count": pa.array(np.arange(2500, dtype=np.int32)),
            "at": pa.array(np.arange(2500, dtype="int64") * 1_000_000, pa.timestamp("us")),
            "flag": pa.array([i % 3 == 0 for i in range(2500)]),
        }
    )
    path = stack.data / "amounts.parquet"
    pq.write_table(table, path, row_group_size=700)
    summary = summary_of(await stack.ingest(path, "amounts", key=["customer"], event_time="at"))
    assert (summary.rows_written, summary.table_rows) == (2500, 2500)
    assert [c.type for c in summary.columns] == [
        ingest_pb2.COLUMN_TYPE_STRING,
        ingest_pb2.COLUMN_TYPE_FLOAT64,
        ingest_pb2.COLUMN_TYPE_INT64,
        ingest_pb2.COLUMN_TYPE_TIMESTAMP,
        ingest_pb2.COLUMN_TYPE_BOOL,
    ]
    stats = {
        s.column: s for s in (await stack.stub.Describe(ingest_pb2.DescribeRequest(table="amounts"))).stats
    }
    assert stats["count"].max == 2499
    assert abs(stats["amount"].mean - 0.5) < 1e-9
    not_parquet = stack.write("broken.parquet", b"PAR1 but not really")
    error = await failure(stack.ingest(not_parquet, "broken"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a Parquet file" in (error.details() or "")


def _sqlite_source(path: Path, rows: int) -> str:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, amount REAL)")
        connection.executemany(
            "INSERT INTO orders VALUES (?, ?, ?)", [(i, f"c{i % 97}", i * 0.25) for i in range(1, rows + 1)]
        )
    return f"sqlite:///{path}"


async def test_sql_source_from_a_sqlite_file_and_one_that_fails_half_way(stack: IngestStack) -> None:
    url = _sqlite_source(stack.data / "source.db", 5000)
    messages = await stack.ingest_sql(
        url, "SELECT id, customer, amount FROM orders ORDER BY id", "orders", key=["id"], chunk_rows=1000
    )
    summary = summary_of(messages)
    assert (summary.rows_written, summary.table_rows) == (5000, 5000)
    assert len(messages) > 2  # progress while streaming
    again = summary_of(
        await stack.ingest_sql(
            url, "SELECT id, customer, amount FROM orders ORDER BY id", "orders", key=["id"]
        )
    )
    assert (again.rows_written, again.table_rows) == (0, 5000)  # same result: nothing written twice
    before = await stack.state()

    # Row 2500 overflows abs(): SQLite raises only when it computes that row, after 2 chunks went in.
    failing = "SELECT id, CASE WHEN id = 2500 THEN abs(-9223372036854775807 - 1) ELSE amount END AS amount FROM orders ORDER BY id"
    error = await failure(stack.ingest_sql(url, failing, "failing", key=["id"], chunk_rows=1000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the query failed after 2000 rows" in (error.details() or "")
    assert "overflow" in (error.details() or "")
    assert await stack.state() == before
    for bad_query, words in (
        ("SELECT nope FROM orders", "no such column"),
        ("", "must be a query"),
        ("SELECT 1 WHERE 0", "no rows"),
    ):
        error = await failure(stack.ingest_sql(url, bad_query, "failing"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad_query
        assert words in (error.details() or ""), bad_query
    error = await failure(stack.ingest_sql("mysql+nodriver://x/y", "SELECT 1", "failing"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await stack.state() == before
    assert await stack.serving()


async def test_sql_source_from_postgresql_and_a_division_by_zero_late(
    stack: IngestStack, postgresql_database_url: str
) -> None:
    messages = await stack.ingest_sql(
        postgresql_database_url,
        "SELECT n AS id, 'c' || (n % 50) AS customer, n * 0.5 AS amount, now() AS at FROM generate_series(1, 4000) AS n",
        "pg_orders",
        key=["id"],
        chunk_rows=500,
    )
    summary = summary_of(messages)
    assert (summary.rows_written, summary.table_rows) == (4000, 4000)
    types = {c.name: c.type for c in summary.columns}
    assert types == {
        "id": ingest_pb2.COLUMN_TYPE_INT64,
        "customer": ingest_pb2.COLUMN_TYPE_STRING,
        "amount": ingest_pb2.COLUMN_TYPE_FLOAT64,
        "at": ingest_pb2.COLUMN_TYPE_TIMESTAMP,
    }
    before = await stack.state()
    error = await failure(
        stack.ingest_sql(
            postgresql_database_url,
            "SELECT n AS id, 100 / (3000 - n) AS ratio FROM generate_series(1, 5000) AS n",
            "pg_failing",
            key=["id"],
            chunk_rows=500,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "division by zero" in (error.details() or "")
    assert await stack.state() == before
    assert await stack.serving()


# Upload --------------------------------------------------------------------------------------


async def _upload(
    stack: IngestStack,
    content: bytes,
    table: str,
    *,
    chunk: int = 7,
    sha256: str | None = None,
    size: int | None = None,
    header: bool = True,
    filename: str = "upload.csv",
) -> ingest_pb2.UploadResponse:
    async def requests() -> AsyncIterator[ingest_pb2.UploadRequest]:
        if header:
            yield ingest_pb2.UploadRequest(
                header=ingest_pb2.UploadHeader(
                    filename=filename,
                    target=load_target(table, key=["customer"]),
                    sha256=hashlib.sha256(content).hexdigest() if sha256 is None else sha256,
                    size_bytes=len(content) if size is None else size,
                )
            )
        for offset in range(0, len(content), chunk):
            yield ingest_pb2.UploadRequest(chunk=content[offset : offset + chunk])

    response: ingest_pb2.UploadResponse = await stack.stub.Upload(requests())
    return response


async def test_upload_in_chunks_and_its_bad_input(stack: IngestStack) -> None:
    content = CUSTOMERS.encode()
    response = await _upload(stack, content, "uploaded")
    assert response.bytes_received == len(content)
    assert (response.summary.rows_written, response.summary.table_rows) == (3, 3)
    # The same bytes by path: already loaded.
    assert (
        summary_of(
            await stack.ingest(stack.write("same.csv", content), "uploaded", key=["customer"])
        ).rows_written
        == 0
    )
    before = await stack.state()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"content": b""}, "zero bytes"),
        ({"content": content, "sha256": "0" * 64}, "do not match"),
        ({"content": content, "size": len(content) + 1}, "header says"),
        # One message: the server refuses the stream at its first, and a client still writing more
        # chunks then sees grpc's INTERNAL "Internal error from Core" instead of the refusal.
        (
            {"content": content, "header": False, "chunk": len(content)},
            "the first message must be the header",
        ),
        ({"content": b"customer,age,gender,trips_per_year\nc9,1,male,1\nc9,2,male,1\n"}, "duplicate key"),
        ({"content": b"\x00\x01not a parquet", "filename": "x.parquet"}, "not a Parquet file"),
    ]
    for arguments, words in cases:
        error = await failure(_upload(stack, table="uploaded", **{"content": b"", **arguments}))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, words
        assert words in (error.details() or ""), (words, error.details())
        assert await stack.state() == before
    error = await failure(_upload(stack, content, "bad table"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not list((stack.data.parent / "uploads").iterdir())  # staged uploads are removed
    assert await stack.serving()


# Online store --------------------------------------------------------------------------------


async def _materialize(
    stack: IngestStack, *views: str, full: bool = False
) -> list[ingest_pb2.MaterializeProgress]:
    request = ingest_pb2.MaterializeRequest(feature_views=list(views), full=full)
    return [message async for message in stack.stub.Materialize(request)]


def _written(messages: list[ingest_pb2.MaterializeProgress]) -> dict[str, int]:
    return {m.feature_view: m.entities_written for m in messages if m.done}


async def test_materialize_full_and_incremental_and_online_reads(stack: IngestStack) -> None:
    view = unique("profiles")
    first = "customer,age,gender,trips_per_year,updated_at\n" + "".join(
        f"c{i},{20 + i},{'female' if i % 2 else 'male'},{i % 4},2024-01-01T00:00:{i:02d}Z\n"
        for i in range(1, 51)
    )
    await stack.ingest(stack.write("p1.csv", first), view, key=["customer"], event_time="updated_at")
    assert _written(await _materialize(stack, view, full=True)) == {view: 50}
    stamps = {
        i: stack.redis.hget(redis_keys.online_features(view, f"c{i}"), "_updated_at") for i in range(1, 51)
    }
    assert stack.redis.hgetall(redis_keys.online_features(view, "c7"))[b"age"] == b"27"

    # A new version of the table where two customers changed (newer event time): only they are rewritten.
    changed = first.replace(
        "c7,27,female,3,2024-01-01T00:00:07Z", "c7,28,female,3,2024-02-01T00:00:00Z"
    ).replace("c9,29,female,1,2024-01-01T00:00:09Z", "c9,29,female,4,2024-02-02T00:00:00Z")
    await stack.ingest(
        stack.write("p2.csv", changed),
        view,
        key=["customer"],
        event_time="updated_at",
        mode=ingest_pb2.WRITE_MODE_REPLACE,
    )
    assert _written(await _materialize(stack, view)) == {view: 2}
    rewritten = {
        i
        for i in range(1, 51)
        if stack.redis.hget(redis_keys.online_features(view, f"c{i}"), "_updated_at") != stamps[i]
    }
    assert rewritten == {7, 9}
    assert _written(await _materialize(stack, view)) == {view: 0}  # nothing newer since

    reply = await stack.stub.GetOnlineFeatures(
        ingest_pb2.GetOnlineFeaturesRequest(
            entity_keys=["c7", "nobody", "c9"], features=[f"{view}.age", f"{view}.trips_per_year"]
        )
    )
    assert [(e.entity_key, e.found) for e in reply.entities] == [
        ("c7", True),
        ("nobody", False),
        ("c9", True),
    ]
    assert reply.entities[0].features[f"{view}.age"].string_value == "28"
    assert set(reply.entities[0].features) == {f"{view}.age", f"{view}.trips_per_year", f"{view}._updated_at"}
    assert reply.entities[2].features[f"{view}.trips_per_year"].string_value == "4"
    everything = await stack.stub.GetOnlineFeatures(ingest_pb2.GetOnlineFeaturesRequest(entity_keys=["c1"]))
    assert everything.entities[0].features[f"{view}.gender"].string_value == "female"

    # A table without event time: incremental runs skip it while its content is unchanged.
    plain = unique("plain")
    await stack.ingest(stack.write("plain.csv", CUSTOMERS), plain, key=["customer"])
    assert _written(await _materialize(stack, plain)) == {plain: 3}
    skipped = await _materialize(stack, plain)
    assert _written(skipped) == {plain: 0}
    assert skipped[-1].progress.message == "unchanged since the last run"
    assert _written(await _materialize(stack, plain, full=True)) == {plain: 3}
    # No view named: every table materialized before.
    assert set(_written(await _materialize(stack))) == {view, plain}

    for views, code in (
        ([unique("none")], grpc.StatusCode.NOT_FOUND),
        (["bad name"], grpc.StatusCode.INVALID_ARGUMENT),
    ):
        error = await failure(_materialize(stack, *views))
        assert error.code() == code
    await stack.ingest(stack.write("nokey.csv", CUSTOMERS), "nokey")
    error = await failure(_materialize(stack, "nokey"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "one key column" in (error.details() or "")
    error = await failure(stack.stub.GetOnlineFeatures(ingest_pb2.GetOnlineFeaturesRequest(features=[view])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_materialize_with_a_ttl_and_a_history_keyed_by_entity_and_time(stack: IngestStack) -> None:
    """Core level: a TTL on every hash; a table keyed by (entity, event time) materializes the
    newest row of each entity."""
    view = unique("events")
    content = (
        "customer,at,offer\n"
        "c1,2024-01-01T00:00:00Z,a\nc1,2024-01-03T00:00:00Z,c\nc1,2024-01-02T00:00:00Z,b\n"
        "c2,2024-01-01T00:00:00Z,z\n"
    )
    await stack.ingest(stack.write("events.csv", content), view, key=["customer", "at"], event_time="at")
    results = online_store.materialize(
        stack.engine, stack.redis, [view], full=True, as_of=None, ttl_seconds=60
    )
    assert results[0].entities_written == 2
    key = redis_keys.online_features(view, "c1")
    assert stack.redis.hget(key, "offer") == b"c"
    assert 0 < stack.redis.ttl(key) <= 60


# Options store -------------------------------------------------------------------------------


def _history_counts(path: Path) -> dict[tuple[str, str], tuple[int, int]]:
    counts: dict[tuple[str, str], tuple[int, int]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            segment = f"age_band={row['age_band']}|gender={row['gender']}|channel={row['channel']}"
            n, s = counts.get((row["offer"], segment), (0, 0))
            counts[(row["offer"], segment)] = (n + 1, s + int(row["accepted"]))
    return counts


async def _generate(stack: IngestStack, mode: int, **fields: Any) -> ingest_pb2.GenerateOptionsResponse:
    request = ingest_pb2.GenerateOptionsRequest(deployment=stack.deployment, mode=mode, **fields)
    reply: ingest_pb2.GenerateOptionsResponse = await stack.stub.GenerateOptions(request)
    return reply


def _arms(stack: IngestStack, segment: str) -> dict[str, float]:
    generation = stack.redis.get(redis_keys.options_generation(stack.deployment))
    assert generation is not None
    raw = stack.redis.hgetall(redis_keys.arm_statistics(stack.deployment, generation.decode(), segment))
    return {k.decode(): float(v) for k, v in raw.items()}


async def test_generate_options_then_update_keeps_what_was_learned(stack: IngestStack) -> None:
    history = SAMPLE_DATA / "history.csv"
    await stack.ingest(history, "history")
    counts = _history_counts(history)
    segment = "age_band=adult|gender=female|channel=app"
    n, s = counts[("data-5gb", segment)]

    # Before any generation the predictors learn into generation "0"; update carries it over.
    stack.redis.hset(
        redis_keys.arm_statistics(stack.deployment, "0", segment),
        mapping={"voice-100|n": 3, "voice-100|s": 1},
    )
    dry = await _generate(stack, ingest_pb2.OPTIONS_MODE_UPDATE, history_table="history", dry_run=True)
    assert dry.dry_run
    assert stack.redis.get(redis_keys.options_generation(stack.deployment)) is None

    reply = await _generate(stack, ingest_pb2.OPTIONS_MODE_UPDATE, history_table="history", prior_weight=10)
    assert reply.config_revision >= 1
    assert reply.offers == 7
    assert reply.history_rows == 4000
    assert reply.arms_created == len(counts) - 1  # voice-100 in this segment was learned: kept
    assert reply.arms_kept == 1
    arms = _arms(stack, segment)
    weight = min(10, n)
    assert arms["data-5gb|pa"] == pytest.approx(weight * s / n)
    assert arms["data-5gb|pb"] == pytest.approx(weight * (n - s) / n)
    assert (arms["voice-100|n"], arms["voice-100|s"]) == (3.0, 1.0)

    # Replicas learn in the live generation; update keeps it, generate starts over from the priors.
    live = stack.redis.get(redis_keys.options_generation(stack.deployment)).decode()  # type: ignore[union-attr]
    stack.redis.hset(
        redis_keys.arm_statistics(stack.deployment, live, segment),
        mapping={"data-5gb|n": 40, "data-5gb|s": 30, "data-5gb|c": 900, redis_keys.SEGMENT_CLOCK_FIELD: 1000},
    )
    updated = await _generate(stack, ingest_pb2.OPTIONS_MODE_UPDATE, history_table="history", prior_weight=50)
    assert updated.arms_kept >= 2
    assert updated.arms_created == 0
    assert updated.arms_removed == 0  # the impression clock is no arm
    # ... and goes with them: an arm's clock reading (`c`) means nothing without its segment's clock.
    assert _arms(stack, segment)[redis_keys.SEGMENT_CLOCK_FIELD] == 1000.0
    assert stack.redis.get(redis_keys.options_generation(stack.deployment)).decode() != live  # type: ignore[union-attr]
    arms = _arms(stack, segment)
    assert (arms["data-5gb|n"], arms["data-5gb|s"]) == (40.0, 30.0)
    assert arms["data-5gb|pa"] == pytest.approx(weight * s / n)  # a learned arm keeps its priors too
    other_offer, other_segment = next(k for k in counts if k[1] != segment)
    other_n, other_s = counts[(other_offer, other_segment)]
    assert _arms(stack, other_segment)[f"{other_offer}|pa"] == pytest.approx(
        min(50, other_n) * other_s / other_n
    )
    assert 0 < stack.redis.ttl(redis_keys.arm_statistics(stack.deployment, live, segment)) <= 24 * 3600

    regenerated = await _generate(stack, ingest_pb2.OPTIONS_MODE_GENERATE, history_table="history")
    assert regenerated.arms_created == len(counts)
    assert regenerated.arms_kept == 0
    arms = _arms(stack, segment)
    assert "data-5gb|n" not in arms
    assert "voice-100|n" not in arms
    assert arms["data-5gb|pa"] == pytest.approx(min(100, n) * s / n)  # the server's default weight

    await stack.ingest(stack.write("thin.csv", "offer,accepted\ndata-1gb,1\n"), "thin")
    for fields, code in (
        ({"history_table": "thin"}, grpc.StatusCode.FAILED_PRECONDITION),
        ({"history_table": "nope"}, grpc.StatusCode.NOT_FOUND),
        ({"history_table": "no way"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prior_weight": -1}, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        error = await failure(_generate(stack, ingest_pb2.OPTIONS_MODE_GENERATE, **fields))
        assert error.code() == code, fields
    error = await failure(
        stack.stub.GenerateOptions(ingest_pb2.GenerateOptionsRequest(deployment="no-such-deployment"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


# A public data set and the generated 1M-row file through the whole pipeline ------------------


def _wine_csv(path: Path, clean_names: bool) -> tuple[list[str], np.ndarray]:
    from sklearn.datasets import load_wine

    wine = load_wine()
    names = (
        [name.replace("/", "_") for name in wine.feature_names] if clean_names else list(wine.feature_names)
    )
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["customer", *names, "cultivar"])
        for index, (row, cultivar) in enumerate(zip(wine.data, wine.target, strict=True)):
            writer.writerow([f"w{index:03d}", *(repr(float(v)) for v in row), int(cultivar)])
    return names, wine.data


async def test_a_public_data_set_through_ingest_features_materialize_and_options(stack: IngestStack) -> None:
    """scikit-learn's copy of the UCI wine data (178 rows, 13 measurements): a data set liveloop
    did not make. Its raw column names are refused with the name given; cleaned, it goes through."""
    raw = stack.data / "wine-raw.csv"
    _wine_csv(raw, clean_names=False)
    error = await failure(stack.ingest(raw, "wine", key=["customer"]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "od280/od315" in (error.details() or "")

    path = stack.data / "wine.csv"
    names, data = _wine_csv(path, clean_names=True)
    wine = unique("wine")
    summary = summary_of(await stack.ingest(path, wine, key=["customer"]))
    assert (summary.rows_written, summary.rows_rejected) == (178, 0)
    described = await stack.stub.Describe(ingest_pb2.DescribeRequest(table=wine, top_values=3))
    stats = {s.column: s for s in described.stats}
    for index, name in enumerate(names):
        assert stats[name].count == 178
        assert stats[name].mean == pytest.approx(float(data[:, index].mean()), rel=1e-9)
        assert stats[name].min == pytest.approx(float(data[:, index].min()))
    assert [(v.value, v.count) for v in stats["cultivar"].top_values] == [("1", 71), ("0", 59), ("2", 48)]

    # Features: a feature view over it, computed by ApplyFeatures, materialized like any table.
    view = unique("wine_profile")
    spec = (
        f"views:\n  - name: {view}\n    source: {wine}\n    entity: customer\n    features:\n"
        "      - {name: alcohol, column: alcohol}\n"
        "      - name: strength\n        discretize: {input: alcohol, edges: [12.5, 13.5], labels: [light, medium, strong]}\n"
        "      - name: color_per_hue\n        ratio: {numerator: color_intensity, denominator: hue}\n"
    )
    applied = await stack.stub.ApplyFeatures(ingest_pb2.ApplyFeaturesRequest(spec_yaml=spec))
    assert [f.name for f in applied.views[0].features] == ["alcohol", "strength", "color_per_hue"]
    assert _written(await _materialize(stack, view)) == {view: 178}
    profile = await stack.stub.GetOnlineFeatures(
        ingest_pb2.GetOnlineFeaturesRequest(
            entity_keys=["w010"], features=[f"{view}.strength", f"{view}.color_per_hue"]
        )
    )
    strength = ["light", "medium", "strong"][int(np.searchsorted([12.5, 13.5], data[10, 0], side="right"))]
    assert profile.entities[0].features[f"{view}.strength"].string_value == strength
    ratio = data[10, names.index("color_intensity")] / data[10, names.index("hue")]
    assert float(profile.entities[0].features[f"{view}.color_per_hue"].string_value) == pytest.approx(ratio)

    assert _written(await _materialize(stack, wine, full=True)) == {wine: 178}
    reply = await stack.stub.GetOnlineFeatures(
        ingest_pb2.GetOnlineFeaturesRequest(entity_keys=["w010"], features=[f"{wine}.alcohol"])
    )
    assert float(reply.entities[0].features[f"{wine}.alcohol"].string_value) == pytest.approx(
        float(data[10, 0])
    )

    # A synthetic offer history derived from it: the cultivar picks the offer, strong wines accept.
    offers = ["data-5gb", "voice-100", "roaming-week"]
    bands = ["young", "adult", "middle", "senior"]
    color = data[:, names.index("color_intensity")]
    quartiles = np.quantile(color, [0.25, 0.5, 0.75])
    median_alcohol = float(np.median(data[:, 0]))
    lines = ["customer,offer,accepted,age_band,gender,channel"]
    with path.open(newline="") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            band = bands[int(np.searchsorted(quartiles, color[index], side="right"))]
            accepted = int(float(row["alcohol"]) > median_alcohol)
            lines.append(
                f"{row['customer']},{offers[int(row['cultivar'])]},{accepted},{band},{['female', 'male'][index % 2]},app"
            )
    history = unique("wine_history")
    await stack.ingest(stack.write("wine-history.csv", "\n".join(lines) + "\n"), history)
    generated = await _generate(stack, ingest_pb2.OPTIONS_MODE_GENERATE, history_table=history)
    pairs = {(line.split(",")[1], line.split(",")[3], line.split(",")[4]) for line in lines[1:]}
    assert (generated.history_rows, generated.arms_created) == (178, len(pairs))


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_the_generated_million_row_file_through_the_pipeline(
    stack: IngestStack, database_url: str
) -> None:
    """The benchmark's 1M-row, 20-column file: ingest, describe, a feature view over it,
    materialize (1M entities), online reads, and options generation with the table as history."""
    if not database_url.startswith("sqlite"):
        pytest.skip("the 1M-row run goes through SQLite here; bench/ingest_throughput.py runs both databases")
    path = stack.data / "million.csv"
    write_customer_csv(path, 1_000_000)
    table = unique("million")
    request = ingest_pb2.IngestRequest(
        file=ingest_pb2.FileSource(path=str(path)),
        target=load_target(table, key=["customer"], event_time="presented_at"),
    )
    messages = [message async for message in stack.stub.Ingest(request, timeout=1100)]
    summary = summary_of(messages)
    assert (summary.rows_written, summary.rows_rejected, len(summary.columns)) == (1_000_000, 0, 20)
    assert len(messages) > 10  # progress all along
    described = await stack.stub.Describe(ingest_pb2.DescribeRequest(table=table, skip_stats=True))
    assert described.table.row_count == 1_000_000
    view = unique("million_profile")
    spec = (
        f"views:\n  - name: {view}\n    source: {table}\n    entity: customer\n"
        "    event_time: presented_at\n    features:\n"
        "      - {name: age, column: age}\n"
        "      - name: spend_per_gb\n        ratio: {numerator: monthly_spend, denominator: data_gb}\n"
        "      - name: log_tenure\n        log: {input: tenure_months, offset: 1}\n"
    )
    applied = await stack.stub.ApplyFeatures(ingest_pb2.ApplyFeaturesRequest(spec_yaml=spec), timeout=1100)
    assert [v.name for v in applied.views] == [view]
    materialized = [
        m
        async for m in stack.stub.Materialize(
            ingest_pb2.MaterializeRequest(feature_views=[view], full=True), timeout=1100
        )
    ]
    assert _written(materialized) == {view: 1_000_000}
    reply = await stack.stub.GetOnlineFeatures(
        ingest_pb2.GetOnlineFeaturesRequest(entity_keys=["c00000001", "c01000000"], features=[f"{view}.age"])
    )
    assert all(entity.found for entity in reply.entities)
    generated = await _generate(stack, ingest_pb2.OPTIONS_MODE_GENERATE, history_table=table)
    assert generated.history_rows == 1_000_000
    assert generated.arms_created == 7 * 4 * 2 * 2
    batch: list[bytes] = []
    for key in stack.redis.scan_iter(match=redis_keys.online_features(view, "*"), count=10_000):
        batch.append(key)
        if len(batch) == 10_000:
            stack.redis.unlink(*batch)
            batch.clear()
    if batch:
        stack.redis.unlink(*batch)


def test_examples_data_is_what_the_generator_writes() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_sample_data.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    spec = deployment_spec_from_mapping(yaml.safe_load(EXAMPLE_SPEC.read_text()))
    with (SAMPLE_DATA / "history.csv").open(newline="") as handle:
        header = next(csv.reader(handle))
    assert {"offer", "accepted", *spec.segment_variables} <= set(header)
    assert spec.feature_lookup is not None
    with (SAMPLE_DATA / "customers.csv").open(newline="") as handle:
        header = next(csv.reader(handle))
    assert {spec.feature_lookup.key, *spec.feature_lookup.defaults} <= set(header)
