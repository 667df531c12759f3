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


# Plain bulk loads: the practical limit ---------------------------------------------------------

# The types the ingest path infers for the generated file, for the plain loads' tables.
SQL_TYPES = {
    "customer": ("TEXT", "text"),
    "age": ("BIGINT", "bigint"),
    "gender": ("TEXT", "text"),
    "age_band": ("TEXT", "text"),
    "channel": ("TEXT", "text"),
    "trips_per_year": ("BIGINT", "bigint"),
    "offer": ("TEXT", "text"),
    "accepted": ("BIGINT", "bigint"),
    "presented_at": ("DATETIME", "timestamptz"),
    "tenure_months": ("BIGINT", "bigint"),
    "monthly_spend": ("FLOAT", "double precision"),
    "data_gb": ("FLOAT", "double precision"),
    "calls_per_week": ("FLOAT", "double precision"),
    "region": ("TEXT", "text"),
    "plan": ("TEXT", "text"),
    "device": ("TEXT", "text"),
    "churn_risk": ("FLOAT", "double precision"),
    "satisfaction": ("BIGINT", "bigint"),
    "is_business": ("BOOLEAN", "boolean"),
    "note": ("TEXT", "text"),
}


def plain_load(kind: str, url: str, csv_path: Path) -> dict[str, Any]:
    """Runs in its own process: the simplest bulk load of the file, with the same primary key."""
    import csv
    import resource

    started = time.perf_counter()
    if kind == "sqlite":
        import sqlite3

        connection = sqlite3.connect(url.removeprefix("sqlite:///"))
        columns = ", ".join(f"{name} {types[0]}" for name, types in SQL_TYPES.items())
        connection.execute(f"CREATE TABLE plain ({columns}, PRIMARY KEY (customer))")
        with csv_path.open(newline="") as handle:
            reader = csv.reader(handle)
            next(reader)
            placeholders = ", ".join("?" for _ in SQL_TYPES)
            with connection:  # one transaction
                connection.executemany(f"INSERT INTO plain VALUES ({placeholders})", reader)
        rows = connection.execute("SELECT count(*) FROM plain").fetchone()[0]
        connection.close()
    else:
        import psycopg

        with psycopg.connect(url) as connection:
            columns = ", ".join(f"{name} {types[1]}" for name, types in SQL_TYPES.items())
            connection.execute(f"CREATE TABLE plain ({columns}, PRIMARY KEY (customer))")
            with (
                connection.cursor() as cursor,
                cursor.copy("COPY plain FROM STDIN (FORMAT csv, HEADER)") as copy,
                csv_path.open("rb") as handle,
            ):
                while block := handle.read(1 << 20):
                    copy.write(block)
            rows = connection.execute("SELECT count(*) FROM plain").fetchone()[0]
    seconds = time.perf_counter() - started
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_plain_load(kind: str, url: str, csv_path: Path) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, __file__, "--plain-load", kind, url, str(csv_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    ).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


# The services ----------------------------------------------------------------------------------


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak since the process started), from /proc."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = round(int(rest.split()[0]) / 1024, 1)
    return values


