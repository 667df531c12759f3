"""Per-minute rollups of decision-log records: what one batch of contacts and responses adds to the
counters of each minute x deployment x variant x segment x (offer) x revision x replica cell.

Pure: the store applies the increments inside the transaction that records the batch as applied.
A response is counted in the minute and cell of the contact it answers (the record carries them),
so accepted / impressions over a window are the uptake of the same decisions. Only offers accepted
for the first time count (`new_offers`); a response after the reward window counts as late, not as
uptake.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from libs.common.decision_log import Contact, Response

INVOKE_METHOD = "/liveloop.predictor.v1.PredictorService/Invoke"
RESPOND_METHOD = "/liveloop.predictor.v1.PredictorService/Respond"

# Latency buckets: bucket i holds [LATENCY_BUCKETS[i], LATENCY_BUCKETS[i + 1]) seconds; four per
# doubling from 10 microseconds to about 100 seconds, so a quantile read from merged buckets is
# within about 10% of the true value whatever the window.
_LATENCY_FLOOR_SECONDS = 1e-5
_BUCKETS_PER_DOUBLING = 4
LATENCY_BUCKETS: tuple[float, ...] = tuple(
    _LATENCY_FLOOR_SECONDS * 2 ** (i / _BUCKETS_PER_DOUBLING) for i in range(94)
)


def minute_of(time: float) -> int:
    """The epoch second the minute of `time` starts at."""
    return int(time // 60) * 60


def latency_bucket(seconds: float) -> int:
    if not math.isfinite(seconds) or seconds <= LATENCY_BUCKETS[0]:
        return 0
    return min(bisect.bisect_right(LATENCY_BUCKETS, seconds) - 1, len(LATENCY_BUCKETS) - 1)


@dataclass
class OfferCounts:
    impressions: int = 0
    explored_impressions: int = 0
    accepted: int = 0
    reward_sum: float = 0.0


@dataclass
class DecisionCounts:
    invocations: int = 0
    explore_decisions: int = 0
    responses: int = 0
    late_responses: int = 0
    duplicate_responses: int = 0
    last_seen: float = 0.0


@dataclass
class LatencyCounts:
    calls: int = 0
    max_seconds: float = 0.0
    buckets: dict[int, int] = field(default_factory=dict)

    def add(self, seconds: float) -> None:
        self.calls += 1
        self.max_seconds = max(self.max_seconds, seconds)
        index = latency_bucket(seconds)
        self.buckets[index] = self.buckets.get(index, 0) + 1

    def merge(self, other: LatencyCounts) -> None:
        self.calls += other.calls
        self.max_seconds = max(self.max_seconds, other.max_seconds)
        for index, calls in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + calls

    def quantile(self, q: float) -> float:
        """The q-quantile in seconds, interpolated inside its bucket (geometrically), capped at max."""
        if self.calls == 0:
            return 0.0
        rank = q * self.calls
        seen = 0
        for index in sorted(self.buckets):
            calls = self.buckets[index]
            if seen + calls >= rank:
                low = LATENCY_BUCKETS[index] if index > 0 else 0.0
                high = LATENCY_BUCKETS[index + 1] if index + 1 < len(LATENCY_BUCKETS) else self.max_seconds
                share = (rank - seen) / calls if calls else 1.0
                value = low + (high - low) * share if low == 0.0 else low * (high / low) ** share
                return min(value, self.max_seconds)
            seen += calls
        return self.max_seconds


# minute, deployment, variant, segment, offer, revision, replica
OfferKey = tuple[int, str, str, str, str, int, str]
# minute, deployment, variant, segment, revision, replica
DecisionKey = tuple[int, str, str, str, int, str]
# minute, deployment, method
LatencyKey = tuple[int, str, str]


@dataclass
class Rollup:
    """The increments of one batch of records."""

    offers: dict[OfferKey, OfferCounts] = field(default_factory=lambda: defaultdict(OfferCounts))
    decisions: dict[DecisionKey, DecisionCounts] = field(default_factory=lambda: defaultdict(DecisionCounts))
    latency: dict[LatencyKey, LatencyCounts] = field(default_factory=lambda: defaultdict(LatencyCounts))
    contacts: int = 0
    responses: int = 0
    shadows: int = 0

    def add(self, record: Contact | Response) -> None:
        if isinstance(record, Contact) and record.is_shadow:
            self.shadows += 1  # never served: compared with the live contacts from the archive
        elif isinstance(record, Contact):
            self._add_contact(record)
        else:
            self._add_response(record)

    def _add_contact(self, contact: Contact) -> None:
        self.contacts += 1
        minute = minute_of(contact.time)
        cell = (minute, contact.deployment, contact.variant, contact.segment)
        decision = self.decisions[(*cell, contact.config_revision, contact.replica)]
        decision.invocations += 1
        decision.explore_decisions += int(contact.explore)
        decision.last_seen = max(decision.last_seen, contact.time)
        for shown in contact.shown:
            counts = self.offers[(*cell, shown.offer, contact.config_revision, contact.replica)]
            counts.impressions += 1
            counts.explored_impressions += int(shown.explored)
        self.latency[(minute, contact.deployment, INVOKE_METHOD)].add(contact.latency_ms / 1000)

    def _add_response(self, response: Response) -> None:
        self.responses += 1
        # The contact's time when the record carries it (entries of older predictors do not).
        minute = minute_of(response.contact_time or response.time)
        cell = (minute, response.deployment, response.variant, response.segment)
        decision = self.decisions[(*cell, response.config_revision, response.replica)]
        decision.responses += 1
        decision.late_responses += int(response.late)
        decision.duplicate_responses += int(response.duplicate)
        if not response.late:
            for offer in response.new_offers:
                counts = self.offers[(*cell, offer, response.config_revision, response.replica)]
                counts.accepted += 1
                counts.reward_sum += response.credited_reward
        self.latency[(minute_of(response.time), response.deployment, RESPOND_METHOD)].add(
            response.latency_ms / 1000
        )


def rollup(records: Iterable[Contact | Response]) -> Rollup:
    result = Rollup()
    for record in records:
        result.add(record)
    return result


def merged_latency(rows: Iterable[tuple[int, float, Mapping[int, int]]]) -> LatencyCounts:
    """Rows of (calls, max_seconds, buckets) as one distribution."""
    total = LatencyCounts()
    for calls, max_seconds, buckets in rows:
        total.merge(LatencyCounts(calls, max_seconds, dict(buckets)))
    return total


def quantiles(counts: LatencyCounts, levels: Sequence[float]) -> list[float]:
    return [counts.quantile(level) for level in levels]
