"""Benchmark: model serving through Envoy, and hot swaps of the bound model under continuous load.

    .venv/bin/python bench/model_serving.py

Starts the local stack (`libs.stack.launcher.up`: Redis, config, two predictor replicas, ingest,
trainer, monitor, Envoy) on free ports in a temporary state directory, ingests a synthetic take-up
table with `liveloop ingest` and trains two versions of a small take-up model with `liveloop train`
(the real trainer service and its worker; the versions differ by seed). It publishes a deployment
whose algorithm is `model` and which binds version 1, and waits until both replicas serve it. Then:

1. ModelInfer against Ping (same run, same Envoy, invoke key). h2load (Debian `nghttp2-client`)
   sends gRPC frames of serialized requests to `inference.GRPCInferenceService/ModelInfer` (one FP32
   input `features` of [batch, width] as ModelMetadata says, batch 1 and batch 32, data in
   `raw_input_contents`) and to `PredictorService/Ping`, at 1 in flight and at 50 in flight
   (`-c10 -m5`), rounds alternating the order; an unrecorded warm-up per RPC and level sizes each
   measured run (bounded by a request count, about `--duration` seconds). As in
   invoke_throughput.py, HTTP 200 proves nothing about the gRPC status, so each run checks that the
   replicas' `liveloop_rpc_requests_total` counted exactly h2load's requests, all OK; before the load
   a Python client and `nghttp -v` check grpc-status 0 and the decoded probabilities of the exact
   bodies, and a negative control with a wrong API key shows that failing calls would be caught.

2. Hot swaps under load. A load generator (a separate process: grpc.aio clients, closed loop) sends
   Invoke (the `model` deployment) and ModelInfer (no version pinned: the newest loaded version
   answers) through Envoy without pause, while this process publishes `--swaps` config revisions
   that alternate the bound version (2, 1, 2, ...): each replica verifies, loads and warms the
   version it does not hold, swaps, and drops the old one. After each Publish it polls both replicas
   directly (Ping's config_revision, every 5 ms) until both serve the revision: swap latency is
   Publish start -> the second replica serving. It records every request's outcome and the version
   that answered it (Invoke: InvokeResponse.model, "name:version"; ModelInfer: model_version),
   cross-checks each Invoke's model against the version bound by the config revision it names
   (disagreements are counted), checks that each offer's model_score equals its arm_reward (the
   `model` algorithm scores with the model), counts gRPC codes on the replicas and Envoy's upstream
   retries and 5xx, and samples
   each replica's RSS (psutil, pid from the stack record) before the first swap (after the warm-up)
   and after every swap: growth after 10 and after all swaps, and the slope over swaps 10..N.

Results go to bench/results/model_serving.{json,md}. The stack is always stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from google.protobuf.struct_pb2 import Struct, Value  # noqa: E402

from bench.invoke_throughput import (  # noqa: E402
    INSTALL_HINT,
    Level,
    code_version,
    cpu_seconds,
    envoy_stats,
    for_requests,
    for_seconds,
    grpc_frame,
    h2load_argv,
    log_latencies,
    machine_facts,
    memory,
    negative_control,
    observed_processes,
    parse_h2load,
    percentile,
    rpc_counts,
    running_stack,
    shown,
    stack_settings,
    verify_with_nghttp,
)
from libs.common.client import open_blocking_channel  # noqa: E402
from libs.protos.inference import grpc_predict_v2_pb2 as oip  # noqa: E402
from libs.protos.inference import grpc_predict_v2_pb2_grpc  # noqa: E402
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc  # noqa: E402
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc  # noqa: E402
from libs.stack.credentials import load_credentials  # noqa: E402
from libs.stack.launcher import StackSettings  # noqa: E402
from tests.trainer_datasets import OFFERS, REGIONS, take_up_rows, write_csv  # noqa: E402

DEPLOYMENT = "bench-model"
MODEL = "bench-take-up"
TABLE = "take_up"
PING_PATH = "/liveloop.predictor.v1.PredictorService/Ping"
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
INVOKE_METHOD = "PredictorService/Invoke"
INFER_METHOD = "GRPCInferenceService/ModelInfer"
PING_METHOD = "PredictorService/Ping"
POLL_SECONDS = 0.005
SWAP_TIMEOUT_SECONDS = 60.0
CALL_TIMEOUT_SECONDS = 5.0
COMBINATIONS = 120  # distinct feature values among the Invoke requests (scores repeat per combination)


# Models and the deployment -------------------------------------------------------------------------


def training_spec(seed: int, epochs: int) -> dict[str, Any]:
    return {
        "model_name": MODEL,
        "training_set": TABLE,
        "label": "label",
        "features": [
            "age",
            "tenure_months",
            {"name": "region", "encoding": "one_hot"},
            {"name": "offer_id", "encoding": "offer"},
        ],
        "hyperparameters": {"epochs": epochs, "learning_rate": 0.05, "batch_size": 128, "hidden_sizes": [8]},
        "split": {"time_column": "event_time"},
        "seed": seed,
    }


def deployment_spec(version: int) -> str:
    """Score every offer with the bound model; each revision differs only in the bound version."""
    return json.dumps(
        {
            "name": DEPLOYMENT,
            "description": "model_serving benchmark",
            "offers": [{"id": offer} for offer in OFFERS],
            "default_number_of_offers": len(OFFERS),
            "exploration_epsilon": 0.0,
            "model": {"name": MODEL, "version": version},
            "algorithm": {"approach": "model"},
        }
    )


def cli(env: dict[str, str], state_dir: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "libs.cli.main", *args, "--state-dir", str(state_dir)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def train_models(
    settings: StackSettings, work: Path, rows: int, epochs: int, seeds: tuple[int, ...]
) -> dict[str, Any]:
    """`liveloop ingest` the take-up table, then `liveloop train` one version per seed."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIVELOOP_")}
    env.update(settings.environment())
    data = write_csv(work / "take_up.csv", take_up_rows(rows))
    started = time.perf_counter()
    loaded = cli(
        env,
        settings.state_dir,
        "ingest",
        str(data),
        "--table",
        TABLE,
        "--event-time",
        "event_time",
        "--json",
        timeout=120,
    )
    if loaded.returncode != 0:
        raise RuntimeError(f"liveloop ingest failed:\n{loaded.stdout}\n{loaded.stderr}")
    result: dict[str, Any] = {
        "rows": rows,
        "ingest_seconds": round(time.perf_counter() - started, 2),
        "versions": [],
    }
    for seed in seeds:
        spec_file = work / f"take-up-seed-{seed}.yaml"
        spec_file.write_text(yaml.safe_dump(training_spec(seed, epochs)))
        started = time.perf_counter()
        trained = cli(env, settings.state_dir, "train", str(spec_file), "--json", timeout=300)
        if trained.returncode != 0:
            raise RuntimeError(f"liveloop train failed:\n{trained.stdout}\n{trained.stderr}")
        final = json.loads(trained.stdout)
        if final.get("state") != "JOB_STATE_SUCCEEDED":
            raise RuntimeError(f"training did not succeed: {json.dumps(final)}")
        metrics = final.get("metrics", {})
        result["versions"].append(
            {
                "version": int(final["model"]["version"]),
                "seed": seed,
                "epochs": epochs,
                "seconds": round(time.perf_counter() - started, 2),
                "auc": round(float(metrics.get("auc", float("nan"))), 4),
                "log_loss": round(float(metrics.get("log_loss", float("nan"))), 4),
            }
        )
        print(f"  trained {MODEL} version {final['model']['version']} (seed {seed})", flush=True)
    return result


