"""Alert notifications to webhook receivers, in Alertmanager's webhook format (version 4), so any
receiver written for Alertmanager (chat bridges, incident tools) takes them as they are.

Evaluation never waits on a receiver: `notify` only queues (a bounded queue per receiver; when it
is full the notification is dropped and counted), and a sender task per receiver posts them in
order with a timeout per attempt, retrying connection errors, timeouts, 429 and 5xx with bounded
exponential backoff up to the receiver's `max_attempts`, then giving up (counted). Another 4xx is
a refusal that retrying will not change: given up at once.

One notification per evaluation, rule and deployment: its alerts are those that fired, changed
severity or resolved in that evaluation. Every alert still firing is sent again each receiver's
`repeat_interval_seconds` (4 h by default, Alertmanager's) and once after the monitor starts, so a
firing notification lost in a crash (the queues live in memory) or to a receiver that gave up comes
again; a resolved notification lost that way is not sent again (the alert's state is in SQL and in
ListAlerts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

from services.monitor.core.alert_rules import WebhookReceiver
from services.monitor.core.alert_store import FIRING, Alert

logger = logging.getLogger(__name__)

WEBHOOK_NOTIFICATIONS = Counter(
    "liveloop_monitor_alert_notifications_total",
    "Alert notifications to webhook receivers, by receiver and outcome (delivered, retried, failed, dropped)",
    ["receiver", "outcome"],
)

PAYLOAD_VERSION = "4"
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert still firing
DEFAULT_QUEUE_SIZE = 1000
_REPLY_BYTES_READ = 64 * 1024

# (url, body, timeout seconds) -> HTTP status; raises OSError when no status came back.
Post = Callable[[str, bytes, float], int]


@dataclass
class ReceiverState:
    delivered: int = 0
    retries: int = 0
    failed: int = 0  # given up: attempts exhausted, or refused
    dropped: int = 0  # not queued: the queue was full
    last_error: str = ""


def post_json(url: str, body: bytes, timeout_seconds: float) -> int:
    """POST a JSON body (blocking: run it in a thread); the reply's status."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "liveloop-monitor"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_seconds) as reply:
            reply.read(_REPLY_BYTES_READ)
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def _timestamp(epoch_seconds: float) -> str:
    return (
        datetime.fromtimestamp(epoch_seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def alert_labels(alert: Alert) -> dict[str, str]:
    return {
        **alert.labels,
        "alertname": alert.rule,
        "severity": alert.severity,
        "deployment": alert.deployment,
    }


def alertmanager_payload(receiver: str, alerts: Sequence[Alert], external_url: str = "") -> dict[str, Any]:
    """The webhook body Alertmanager would send for these alerts (one group: same rule and deployment)."""
    entries = []
    labels: list[dict[str, str]] = []
    annotations: list[dict[str, str]] = []
    for alert in alerts:
        labels.append(alert_labels(alert))
        annotations.append(
            {"summary": alert.summary, "value": f"{alert.value:g}", "threshold": f"{alert.threshold:g}"}
        )
        entries.append(
            {
                "status": alert.state,
                "labels": labels[-1],
                "annotations": annotations[-1],
                "startsAt": _timestamp(alert.started_at),
                "endsAt": ZERO_TIME if alert.resolved_at is None else _timestamp(alert.resolved_at),
                "generatorURL": external_url,
                "fingerprint": alert.id,
            }
        )
    group_labels = {"alertname": alerts[0].rule, "deployment": alerts[0].deployment} if alerts else {}
    return {
        "version": PAYLOAD_VERSION,
        "groupKey": "{}:{" + ",".join(f'{k}="{v}"' for k, v in sorted(group_labels.items())) + "}",
        "truncatedAlerts": 0,
        "status": FIRING if any(alert.state == FIRING for alert in alerts) else "resolved",
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": _common(labels),
        "commonAnnotations": _common(annotations),
        "externalURL": external_url,
        "alerts": entries,
    }


def _common(mappings: Sequence[dict[str, str]]) -> dict[str, str]:
    if not mappings:
        return {}
    first = mappings[0]
    return {key: value for key, value in first.items() if all(m.get(key) == value for m in mappings[1:])}


class WebhookNotifier:
    def __init__(
        self,
        receivers: Sequence[WebhookReceiver],
        *,
        external_url: str = "",
        queue_size: int = DEFAULT_QUEUE_SIZE,
        post: Post = post_json,
    ) -> None:
        self.receivers = tuple(receivers)
        self.external_url = external_url
        self.state = {receiver.name: ReceiverState() for receiver in self.receivers}
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {
            receiver.name: asyncio.Queue(maxsize=queue_size) for receiver in self.receivers
        }
        self._post = post
        self._repeated_at: dict[str, float] = {}  # receiver -> when every firing alert was last sent

    def notify(self, alerts: Sequence[Alert]) -> None:
        """Queue notifications of these alerts (grouped by rule and deployment); never waits."""
        for receiver in self.receivers:
            self._queue(receiver, alerts)

    def repeat(self, firing: Sequence[Alert], now: float, just_sent: Sequence[Alert] = ()) -> None:
        """Send every firing alert again to each receiver whose repeat interval has passed, and to
        every receiver once after a start: a notification lost with a crashed monitor or a receiver
        that was down comes again (receivers take repeats by fingerprint, as from Alertmanager)."""
        sent = {alert.id for alert in just_sent}
        for receiver in self.receivers:
            last = self._repeated_at.get(receiver.name)
            interval = receiver.repeat_interval_seconds
            if last is not None and (interval == 0 or now - last < interval):
                continue
            self._repeated_at[receiver.name] = now
            self._queue(receiver, [alert for alert in firing if alert.id not in sent])

    def _queue(self, receiver: WebhookReceiver, alerts: Sequence[Alert]) -> None:
        groups: dict[tuple[str, str], list[Alert]] = {}
        for alert in alerts:
            groups.setdefault((alert.rule, alert.deployment), []).append(alert)
        for group in groups.values():
            try:
                self._queues[receiver.name].put_nowait(
                    alertmanager_payload(receiver.name, group, self.external_url)
                )
            except asyncio.QueueFull:
                self._count(receiver.name, "dropped")
                logger.warning("webhook %s: queue full, a notification was dropped", receiver.name)

    def pending(self) -> int:
        """Notifications queued and not yet taken by a sender."""
        return sum(queue.qsize() for queue in self._queues.values())

    async def run(self) -> None:
        """One sender per receiver, until cancelled."""
        if not self.receivers:
            return
        async with asyncio.TaskGroup() as senders:
            for receiver in self.receivers:
                senders.create_task(self._send_forever(receiver), name=f"webhook-{receiver.name}")

    async def _send_forever(self, receiver: WebhookReceiver) -> None:
        queue = self._queues[receiver.name]
        while True:
            payload = await queue.get()
            try:
                await self.deliver(receiver, payload)
            finally:
                queue.task_done()

    async def deliver(self, receiver: WebhookReceiver, payload: dict[str, Any]) -> bool:
        """Post with retries; True when the receiver took it."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        backoff = receiver.initial_backoff_seconds
        state = self.state[receiver.name]
        for attempt in range(1, receiver.max_attempts + 1):
            try:
                # The thread's own timeout bounds the attempt; wait_for is the backstop.
                status = await asyncio.wait_for(
                    asyncio.to_thread(self._post, receiver.url, body, receiver.timeout_seconds),
                    receiver.timeout_seconds + 1.0,
                )
                error = f"HTTP {status}"
            except (OSError, TimeoutError) as exc:
                status, error = 0, f"{type(exc).__name__}: {exc}"
            if 200 <= status < 300:
                self._count(receiver.name, "delivered")
                return True
            state.last_error = error
            retryable = status == 0 or status == 429 or status >= 500
            if not retryable or attempt == receiver.max_attempts:
                self._count(receiver.name, "failed")
                logger.warning(
                    "webhook %s: notification given up after %d attempt(s): %s", receiver.name, attempt, error
                )
                return False
            self._count(receiver.name, "retried")
            await asyncio.sleep(backoff)  # back off before the next attempt
            backoff = min(backoff * 2, receiver.max_backoff_seconds)
        return False

    def _count(self, receiver: str, outcome: str) -> None:
        WEBHOOK_NOTIFICATIONS.labels(receiver, outcome).inc()
        state = self.state[receiver]
        if outcome == "delivered":
            state.delivered += 1
        elif outcome == "retried":
            state.retries += 1
        elif outcome == "failed":
            state.failed += 1
        else:
            state.dropped += 1