@dataclass
class Services:
    work: Path
    redis_url: str
    keys_file: Path
    admin_key: str
    service_key: str
    config_target: str
    env: dict[str, str]

    @contextlib.contextmanager
    def ingest(self, database_url: str) -> Iterator[tuple[Any, int, str]]:
        """A fresh ingest service process on `database_url`: (stub, pid, target)."""
        from libs.common.client import open_blocking_channel
        from libs.common.health_check import grpc_health
        from libs.protos.liveloop.ingest.v1 import ingest_pb2_grpc
        from libs.stack.processes import free_port, wait_until

        port = free_port()
        env = dict(self.env)
        env.update(
            {
                "LIVELOOP_INGEST_PORT": str(port),
                "LIVELOOP_INGEST_DATABASE_URL": database_url,
                "LIVELOOP_INGEST_REDIS_URL": self.redis_url,
                "LIVELOOP_INGEST_API_KEYS_FILE": str(self.keys_file),
                "LIVELOOP_INGEST_CONFIG_TARGET": self.config_target,
                "LIVELOOP_INGEST_CONFIG_API_KEY": self.service_key,
                "LIVELOOP_INGEST_UPLOAD_DIR": str(self.work / "uploads"),
                "LIVELOOP_INGEST_LOG_LEVEL": "WARNING",
                "LIVELOOP_INGEST_SHUTDOWN_DRAIN_SECONDS": "0",
            }
        )
        process = subprocess.Popen([sys.executable, "-m", "services.ingest"], cwd=REPO, env=env)
        target = f"127.0.0.1:{port}"
        try:
            if not wait_until(
                lambda: grpc_health(target, "liveloop.ingest.v1.IngestService") == "SERVING", 60
            ):
                raise RuntimeError("the ingest service did not start")
            with open_blocking_channel(target, api_key=self.admin_key, deadline_seconds=3600) as channel:
                yield ingest_pb2_grpc.IngestServiceStub(channel), process.pid, target
        finally:
            process.terminate()
            process.wait(timeout=60)


@contextlib.contextmanager
def services(work: Path) -> Iterator[Services]:
    """redis-server and a config service (serving the example deployment) on free ports."""
    import redis

    from libs.common.auth import ApiKeyStore, Role, generate_api_key
    from libs.common.client import open_blocking_channel
    from libs.common.health_check import grpc_health
    from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
    from libs.stack.processes import free_port, redis_argv, wait_until

    admin_key, admin = generate_api_key(Role.ADMIN, "bench-admin")
    service_key, service = generate_api_key(Role.SERVICE, "bench-service")
    keys = work / "keys.json"
    ApiKeyStore([admin, service]).save(keys)
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIVELOOP_")}
    redis_port, config_port = free_port(), free_port()
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(
            subprocess.Popen(
                redis_argv(redis_port, work / "redis", persistent=False), stdout=subprocess.DEVNULL
            )
        )
        client = redis.Redis(port=redis_port)
        if not wait_until(lambda: _pings(client), 15):
            raise RuntimeError("redis-server did not start")
        config_env = dict(env)
        config_env.update(
            {
                "LIVELOOP_CONFIG_PORT": str(config_port),
                "LIVELOOP_CONFIG_DATABASE_URL": f"sqlite:///{work / 'config.db'}",
                "LIVELOOP_CONFIG_API_KEYS_FILE": str(keys),
                "LIVELOOP_CONFIG_LOG_LEVEL": "WARNING",
            }
        )
        started.append(subprocess.Popen([sys.executable, "-m", "services.config"], cwd=REPO, env=config_env))
        config_target = f"127.0.0.1:{config_port}"
        if not wait_until(
            lambda: grpc_health(config_target, "liveloop.config.v1.ConfigService") == "SERVING", 30
        ):
            raise RuntimeError("the config service did not start")
        with open_blocking_channel(config_target, api_key=admin_key) as channel:
            spec = (REPO / "examples" / "deployments" / "telco-offers.yaml").read_text()
            config_pb2_grpc.ConfigServiceStub(channel).Publish(config_pb2.PublishRequest(spec_text=spec))
        yield Services(
            work, f"redis://127.0.0.1:{redis_port}/0", keys, admin_key, service_key, config_target, env
        )
    finally:
        for process in reversed(started):
            process.terminate()
            process.wait(timeout=30)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


FEATURE_SPEC = """
views:
  - name: customer_profile
    source: customers
    entity: customer
    event_time: presented_at
    features:
      - name: age
        column: age
      - name: spend_band
        discretize: {input: monthly_spend, edges: [20, 50, 100], labels: [low, mid, high, top]}
      - name: spend_per_gb
        ratio: {numerator: monthly_spend, denominator: data_gb}
      - name: log_tenure
        log: {input: tenure_months, offset: 1}
"""


