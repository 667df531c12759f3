"""`make demo`: start the local stack, show it healthy, call a predictor through Envoy, stop it.

Each step runs the same `liveloop` command a person would type. Later capabilities (publish a
deployment, invoke, respond, train, promote) extend this script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from libs.stack.credentials import load_credentials
from libs.stack.launcher import StackRecord, StackSettings

REPO = Path(__file__).resolve().parent.parent


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def liveloop(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print(f"$ liveloop {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "libs.cli.main", *args], cwd=REPO, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"demo failed at `liveloop {' '.join(args)}` (exit {result.returncode})")
    return result


def main() -> int:
    settings = StackSettings()
    step("Start the local stack: Redis, config, 2 predictors, ingest, trainer, monitor, Envoy")
    liveloop("up")
    try:
        step("Every service is healthy through the front door")
        liveloop("health")
        step("Calls through Envoy are balanced over both predictor replicas")
        liveloop("ping", "--count", "6")
        step("REST through Envoy's gRPC-JSON transcoder: GET /ping")
        record = StackRecord.load(settings.state_dir)
        credentials = load_credentials(settings.state_dir)
        assert record is not None and credentials is not None
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
    print("\ndemo finished: the stack started healthy, served through Envoy, and stopped cleanly.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
