"""A deployment's corpora named by file or by ingested table (`corpora: {name: {key: ..., file: ...}}`
or `{key: ..., table: ...}`), read into rows before the spec is published, so the rows are part of
the revision that names them (versioned with it: the same data gives the same revision, changed data
a new one)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml

from libs.common.deployment_spec import MAX_SPEC_BYTES
from libs.common.errors import InvalidArgument

# A table's rows, and a note of which write of it they are: (rows, source).
TableReader = Callable[[str], tuple[list[dict[str, Any]], str]]


def resolve_corpus_files(text: str, spec_file: Path, read_table: TableReader | None = None) -> str | None:
    """The spec as JSON with every corpus `file` (relative to the spec's folder) or `table` read
    into `rows` and noted in `source`; None when no corpus names either (publish the text as it is)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # the config service names the problem
    corpora = document.get("corpora") if isinstance(document, dict) else None
    if not isinstance(corpora, dict) or not any(
        isinstance(corpus, dict) and ("file" in corpus or "table" in corpus) for corpus in corpora.values()
    ):
        return None
    for name, corpus in corpora.items():
        if not isinstance(corpus, dict):
            continue
        if "file" in corpus:
            path = spec_file.parent / str(corpus.pop("file"))
            corpus["rows"] = read_rows(path, f"corpora.{name}.file", str(corpus.get("key", "")))
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            corpus["source"] = f"{path.name} sha256:{digest}"
        elif "table" in corpus:
            if read_table is None:
                raise InvalidArgument(
                    "no ingest service to read the table from", field=f"corpora.{name}.table"
                )
            corpus["rows"], corpus["source"] = read_table(str(corpus.pop("table")))
    try:
        text = json.dumps(document, separators=(",", ":"), default=_json_value, allow_nan=False)
    except (TypeError, ValueError) as exc:  # a value JSON cannot hold, such as .nan
        raise InvalidArgument(f"cannot be written as JSON: {exc}", field="spec") from None
    if len(text.encode()) > MAX_SPEC_BYTES:
        largest = max(
            (name for name, corpus in corpora.items() if isinstance(corpus, dict)),
            key=lambda name: len(json.dumps(corpora[name].get("rows", []), default=_json_value)),
        )
        raise InvalidArgument(
            f"{len(corpora[largest].get('rows', []))} rows make the spec {len(text.encode())} bytes; a spec, "
            f"corpora included, is at most {MAX_SPEC_BYTES} bytes",
            field=f"corpora.{largest}",
        )
    return text


def read_rows(path: Path, field: str, key: str = "") -> list[dict[str, Any]]:
    """Rows of a CSV (a header row; a cell written as a plain decimal number is a number, except in
    the key column, which stays text; an empty cell is null), a JSON list of objects, or JSON lines.
    A UTF-8 byte order mark (as spreadsheets write) is skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read {path}: {exc}", field=field) from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [
            {name: (value or None) if name == key else _cell(value) for name, value in row.items()}
            for row in reader
        ]
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            rows = [
                json.loads(line, parse_constant=_no_constant) for line in text.splitlines() if line.strip()
            ]
        else:
            rows = json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise InvalidArgument(f"{path} is not JSON: {exc}", field=field) from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise InvalidArgument(f"{path} must hold a list of objects (one per row)", field=field)
    return rows


# A number as a CSV cell writes one: no leading zeros (an id such as 007 stays text), no
# underscores, no nan or inf.
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _cell(value: str | None) -> str | int | float | None:
    if value is None or value == "":
        return None
    if _NUMBER.fullmatch(value):
        number = float(value)
        if math.isfinite(number):
            return int(value) if value.lstrip("-").isdigit() else number
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a corpus holds")


def _json_value(value: Any) -> Any:
    """What JSON cannot hold as it is (a YAML date or time), as ISO 8601 text."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")