# Config: publish and wait for both replicas --------------------------------------------------------


def publish(config_target: str, admin_key: str, spec_text: str, message: str) -> int:
    with open_blocking_channel(config_target, api_key=admin_key, deadline_seconds=30) as channel:
        reply = config_pb2_grpc.ConfigServiceStub(channel).Publish(
            config_pb2.PublishRequest(spec_text=spec_text, message=message)
        )
    return int(reply.revision)


def replica_status(config_target: str, admin_key: str) -> list[dict[str, Any]]:
    with open_blocking_channel(config_target, api_key=admin_key, deadline_seconds=10) as channel:
        reply = config_pb2_grpc.ConfigServiceStub(channel).ReplicaStatus(config_pb2.ReplicaStatusRequest())
    return [
        {
            "replica_id": r.replica_id,
            "applied_revision": r.applied_revision,
            "last_nack_revision": r.last_nack_revision,
            "last_nack_reason": r.last_nack_reason,
            "connected": r.connected,
        }
        for r in reply.replicas
        if r.service == "predictor"
    ]


class ReplicaRevisions:
    """Direct channels to each replica (not through Envoy): which config revision each one serves."""

    def __init__(self, ports: list[int], invoke_key: str) -> None:
        self._channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        self._stubs = [predictor_pb2_grpc.PredictorServiceStub(channel) for channel in self._channels]
        self._metadata = (("x-api-key", invoke_key),)

    def revision(self, index: int) -> int:
        try:
            reply = self._stubs[index].Ping(predictor_pb2.PingRequest(), timeout=2, metadata=self._metadata)
        except grpc.RpcError:
            return -1
        return int(reply.config_revision)

    def wait_for(self, revision: int, started: float, timeout: float) -> list[float | None]:
        """Seconds from `started` (perf_counter) until each replica served `revision`; None: never."""
        served: list[float | None] = [None] * len(self._stubs)
        deadline = time.perf_counter() + timeout
        while any(value is None for value in served) and time.perf_counter() < deadline:
            for index, value in enumerate(served):
                if value is None and self.revision(index) >= revision:
                    served[index] = time.perf_counter() - started
            if any(value is None for value in served):
                time.sleep(POLL_SECONDS)
        return served

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


# Request bodies ------------------------------------------------------------------------------------


def model_width(front_door: str, invoke_key: str, version: int) -> int:
    with open_blocking_channel(front_door, api_key=invoke_key, deadline_seconds=10) as channel:
        reply = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            oip.ModelMetadataRequest(name=MODEL, version=str(version))
        )
    (tensor,) = [t for t in reply.inputs if t.name == "features"]
    if tensor.datatype != "FP32" or len(tensor.shape) != 2:
        raise RuntimeError(f"unexpected input metadata: {tensor}")
    return int(tensor.shape[1])


def infer_request(batch: int, width: int, version: int | None) -> oip.ModelInferRequest:
    """One FP32 `features` input [batch, width]; one-hot columns take 0/1, so uniform [0, 1) is in range."""
    matrix = np.random.default_rng(batch).random((batch, width), dtype=np.float32)
    return oip.ModelInferRequest(
        model_name=MODEL,
        model_version="" if version is None else str(version),
        id=f"bench-batch-{batch}",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(name="features", datatype="FP32", shape=[batch, width])
        ],
        raw_input_contents=[matrix.astype("<f4").tobytes()],
    )


def invoke_request(index: int) -> predictor_pb2.InvokeRequest:
    """Customer `index`, with the features of combination index % COMBINATIONS as params."""
    combination = index % COMBINATIONS
    params = Struct()
    params.update(
        {
            "age": 18 + combination % 60,
            "tenure_months": combination,
            "region": REGIONS[combination % len(REGIONS)],
        }
    )
    return predictor_pb2.InvokeRequest(
        campaign=DEPLOYMENT, customer=f"cust-{index:06d}", params=Value(struct_value=params)
    )


