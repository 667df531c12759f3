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
    row_number: int  # 1-based row of the source, header excluded (JSON lines: the line number)
    column: str
    reason: str
    raw: str = ""


@dataclass
class RawChunk:
    batch: pa.RecordBatch
    first_row: int  # row number of the batch's first row
    rejects: list[Reject] = field(default_factory=list)
    # Row number of every batch row, when the reader knows them (else derived from the skipped rows).
    numbers: list[int] | None = field(default=None, repr=False)

    def row_number(self, index: int) -> int:
        """Row number of the batch's index-th row, counting the rows skipped as unparseable."""
        return self.row_numbers()[index]

    def row_numbers(self) -> list[int]:
        if self.numbers is None:
            skipped = sorted(r.row_number for r in self.rejects if r.row_number >= self.first_row)
            if not skipped:
                self.numbers = list(range(self.first_row, self.first_row + self.batch.num_rows))
                return self.numbers
            numbers: list[int] = []
            number, position = self.first_row, 0
            for _ in range(self.batch.num_rows):
                while position < len(skipped) and skipped[position] <= number:
                    if skipped[position] == number:
                        number += 1
                    position += 1
                numbers.append(number)
                number += 1
            self.numbers = numbers
        return self.numbers


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
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), None)
    if not header or all(not name.strip() for name in header):
        raise InvalidArgument(f"{path} has no header row", field="file.path")
    names = [name.strip() for name in header]
    # Unparseable rows, in file order. pyarrow parses blocks ahead of the batches it hands out, so
    # these are attached to batches by row number, never by when they were reported.
    skipped: list[Reject] = []

    def ragged(row: Any) -> str:
        number = int(row.number) - 1 if row.number is not None else -1  # line 1 is the header
        skipped.append(
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
        read_options=pacsv.ReadOptions(block_size=csv_block_bytes(chunk_rows), use_threads=False),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter, invalid_row_handler=ragged, newlines_in_values=False
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.binary() for name in header},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    last_row = 0  # row number (header excluded) of the last row handed out
    attached = 0  # entries of `skipped` already attached to a chunk
    for batch in reader:
        end = last_row + batch.num_rows
        taken = attached
        while taken < len(skipped) and skipped[taken].row_number <= end:
            end += 1  # a skipped row inside this batch's span pushes its end one row further
            taken += 1
        batch = pa.RecordBatch.from_arrays(batch.columns, names=names)
        yield RawChunk(batch, last_row + 1, skipped[attached:taken])
        last_row, attached = end, taken
    if attached < len(skipped):  # unparseable rows after the last good one
        empty = pa.RecordBatch.from_arrays([pa.array([], pa.binary()) for _ in names], names=names)
        yield RawChunk(empty, last_row + 1, skipped[attached:])


def csv_block_bytes(chunk_rows: int) -> int:
    """pyarrow's CSV reader holds several blocks in flight (measured: 40 to 150 MB of Arrow memory
    with 1 to 4 MiB blocks), so the block stays between 1 and 2 MiB whatever `chunk_rows` asks."""
    return min(max(chunk_rows * 100, 1 << 20), 2 << 20)


def _read_jsonl(path: Path, chunk_rows: int) -> Iterator[RawChunk]:
    columns: list[str] | None = None
    rows: list[dict[str, Any]] = []
    numbers: list[int] = []  # line number of each row (blank lines are skipped, not counted as rows)
    rejects: list[Reject] = []
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
            numbers.append(number)
            if len(rows) >= chunk_rows:
                yield RawChunk(_json_batch(rows, columns), numbers[0], rejects, numbers)
                rows, numbers, rejects = [], [], []
    if columns is None:
        raise InvalidArgument(f"{path} holds no JSON objects", field="file.path")
    if rows or rejects:
        yield RawChunk(_json_batch(rows, columns), numbers[0] if numbers else 1, rejects, numbers)


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
    first = 1
    try:
        try:
            connection = engine.connect()
        except sa.exc.SQLAlchemyError as exc:
            raise InvalidArgument(
                f"cannot connect to the source database: {_database_error(exc)}", field="sql.url"
            ) from None
        with connection:
            try:
                result = connection.execution_options(stream_results=True, yield_per=chunk_rows).execute(
                    sa.text(query)
                )
                names = list(result.keys())
                partitions = result.partitions(chunk_rows)
                while True:
                    # A query can fail on any fetch (a division by zero on row 70 000): that is a bad
                    # source, not a server fault, and the load rolls back.
                    partition = next(partitions, None)
                    if partition is None:
                        break
                    columns: list[Any] = list(zip(*partition, strict=True))
                    arrays = [_sql_array(values) for values in columns]
                    batch = pa.RecordBatch.from_arrays(arrays, names=names)
                    yield RawChunk(batch, first)
                    first += batch.num_rows
            except sa.exc.SQLAlchemyError as exc:
                where = f" after {first - 1} rows" if first > 1 else ""
                raise InvalidArgument(
                    f"the query failed{where}: {_database_error(exc)}", field="sql.query"
                ) from None
    finally:
        engine.dispose()


def _database_error(exc: Exception) -> str:
    original = getattr(exc, "orig", None)
    text = str(original) if original is not None else str(exc)
    return (text.strip().splitlines() or ["unknown error"])[0][:300]


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
