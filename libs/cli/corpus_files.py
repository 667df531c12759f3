"""A deployment's corpora named by file or by ingested table (`corpora: {name: {key: ..., file: ...}}`
or `{key: ..., table: ...}`), read into rows before the spec is published, so the rows are part of
the revision that names them (versioned with it: the same data gives the same revision, changed data
a new one)."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

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
            corpus["rows"] = read_rows(path, f"corpora.{name}.file")
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            corpus["source"] = f"{path.name} sha256:{digest}"
        elif "table" in corpus:
            if read_table is None:
                raise InvalidArgument(
                    "no ingest service to read the table from", field=f"corpora.{name}.table"
                )
            corpus["rows"], corpus["source"] = read_table(str(corpus.pop("table")))
    return json.dumps(document)


def read_rows(path: Path, field: str) -> list[dict[str, Any]]:
    """Rows of a CSV (header row; numbers read as numbers, empty cells as null), a JSON list of
    objects, or JSON lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read {path}: {exc}", field=field) from None
    if path.suffix.lower() == ".csv":
        return [
            {key: _cell(value) for key, value in row.items()} for row in csv.DictReader(text.splitlines())
        ]
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{path} is not JSON: {exc}", field=field) from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise InvalidArgument(f"{path} must hold a list of objects (one per row)", field=field)
    return rows


def _cell(value: str | None) -> str | int | float | None:
    if value is None or value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