def verify_infer(front_door: str, invoke_key: str, body: bytes, batch: int) -> dict[str, Any]:
    """Send these exact message bytes through Envoy with grpcio and decode the probabilities."""
    with grpc.insecure_channel(front_door) as channel:
        call = channel.unary_unary(
            INFER_PATH,
            request_serializer=lambda raw: raw,
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        try:
            reply = call(body, timeout=5, metadata=(("x-api-key", invoke_key),))
        except grpc.RpcError as exc:
            return {"grpc_status": exc.code().name, "detail": exc.details()}
    values = (
        np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
        if reply.raw_output_contents
        else np.array([])
    )
    shape = list(reply.outputs[0].shape) if reply.outputs else []
    return {
        "grpc_status": "OK",
        "model_version": reply.model_version,
        "output_shape": shape,
        "probabilities_ok": bool(
            shape == [batch, 1] and values.size == batch and ((values > 0) & (values < 1)).all()
        ),
        "first": round(float(values[0]), 6) if values.size else None,
    }


def verify_ping(front_door: str, invoke_key: str) -> dict[str, Any]:
    with open_blocking_channel(front_door, api_key=invoke_key, deadline_seconds=5) as channel:
        try:
            reply = predictor_pb2_grpc.PredictorServiceStub(channel).Ping(predictor_pb2.PingRequest())
        except grpc.RpcError as exc:
            return {"grpc_status": exc.code().name, "detail": exc.details()}
    return {"grpc_status": "OK", "replica": reply.replica_id, "config_revision": reply.config_revision}


# Part 1: ModelInfer against Ping with h2load -------------------------------------------------------


def method_of(path: str) -> str:
    return path.lstrip("/").rsplit(".", 1)[-1]


def measured_run(
    url: str,
    body: Path,
    level: Level,
    requests: int,
    invoke_key: str,
    log_file: Path,
    metrics_ports: list[int],
    processes: list[Any],
) -> dict[str, Any]:
    """One h2load run bounded by a request count; gRPC statuses counted on the replicas."""
    log_file.unlink(missing_ok=True)  # h2load appends
    argv = h2load_argv(url, body, level, for_requests(requests), invoke_key, log_file)
    counts_before = [rpc_counts(port) for port in metrics_ports]
    cpu_before = cpu_seconds(processes)
    wall_start = time.perf_counter()
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - wall_start
    cpu_after = cpu_seconds(processes)
    counts_after = [rpc_counts(port) for port in metrics_ports]
    if completed.returncode != 0:
        raise RuntimeError(f"h2load failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    parsed = parse_h2load(completed.stdout)
    latency, non_200 = log_latencies(log_file)
    method = method_of(url.split("://", 1)[1].split("/", 1)[1])
    codes: collections.Counter[str] = collections.Counter()
    for before, after in zip(counts_before, counts_after, strict=True):
        for (name, code), value in after.items():
            delta = int(value - before.get((name, code), 0.0))
            if name == method and delta > 0:
                codes[code] += delta
    succeeded = parsed.get("requests", {}).get("succeeded", 0)
    predictor_cpu = sum(
        cpu_after[n] - cpu_before[n] for n in cpu_after if n.startswith("predictor") and n in cpu_before
    )
    envoy_cpu = cpu_after.get("envoy", 0.0) - cpu_before.get("envoy", 0.0)
    done = parsed.get("requests", {}).get("done", 0)
    return {
        "command": shown(argv, invoke_key),
        "h2load": parsed,
        "latency_ms": latency,
        "log_rows_not_200": non_200,
        "server_grpc_codes": dict(codes),
        "every_request_grpc_ok": codes.get("OK", 0) == succeeded == requests and len(codes) == 1,
        "wall_seconds": round(wall, 2),
        "predictor_cores": round(predictor_cpu / wall, 3),
        "envoy_cores": round(envoy_cpu / wall, 3),
        "predictor_cpu_ms_per_request": round(1000 * predictor_cpu / done, 4) if done else None,
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }


def infer_against_ping(
    args: argparse.Namespace,
    work: Path,
    front_door: str,
    invoke_key: str,
    width: int,
    metrics_ports: list[int],
    processes: list[Any],
) -> dict[str, Any]:
    base = f"http://{front_door}"
    rpcs: dict[str, tuple[str, Path]] = {"Ping": (base + PING_PATH, work / "ping.bin")}
    rpcs["Ping"][1].write_bytes(grpc_frame(predictor_pb2.PingRequest().SerializeToString()))
    for batch in args.batches:
        path = work / f"infer-{batch}.bin"
        path.write_bytes(grpc_frame(infer_request(batch, width, 1).SerializeToString()))
        rpcs[f"ModelInfer batch {batch}"] = (base + INFER_PATH, path)

    verification: dict[str, Any] = {}
    for name, (url, body) in rpcs.items():
        if name == "Ping":
            checks = [verify_ping(front_door, invoke_key) for _ in range(2)]
            good = all(c["grpc_status"] == "OK" for c in checks)
        else:
            batch = int(name.rsplit(" ", 1)[1])
            checks = [verify_infer(front_door, invoke_key, body.read_bytes()[5:], batch) for _ in range(2)]
            good = all(c["grpc_status"] == "OK" and c["probabilities_ok"] for c in checks)
        nghttp = verify_with_nghttp(url, body, invoke_key)
        verification[name] = {"python_client": checks, "nghttp": nghttp}
        if not good or ("skipped" not in nghttp and nghttp.get("grpc_status") != 0):
            raise RuntimeError(f"verification failed for {name}: {json.dumps(verification[name])}")
    print(
        "verified: grpc-status 0 and probabilities in (0, 1) for every body (Python client and nghttp)",
        flush=True,
    )
    verification["negative_control"] = negative_control(
        base + "/liveloop.predictor.v1.PredictorService/", rpcs["Ping"][1], metrics_ports
    )

    levels = [
        Level("1 in flight", 1, 1),
        Level(f"{args.clients * args.streams} in flight", args.clients, args.streams),
    ]
    warm_up_rates: dict[tuple[str, str], float] = {}
    for level in levels:
        for name, (url, body) in rpcs.items():
            completed = subprocess.run(
                h2load_argv(url, body, level, for_seconds(args.warm_up), invoke_key, None),
                capture_output=True,
                text=True,
                check=True,
            )
            warm_up_rates[(name, level.name)] = parse_h2load(completed.stdout)["req_per_s"]
    time.sleep(1.0)  # requests cancelled at the end of the warm-up finish before counting starts
    print(
        "warm-up: " + ", ".join(f"{n} {lv} {r:.0f} req/s" for (n, lv), r in warm_up_rates.items()),
        flush=True,
    )
    runs = []
    names = list(rpcs)
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for level in levels:
            for name in order:
                url, body = rpcs[name]
                requests = max(100, round(warm_up_rates[(name, level.name)] * args.duration))
                run = measured_run(
                    url, body, level, requests, invoke_key, work / "h2load.log", metrics_ports, processes
                )
                run |= {"round": round_index + 1, "rpc": name, "level": level.name}
                runs.append(run)
                print(
                    f"round {round_index + 1} {name:20s} {level.name:13s} {run['h2load'].get('req_per_s', 0):8.0f} req/s"
                    f"  p50 {run['latency_ms']['p50']:.2f} ms  p99 {run['latency_ms']['p99']:.2f} ms"
                    f"  grpc codes {run['server_grpc_codes']}",
                    flush=True,
                )
    return {
        "levels": [level.__dict__ | {"in_flight": level.in_flight} for level in levels],
        "rpcs": names,
        "runs": runs,
        "verification": verification,
        "summary": summarize_infer(runs, names, [level.name for level in levels]),
    }


def summarize_infer(runs: list[dict[str, Any]], names: list[str], levels: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"rows": {}, "throughput_over_ping": {}}
    for name in names:
        for level in levels:
            rows = [r for r in runs if r["rpc"] == name and r["level"] == level]
            summary["rows"][f"{name} | {level}"] = {
                "rpc": name,
                "level": level,
                "req_per_s": round(statistics.median(r["h2load"]["req_per_s"] for r in rows), 1),
                "p50_ms": round(statistics.median(r["latency_ms"]["p50"] for r in rows), 3),
                "p99_ms": round(statistics.median(r["latency_ms"]["p99"] for r in rows), 3),
                "max_ms": round(max(r["latency_ms"]["max"] for r in rows), 3),
                "predictor_cores": round(statistics.median(r["predictor_cores"] for r in rows), 3),
                "predictor_cpu_ms_per_request": round(
                    statistics.median(r["predictor_cpu_ms_per_request"] or 0 for r in rows), 4
                ),
                "grpc_ok": sum(r["server_grpc_codes"].get("OK", 0) for r in rows),
                "grpc_non_ok": sum(v for r in rows for c, v in r["server_grpc_codes"].items() if c != "OK"),
                "every_request_grpc_ok": all(r["every_request_grpc_ok"] for r in rows),
                "per_round_req_per_s": [r["h2load"]["req_per_s"] for r in rows],
            }
    for name in names[1:]:
        for level in levels:
            ratios = []
            for round_number in sorted({r["round"] for r in runs}):
                pair = {
                    r["rpc"]: r["h2load"]["req_per_s"]
                    for r in runs
                    if r["round"] == round_number and r["level"] == level and r["rpc"] in (name, "Ping")
                }
                ratios.append(round(pair[name] / pair["Ping"], 3))
            summary["throughput_over_ping"][f"{name} | {level}"] = {
                "per_round": ratios,
                "median": round(statistics.median(ratios), 3),
            }
    return summary


# Part 2: the load generator (a separate process) ---------------------------------------------------


def load_generator(
    front_door: str,
    invoke_key: str,
    width: int,
    invoke_concurrency: int,
    infer_concurrency: int,
    infer_batch: int,
    ready: Any,
    stop: Any,
    results: Any,
) -> None:
    """Closed-loop grpc.aio clients through Envoy until `stop` is set; then one result on `results`:
    per request (rpc, monotonic start, latency ms, outcome), outcome being what answered and the
    scores (Invoke: "<revision>|<combination>|<model>|<offers with model_score != arm_reward>|<scores>",
    ModelInfer: "<version>|<scores>") or "!<gRPC code>: <details>"."""
    results.put(
        asyncio.run(
            _generate(
                front_door, invoke_key, width, invoke_concurrency, infer_concurrency, infer_batch, ready, stop
            )
        )
    )


async def _generate(
    front_door: str,
    invoke_key: str,
    width: int,
    invoke_concurrency: int,
    infer_concurrency: int,
    infer_batch: int,
    ready: Any,
    stop: Any,
) -> dict[str, Any]:
    metadata = (("x-api-key", invoke_key),)
    records: list[tuple[str, float, float, str]] = []
    stopping = asyncio.Event()
    infer_body = infer_request(infer_batch, width, None)  # no version: the newest one loaded answers
    async with grpc.aio.insecure_channel(front_door) as channel:
        predictor = predictor_pb2_grpc.PredictorServiceStub(channel)
        inference = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def invoke_loop(worker: int) -> None:
            index = worker
            while not stopping.is_set():
                started = time.monotonic()
                try:
                    reply = await predictor.Invoke(
                        invoke_request(index), timeout=CALL_TIMEOUT_SECONDS, metadata=metadata
                    )
                    scores = ",".join(
                        f"{row.result.offer}={row.result.arm_reward:.6f}"
                        for row in sorted(reply.final_result, key=lambda row: row.result.offer)
                    )
                    # The `model` algorithm scores with the model: its score per offer is the reward.
                    score_mismatches = sum(
                        1 for row in reply.final_result if row.result.model_score != row.result.arm_reward
                    )
                    outcome = f"{reply.config_revision}|{index % COMBINATIONS}|{reply.model}|{score_mismatches}|{scores}"
                    if len(reply.final_result) != len(OFFERS):
                        outcome = (
                            f"!SHORT: {len(reply.final_result)} offers in revision {reply.config_revision}"
                        )
                except grpc.aio.AioRpcError as exc:
                    outcome = f"!{exc.code().name}: {exc.details()}"
                records.append(("Invoke", started, 1000 * (time.monotonic() - started), outcome))
                index += invoke_concurrency

        async def infer_loop() -> None:
            while not stopping.is_set():
                started = time.monotonic()
                try:
                    reply = await inference.ModelInfer(
                        infer_body, timeout=CALL_TIMEOUT_SECONDS, metadata=metadata
                    )
                    values = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
                    good = values.size == infer_batch and bool(((values > 0) & (values < 1)).all())
                    shown_values = ",".join(f"{value:.6f}" for value in values[:4])
                    outcome = (
                        f"{reply.model_version}|{shown_values}"
                        if good
                        else f"!BAD_OUTPUT: {values.size} values"
                    )
                except grpc.aio.AioRpcError as exc:
                    outcome = f"!{exc.code().name}: {exc.details()}"
                records.append(("ModelInfer", started, 1000 * (time.monotonic() - started), outcome))

        async def watch_stop() -> None:
            await asyncio.to_thread(stop.wait)  # a multiprocessing Event, set by the parent
            stopping.set()

        # The parent waits for `ready` (this process takes seconds to start on a busy machine) before
        # its warm-up time starts; a Ping, so the replicas' Invoke and ModelInfer counts stay exact.
        await predictor.Ping(predictor_pb2.PingRequest(), timeout=30, metadata=metadata)
        ready.set()
        began = time.monotonic()
        await asyncio.gather(
            watch_stop(),
            *(invoke_loop(worker) for worker in range(invoke_concurrency)),
            *(infer_loop() for _ in range(infer_concurrency)),
        )
        ended = time.monotonic()
    return {"began": began, "ended": ended, "records": records}


# Part 2: the swaps ---------------------------------------------------------------------------------


def predictor_processes(processes: list[Any]) -> dict[str, Any]:
    return {p.name: p.process for p in processes if p.name.startswith("predictor")}


def rss_mib(replicas: dict[str, Any]) -> dict[str, float]:
    return {name: round(process.memory_info().rss / 2**20, 2) for name, process in replicas.items()}


def rpc_totals(metrics_ports: list[int]) -> dict[tuple[str, str], float]:
    totals: dict[tuple[str, str], float] = collections.defaultdict(float)
    for port in metrics_ports:
        for key, value in rpc_counts(port).items():
            totals[key] += value
    return totals


def hot_swaps(
    args: argparse.Namespace,
    settings: StackSettings,
    front_door: str,
    admin_key: str,
    invoke_key: str,
    width: int,
    processes: list[Any],
    start_revision: int,
) -> dict[str, Any]:
    config_target = f"127.0.0.1:{settings.config_port}"
    metrics_ports = settings.predictor_metrics_ports
    replicas = predictor_processes(processes)
    watcher = ReplicaRevisions(settings.predictor_ports, invoke_key)
    bound: dict[int, int] = {start_revision: 1}  # config revision -> model version it binds

    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    results = context.Queue()
    generator = context.Process(
        target=load_generator,
        args=(
            front_door,
            invoke_key,
            width,
            args.invoke_concurrency,
            args.infer_concurrency,
            args.swap_infer_batch,
            ready,
            stop,
            results,
        ),
        name="model-serving-load",
    )
    counts_before = rpc_totals(metrics_ports)
    envoy_before = envoy_stats(settings.envoy_admin_port)
    generator.start()
    swaps: list[dict[str, Any]] = []
    memory_samples: dict[str, Any] = {}
    try:
        if not ready.wait(timeout=120):
            raise RuntimeError("the load generator did not start within 120 s")
        time.sleep(args.load_warm_up)
        baseline = rss_mib(replicas)
        memory_samples["before_first_swap"] = memory(processes)
        rss_after: list[dict[str, float]] = []
        cpu_before = cpu_seconds(processes)
        swaps_began = time.monotonic()
        print(f"load running; RSS before the first swap: {baseline}", flush=True)
        for number in range(1, args.swaps + 1):
            version = 2 if number % 2 == 1 else 1
            started_mono = time.monotonic()
            started = time.perf_counter()
            revision = publish(
                config_target, admin_key, deployment_spec(version), f"model_serving swap {number}"
            )
            published = time.perf_counter() - started
            bound[revision] = version
            served = watcher.wait_for(revision, started, SWAP_TIMEOUT_SECONDS)
            time.sleep(args.dwell)  # the new version serves the load for a while before the next swap
            rss = rss_mib(replicas)
            rss_after.append(rss)
            swap = {
                "swap": number,
                "revision": revision,
                "version": version,
                "started_monotonic": started_mono,
                "publish_ms": round(1000 * published, 2),
                "replica_serving_ms": [None if s is None else round(1000 * s, 2) for s in served],
                "both_serving_ms": None
                if None in served
                else round(1000 * max(s for s in served if s is not None), 2),
                "rss_mib": rss,
            }
            swaps.append(swap)
            if swap["both_serving_ms"] is None:
                print(f"swap {number}: revision {revision} not served by every replica: {served}", flush=True)
            if number in (1, 10, args.swaps) or number % 10 == 0:
                print(
                    f"swap {number:3d}: revision {revision} (v{version}) served by both after "
                    f"{swap['both_serving_ms']} ms; RSS {rss}",
                    flush=True,
                )
            if number == 10:
                memory_samples["after_10_swaps"] = memory(processes)
        swaps_ended = time.monotonic()
        cpu_after = cpu_seconds(processes)
        memory_samples[f"after_{args.swaps}_swaps"] = memory(processes)
        time.sleep(args.load_tail)  # keep the load on after the last swap
    finally:
        stop.set()
        try:
            generated = results.get(timeout=60)
        except queue.Empty:
            generated = {
                "began": 0.0,
                "ended": 0.0,
                "records": [],
                "error": "the load generator sent nothing",
            }
        generator.join(timeout=30)
        if generator.is_alive():
            generator.terminate()
        watcher.close()
    time.sleep(0.5)
    counts_after = rpc_totals(metrics_ports)
    envoy_after = envoy_stats(settings.envoy_admin_port)
    status = replica_status(config_target, admin_key)
    return {
        "swaps": swaps,
        "bound_versions": {str(k): v for k, v in bound.items()},
        "baseline_rss_mib": baseline,
        "rss_after_each_swap_mib": rss_after,
        "memory_full": memory_samples,
        "window": {
            "load_began": generated["began"],
            "swaps_began": swaps_began,
            "swaps_ended": swaps_ended,
            "load_ended": generated["ended"],
        },
        "cpu_cores_during_swaps": {
            name: round((cpu_after[name] - cpu_before[name]) / (swaps_ended - swaps_began), 3)
            for name in cpu_after
            if name in cpu_before
        },
        "server_grpc_codes": {
            f"{method} {code}": int(counts_after[(method, code)] - counts_before.get((method, code), 0.0))
            for (method, code) in counts_after
            if method in (INVOKE_METHOD, INFER_METHOD)
            and counts_after[(method, code)] > counts_before.get((method, code), 0.0)
        },
        "envoy_upstream": {k: envoy_after.get(k, 0) - envoy_before.get(k, 0) for k in envoy_after},
        "replica_status_after": status,
        "load": analyse_load(generated, bound, swaps_began, swaps_ended),
        "settings": {
            "invoke_concurrency": args.invoke_concurrency,
            "infer_concurrency": args.infer_concurrency,
            "infer_batch": args.swap_infer_batch,
            "load_warm_up_s": args.load_warm_up,
            "load_tail_s": args.load_tail,
            "dwell_s": args.dwell,
        },
    }


def analyse_load(
    generated: dict[str, Any], bound: dict[int, int], began: float, ended: float
) -> dict[str, Any]:
    """Per RPC: totals, failures, versions served, latency before and during the swaps.

    The model behind an answer: ModelInfer names its version (model_version); an Invoke names it in
    InvokeResponse.model ("name:version"), cross-checked against the version bound by the config
    revision the answer names (whose binding we published): disagreements are counted. Both are
    checked against the scores themselves: the model is deterministic, so every answer for the same
    input (Invoke: the same feature combination) from the same version must carry the same scores,
    and the two versions differ. For Invoke, each offer's model_score must equal its arm_reward.
    """
    result: dict[str, Any] = {"error": generated.get("error")} if generated.get("error") else {}
    for rpc in ("Invoke", "ModelInfer"):
        rows = [r for r in generated["records"] if r[0] == rpc]
        failures = [r for r in rows if r[3].startswith("!")]
        versions: collections.Counter[str] = collections.Counter()
        model_field: collections.Counter[str] = collections.Counter()
        disagreements: collections.Counter[str] = collections.Counter()  # "model named -> revision binds"
        disagreement_examples: list[dict[str, Any]] = []
        score_mismatch_replies = score_mismatch_offers = 0
        scores: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for _, started, _, outcome in rows:
            if outcome.startswith("!"):
                continue
            if rpc == "Invoke":
                revision_text, combination, model, mismatched, scored = outcome.split("|", 4)
                name, _, version = model.partition(":")
                if name != MODEL or not version:
                    version = f"unnamed ({model!r})"
                expected = bound.get(int(revision_text))
                if expected is None or version != str(expected):
                    disagreements[f"{model!r} in revision {revision_text} (binds {expected})"] += 1
                    if len(disagreement_examples) < 10:
                        disagreement_examples.append(
                            {
                                "at_s_from_first_swap": round(started - began, 3),
                                "config_revision": int(revision_text),
                                "model": model,
                                "bound_version": expected,
                            }
                        )
                model_field[model] += 1
                score_mismatch_offers += int(mismatched)
                score_mismatch_replies += int(mismatched) > 0
            else:
                version, scored = outcome.split("|", 1)
                combination = ""
            versions[f"{MODEL}:{version}" if version.isdigit() else version] += 1
            scores[(combination, version)][scored] += 1
        # Answers whose scores are not the usual ones of their version for that input.
        inconsistent = sum(sum(c.values()) - max(c.values()) for c in scores.values())
        combinations = {combination for combination, _ in scores}
        # Inputs answered by both versions, and among them those where the versions' scores differ
        # (only there can the scores tell which version answered).
        both = [c for c in combinations if (c, "1") in scores and (c, "2") in scores]
        distinguishable = sum(
            1 for c in both if scores[(c, "1")].most_common(1)[0][0] != scores[(c, "2")].most_common(1)[0][0]
        )
        during = [r for r in rows if began <= r[1] < ended]
        result[rpc] = {
            "requests": len(rows),
            "failed": len(failures),
            # Answers with grpc-status OK (a wrong answer with status OK still counts as failed above).
            "grpc_ok": sum(
                1 for r in rows if not r[3].startswith("!") or r[3].startswith(("!SHORT", "!BAD_OUTPUT"))
            ),
            "requests_during_swaps": len(during),
            "failed_during_swaps": sum(1 for r in during if r[3].startswith("!")),
            "failure_kinds": dict(collections.Counter(r[3].split(":", 1)[0] for r in failures)),
            "first_failures": [
                {"at_s_from_first_swap": round(r[1] - began, 3), "outcome": r[3][:300]} for r in failures[:10]
            ],
            "served_by_version": dict(sorted(versions.items())),
            "answers_with_other_scores_than_their_version": inconsistent,
            "inputs_seen": len(combinations),
            "inputs_answered_by_both_versions": len(both),
            "inputs_where_v1_and_v2_scores_differ": distinguishable,
            "req_per_s_during_swaps": round(len(during) / (ended - began), 1) if ended > began else None,
            "latency_ms_before_swaps": latency_summary(rows, float("-inf"), began),
            "latency_ms_during_swaps": latency_summary(rows, began, ended),
        }
        if rpc == "Invoke":
            result[rpc] |= {
                "model_field_of_replies": dict(sorted(model_field.items())),
                "model_disagrees_with_revision_binding": sum(disagreements.values()),
                "model_disagreement_kinds": dict(disagreements),
                "first_model_disagreements": disagreement_examples,
                "replies_with_model_score_not_arm_reward": score_mismatch_replies,
                "offers_with_model_score_not_arm_reward": score_mismatch_offers,
            }
    return result


def latency_summary(rows: list[Any], low: float, high: float) -> dict[str, float]:
    """Latency (ms) of the successful requests that started in [low, high)."""
    values = sorted(r[2] for r in rows if low <= r[1] < high and not r[3].startswith("!"))
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(values[-1], 3) if values else float("nan"),
    }


def summarize_swaps(part: dict[str, Any], swaps_wanted: int) -> dict[str, Any]:
    swaps = part["swaps"]
    both = sorted(s["both_serving_ms"] for s in swaps if s["both_serving_ms"] is not None)
    publish_ms = sorted(s["publish_ms"] for s in swaps)
    memory_rows = {}
    for name, base in part["baseline_rss_mib"].items():
        series = [sample[name] for sample in part["rss_after_each_swap_mib"]]
        row: dict[str, Any] = {"before_first_swap": base}
        if len(series) >= 10:
            row["after_10"] = series[9]
        row[f"after_{len(series)}"] = series[-1] if series else None
        row["growth_percent_after_10"] = (
            round(100 * (series[9] - base) / base, 2) if len(series) >= 10 else None
        )
        row["growth_percent"] = round(100 * (series[-1] - base) / base, 2) if series else None
        row["max"] = max(series) if series else None
        if len(series) > 10:
            xs = list(range(10, len(series) + 1))
            slope, _ = statistics.linear_regression(xs, series[9:])
            row["slope_kib_per_swap_10_to_end"] = round(slope * 1024, 1)
            # Alternate swaps bind different versions: fit each parity too, so a v1/v2 size
            # difference does not read as a trend.
            for parity, label in ((0, "even swaps (v1 bound)"), (1, "odd swaps (v2 bound)")):
                pairs = [(x, y) for x, y in zip(xs, series[9:], strict=True) if x % 2 == parity]
                if len(pairs) >= 3:
                    slope_p, _ = statistics.linear_regression([p[0] for p in pairs], [p[1] for p in pairs])
                    row[f"slope_kib_per_swap_{label}"] = round(slope_p * 1024, 1)
        memory_rows[name] = row
    load = part["load"]
    return {
        "swaps_done": len(swaps),
        "swaps_served_by_both": len(both),
        "swap_ms": {
            "p50": round(percentile(both, 50), 1),
            "p99": round(percentile(both, 99), 1),
            "max": both[-1] if both else None,
            "mean": round(statistics.fmean(both), 1) if both else None,
        },
        "publish_rpc_ms": {
            "p50": round(percentile(publish_ms, 50), 1),
            "p99": round(percentile(publish_ms, 99), 1),
        },
        "requests": sum(load[rpc]["requests"] for rpc in ("Invoke", "ModelInfer") if rpc in load),
        "failed": sum(load[rpc]["failed"] for rpc in ("Invoke", "ModelInfer") if rpc in load),
        "server_non_ok": sum(v for k, v in part["server_grpc_codes"].items() if not k.endswith(" OK")),
        # Every OK the client saw is one the replicas counted, and no more: Envoy retried nothing.
        "client_ok_equals_replica_ok": all(
            load[rpc]["grpc_ok"] == part["server_grpc_codes"].get(f"{method} OK", 0)
            for rpc, method in (("Invoke", INVOKE_METHOD), ("ModelInfer", INFER_METHOD))
            if rpc in load
        ),
        "memory": memory_rows,
        "swaps_wanted": swaps_wanted,
    }


# Report --------------------------------------------------------------------------------------------


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    summary = report["swap_summary"]
    load = report["hot_swaps"]["load"]
    mismatches = sum(
        load[r]["answers_with_other_scores_than_their_version"] for r in ("Invoke", "ModelInfer") if r in load
    )
    status = report["hot_swaps"]["replica_status_after"]
    last_revision = report["hot_swaps"]["swaps"][-1]["revision"] if report["hot_swaps"]["swaps"] else None
    exact = all(row["every_request_grpc_ok"] for row in report["infer_vs_ping"]["summary"]["rows"].values())
    result = [
        {
            "goal": "h2load runs: every request answered grpc-status OK (replica counters = h2load's count)",
            "value": "yes" if exact else "counts differ in some run (see JSON)",
            "met": exact,
        },
        {
            "goal": "no failed request during the swaps (client side and replica counters)",
            "value": f"{summary['failed']} failed of {summary['requests']} (client), {summary['server_non_ok']} non-OK on "
            "the replicas; client OK count "
            + ("=" if summary["client_ok_equals_replica_ok"] else "!=")
            + " replicas' OK count",
            "met": summary["failed"] == 0
            and summary["server_non_ok"] == 0
            and summary["client_ok_equals_replica_ok"],
        },
        {
            "goal": f"every swap served by both replicas (ReplicaStatus: both applied revision {last_revision}, no NACK)",
            "value": f"{summary['swaps_served_by_both']} of {summary['swaps_wanted']}; "
            + ", ".join(
                f"{r['replica_id']} applied {r['applied_revision']}, last NACK {r['last_nack_revision']}"
                for r in status
            ),
            "met": summary["swaps_served_by_both"] == summary["swaps_wanted"]
            and all(r["applied_revision"] == last_revision and r["last_nack_revision"] == 0 for r in status),
        },
        {
            "goal": "every answer scored by the version that served it (Invoke: InvokeResponse.model; "
            "ModelInfer: model_version): same scores as the other answers of that version",
            "value": f"{mismatches} answers with other scores; v1 and v2 scores differ on "
            + ", ".join(
                f"{load[r]['inputs_where_v1_and_v2_scores_differ']} of the {load[r]['inputs_answered_by_both_versions']} "
                f"{r} inputs answered by both"
                for r in ("Invoke", "ModelInfer")
                if r in load
            ),
            "met": mismatches == 0
            and all(
                load[r]["inputs_where_v1_and_v2_scores_differ"]
                == load[r]["inputs_answered_by_both_versions"]
                > 0
                for r in ("Invoke", "ModelInfer")
                if r in load
            ),
        },
    ]
    if "Invoke" in load:
        invoke = load["Invoke"]
        named = invoke["model_field_of_replies"]
        disagree = invoke["model_disagrees_with_revision_binding"]
        answered = sum(named.values())
        result.append(
            {
                "goal": 'every Invoke\'s InvokeResponse.model ("name:version") is the version bound by the config '
                "revision it names",
                "value": f"{disagree} of {answered} disagree"
                + (f" ({invoke['model_disagreement_kinds']})" if disagree else "")
                + "; "
                + ", ".join(f"{k!r}: {v}" for k, v in named.items()),
                "met": answered > 0 and disagree == 0,
            }
        )
        offers = invoke["offers_with_model_score_not_arm_reward"]
        result.append(
            {
                "goal": "algorithm `model`: every offer's FinalResult.Result.model_score equals its arm_reward",
                "value": f"{offers} of {answered * len(OFFERS)} offers differ "
                f"({invoke['replies_with_model_score_not_arm_reward']} of {answered} replies)",
                "met": answered > 0 and offers == 0,
            }
        )
    after_key = f"after_{summary['swaps_done']}"
    for name, row in summary["memory"].items():
        growth = row["growth_percent"]
        result.append(
            {
                "goal": f"{name} RSS growth after {summary['swaps_done']} swaps < 10%",
                "value": f"{growth}% ({row['before_first_swap']} -> {row[after_key]} MiB; "
                f"slope {row.get('slope_kib_per_swap_10_to_end')} KiB/swap over swaps 10..{summary['swaps_done']})",
                "met": growth is not None and growth < 10,
            }
        )
    return result


def write_markdown(report: dict[str, Any], path: Path) -> None:
    machine = report["machine"]
    models = report["models"]
    part1 = report["infer_vs_ping"]
    swap_summary = report["swap_summary"]
    part2 = report["hot_swaps"]
    settings = report["settings"]
    busy = part1["levels"][1]
    lines = [
        "# Model serving through Envoy: ModelInfer against Ping, and hot swaps under load",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['when']}  ",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, shared with other work "
        f"(load average {machine['load_average_at_start']} at start, {machine['load_average_at_end']} at end); "
        f"Python {machine['python']}, grpcio {machine['grpcio']}, {machine['h2load']}.  ",
        f"Code: commit {report['code']['commit']}"
        + (
            f", with uncommitted changes in {len(report['code']['uncommitted_changes_in'])} files under services/ and "
            "libs/ (listed in the JSON)."
            if report["code"]["uncommitted_changes_in"]
            else "."
        ),
        f"Took {report['seconds']:.0f} s.",
        "",
        "Stack: `libs.stack.launcher.up` on free ports (Redis, config, 2 predictor replicas, ingest, trainer, monitor, "
        f"Envoy `--concurrency 1`, round robin). Models: `liveloop ingest` of {models['rows']} synthetic take-up rows, "
        f"then `liveloop train` twice through the trainer service ({MODEL}, features age, tenure_months, region one-hot, "
        "offer_id; hidden [8]): "
        + "; ".join(
            f"version {v['version']} seed {v['seed']}, {v['epochs']} epochs, test AUC {v['auc']}, {v['seconds']:.0f} s"
            for v in models["versions"]
        )
        + f". Deployment `{DEPLOYMENT}`: {len(OFFERS)} offers, algorithm `model`, exploration 0. "
        f"Model input width (ModelMetadata): {report['model_width']} FP32.",
        "",
        "## ModelInfer against Ping (h2load through Envoy)",
        "",
        f"`-c1 -m1` (1 in flight) and `-c{busy['clients']} -m{busy['streams']}` ({busy['in_flight']} in flight); "
        f"an unrecorded {settings['warm_up']:g} s warm-up per RPC and level sizes each measured run (`-n`, about "
        f"{settings['duration']:g} s); {settings['rounds']} rounds, order alternating; medians. ModelInfer pins "
        "version 1, data in `raw_input_contents`. gRPC success is counted on the replicas "
        "(`liveloop_rpc_requests_total` by code), not from HTTP 200.",
        "",
        "| RPC | load | req/s (median) | p50 ms | p99 ms | max ms | predictor cores | predictor CPU ms/req | gRPC OK | non-OK |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in part1["summary"]["rows"].values():
        lines.append(
            f"| {row['rpc']} | {row['level']} | {row['req_per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
            f"| {row['max_ms']:.1f} | {row['predictor_cores']:.2f} | {row['predictor_cpu_ms_per_request']:.3f} "
            f"| {row['grpc_ok']} | {row['grpc_non_ok']} |"
        )
    lines += ["", "| ratio | per round | median |", "|---|---|---|"]
    for key, ratio in part1["summary"]["throughput_over_ping"].items():
        rpc, level = key.split(" | ")
        lines.append(
            f"| {rpc} / Ping throughput, {level} | {ratio['per_round']} | **{ratio['median']:.2f}** |"
        )
    control = part1["verification"].get("negative_control", {})
    lines += [
        "",
        "Checks before the load: two grpcio calls with the exact bytes of each body and one `nghttp -v` got grpc-status 0, "
        "ModelInfer answered [batch, 1] probabilities in (0, 1). Negative control, 20 Pings with a wrong API key: h2load "
        f"counted {control.get('h2load_requests', {}).get('succeeded')} as succeeded, the replicas answered "
        f"{control.get('replica_grpc_codes')}.",
        "",
        f"## {swap_summary['swaps_done']} hot swaps under continuous load",
        "",
        f"A separate load process (grpc.aio, closed loop, through Envoy): {part2['settings']['invoke_concurrency']} Invoke and "
        f"{part2['settings']['infer_concurrency']} ModelInfer (batch {part2['settings']['infer_batch']}, no version pinned) "
        f"in flight, {part2['settings']['load_warm_up_s']:g} s before the first swap and {part2['settings']['load_tail_s']:g} s "
        "after the last. Each swap publishes a revision binding the other version (2, 1, 2, ...; every replica verifies, "
        "loads and warms the version, swaps, drops the old one) and polls both replicas' Ping every "
        f"{1000 * POLL_SECONDS:g} ms: swap latency = Publish start -> both replicas serving the revision; then the new "
        f"version serves for {part2['settings'].get('dwell_s', 0):g} s before the next swap. RSS from psutil (pids from "
        "the stack record) at the end of each swap's dwell. Which version answered: ModelInfer names it "
        '(model_version), an Invoke names it in InvokeResponse.model ("name:version"), cross-checked against the '
        "version bound by the config revision the answer names. Both are checked against the scores: the model is "
        f"deterministic, so the answers of one version to one input (Invoke: {COMBINATIONS} feature combinations) must "
        "all carry the same scores, and differ from the other version's; and on every Invoke offer model_score must "
        "equal arm_reward (algorithm `model`).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| swaps served by both replicas | {swap_summary['swaps_served_by_both']} of {swap_summary['swaps_wanted']} |",
        f"| swap latency p50 / p99 / max (ms) | {swap_summary['swap_ms']['p50']} / {swap_summary['swap_ms']['p99']} / "
        f"{swap_summary['swap_ms']['max']} |",
        f"| Publish RPC alone p50 / p99 (ms) | {swap_summary['publish_rpc_ms']['p50']} / {swap_summary['publish_rpc_ms']['p99']} |",
        f"| requests (whole load) | {swap_summary['requests']} |",
        f"| failed requests (client) | **{swap_summary['failed']}** |",
        f"| non-OK on the replicas (Invoke, ModelInfer) | {swap_summary['server_non_ok']} |",
        "| Invoke: InvokeResponse.model != version bound by its config revision | "
        f"**{part2['load'].get('Invoke', {}).get('model_disagrees_with_revision_binding')}** |",
        "| Invoke: offers with model_score != arm_reward | "
        f"**{part2['load'].get('Invoke', {}).get('offers_with_model_score_not_arm_reward')}** |",
        f"| replica counters | {part2['server_grpc_codes']} |",
        f"| Envoy upstream (predictor cluster) | {part2['envoy_upstream']} |",
        f"| cores during the swaps | {part2['cpu_cores_during_swaps']} |",
    ]
    lines += [
        "",
        "| RPC | requests | failed | during swaps (req/s) | served by version | answers with other scores than their version "
        "| p50 / p99 ms before swaps | p50 / p99 / max ms during swaps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rpc in ("Invoke", "ModelInfer"):
        row = part2["load"].get(rpc)
        if not row:
            continue
        before, during = row["latency_ms_before_swaps"], row["latency_ms_during_swaps"]
        lines.append(
            f"| {rpc} | {row['requests']} | {row['failed']} | {row['requests_during_swaps']} ({row['req_per_s_during_swaps']}) "
            f"| {', '.join(f'{k}: {v}' for k, v in row['served_by_version'].items())} | {row['answers_with_other_scores_than_their_version']} "
            f"| {before['p50']} / {before['p99']} | {during['p50']} / {during['p99']} / {during['max']} |"
        )
    failures = [
        f for rpc in ("Invoke", "ModelInfer") for f in part2["load"].get(rpc, {}).get("first_failures", [])
    ]
    if failures:
        lines += ["", "First failures (seconds from the first swap):", ""]
        lines += [f"- {f['at_s_from_first_swap']} s: `{f['outcome']}`" for f in failures[:10]]
    done = swap_summary["swaps_done"]
    lines += [
        "",
        "| replica | RSS MiB before first swap | after 10 | after "
        + str(done)
        + " | growth after 10 | growth after "
        f"{done} | slope swaps 10..{done} KiB/swap | slope, v1-bound swaps | slope, v2-bound swaps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in swap_summary["memory"].items():
        lines.append(
            f"| {name} | {row['before_first_swap']} | {row.get('after_10')} | {row.get(f'after_{done}')} "
            f"| {row['growth_percent_after_10']}% | {row['growth_percent']}% | {row.get('slope_kib_per_swap_10_to_end')} "
            f"| {row.get('slope_kib_per_swap_even swaps (v1 bound)')} | {row.get('slope_kib_per_swap_odd swaps (v2 bound)')} |"
        )
    lines += ["", "## Goals", "", "| goal | value | met |", "|---|---|---|"]
    for goal in report["goals"]:
        lines.append(f"| {goal['goal']} | {goal['value']} | {'yes' if goal['met'] else '**no**'} |")
    if report.get("findings"):
        lines += ["", "## Findings", ""] + [f"- {item}" for item in report["findings"]]
    path.write_text("\n".join(lines) + "\n")


# Main ----------------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    settings = stack_settings(work / "state")
    report: dict[str, Any] = {}
    with running_stack(settings) as record:
        credentials = load_credentials(settings.state_dir)
        assert credentials is not None
        front_door = f"127.0.0.1:{settings.envoy_port}"
        config_target = f"127.0.0.1:{settings.config_port}"
        report["models"] = train_models(settings, work, args.rows, args.epochs, (1, 2))
        revision = publish(
            config_target, credentials.admin_key, deployment_spec(1), "model_serving: bind version 1"
        )
        watcher = ReplicaRevisions(settings.predictor_ports, credentials.invoke_key)
        try:
            served = watcher.wait_for(revision, time.perf_counter(), SWAP_TIMEOUT_SECONDS)
        finally:
            watcher.close()
        if None in served:
            raise RuntimeError(
                f"the replicas did not apply revision {revision}: {replica_status(config_target, credentials.admin_key)}"
            )
        print(f"revision {revision} (version 1) served by both replicas", flush=True)
        width = model_width(front_door, credentials.invoke_key, 1)
        report["model_width"] = width
        processes = observed_processes(record)
        report["infer_vs_ping"] = infer_against_ping(
            args, work, front_door, credentials.invoke_key, width, settings.predictor_metrics_ports, processes
        )
        report["hot_swaps"] = hot_swaps(
            args,
            settings,
            front_door,
            credentials.admin_key,
            credentials.invoke_key,
            width,
            processes,
            revision,
        )
        report["memory_after"] = memory(processes)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=3.0, help="about how long each measured h2load run lasts"
    )
    parser.add_argument(
        "--warm-up",
        type=float,
        default=1.5,
        help="seconds of the unrecorded h2load warm-up per RPC and level",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10, help="connections of the busy level")
    parser.add_argument("--streams", type=int, default=5, help="streams per connection of the busy level")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="ModelInfer batch sizes")
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument(
        "--invoke-concurrency", type=int, default=2, help="Invoke calls in flight during the swaps"
    )
    parser.add_argument(
        "--infer-concurrency", type=int, default=2, help="ModelInfer calls in flight during the swaps"
    )
    parser.add_argument("--swap-infer-batch", type=int, default=1, help="ModelInfer batch during the swaps")
    parser.add_argument(
        "--dwell", type=float, default=0.5, help="seconds each version serves before the next swap"
    )
    parser.add_argument(
        "--load-warm-up", type=float, default=5.0, help="seconds of load before the first swap"
    )
    parser.add_argument("--load-tail", type=float, default=2.0, help="seconds of load after the last swap")
    parser.add_argument("--rows", type=int, default=600, help="rows of the take-up training table")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--findings", type=Path, help="a text file of findings (one per line) to add to the report"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--from-json",
        type=Path,
        help="run nothing: rewrite the .md from this recorded JSON (with --findings, replace them)",
    )
    args = parser.parse_args()

    if args.from_json is not None:
        recorded = json.loads(args.from_json.read_text())
        if args.findings is not None:
            recorded["findings"] = [
                line.strip() for line in args.findings.read_text().splitlines() if line.strip()
            ]
            args.from_json.write_text(json.dumps(recorded, indent=2) + "\n")
        write_markdown(recorded, args.from_json.with_suffix(".md"))
        return 0

    if not args.swaps >= 1:
        parser.error("--swaps must be at least 1")
    if shutil.which("h2load") is None:
        print(
            f"h2load is not installed. It comes with Debian's nghttp2-client; install it with:\n  {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2

    started = time.time()
    report: dict[str, Any] = {
        "benchmark": "ModelInfer vs Ping through Envoy (h2load), and hot model swaps under continuous load",
        "command": "python bench/model_serving.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine_facts(),
        "code": code_version(),
        "settings": {
            "duration": args.duration,
            "warm_up": args.warm_up,
            "rounds": args.rounds,
            "batches": args.batches,
            "swaps": args.swaps,
        },
    }
    with tempfile.TemporaryDirectory(prefix="liveloop-bench-model-") as work:
        report |= run_benchmark(args, Path(work))
    report["seconds"] = round(time.time() - started, 1)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["swap_summary"] = summarize_swaps(report["hot_swaps"], args.swaps)
    report["goals"] = goals(report)
    if args.findings is not None:
        report["findings"] = [line.strip() for line in args.findings.read_text().splitlines() if line.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_serving.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "model_serving.md")
    print(
        json.dumps(
            {
                "infer_vs_ping": report["infer_vs_ping"]["summary"],
                "swaps": report["swap_summary"],
                "goals": report["goals"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
