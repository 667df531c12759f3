"""`make demo`: start the local stack, show it healthy, call a predictor through Envoy, push live
configuration to both replicas, stop it.

Each step runs the same `liveloop` command a person would type. Later capabilities (invoke, respond,
train, promote) extend this script.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from libs.policy.models import FeatureEncoder
from libs.stack.credentials import load_credentials
from libs.stack.launcher import StackRecord, StackSettings

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_SPEC = Path("examples/deployments/telco-offers.yaml")
TRAINING_SPEC = Path("examples/training/telco-take-up.yaml")
CUSTOMERS = Path("examples/data/customers.csv")
DEMO_ALERT_RULES = Path("examples/monitoring/demo-alert-rules.yaml")
CANDIDATE_SPEC = EXAMPLE_SPEC  # Thompson sampling without the model: what going back would earn
TAKEN_OFFER = "family-bundle"


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def liveloop(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print(f"$ liveloop {shlex.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "libs.cli.main", *args], cwd=REPO, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"demo failed at `liveloop {shlex.join(args)}` (exit {result.returncode})")
    return result


def live_configuration(state_dir: Path) -> None:
    step("Publish a deployment: validated, stored as an immutable revision, pushed to every replica")
    liveloop("config", "publish", str(EXAMPLE_SPEC), "--no-diff", "--message", "demo: first version")
    step("The deployments at the head revision")
    liveloop("config", "list")
    step("Both predictor replicas applied it and ACKed over their Watch streams")
    liveloop("config", "status", "--wait-for-head", "10")
    step("Every reply says which config revision served it")
    liveloop("ping", "--count", "4")
    step("Change one parameter: the publish shows the diff, the replicas follow without a restart")
    changed = state_dir / "telco-offers.yaml"
    original = (REPO / EXAMPLE_SPEC).read_text()
    if "exploration_epsilon: 0.05\n" not in original:
        raise SystemExit(f"demo failed: {EXAMPLE_SPEC} no longer sets exploration_epsilon: 0.05")
    print(f"$ sed 's/exploration_epsilon: 0.05/exploration_epsilon: 0.1/' {EXAMPLE_SPEC} > {changed}")
    (REPO / changed).write_text(original.replace("exploration_epsilon: 0.05\n", "exploration_epsilon: 0.1\n"))
    liveloop("config", "publish", str(changed), "--message", "demo: explore more")
    liveloop("config", "status", "--wait-for-head", "10")
    step("The audit trail: who changed what, when, and why (`liveloop config rollback` undoes it)")
    liveloop("config", "history", "telco-offers")


def data_and_options() -> None:
    customers, history = "examples/data/customers.csv", "examples/data/history.csv"
    step("Load the sample customers into the offline store: types inferred, bad rows rejected by row number")
    liveloop("ingest", customers, "--table", "customers", "--key", "customer", "--mode", "replace")
    step("Their offer history, streamed to the service in chunks (Upload), as a remote client would")
    liveloop("ingest", history, "--table", "history", "--upload", "--mode", "replace")
    step("Loading the same file again writes nothing")
    liveloop("ingest", customers, "--table", "customers", "--key", "customer")
    step("The offline store, and one table's schema and statistics")
    liveloop("tables")
    liveloop("tables", "--describe", "customers", "--top", "2")
    step("The newest features of every customer into the online store (Redis), where predictors read them")
    liveloop("materialize", "customers")
    step("The deployment's options store, with priors from the history; the new generation goes live at once")
    liveloop("options", "generate", "--deployment", "telco-offers", "--history-table", "history")
    step("An Invoke now uses the customer's features (segment) and the priors (arm reward)")
    liveloop("invoke", "telco-offers", "c0002", "--channel", "app")


def learning_loop(front_door: str, invoke_key: str) -> None:
    step(
        "REST, as ecosystem.Ai clients send it: POST /invocations (numberoffers as a string, params as JSON text)"
    )
    body = {
        "campaign": "telco-offers",
        "customer": "c0002",
        "channel": "app",
        "numberoffers": "2",
        "params": json.dumps({"channel": "app"}),
    }
    print(f"$ curl -H 'x-api-key: ...' -d '{json.dumps(body)}' http://{front_door}/invocations")
    reply = _post(front_door, "/invocations", body, invoke_key)
    for row in reply["final_result"]:
        result = row["result"]
        print(
            f"  rank {result['rank']}: {result['offer']:<16} score {result['score']:.3f}  arm_reward "
            f"{result['arm_reward']:.3f}  propensity {result['propensity']:.3f}"
        )
    offer = reply["final_result"][0]["result"]["offer"]
    segment = reply["final_result"][0]["result"]["segment"]
    step(f"The customer takes {offer}: POST /response; the arm statistics in Redis change at once")
    answer = {
        "uuid": reply["uuid"],
        "offers_accepted": [{"offer_name": reply["final_result"][0]["result"]["offer_name"]}],
    }
    print(f"$ curl -H 'x-api-key: ...' -d '{json.dumps(answer)}' http://{front_door}/response")
    print(json.dumps(_post(front_door, "/response", answer, invoke_key)))
    step("Responding twice learns nothing twice")
    print(json.dumps(_post(front_door, "/response", answer, invoke_key)))
    step("Every replica sees the learning on its next request (both serve the same Redis statistics)")
    before = reply["final_result"][0]["result"]["arm_count"]
    for _ in range(2):  # round robin: one call on each replica
        again = _post(front_door, "/invocations", {**body, "numberoffers": 7}, invoke_key)
        row = next(r["result"] for r in again["final_result"] if r["result"]["offer"] == offer)
        print(
            f"  replica {again['replica_id']}: {offer} in segment {segment}: evidence {row['arm_count']:.2f} "
            f"(was {before:.2f}), arm_reward {row['arm_reward']:.3f}"
        )
    step("The same over gRPC from the command line")
    liveloop("invoke", "telco-offers", "c0003", "-n", "3", "--channel", "app")


def customer_traffic(front_door: str, invoke_key: str, take_up: float, invokes: int = 150) -> float:
    """Customers shown every offer (numberoffers 7) who take TAKEN_OFFER with probability `take_up`
    and now and then another; returns when the last contact was made."""
    import random

    generator = random.Random(int(take_up * 1000))
    for i in range(invokes):
        body = {"campaign": "telco-offers", "customer": f"c{i % 40:04d}", "channel": "app", "numberoffers": 7}
        reply = _post(front_door, "/invocations", body, invoke_key)
        shown = [row["result"]["offer"] for row in reply["final_result"]]
        accepted = [TAKEN_OFFER] if TAKEN_OFFER in shown and generator.random() < take_up else []
        if generator.random() < 0.1:
            accepted.append(generator.choice([offer for offer in shown if offer != TAKEN_OFFER]))
        if accepted:
            _post(front_door, "/response", {"uuid": reply["uuid"], "accepted_offers": accepted}, invoke_key)
    print(f"  {invokes} customers shown every offer; {TAKEN_OFFER} taken by about {take_up:.0%} of them")
    return time.time()


def monitoring(front_door: str, invoke_key: str, baseline_ended: float) -> None:
    step(f"Then {TAKEN_OFFER} stops selling: nobody takes it any more")
    if int(time.time() // 60) == int(baseline_ended // 60):
        print("  (the rules read whole minutes: waiting for the minute of the earlier traffic to close)")
        time.sleep(60 - time.time() % 60 + 0.5)
    collapsed = customer_traffic(front_door, invoke_key, take_up=0.0)
    step(
        "The monitor summarises what it consumed from the decision log: uptake, exploration, latency, replicas"
    )
    liveloop("monitor", "summary", "telco-offers", "--window", "1h")
    step("Served model inputs and scores against the training reference the trainer recorded with the model")
    liveloop("monitor", "drift", "telco-offers")
    step(f"An alert fires: the uptake of {TAKEN_OFFER} collapsed (a significance test, not a raw ratio)")
    wait = 60 - collapsed % 60 + 1
    print(f"  (the minute of that traffic closes in {wait:.0f} s; the rules run every 2 s)")
    deadline = time.time() + wait + 60
    while time.time() < deadline:
        alerts = json.loads(liveloop_output("monitor", "alerts", "--deployment", "telco-offers", "--json"))
        if any(alert["rule"] == "uptake_drop" for alert in alerts["alerts"]):
            break
        time.sleep(2)
    else:
        raise SystemExit("demo failed: the uptake_drop alert did not fire")
    liveloop("monitor", "alerts", "--deployment", "telco-offers")
    step("Before pushing a change, estimate what it would have earned on the logged decisions")
    liveloop("monitor", "evaluate", "telco-offers", "--spec", str(CANDIDATE_SPEC), "--window", "1h")
    step("The same estimate at publish time (dry run: nothing stored); a deployment can require it")
    liveloop("config", "publish", str(CANDIDATE_SPEC), "--evaluate", "--dry-run", "--no-diff")
    step(
        "The monitoring page, served by Envoy (charts of uptake, exploration, latency, replicas, alerts, drift)"
    )
    print(
        f"  http://{front_door}/dashboard?deployment=telco-offers  (while the stack runs: `liveloop up`;"
        " it asks for the admin key in .liveloop/credentials.json)"
    )
    request = urllib.request.Request(f"http://{front_door}/dashboard")
    with urllib.request.urlopen(request, timeout=5) as response:
        print(f"  GET /dashboard: HTTP {response.status}, {len(response.read())} bytes")


def trained_model(front_door: str, invoke_key: str) -> None:
    step("Train a take-up model on the ingested sample: a torch job in a trainer worker process")
    liveloop("train", str(TRAINING_SPEC))
    step("The model registry: each version with its held-out AUC, log loss and calibration error")
    liveloop("models")
    step(
        "Promote it (version 0: the newest): a config revision binds it to telco-offers and ranks by its"
        " predicted take-up;"
        " every replica verifies the artifact's checksums, loads, warms and swaps it before it ACKs"
    )
    liveloop("promote", "take-up", "0", "--deployment", "telco-offers", "--use", "score", "--no-diff")
    liveloop("config", "status", "--wait-for-head", "30")
    step("Invoke now ranks by the model: score = P(take-up | customer, offer), the same on both replicas")
    body = {"campaign": "telco-offers", "customer": "c0002", "channel": "app", "numberoffers": 7}
    invoked = [_post(front_door, "/invocations", body, invoke_key) for _ in range(2)]
    take_up = {}
    for reply in invoked:
        take_up[reply["replica_id"]] = {
            r["result"]["offer"]: r["result"]["arm_reward"] for r in reply["final_result"]
        }
    if len(set(map(lambda scores: tuple(sorted(scores.items())), take_up.values()))) != 1:
        raise SystemExit(f"demo failed: the replicas score the model differently: {take_up}")
    scores = next(iter(take_up.values()))
    model = invoked[0]["model"]  # "name:version"
    print(f"  scored by {model} on replicas {', '.join(sorted(take_up))}")
    for offer, value in sorted(scores.items(), key=lambda item: -item[1]):
        print(f"  {offer:<16} {value:.4f}")
    step("The same model over the Open Inference Protocol: a standard tritonclient, through Envoy")
    segment = dict(
        part.split("=", 1) for part in invoked[0]["final_result"][0]["result"]["segment"].split("|")
    )
    with (REPO / CUSTOMERS).open(newline="") as handle:
        customer = next(row for row in csv.DictReader(handle) if row["customer"] == "c0002")
    values = {**customer, **segment}
    print(
        f"  inputs of c0002: {json.dumps({k: values[k] for k in ('age', 'gender', 'trips_per_year', 'age_band', 'channel')})}"
    )
    served = _infer_over_oip(front_door, invoke_key, model.split(":")[1], values, list(scores))
    worst = max(abs(served[offer] - scores[offer]) for offer in scores)
    for offer in sorted(scores, key=lambda o: -scores[o]):
        print(f"  {offer:<16} ModelInfer {served[offer]:.6f}   Invoke {scores[offer]:.6f}")
    if worst > 1e-6:
        raise SystemExit(f"demo failed: ModelInfer and Invoke differ by {worst:.2e}")
    print(f"  largest difference {worst:.1e}: Invoke and ModelInfer run the same artifact")


def _infer_over_oip(
    front_door: str, invoke_key: str, version: str, values: dict[str, str], offers: list[str]
) -> dict[str, float]:
    """Encode the customer x each offer as the artifact's preprocessing.json says, then ModelInfer."""
    import numpy as np
    import tritonclient.grpc as triton

    described = json.loads(liveloop_output("models", "take-up", "--json"))  # its newest version
    artifact = Path(urllib.parse.urlparse(described["model"]["artifact_uri"]).path)
    encoder = FeatureEncoder(json.loads((artifact / "preprocessing.json").read_text()))
    matrix = encoder.encode_offers(values, offers).astype(np.float32)
    headers = {"x-api-key": invoke_key}
    client = triton.InferenceServerClient(url=front_door)
    try:
        print(
            f"$ tritonclient: server ready {client.is_server_ready(headers=headers)}, model ready "
            f"{client.is_model_ready('take-up', version, headers=headers)}"
        )
        metadata = client.get_model_metadata("take-up", version, headers=headers, as_json=True)
        print(f"  model metadata: inputs {metadata['inputs']} outputs {metadata['outputs']}")
        tensor = triton.InferInput("features", list(matrix.shape), "FP32")
        tensor.set_data_from_numpy(matrix)
        result = client.infer("take-up", [tensor], model_version=version, headers=headers, client_timeout=10)
    finally:
        client.close()
    probabilities = result.as_numpy("probability").reshape(-1)
    return {offer: float(p) for offer, p in zip(offers, probabilities, strict=True)}


