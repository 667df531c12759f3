"""The monitoring page through the front door of a whole local stack, in a real browser.

A deployment is published, Invokes and Responds go through Envoy over REST, and once the monitor has
counted them the page at GET /dashboard is loaded in headless Chromium (Debian's `chromium`; `make
test` installs it when it is missing, and without it this test fails, it never skips). The page gets
the admin key from a `#key=` fragment (which no server ever sees) and reads everything over REST; the
DOM it leaves behind is compared with what the same REST routes answer: the tiles with GetSummary,
one line per offer in the uptake chart with GetTimeSeries' per-minute uptake, a bar per minute whose
heights add up to the Invoke count, p50/p99 lines, the revision each replica served, and, for the
firing alerts and the drift table, exactly what ListAlerts and GetDrift said (rows, 'none', or the
error). The page without a key shows nothing but the key prompt. A screenshot is written too
(to $LIVELOOP_DASHBOARD_SCREENSHOT when set) for a person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from libs.common.client import open_blocking_channel
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.stack.envoy_config import DASHBOARD_CSP, REPO_DASHBOARD_DIR
from libs.stack.processes import wait_until
from tests.e2e.conftest import REPO, LocalStack, local_stack, started

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLE = REPO / "examples" / "deployments" / "telco-offers.yaml"
DEPLOYMENT = "telco-offers"
REPLICAS = {"predictor-1", "predictor-2"}
INVOKES = 40
WINDOW = "3600s"
GRPC_CODE_NAMES = {
    3: "INVALID_ARGUMENT",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    9: "FAILED_PRECONDITION",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}


# --------------------------------------------------------------------------------------------------
# a small DOM, from the HTML Chromium dumps


VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.text_parts) + "".join(child.text for child in self.children)

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()

    def find_all(self, tag: str | None = None, **attrs: str | None) -> list[Node]:
        """Descendants with this tag whose attributes equal these (None: only present)."""
        found = []
        for node in self.walk():
            if node is self or (tag is not None and node.tag != tag):
                continue
            wanted = {name.replace("_", "-"): value for name, value in attrs.items()}
            if all(
                name in node.attrs and (value is None or node.attrs[name] == value)
                for name, value in wanted.items()
            ):
                found.append(node)
        return found

    def one(self, tag: str | None = None, **attrs: str | None) -> Node:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}> found"
        return found[0]


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID_ELEMENTS:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.stack) - 1, 0, -1):
            if self.stack[index].tag == tag:
                del self.stack[index:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text_parts.append(data)


def parse_dom(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


# --------------------------------------------------------------------------------------------------
# the stack, REST and the browser


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with started(local_stack(tmp_path_factory.mktemp("monitor-dashboard") / "state")) as local:
        yield local


def rest(
    stack: LocalStack, method: str, path: str, body: Any = None, key: str | None = "admin"
) -> tuple[int, Any, dict[str, str]]:
    """A REST call through Envoy: (HTTP status, decoded JSON or text, response headers)."""
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["x-api-key"] = stack.credentials()[key]
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{stack.front_door}{path}", data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            status, raw, response_headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, raw, response_headers = error.code, error.read(), dict(error.headers)
    text = raw.decode()
    try:
        return status, json.loads(text), response_headers
    except json.JSONDecodeError:
        return status, text, response_headers


def publish(stack: LocalStack) -> int:
    admin = stack.credentials()["admin"]
    with open_blocking_channel(stack.front_door, api_key=admin, deadline_seconds=15) as channel:
        config = config_pb2_grpc.ConfigServiceStub(channel)
        revision = int(config.Publish(config_pb2.PublishRequest(spec_text=EXAMPLE.read_text())).revision)

        def both_applied() -> bool:
            replicas = config.ReplicaStatus(config_pb2.ReplicaStatusRequest()).replicas
            return {
                r.replica_id for r in replicas if r.connected and r.applied_revision >= revision
            } >= REPLICAS

        assert wait_until(both_applied, timeout=20), f"replicas did not apply revision {revision}"
    return revision


def chromium(*args: str, user_data_dir: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary is not None, (
        "chromium is missing: run tools/ensure_system_packages.sh (`make test` does), or apt-get install chromium"
    )
    argv = [
        binary,
        "--headless",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={user_data_dir}",
        # The page's fetches finish inside this much virtual time (it pauses while they are in flight).
        "--virtual-time-budget=8000",
        "--window-size=1400,2000",
        "--hide-scrollbars",
        *args,
    ]
    if os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root inside its sandbox
    result = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def minute_key(value: str) -> str:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).strftime("%Y-%m-%dT%H:%M")


def error_text(answer: Any) -> str:
    """How the page shows a failed call: 'unavailable: CODE: message'."""
    return f"unavailable: {GRPC_CODE_NAMES.get(answer['code'], answer['code'])}: {answer['message']}"


# --------------------------------------------------------------------------------------------------
# the test


def test_dashboard_shows_the_monitor_data_in_a_browser(stack: LocalStack, tmp_path: Path) -> None:
    # The shell is static and public, the data is not.
    status, page, headers = rest(stack, "GET", "/dashboard", key=None)
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert headers["content-security-policy"] == DASHBOARD_CSP
    assert page == (REPO_DASHBOARD_DIR / "index.html").read_text()
    status, script, headers = rest(stack, "GET", "/dashboard/dashboard.js", key=None)
    assert status == 200
    assert headers["content-type"].startswith("text/javascript")
    assert "x-api-key" in script
    summary_path = f"/v1/monitor/{DEPLOYMENT}/summary?window={WINDOW}"
    status, answer, _ = rest(stack, "GET", summary_path, key=None)
    assert (status, answer["code"]) == (401, 16)
    status, answer, _ = rest(stack, "GET", summary_path, key="invoke")
    assert (status, answer["code"]) == (403, 7), "MonitorService needs the admin role"

    revision = publish(stack)
    status, listing, _ = rest(stack, "GET", "/v1/config/deployments")
    assert status == 200
    assert [d["name"] for d in listing["deployments"]] == [DEPLOYMENT]

    # Traffic through the front door, as applications send it.
    uuids = []
    for index in range(INVOKES):
        request = {
            "campaign": DEPLOYMENT,
            "customer": f"customer-{index % 10}",
            "channel": "app" if index % 2 else "web",
            "numberoffers": 3,
        }
        status, reply, _ = rest(stack, "POST", "/invocations", request, key="invoke")
        assert status == 200, reply
        uuids.append((reply["uuid"], reply["final_result"][0]["result"]["offer"]))
    responded = uuids[::3]
    for uuid, offer in responded:
        status, reply, _ = rest(
            stack, "POST", "/response", {"uuid": uuid, "offers_accepted": [offer]}, key="invoke"
        )
        assert status == 200, reply

    def counted() -> bool:
        status, answer, _ = rest(stack, "GET", summary_path)
        return status == 200 and (int(answer["invocations"]), int(answer["responses"])) == (
            INVOKES,
            len(responded),
        )

    assert wait_until(counted, timeout=60, interval=0.5), rest(stack, "GET", summary_path)[1]
    _, summary, _ = rest(stack, "GET", summary_path)
    status, series, _ = rest(stack, "GET", f"/v1/monitor/{DEPLOYMENT}/time-series?window={WINDOW}")
    assert status == 200, series
    alerts_status, alerts, _ = rest(stack, "GET", f"/v1/monitor/alerts?deployment={DEPLOYMENT}")
    drift_status, drift, _ = rest(stack, "GET", f"/v1/monitor/{DEPLOYMENT}/drift")

    # The page, with the key in the fragment (never sent to Envoy, moved to sessionStorage by the page).
    admin = stack.credentials()["admin"]
    url = f"http://{stack.front_door}/dashboard?deployment={DEPLOYMENT}#key={admin}"
    dumped = chromium("--dump-dom", url, user_data_dir=tmp_path / "profile").stdout
    dom = parse_dom(dumped)
    body = dom.one("body")
    assert body.attrs["data-state"] == "ready", dom.one("p", id="status").text
    assert body.attrs["data-deployment"] == DEPLOYMENT
    assert admin not in dumped, "the key must not end up in the page"
    assert "hidden" in dom.one("section", id="login").attrs
    assert "hidden" not in dom.one("main", id="board").attrs
    options = [node.attrs["value"] for node in dom.one("select", id="deployment").find_all("option")]
    assert options == [DEPLOYMENT], "the deployment list comes from ConfigService.List over REST"

    # Tiles: GetSummary's numbers.
    tiles = {node.attrs["data-field"]: node for node in dom.find_all("span", data_field=None)}
    for name in ("invocations", "responses", "impressions", "accepted", "head_revision"):
        assert float(tiles[name].attrs["data-value"]) == float(summary[name]), name
    assert int(tiles["invocations"].text.replace(",", "")) == INVOKES
    for name in ("uptake_rate", "explore_share"):
        assert float(tiles[name].attrs["data-value"]) == pytest.approx(summary[name]), name
    assert float(tiles["head_revision"].attrs["data-value"]) == revision

    # Uptake per offer: one line (a path and a marker per minute) per offer, at accepted/impressions.
    expected_uptake: dict[str, dict[str, float]] = {}
    for point in series["offers"]:
        if int(point["impressions"]) > 0:
            expected_uptake.setdefault(point["offer"], {})[minute_key(point["minute"])] = int(
                point["accepted"]
            ) / int(point["impressions"])
    uptake_chart = dom.one("svg", data_chart="uptake")
    lines = {g.attrs["data-series"]: g for g in uptake_chart.find_all("g", data_series=None)}
    assert set(lines) == set(expected_uptake) == {row["offer"] for row in summary["by_offer"]}
    assert len(lines) >= 2
    for offer, minutes in expected_uptake.items():
        line = lines[offer]
        path = line.one("path")
        assert path.attrs["d"].startswith("M")
        assert path.attrs["d"].count("L") == len(minutes) - 1
        markers = line.find_all("circle")
        assert int(line.attrs["data-points"]) == len(markers) == len(minutes)
        assert sorted(float(m.attrs["data-value"]) for m in markers) == pytest.approx(
            sorted(minutes.values())
        )
    by_offer = {row["offer"]: row for row in summary["by_offer"]}
    for offer, line in lines.items():
        assert int(line.attrs["data-total"]) == int(by_offer[offer]["impressions"])

    # Invoke calls per minute: the bars add up to the Invoke count; p50 and p99 per minute.
    bars = dom.one("svg", data_chart="rate").find_all("rect", data_minute=None)
    assert len(bars) == len(series["invocations"])
    assert sum(float(bar.attrs["data-value"]) for bar in bars) == INVOKES
    latency = dom.one("svg", data_chart="latency")
    for quantile in ("p50", "p99"):
        markers = latency.one("g", data_series=quantile).find_all("circle")
        expected = sorted(float(m[f"{quantile}_seconds"]) for m in series["invocations"])
        assert sorted(float(m.attrs["data-value"]) for m in markers) == pytest.approx(expected)
    explore = dom.one("svg", data_chart="explore").one("g", data_series="explore share")
    assert int(explore.attrs["data-points"]) >= 1

    # Tables: offers, the revision each replica served, latency.
    offer_rows = {
        row.attrs["data-offer"]: row
        for row in dom.one("div", id="table-offers").find_all("tr", data_offer=None)
    }
    assert set(offer_rows) == set(by_offer)
    for offer, row in offer_rows.items():
        presented = row.one("td", data_column="impressions").text
        assert int(presented.replace(",", "")) == int(by_offer[offer]["impressions"])
    replica_rows = dom.one("div", id="table-replicas").find_all("tr", data_replica=None)
    served = {row.attrs["data-replica"]: int(row.attrs["data-revision"]) for row in replica_rows}
    assert served == {r["replica_id"]: int(r["config_revision"]) for r in summary["replicas"]}
    assert set(served) == REPLICAS
    assert set(served.values()) == {revision}
    methods = {
        row.attrs["data-method"]
        for row in dom.one("div", id="table-latency").find_all("tr", data_method=None)
    }
    assert "/liveloop.predictor.v1.PredictorService/Invoke" in methods

    # Alerts and drift: exactly what the monitor answered, rows, 'none' or its error.
    alerts_box = dom.one("div", id="table-alerts")
    if alerts_status != 200:
        assert alerts_box.text.strip() == error_text(alerts)
    else:
        firing = [a for a in alerts["alerts"] if a.get("state", "ALERT_STATE_FIRING") == "ALERT_STATE_FIRING"]
        rows = alerts_box.find_all("tr", data_alert=None)
        assert [r.attrs["data-alert"] for r in rows] == [a["id"] for a in firing]
        if not firing:
            assert alerts_box.text.strip() == "none"
    drift_box = dom.one("div", id="table-drift")
    if drift_status != 200:
        assert drift_box.text.strip() == error_text(drift)
    else:
        names = [d["name"] for d in drift.get("features", [])]
        if drift.get("score", {}).get("name"):
            names.append(drift["score"]["name"])
        assert [
            r.attrs["data-distribution"] for r in drift_box.find_all("tr", data_distribution=None)
        ] == names

    # A screenshot for people.
    screenshot = tmp_path / "dashboard.png"
    chromium(f"--screenshot={screenshot}", url, user_data_dir=tmp_path / "profile-screenshot")
    assert png_size(screenshot) == (1400, 2000)
    assert screenshot.stat().st_size > 20_000, "the screenshot looks empty"
    if target := os.environ.get("LIVELOOP_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(screenshot, target)

    # Without a key the page shows nothing but the prompt.
    dumped = chromium(
        "--dump-dom",
        f"http://{stack.front_door}/dashboard?deployment={DEPLOYMENT}",
        user_data_dir=tmp_path / "anon",
    ).stdout
    dom = parse_dom(dumped)
    assert dom.one("body").attrs["data-state"] == "needs-key"
    assert "hidden" not in dom.one("section", id="login").attrs
    assert "hidden" in dom.one("main", id="board").attrs
    assert not dom.find_all("span", data_field=None)
    assert not dom.find_all("svg", data_chart=None)
