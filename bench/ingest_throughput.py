"""Benchmark: ingest rows/s and peak RSS into SQLite and PostgreSQL against a plain bulk load of the
same file; materialization rate into Redis; online read latency; bounded memory as files grow.

    .venv/bin/python bench/ingest_throughput.py --rows 1000000 --big-rows 3000000

Generates a deterministic CSV of `--rows` rows and 20 columns (customers with their last offer:
the table serves as features and as offer history) in a temporary directory, then for each database:

- the practical limit, in a subprocess: SQLite, the csv module and executemany in one transaction;
  PostgreSQL, COPY FROM of the raw file into a table of the same types;
- the ingest path: a real ingest service process (`python -m services.ingest`), one Ingest RPC of the
  file by path; rows/s from the RPC's wall time, peak RSS from the service's VmHWM (a fresh process
  per load, so the peak is the load's);
- Materialize of the table into Redis (a redis-server on a free port), entities/s;
- GenerateOptions for the example deployment with the table as history (a config service process
  serves the spec);
- ApplyFeatures with a small feature spec over the table, where the service implements it.

Then online reads of one customer at a time: HGETALL through redis-py and GetOnlineFeatures through
gRPC, p50 and p99. Finally the bounded-memory check: the same load with `--big-rows` rows (SQLite),
whose peak RSS should match the `--rows` one. Results: bench/results/ingest_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OFFERS = (
    "data-1gb",
    "data-5gb",
    "data-20gb",
    "voice-100",
    "voice-unlimited",
    "roaming-week",
    "family-bundle",
)
TAKE_UP = (0.10, 0.16, 0.08, 0.10, 0.07, 0.12, 0.06)
AGE_EDGES = (25, 40, 60)  # the example deployment's age_band
AGE_BANDS = ("young", "adult", "middle", "senior")
COLUMNS = (
    "customer", "age", "gender", "age_band", "channel", "trips_per_year", "offer", "accepted", "presented_at",
    "tenure_months", "monthly_spend", "data_gb", "calls_per_week", "region", "plan", "device", "churn_risk",
    "satisfaction", "is_business", "note",
)  # fmt: skip


def write_customer_csv(path: Path, rows: int, *, seed: int = 7, block: int = 100_000) -> None:
    """`rows` customers (c00000001, ...) with 20 columns of every type, the same bytes for the same
    arguments. Written a block at a time: memory stays small whatever `rows` is."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2024-01-01T00:00:00", "s")
    with path.open("wb") as handle:
        handle.write((",".join(COLUMNS) + "\n").encode())
        for offset in range(0, rows, block):
            n = min(block, rows - offset)
            ids = np.arange(offset + 1, offset + n + 1)
            age = np.clip(rng.normal(41, 14, n).astype(np.int64), 18, 85)
            offer = rng.integers(0, len(OFFERS), n)
            seconds = rng.integers(0, 365 * 86400, n).astype("timedelta64[s]")
            table = pa.table(
                {
                    "customer": np.char.add("c", np.char.zfill(ids.astype(str), 8)),
                    "age": age,
                    "gender": np.where(rng.random(n) < 0.5, "female", "male"),
                    "age_band": np.array(AGE_BANDS)[np.searchsorted(AGE_EDGES, age, side="right")],
                    "channel": np.where(rng.random(n) < 0.7, "app", "web"),
                    "trips_per_year": np.minimum(rng.exponential(2.0, n).astype(np.int64), 12),
                    "offer": np.array(OFFERS)[offer],
                    "accepted": (rng.random(n) < np.array(TAKE_UP)[offer]).astype(np.int64),
                    "presented_at": pa.array(start + seconds).cast(pa.timestamp("s", tz="UTC")),
                    "tenure_months": rng.integers(1, 240, n),
                    "monthly_spend": np.round(rng.gamma(2.0, 20.0, n), 2),
                    "data_gb": np.round(rng.exponential(8.0, n), 3),
                    "calls_per_week": np.round(rng.exponential(12.0, n), 1),
                    "region": np.array(["north", "south", "east", "west", "central"])[rng.integers(0, 5, n)],
                    "plan": np.array(["prepaid", "postpaid", "business"])[rng.integers(0, 3, n)],
                    "device": np.array(["android", "ios", "feature"])[rng.integers(0, 3, n)],
                    "churn_risk": np.round(rng.random(n), 4),
                    "satisfaction": rng.integers(1, 6, n),
                    "is_business": rng.random(n) < 0.1,
                    "note": np.char.add("customer note ", ids.astype(str)),
                }
            )
            buffer = pa.BufferOutputStream()
            pacsv.write_csv(
                table, buffer, write_options=pacsv.WriteOptions(include_header=False, quoting_style="none")
            )
            handle.write(buffer.getvalue().to_pybytes())
