"""The monitor's costs: how fast its consumer empties the decision log against the Invoke rate the
stack sustains, what a day of decisions costs on disk, GetSummary over 10 million logged contacts,
and EvaluatePolicy over 1 million logged decisions (time and peak memory).

    .venv/bin/python bench/monitor.py                       # the recorded run
    .venv/bin/python bench/monitor.py --consumer-entries 20000 --summary-contacts 1000000 --evaluation-decisions 20000

Each part runs in a fresh process (peak memory is that process's). The consumer reads real entries
of the benchmark deployment's shape (50 eligible offers, 1 shown, about 2.3 KB each) from a real
redis-server on a free port, archives them to Parquet and rolls them up in SQLite, as the service
does. The summary part writes the rollups 10 million contacts would leave (1,000 Invokes/s for
10,000 s, 50 offers x 8 segments x 2 replicas) and times the GetSummary query. The evaluation part
archives synthetic decisions logged by a uniformly random policy and evaluates a Thompson candidate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from libs.common.database import apply_migrations, create_database_engine, write_transaction  # noqa: E402
from libs.common.decision_log import Contact, FirstSlot, Response, ShownOffer  # noqa: E402
from libs.common.deployment_spec import deployment_spec_from_mapping  # noqa: E402
from libs.stack.processes import free_port, redis_argv, wait_until  # noqa: E402
from services.monitor.core.decision_archive import DecisionArchive  # noqa: E402
from services.monitor.core.decision_consumer import ConsumerOptions, DecisionLogConsumer  # noqa: E402
from services.monitor.core.monitor_service import MonitorService  # noqa: E402
from services.monitor.core.policy_evaluation import EvaluationRequest, evaluate_candidate  # noqa: E402
from services.monitor.core.rollup_store import EntryId, RollupStore, StreamEntry  # noqa: E402
from services.monitor.core.rollups import Rollup  # noqa: E402
from services.monitor.core.schema import MIGRATIONS_PACKAGE, VERSION_TABLE  # noqa: E402

OFFERS = [f"offer-{i:02d}" for i in range(50)]
SEGMENTS = [f"gender={g}|channel={c}" for g in "fmu" for c in ("app", "web", "sms")][:8]
REPLICAS = ("predictor-1", "predictor-2")
T0 = 1_765_000_000.0
RESULTS = REPO / "bench" / "results"


def contact(i: int, rng: np.random.Generator, time_: float) -> Contact:
    shown = OFFERS[int(rng.integers(len(OFFERS)))]
    return Contact(
        uuid=f"bench-{i:09d}",
        time=time_,
        deployment="bench",
        campaign="bench",
        channel="app",
        config_revision=7,
        variant="",
        replica=REPLICAS[i % 2],
        options_generation="0",
        customer=f"c{i % 100_000}",
        segment=SEGMENTS[i % len(SEGMENTS)],
        context={"gender": "f", "channel": "app"},
        features={"gender": "f", "age": "34"},
        eligible=OFFERS,
        eligible_scores=rng.random(len(OFFERS)).round(6).tolist(),
        first_slot=FirstSlot(1.0, 1, [1] + [0] * (len(OFFERS) - 1)),
        shown=[ShownOffer(shown, 1, 0.5, 1 / len(OFFERS), True)],
        explore=True,
        model="",
        latency_ms=1.2,
    )


def response(to: Contact) -> Response:
    offer = to.shown[0].offer
    return Response(
        uuid=to.uuid,
        time=to.time + 0.5,
        deployment="bench",
        accepted=[offer],
        learned_offers=[offer],
        reward=None,
        channel="app",
        learned=True,
        late=False,
        duplicate=False,
        replica=to.replica,
        new_offers=[offer],
        credited_reward=1.0,
        contact_time=to.time,
        segment=to.segment,
        variant="",
        config_revision=7,
        latency_ms=0.9,
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Consumer -------------------------------------------------------------------------------------------


def consumer_part(entries: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    port = free_port()
    redis_process = subprocess.Popen(
        redis_argv(port, work / "redis", persistent=False), stdout=subprocess.DEVNULL
    )
    try:
        import redis as redis_sync

        client = redis_sync.Redis(port=port)
        assert wait_until(lambda: _pings(client), timeout=15), "redis did not start"
        rng = np.random.default_rng(1)
        records: list[Contact | Response] = []
        for i in range(entries):
            made = contact(i, rng, T0 + i / 1000)
            records.append(made)
            if i % 10 == 0:
                records.append(response(made))
        pipeline = client.pipeline(transaction=False)
        for record in records:
            pipeline.xadd("bench-decisions", record.encode())  # type: ignore[arg-type]
        pipeline.execute()
        stream_bytes = int(client.memory_usage("bench-decisions") or 0)
        engine = create_database_engine(f"sqlite:///{work / 'monitor.db'}")
        apply_migrations(engine, MIGRATIONS_PACKAGE, version_table=VERSION_TABLE)
        archive = DecisionArchive(work / "decisions", retention_hours=24 * 365 * 30)

        async def drain() -> float:
            from redis.asyncio import Redis

            redis = Redis(port=port)
            consumer = DecisionLogConsumer(
                redis,
                RollupStore(engine),
                archive,
                ConsumerOptions(stream="bench-decisions", consumer="bench", block_ms=10),
            )
            started = time.perf_counter()
            while await consumer.step():
                pass
            elapsed = time.perf_counter() - started
            await redis.aclose()
            return elapsed

        elapsed = asyncio.run(drain())
        for partition in (work / "decisions").glob("*/*/*"):
            archive.compact(partition)
        contacts_bytes = sum(p.stat().st_size for p in (work / "decisions" / "contacts").rglob("*.parquet"))
        responses_bytes = sum(p.stat().st_size for p in (work / "decisions" / "responses").rglob("*.parquet"))
        day_contacts = 86_400 * 1000
        return {
            "entries": len(records),
            "contacts": entries,
            "seconds": elapsed,
            "entries_per_second": len(records) / elapsed,
            "contacts_per_second": entries / elapsed,
            "redis_bytes_per_entry": stream_bytes / len(records),
            "parquet_bytes_per_contact": contacts_bytes / entries,
            "parquet_bytes_per_response": responses_bytes / (entries // 10),
            "day_at_1000_invokes_per_second_gb": {
                "parquet_contacts": contacts_bytes / entries * day_contacts / 1e9,
                "parquet_responses_at_10_percent": responses_bytes
                / (entries // 10)
                * day_contacts
                / 10
                / 1e9,
            },
            "peak_rss_mib": peak_rss_mib(),
        }
    finally:
        redis_process.terminate()
        redis_process.wait(timeout=10)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


# GetSummary -----------------------------------------------------------------------------------------


def summary_part(contacts: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    engine = create_database_engine(f"sqlite:///{work / 'monitor.db'}")
    apply_migrations(engine, MIGRATIONS_PACKAGE, version_table=VERSION_TABLE)
    store = RollupStore(engine)
    per_minute = 60_000  # 1,000 Invokes/s
    minutes = max(1, contacts // per_minute)
    rng = np.random.default_rng(2)
    started = time.perf_counter()
    for minute_index in range(minutes):
        minute = int(T0 // 60 * 60) + 60 * minute_index
        increments = Rollup()
        cells = len(SEGMENTS) * len(REPLICAS)
        for segment in SEGMENTS:
            for replica in REPLICAS:
                decisions = increments.decisions[(minute, "bench", "", segment, 7, replica)]
                decisions.invocations = per_minute // cells
                decisions.responses = per_minute // cells // 10
                decisions.last_seen = minute + 59.0
                for offer in OFFERS:
                    counts = increments.offers[(minute, "bench", "", segment, offer, 7, replica)]
                    counts.impressions = per_minute // cells // len(OFFERS)
                    counts.accepted = int(rng.integers(0, 10))
                    counts.reward_sum = float(counts.accepted)
        latency = increments.latency[(minute, "bench", "/liveloop.predictor.v1.PredictorService/Invoke")]
        for value in rng.lognormal(np.log(0.0015), 0.4, 2000):
            latency.add(float(value))
        with write_transaction(engine) as connection:
            RollupStore._add(connection, increments)
    load_seconds = time.perf_counter() - started
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    sql_bytes = (work / "monitor.db").stat().st_size
    service = MonitorService(
        store, DecisionArchive(work / "decisions", 24), None, None, clock=lambda: T0 + minutes * 60
    )

    def timed(window: float) -> list[float]:
        samples = []
        for _ in range(7):
            began = time.perf_counter()
            summary = asyncio.run(service.summary("bench", window, None))
            samples.append(time.perf_counter() - began)
        assert summary.invocations > 0
        return samples

    whole = timed(minutes * 60)
    hour = timed(3600)
    return {
        "contacts": minutes * per_minute,
        "minutes": minutes,
        "rollup_rows": minutes * len(SEGMENTS) * len(REPLICAS) * (len(OFFERS) + 1),
        "load_seconds": load_seconds,
        "sql_bytes": sql_bytes,
        "sql_bytes_per_day_at_1000_invokes_per_second": sql_bytes / minutes * 1440,
        "summary_whole_window_ms_median": 1000 * statistics.median(whole),
        "summary_one_hour_ms_median": 1000 * statistics.median(hour),
        "peak_rss_mib": peak_rss_mib(),
    }


# EvaluatePolicy ---------------------------------------------------------------------------------------


def evaluation_part(decisions: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    archive = DecisionArchive(work / "decisions", retention_hours=24 * 365 * 30)
    rng = np.random.default_rng(3)
    take_up = {offer: 0.02 + 0.2 * i / len(OFFERS) for i, offer in enumerate(OFFERS)}
    batch: list[StreamEntry] = []
    started = time.perf_counter()
    for i in range(decisions):
        made = contact(i, rng, T0 + i / 1000)
        batch.append(StreamEntry(EntryId(int(T0 * 1000) + i, 0), made))
        if rng.random() < take_up[made.shown[0].offer]:
            batch.append(StreamEntry(EntryId(int(T0 * 1000) + i, 1), response(made)))
        if len(batch) >= 50_000:
            archive.write(batch)
            batch = []
    archive.write(batch)
    for partition in (work / "decisions").glob("*/*/*"):
        archive.compact(partition)
    archive_seconds = time.perf_counter() - started
    spec = deployment_spec_from_mapping(
        {
            "name": "bench",
            "campaigns": ["bench"],
            "offers": [{"id": offer, "price": 1.0} for offer in OFFERS],
            "context_variables": [{"name": "gender", "source": "param", "default": "u"}],
            "algorithm": {"approach": "thompson"},
            "exploration_epsilon": 0.1,
            "default_number_of_offers": 1,
        }
    )
    rss_before = peak_rss_mib()
    began = time.perf_counter()
    contacts = archive.contacts("bench", T0 - 1, T0 + decisions)
    responses = archive.responses("bench", T0 - 1, T0 + decisions + 10)
    read_seconds = time.perf_counter() - began
    result = evaluate_candidate(
        spec, contacts, responses, EvaluationRequest(estimators=["ips", "snips", "dm", "dr"])
    )
    total = time.perf_counter() - began
    return {
        "decisions": decisions,
        "archive_bytes": archive.disk_bytes(),
        "archive_write_seconds": archive_seconds,
        "read_seconds": read_seconds,
        "evaluate_seconds": total,
        "microseconds_per_decision": 1e6 * total / decisions,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_before_evaluation_mib": rss_before,
        "estimates": {
            name: [row.value, row.lower, row.upper] for name, row in result.result.estimates.items()
        },
        "logged_value": result.result.logged_value,
    }


def markdown(document: dict[str, Any]) -> str:
    consumer, summary, evaluation = (
        document["results"][part] for part in ("consumer", "summary", "evaluation")
    )
    day = consumer["day_at_1000_invokes_per_second_gb"]
    lines = [
        "# The monitor: consumer throughput, storage, GetSummary, EvaluatePolicy",
        "",
        f"Command: `{document['command']}` ({document['date']}, {document['machine']['cpus']} CPUs, "
        f"load average {', '.join(f'{x:.2f}' for x in document['machine']['load_average'])}).",
        *(
            f"Part {part} re-run: `{run['command']}` ({run['date']})."
            for part, run in document.get("reruns", {}).items()
        ),
        "",
        "| what | measured |",
        "|---|---|",
        f"| consumer: entries archived, rolled up and acknowledged per second (one replica) | "
        f"{consumer['entries_per_second']:,.0f} ({consumer['contacts_per_second']:,.0f} contacts/s with a response for every tenth) |",
        f"| Redis bytes per decision-log entry (50 eligible offers) | {consumer['redis_bytes_per_entry']:,.0f} |",
        f"| Parquet bytes per contact / per response | {consumer['parquet_bytes_per_contact']:,.0f} / {consumer['parquet_bytes_per_response']:,.0f} |",
        f"| a day at 1,000 Invokes/s: Parquet contacts, responses (10% answered), SQL rollups | "
        f"{day['parquet_contacts']:.1f} GB, {day['parquet_responses_at_10_percent']:.2f} GB, "
        f"{summary['sql_bytes_per_day_at_1000_invokes_per_second'] / 1e9:.2f} GB |",
        f"| GetSummary over {summary['contacts']:,} logged contacts ({summary['rollup_rows']:,} rollup rows, SQLite): whole window / last hour, median of 7 | "
        f"{summary['summary_whole_window_ms_median']:.0f} ms / {summary['summary_one_hour_ms_median']:.0f} ms |",
        f"| EvaluatePolicy (IPS, SNIPS, DM, DR, 500 bootstrap resamples, Thompson candidate replayed) over {evaluation['decisions']:,} decisions | "
        f"{evaluation['evaluate_seconds']:.0f} s ({evaluation['microseconds_per_decision']:.0f} us per decision; reading the archive {evaluation['read_seconds']:.1f} s) |",
        f"| EvaluatePolicy peak memory (process) | {evaluation['peak_rss_mib']:,.0f} MiB (before it: {evaluation['peak_rss_before_evaluation_mib']:,.0f} MiB) |",
        "",
    ]
    lines += [
        "The consumer's capacity is compared with the highest Invoke rate the stack sustained here",
        "(bench/results/invoke_throughput.md: about 1,100-1,240 Invokes/s through Envoy with two",
        "replicas): one monitor replica keeps up with that rate with room to spare; lag under live load",
        "is reported by GetSummary (decision_log.lag) and the consumer-lag metric.",
        "",
    ]
    return "\n".join(lines)


PARTS = {"consumer": consumer_part, "summary": summary_part, "evaluation": evaluation_part}


def _run_part(name: str, size: int, queue: Any) -> None:
    queue.put(PARTS[name](size))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consumer-entries", type=int, default=100_000)
    parser.add_argument("--summary-contacts", type=int, default=10_000_000)
    parser.add_argument("--evaluation-decisions", type=int, default=1_000_000)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["consumer", "summary", "evaluation"],
        help="Run only these; keep the others",
    )
    arguments = parser.parse_args()
    sizes = {
        "consumer": arguments.consumer_entries,
        "summary": arguments.summary_contacts,
        "evaluation": arguments.evaluation_decisions,
    }
    if arguments.parts:
        sizes = {part: size for part, size in sizes.items() if part in arguments.parts}
    context = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {}
    for name, size in sizes.items():
        queue = context.Queue()
        process = context.Process(target=_run_part, args=(name, size, queue))
        process.start()
        results[name] = queue.get()
        process.join()
        print(name, json.dumps(results[name], indent=1), flush=True)
    command = "python bench/monitor.py " + " ".join(sys.argv[1:])
    date = datetime.now(UTC).isoformat(timespec="seconds")
    if arguments.parts and (RESULTS / "monitor.json").exists():
        document = json.loads((RESULTS / "monitor.json").read_text())
        document["results"].update(results)
        document.setdefault("reruns", {}).update(
            {part: {"command": command, "date": date} for part in results}
        )
    else:
        document = {
            "command": command,
            "date": date,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_average": os.getloadavg(),
            },
            "results": results,
        }
    (RESULTS / "monitor.json").write_text(json.dumps(document, indent=2) + "\n")
    (RESULTS / "monitor.md").write_text(markdown(document))
    print(f"wrote {RESULTS / 'monitor.json'} and monitor.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