def ingest_run(
    stack: Services, database_url: str, csv_path: Path, rows: int, *, pipeline: bool
) -> dict[str, Any]:
    """One fresh ingest service: the load (rows/s, peak RSS); with `pipeline`, then features,
    materialization and options generation on the loaded table."""
    import grpc

    from libs.protos.liveloop.ingest.v1 import ingest_pb2

    result: dict[str, Any] = {}
    with stack.ingest(database_url) as (stub, pid, _target):
        before = memory_mb(pid)
        started = time.perf_counter()
        messages = 0
        request = ingest_pb2.IngestRequest(
            file=ingest_pb2.FileSource(path=str(csv_path)),
            target=ingest_pb2.LoadTarget(
                table="customers", key=["customer"], event_time_column="presented_at"
            ),
        )
        for message in stub.Ingest(request):
            messages += 1
            summary = message.summary
        seconds = time.perf_counter() - started
        after = memory_mb(pid)
        if summary.rows_written != rows:
            raise RuntimeError(f"expected {rows} rows written, got {summary}")
        result["ingest"] = {
            "rows": rows,
            "seconds": round(seconds, 2),
            "rows_per_second": round(rows / seconds),
            "progress_messages": messages,
            "service_rss_before_mb": before["VmRSS"],
            "service_peak_rss_mb": after["VmHWM"],
        }
        if not pipeline:
            return result
        started = time.perf_counter()
        try:
            applied = stub.ApplyFeatures(ingest_pb2.ApplyFeaturesRequest(spec_yaml=FEATURE_SPEC))
            result["features"] = {
                "seconds": round(time.perf_counter() - started, 2),
                "rows_per_second": round(rows / (time.perf_counter() - started)),
                "views": [v.name for v in applied.views],
            }
        except grpc.RpcError as exc:
            result["features"] = {"error": f"{exc.code().name}: {exc.details()}"}
        started = time.perf_counter()
        done = [
            m
            for m in stub.Materialize(ingest_pb2.MaterializeRequest(feature_views=["customers"], full=True))
            if m.done
        ]
        seconds = time.perf_counter() - started
        result["materialize"] = {
            "entities": done[-1].entities_written,
            "seconds": round(seconds, 2),
            "entities_per_second": round(done[-1].entities_written / seconds),
        }
        started = time.perf_counter()
        options = stub.GenerateOptions(
            ingest_pb2.GenerateOptionsRequest(
                deployment="telco-offers", history_table="customers", mode=ingest_pb2.OPTIONS_MODE_GENERATE
            )
        )
        result["options"] = {
            "history_rows": options.history_rows,
            "arms_created": options.arms_created,
            "seconds": round(time.perf_counter() - started, 2),
        }
        result["service_peak_rss_after_pipeline_mb"] = memory_mb(pid)["VmHWM"]
    return result


READ_ROUNDS = 3


