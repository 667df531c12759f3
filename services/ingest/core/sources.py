"""Sources read in bounded chunks: CSV and JSON lines as raw text, Parquet and SQL queries typed.

Every reader yields `RawChunk`s of at most about `chunk_rows` rows, so memory stays bounded by the
chunk size whatever the size of the source. Rows that cannot even be parsed (ragged CSV lines,
malformed JSON) come back as rejects with their line number.
"""

from __future__ import annotations

import csv
import enum
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import sqlalchemy as sa

from libs.common.errors import InvalidArgument


class FileFormat(enum.StrEnum):
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"


@dataclass(frozen=True)
class Reject:
    row_number: int  # 1-based data row (CSV: line number including the header line)
    column: str
    reason: str
    raw: str = ""


@dataclass
class RawChunk:
    batch: pa.RecordBatch
    first_row: int  # row number of the batch's first row
    rejects: list[Reject] = field(default_factory=list)

    def row_number(self, index: int) -> int:
        """Row number of the batch's index-th row, counting the rows skipped as unparseable."""
        number = self.first_row + index
        for skipped in sorted(r.row_number for r in self.rejects if r.row_number >= self.first_row):
            if skipped <= number:
                number += 1
        return number


def detect_format(path: str, given: FileFormat | None) -> FileFormat:
    if given is not None:
        return given
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return FileFormat.JSONL
    if suffix in (".parquet", ".pq"):
        return FileFormat.PARQUET
    return FileFormat.CSV


def read_file(
    path: Path, file_format: FileFormat, chunk_rows: int, delimiter: str = ","
) -> Iterator[RawChunk]:
    if not path.exists():
        raise InvalidArgument(
            f"{path} does not exist (paths are read by the ingest service)", field="file.path"
        )
    if not path.is_file():
        raise InvalidArgument(f"{path} is not a file", field="file.path")
    if path.stat().st_size == 0:
        raise InvalidArgument(f"{path} is empty", field="file.path")
    if file_format is FileFormat.CSV:
        return _read_csv(path, chunk_rows, delimiter)
    if file_format is FileFormat.JSONL:
        return _read_jsonl(path, chunk_rows)
    return _read_parquet(path, chunk_rows)


def _read_csv(path: Path, chunk_rows: int, delimiter: str) -> Iterator[RawChunk]:
    if len(delimiter) != 1:
        raise InvalidArgument("must be one character", field="file.delimiter")
    with path.open("r", encoding="utf-8", errors="replace", newline="") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), None)
    if not header or all(not name.strip() for name in header):
        raise InvalidArgument(f"{path} has no header row", field="file.path")
    names = [name.strip() for name in header]
    pending: list[Reject] = []

    def ragged(row: Any) -> str:
        number = int(row.number) if row.number is not None else -1
        pending.append(
            Reject(
                number,
                "",
                f"expected {row.expected_columns} fields, found {row.actual_columns}",
                row.text[:200],
            )
        )
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=max(chunk_rows * 200, 1 << 20), use_threads=False),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter, invalid_row_handler=ragged, newlines_in_values=False
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.binary() for name in names},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    row = 2  # line 1 is the header
    skipped_so_far = 0
    for batch in reader:
        rejects, pending[:] = list(pending), []
        first = row + skipped_so_far
        skipped_so_far += len(rejects)
        row += batch.num_rows
        yield RawChunk(batch, first, rejects)


def _read_jsonl(path: Path, chunk_rows: int) -> Iterator[RawChunk]:
    columns: list[str] | None = None
    rows: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    first = 1
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("a line must hold a JSON object")
            except (ValueError, UnicodeDecodeError) as exc:
                rejects.append(
                    Reject(number, "", f"not a JSON object: {exc}"[:200], line[:200].decode(errors="replace"))
                )
                continue
            if columns is None:
                columns = list(record)
            unknown = [key for key in record if key not in columns]
            if unknown:
                rejects.append(
                    Reject(
                        number,
                        unknown[0],
                        f"unexpected field '{unknown[0]}'",
                        line[:200].decode(errors="replace"),
                    )
                )
                continue
            rows.append(record)
            if len(rows) >= chunk_rows:
                yield RawChunk(_json_batch(rows, columns), first, rejects)
                first, rows, rejects = number + 1, [], []
    if columns is None:
        raise InvalidArgument(f"{path} holds no JSON objects", field="file.path")
    if rows or rejects:
        yield RawChunk(_json_batch(rows, columns), first, rejects)


def _json_batch(rows: list[dict[str, Any]], columns: list[str]) -> pa.RecordBatch:
    def text(value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, dict | list):
            return json.dumps(value)
        return str(value)

    arrays = [pa.array([text(row.get(column)) for row in rows], type=pa.string()) for column in columns]
    return pa.RecordBatch.from_arrays(arrays, names=columns)


def _read_parquet(path: Path, chunk_rows: int) -> Iterator[RawChunk]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidArgument(f"{path} is not a Parquet file: {exc}", field="file.path") from None
    first = 1
    for batch in parquet.iter_batches(batch_size=chunk_rows):
        yield RawChunk(batch, first)
        first += batch.num_rows


def read_sql(url: str, query: str, chunk_rows: int) -> Iterator[RawChunk]:
    """Stream a query's result in chunks (server-side cursor where the driver has one)."""
    if not query.strip():
        raise InvalidArgument("must be a query", field="sql.query")
    from libs.common.database import create_database_engine

    try:
        engine = create_database_engine(url)
    except ValueError:
        try:
            engine = sa.create_engine(url)
        except Exception as exc:
            raise InvalidArgument(f"cannot use this URL: {exc}", field="sql.url") from None
    try:
        with engine.connect() as connection:
            result = connection.execution_options(stream_results=True, yield_per=chunk_rows).execute(
                sa.text(query)
            )
            names = list(result.keys())
            first = 1
            for partition in result.partitions(chunk_rows):
                columns: list[Any] = list(zip(*partition, strict=False)) if partition else [() for _ in names]
                arrays = [_sql_array(values) for values in columns]
                batch = pa.RecordBatch.from_arrays(arrays, names=names)
                yield RawChunk(batch, first)
                first += batch.num_rows
    finally:
        engine.dispose()


def _sql_array(values: Any) -> pa.Array:
    try:
        return pa.array(list(values))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def decode_utf8(
    column: pa.Array, name: str, row_number: Callable[[int], int]
) -> tuple[pa.Array, list[Reject], list[bool]]:
    """Raw CSV bytes to text; rows that are not UTF-8 are rejected (mask True = keep)."""
    if not pa.types.is_binary(column.type):
        return column, [], [True] * len(column)
    try:
        return column.cast(pa.string()), [], [True] * len(column)
    except pa.ArrowInvalid:
        pass
    texts: list[str | None] = []
    keep: list[bool] = []
    rejects: list[Reject] = []
    for index, raw in enumerate(column.to_pylist()):
        try:
            texts.append(raw.decode("utf-8") if raw is not None else None)
            keep.append(True)
        except UnicodeDecodeError:
            texts.append(None)
            keep.append(False)
            rejects.append(Reject(row_number(index), name, "bytes that are not UTF-8", repr(raw[:60])))
    return pa.array(texts, type=pa.string()), rejects, keep


def csv_bytes(batch: pa.RecordBatch) -> bytes:
    """A batch as header-less CSV (for PostgreSQL COPY)."""
    buffer = io.BytesIO()
    pacsv.write_csv(batch, buffer, write_options=pacsv.WriteOptions(include_header=False))
    return buffer.getvalue()