def liveloop_output(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "libs.cli.main", *args], cwd=REPO, check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"demo failed at `liveloop {shlex.join(args)}`: {result.stderr.strip()}")
    return result.stdout


def _post(front_door: str, path: str, body: dict[str, object], key: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://{front_door}{path}",
        data=json.dumps(body).encode(),
        headers={"x-api-key": key, "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        reply: dict[str, Any] = json.loads(response.read())
        return reply


def main() -> int:
    # The demo's alert rules: short windows, so that a collapse shows within the demo.
    os.environ.setdefault("LIVELOOP_MONITOR_ALERT_RULES_FILE", str(REPO / DEMO_ALERT_RULES))
    os.environ.setdefault("LIVELOOP_MONITOR_ALERT_INTERVAL_SECONDS", "2")
    settings = StackSettings()
    step("Start the local stack: Redis, config, 2 predictors, ingest, trainer, monitor, Envoy")
    liveloop("up")
    try:
        step("Every service is healthy through the front door")
        liveloop("health")
        step("Calls through Envoy are balanced over both predictor replicas")
        liveloop("ping", "--count", "6")
        live_configuration(settings.state_dir)
        data_and_options()
        record = StackRecord.load(settings.state_dir)
        credentials = load_credentials(settings.state_dir)
        assert record is not None
        assert credentials is not None
        front = f"{settings.host}:{record.envoy_port}"
        learning_loop(front, credentials.invoke_key)
        step(f"Customers keep coming; about half of them take {TAKEN_OFFER}")
        baseline_ended = customer_traffic(front, credentials.invoke_key, take_up=0.5)
        trained_model(front, credentials.invoke_key)
        monitoring(front, credentials.invoke_key, baseline_ended)
        step("REST through Envoy's gRPC-JSON transcoder: GET /ping")
        url = f"http://{settings.host}:{record.envoy_port}/ping"
        print(f"$ curl -H 'x-api-key: ...' {url}")
        request = urllib.request.Request(url, headers={"x-api-key": credentials.invoke_key})
        with urllib.request.urlopen(request, timeout=5) as response:
            print(json.dumps(json.loads(response.read()), indent=2))
        step("Secure by default: a call without an API key is refused")
        print(f"$ curl {url}")
        try:
            urllib.request.urlopen(url, timeout=5)
            raise SystemExit("demo failed: a call without a key was accepted")
        except urllib.error.HTTPError as refused:
            print(f"HTTP {refused.code}: {json.loads(refused.read())['message']}")
    finally:
        step("Stop everything")
        liveloop("down")
    print(
        "\ndemo finished: the stack started healthy, served through Envoy, followed two config pushes on"
        " both replicas, ingested and materialized the sample data, generated the options store, ranked"
        " offers over REST and gRPC, learned from a response on every replica, trained and promoted a take-up"
        " model that both replicas served through Invoke and the Open Inference Protocol, summarised the"
        " traffic, compared served inputs with training, fired an alert when an offer stopped selling,"
        " estimated a candidate on the logged decisions before a push, and stopped cleanly."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