def read_latency(stack: Services, database_url: str, rows: int, reads: int, rpc_reads: int) -> dict[str, Any]:
    """One random customer per call: HGETALL through redis-py, GetOnlineFeatures through gRPC. Three
    rounds each; the round with the median p99 is reported (a burst of other work on the machine
    lands in one round, not in all three)."""
    import redis

    from libs.common import redis_keys
    from libs.protos.liveloop.ingest.v1 import ingest_pb2

    rng = np.random.default_rng(11)
    client = redis.Redis.from_url(stack.redis_url)
    customers = [f"c{n:08d}" for n in rng.integers(1, rows + 1, reads)]
    rounds: dict[str, list[dict[str, float]]] = {"redis_hgetall_ms": [], "get_online_features_rpc_ms": []}
    for _ in range(READ_ROUNDS):
        timings = []
        for customer in customers:
            started = time.perf_counter()
            found = client.hgetall(redis_keys.online_features("customers", customer))
            timings.append((time.perf_counter() - started) * 1000)
            if not found:
                raise RuntimeError(f"{customer} is not in the online store")
        rounds["redis_hgetall_ms"].append(latency_summary(timings))
    with stack.ingest(database_url) as (stub, _pid, _target):
        for _ in range(READ_ROUNDS):
            timings = []
            for customer in customers[:rpc_reads]:
                request = ingest_pb2.GetOnlineFeaturesRequest(entity_keys=[customer], features=["customers"])
                started = time.perf_counter()
                reply = stub.GetOnlineFeatures(request)
                timings.append((time.perf_counter() - started) * 1000)
                if not reply.entities[0].found:
                    raise RuntimeError(f"{customer} not found through GetOnlineFeatures")
            rounds["get_online_features_rpc_ms"].append(latency_summary(timings))
    client.close()
    result: dict[str, Any] = {"load_average_1m": round(os.getloadavg()[0], 2)}
    for name, summaries in rounds.items():
        result[name] = sorted(summaries, key=lambda item: item["p99"])[len(summaries) // 2]
        result[name]["rounds_p99"] = [item["p99"] for item in summaries]
    return result


def latency_summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)

    return {"calls": len(values), "p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1], 3)}


def postgresql_database(admin_url: str, name: str) -> str | None:
    """A new database on the PostgreSQL server at admin_url, or None when none answers."""
    import psycopg
    import sqlalchemy as sa

    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        print(f"no PostgreSQL at {admin_url}: {exc}; PostgreSQL skipped", file=sys.stderr)
        return None
    return sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_postgresql_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Report ----------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Ingest throughput",
        "",
        f"`{report['command']}`",
        "",
        f"{report['date']} on {report['machine']}. {report['rows']:,} rows x 20 columns "
        f"({report['csv_mb']} MB of CSV, generated in {report['generate_seconds']} s). Timings on a "
        "2-core machine shared with other work drift by tens of percent between runs: compare the "
        "ingest path with the plain load of the same run.",
        "",
        "## Loading the file",
        "",
        "| database | path | rows/s | seconds | peak RSS (MB) | share of the plain load's rate |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, run in report["databases"].items():
        plain, ingest = run["plain_load"], run["ingest"]
        plain_how = "csv + executemany, one transaction" if name == "sqlite" else "COPY FROM of the raw file"
        lines.append(
            f"| {name} | plain load ({plain_how}) | {plain['rows_per_second']:,} | {plain['seconds']} | "
            f"{plain['peak_rss_mb']} | 100% |"
        )
        lines.append(
            f"| {name} | ingest service (Ingest RPC: infer, validate, reject, dedupe, load) | "
            f"{ingest['rows_per_second']:,} | {ingest['seconds']} | {ingest['service_peak_rss_mb']} "
            f"(at start {ingest['service_rss_before_mb']}) | "
            f"{ingest['rows_per_second'] / plain['rows_per_second']:.0%} |"
        )
    lines += ["", "## The rest of the pipeline on the loaded table", ""]
    lines += ["| database | step | result |", "|---|---|---|"]
    for name, run in report["databases"].items():
        features = run.get("features", {})
        if "error" in features:
            lines.append(f"| {name} | ApplyFeatures (4 features over the table) | {features['error']} |")
        elif features:
            lines.append(
                f"| {name} | ApplyFeatures (4 features over the table) | {features['seconds']} s, "
                f"{features['rows_per_second']:,} rows/s |"
            )
        m = run["materialize"]
        lines.append(
            f"| {name} | Materialize into Redis | {m['entities']:,} entities in {m['seconds']} s, "
            f"{m['entities_per_second']:,} entities/s |"
        )
        o = run["options"]
        lines.append(
            f"| {name} | GenerateOptions (table as history) | {o['arms_created']} arms from "
            f"{o['history_rows']:,} rows in {o['seconds']} s |"
        )
    reads = report["online_reads"]
    lines += [
        "",
        "## Online reads, one customer per call (loopback)",
        "",
        f"Random customers among the {report['rows']:,} materialized; {READ_ROUNDS} rounds, the round with "
        f"the median p99 shown. Goal: under 1 ms. Load average at the end of the reads: "
        f"{report['online_reads']['load_average_1m']} on {os.cpu_count()} CPUs (other work included): the "
        "tail is where a busy machine shows.",
        "",
        "| how | calls per round | p50 (ms) | p99 (ms) | max (ms) | p99 of each round (ms) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, key in (
        ("HGETALL through redis-py", "redis_hgetall_ms"),
        ("GetOnlineFeatures RPC", "get_online_features_rpc_ms"),
    ):
        item = reads[key]
        lines.append(
            f"| {label} | {item['calls']:,} | {item['p50']} | {item['p99']} | {item['max']} | "
            f"{', '.join(str(v) for v in item['rounds_p99'])} |"
        )
    if report.get("bounded_memory"):
        lines += [
            "",
            "## Bounded memory: peak RSS of the ingest service as the file grows (SQLite)",
            "",
            "| rows | CSV (MB) | rows/s | service peak RSS (MB) |",
            "|---:|---:|---:|---:|",
        ]
        for item in report["bounded_memory"]:
            lines.append(
                f"| {item['rows']:,} | {item['csv_mb']} | {item['rows_per_second']:,} | {item['service_peak_rss_mb']} |"
            )
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--plain-load":
        print(json.dumps(plain_load(sys.argv[2], sys.argv[3], Path(sys.argv[4]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--big-rows", type=int, default=3_000_000, help="Bounded-memory check (0: skip)")
    parser.add_argument("--reads", type=int, default=20_000, help="HGETALL calls")
    parser.add_argument("--rpc-reads", type=int, default=5_000, help="GetOnlineFeatures calls")
    parser.add_argument("--postgresql-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    report: dict[str, Any] = {
        "command": "python bench/ingest_throughput.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "rows": args.rows,
        "databases": {},
    }
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as directory:
        work = Path(directory)
        csv_path = work / "customers.csv"
        started = time.perf_counter()
        write_customer_csv(csv_path, args.rows)
        report["generate_seconds"] = round(time.perf_counter() - started, 1)
        report["csv_mb"] = round(csv_path.stat().st_size / 2**20, 1)
        with services(work) as stack:
            databases: list[tuple[str, str, str]] = [
                ("sqlite", f"sqlite:///{work / 'ingest.db'}", f"sqlite:///{work / 'plain.db'}")
            ]
            pg_ingest = postgresql_database(args.postgresql_url, "liveloop_bench_ingest")
            pg_plain = postgresql_database(args.postgresql_url, "liveloop_bench_plain")
            if pg_ingest and pg_plain:
                databases.append(("postgresql", pg_ingest, pg_plain))
            try:
                for name, ingest_url, plain_url in databases:
                    print(f"{name}: plain load", file=sys.stderr)
                    plain = run_plain_load(name, plain_url, csv_path)
                    print(f"{name}: ingest service", file=sys.stderr)
                    run = ingest_run(stack, ingest_url, csv_path, args.rows, pipeline=True)
                    report["databases"][name] = {"plain_load": plain, **run}
                    print(json.dumps(report["databases"][name]), file=sys.stderr)
                print("online reads", file=sys.stderr)
                report["online_reads"] = read_latency(
                    stack, databases[0][1], args.rows, args.reads, args.rpc_reads
                )
                if args.big_rows:
                    bounded = [
                        {
                            "rows": args.rows,
                            "csv_mb": report["csv_mb"],
                            "rows_per_second": report["databases"]["sqlite"]["ingest"]["rows_per_second"],
                            "service_peak_rss_mb": report["databases"]["sqlite"]["ingest"][
                                "service_peak_rss_mb"
                            ],
                        }
                    ]
                    big = work / "big.csv"
                    write_customer_csv(big, args.big_rows)
                    print(f"bounded memory: {args.big_rows} rows", file=sys.stderr)
                    run = ingest_run(
                        stack, f"sqlite:///{work / 'big.db'}", big, args.big_rows, pipeline=False
                    )
                    bounded.append(
                        {
                            "rows": args.big_rows,
                            "csv_mb": round(big.stat().st_size / 2**20, 1),
                            "rows_per_second": run["ingest"]["rows_per_second"],
                            "service_peak_rss_mb": run["ingest"]["service_peak_rss_mb"],
                        }
                    )
                    report["bounded_memory"] = bounded
            finally:
                for name in ("liveloop_bench_ingest", "liveloop_bench_plain"):
                    if pg_ingest:
                        drop_postgresql_database(args.postgresql_url, name)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ingest_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "ingest_throughput.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
