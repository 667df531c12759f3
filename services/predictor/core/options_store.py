"""The options store in Redis: arm statistics per deployment x segment x offer, updated atomically by
Lua scripts (decay, windows and caps applied incrementally), plus contacts for the Respond join and
the decision log stream. Every replica reads and writes the same keys, so a response learned on one
replica changes what every replica scores on its next request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common import redis_keys
from libs.common.deployment_spec import ThompsonAlgorithm
from services.predictor.core.algorithms import ArmCounts, LinearState, Statistics

logger = logging.getLogger(__name__)

DECISION_LOG_MAX_LENGTH = 1_000_000
GENERATION_CACHE_SECONDS = 1.0
ARM_HASHES_KEPT = 10_000  # segments whose arm statistics a replica keeps (statistics_max_age > 0)
UPDATE_FEED_RETRY_SECONDS = 0.2
UPDATE_FEED_RETRY_MAX_SECONDS = 5.0

# KEYS[1] = arm statistics hash. ARGV: now, half_life (0 = none), window (0 = none), cap (0 = none),
# then triples (offer, impressions to add, successes to add). Per arm: decay the evidence to now,
# add, cap, and keep a two-bucket sliding window when one is set.
UPDATE_ARMS = """
local now = tonumber(ARGV[1])
local half_life = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
for i = 5, #ARGV, 3 do
  local offer = ARGV[i]
  local dn = tonumber(ARGV[i + 1])
  local ds = tonumber(ARGV[i + 2])
  local v = redis.call('HMGET', KEYS[1], offer .. '|n', offer .. '|s', offer .. '|t',
                      offer .. '|wn', offer .. '|ws', offer .. '|pn', offer .. '|ps', offer .. '|wb')
  local n = tonumber(v[1]) or 0
  local s = tonumber(v[2]) or 0
  local t = tonumber(v[3]) or now
  if half_life > 0 and now > t then
    local f = math.pow(0.5, (now - t) / half_life)
    n = n * f
    s = s * f
  end
  n = n + dn
  s = s + ds
  if s > n then n = s end
  if cap > 0 and n > cap then
    s = s * cap / n
    n = cap
  end
  if now > t then t = now end
  redis.call('HSET', KEYS[1], offer .. '|n', string.format('%.17g', n), offer .. '|s',
             string.format('%.17g', s), offer .. '|t', string.format('%.17g', t))
  if window > 0 then
    local wn = tonumber(v[4]) or 0
    local ws = tonumber(v[5]) or 0
    local pn = tonumber(v[6]) or 0
    local ps = tonumber(v[7]) or 0
    local wb = tonumber(v[8]) or 0
    local bucket = math.floor(now / window) * window
    if bucket > wb then
      if bucket - wb >= 2 * window then pn = 0 ps = 0 else pn = wn ps = ws end
      wn = 0
      ws = 0
      wb = bucket
    end
    wn = wn + dn
    ws = ws + ds
    redis.call('HSET', KEYS[1], offer .. '|wn', string.format('%.17g', wn), offer .. '|ws',
               string.format('%.17g', ws), offer .. '|pn', string.format('%.17g', pn), offer .. '|ps',
               string.format('%.17g', ps), offer .. '|wb', string.format('%.17g', wb))
  end
end
return 1
"""

# KEYS[1] = contact hash. ARGV: offers the response credits. Marks each offer answered once and
# returns the ones marked now (a repeated response learns nothing twice); also marks the contact.
MARK_RESPONSES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local fresh = {}
redis.call('HSETNX', KEYS[1], 'responded', '1')
for i = 1, #ARGV do
  if redis.call('HSETNX', KEYS[1], 'accepted|' .. ARGV[i], '1') == 1 then
    table.insert(fresh, ARGV[i])
  end
end
return fresh
"""

# KEYS[1] = linear model hash of one offer. ARGV: dimension, reward, x_1..x_d.
# A += x x^T and b += reward * x, as JSON arrays (cjson ships with Redis's Lua).
UPDATE_LINEAR = """
local d = tonumber(ARGV[1])
local reward = tonumber(ARGV[2])
local raw = redis.call('HMGET', KEYS[1], 'a', 'b')
local a = {}
local b = {}
if raw[1] and raw[2] then a = cjson.decode(raw[1]) b = cjson.decode(raw[2]) end
if #b ~= d or #a ~= d * d then  -- none yet, or one over features the deployment no longer uses
  a = {}
  b = {}
  for i = 1, d * d do a[i] = 0 end
  for i = 1, d do b[i] = 0 end
end
for i = 1, d do
  local xi = tonumber(ARGV[2 + i])
  b[i] = b[i] + reward * xi
  for j = 1, d do
    a[(i - 1) * d + j] = a[(i - 1) * d + j] + xi * tonumber(ARGV[2 + j])
  end
end
redis.call('HSET', KEYS[1], 'a', cjson.encode(a), 'b', cjson.encode(b))
return 1
"""


@dataclass(frozen=True)
class ArmPolicy:
    """How evidence ages: from the Thompson parameters (other arm algorithms keep it forever)."""

    half_life_seconds: float = 0.0
    window_seconds: float = 0.0
    count_cap: float = 0.0

    @classmethod
    def from_algorithm(cls, algorithm: object) -> ArmPolicy:
        if isinstance(algorithm, ThompsonAlgorithm):
            return cls(
                algorithm.half_life_seconds or 0.0,
                algorithm.window_seconds or 0.0,
                algorithm.count_cap or 0.0,
            )
        half_life = getattr(algorithm, "half_life_seconds", None)
        return cls(half_life_seconds=half_life or 0.0)


_ARM_FIELDS = ("n", "s", "t", "pa", "pb", "wb", "wn", "ws", "pn", "ps")
_PARSE_PLANS_KEPT = 256


@dataclass(frozen=True)
class _ParsePlan:
    """Where each field of each offer sits in an arm hash's HGETALL reply (-1: absent)."""

    offers: tuple[str, ...]
    positions: dict[str, np.ndarray]  # field -> per offer, its position among the values, or -1


_parse_plans: dict[tuple[bytes | str, ...], _ParsePlan] = {}


def _parse_plan(keys: tuple[bytes | str, ...]) -> _ParsePlan:
    """The plan for a hash with these fields, made once per field layout (a segment's hash keeps
    its fields; values change)."""
    plan = _parse_plans.get(keys)
    if plan is not None:
        return plan
    offers: dict[str, int] = {}
    located: list[tuple[int, str, int]] = []
    for position, key in enumerate(keys):
        name = key.decode() if isinstance(key, bytes) else key
        offer, _, part = name.rpartition("|")
        located.append((offers.setdefault(offer, len(offers)), part, position))
    positions = {field: np.full(len(offers), -1, dtype=np.intp) for field in _ARM_FIELDS}
    for index, part, position in located:
        if part in positions:
            positions[part][index] = position
    plan = _ParsePlan(tuple(offers), positions)
    if len(_parse_plans) >= _PARSE_PLANS_KEPT:
        _parse_plans.clear()
    _parse_plans[keys] = plan
    return plan


class ArmTable(Mapping[str, ArmCounts]):
    """The arms of one segment, decayed to now, as columns; a Mapping of offer -> ArmCounts."""

    def __init__(
        self,
        offers: Sequence[str],
        impressions: np.ndarray,
        successes: np.ndarray,
        prior_alpha: np.ndarray,
        prior_beta: np.ndarray,
    ) -> None:
        self._index = {offer: position for position, offer in enumerate(offers)}
        # One zero row at the end stands for every offer without statistics.
        self._columns = tuple(
            np.append(column.astype(np.float64), 0.0)
            for column in (impressions, successes, prior_alpha, prior_beta)
        )

    def __getitem__(self, offer: str) -> ArmCounts:
        position = self._index[offer]
        n, s, pa, pb = (float(column[position]) for column in self._columns)
        return ArmCounts(n, s, pa, pb)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def columns(self, offers: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(impressions, successes, prior alpha, prior beta) of these offers; zeros for unknown ones."""
        missing = len(self._index)
        rows = np.fromiter((self._index.get(offer, missing) for offer in offers), np.intp, len(offers))
        n, s, pa, pb = (column[rows] for column in self._columns)
        return n, s, pa, pb


def parse_arms(raw: Mapping[Any, Any], policy: ArmPolicy, now: float) -> ArmTable:
    """An arm hash (`<offer>|<field>` -> number) decayed to `now`, vectorised over its offers.
    A field whose value is not a number is ignored."""
    plan = _parse_plan(tuple(raw))
    try:
        values = np.fromiter((float(value) for value in raw.values()), np.float64, len(raw))
    except ValueError:  # a field that is not a number: the careful path
        return _parse_arms_field_by_field(raw, policy, now)
    padded = np.append(values, np.nan)  # position -1 reads the NaN: "absent"

    def field(name: str) -> np.ndarray:
        column: np.ndarray = padded[plan.positions[name]]
        return column

    n, s = np.nan_to_num(field("n")), np.nan_to_num(field("s"))
    if policy.half_life_seconds > 0:
        elapsed = np.maximum(now - np.where(np.isnan(field("t")), now, field("t")), 0.0)
        factor = np.power(0.5, elapsed / policy.half_life_seconds)
        n, s = n * factor, s * factor
    if policy.window_seconds > 0:
        window = policy.window_seconds
        begun = field("wb")
        windowed = ~np.isnan(begun)
        elapsed = now - np.nan_to_num(begun)
        wn, ws = np.nan_to_num(field("wn")), np.nan_to_num(field("ws"))
        pn, ps = np.nan_to_num(field("pn")), np.nan_to_num(field("ps"))
        expired = elapsed >= 2 * window
        previous = (elapsed >= window) & ~expired
        fading = np.maximum(0.0, 1.0 - (elapsed - window) / window)
        current = np.maximum(0.0, 1.0 - elapsed / window)
        window_n = np.where(expired, 0.0, np.where(previous, wn * fading, wn + pn * current))
        window_s = np.where(expired, 0.0, np.where(previous, ws * fading, ws + ps * current))
        n, s = np.where(windowed, window_n, n), np.where(windowed, window_s, s)
    return ArmTable(plan.offers, n, np.minimum(s, n), np.nan_to_num(field("pa")), np.nan_to_num(field("pb")))


def _parse_arms_field_by_field(
    raw: Mapping[bytes | str, bytes | str], policy: ArmPolicy, now: float
) -> ArmTable:
    fields: dict[str, dict[str, float]] = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else key
        offer, _, part = name.rpartition("|")
        try:
            fields.setdefault(offer, {})[part] = float(value)
        except ValueError:
            continue
    filtered = {
        f"{offer}|{part}": str(value) for offer, parts in fields.items() for part, value in parts.items()
    }
    return parse_arms(filtered, policy, now)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class OptionsStore:
    def __init__(self, redis: Redis, clock: Any = time.time, statistics_max_age: float = 0.0) -> None:
        self._redis = redis
        self._clock = clock
        self._statistics_max_age = statistics_max_age
        self._arm_hashes: dict[str, tuple[float, Mapping[Any, Any]]] = {}
        self._generations: dict[str, tuple[float, str]] = {}
        self._mark_responses = redis.register_script(MARK_RESPONSES)

    @property
    def redis(self) -> Redis:
        return self._redis

    def now(self) -> float:
        return float(self._clock())

    async def generation(self, deployment: str) -> str:
        """The live options generation (ingest switches it atomically); cached for a second."""
        cached = self._generations.get(deployment)
        now = time.monotonic()
        if cached is not None and now - cached[0] < GENERATION_CACHE_SECONDS:
            return cached[1]
        value = await self._redis.get(redis_keys.options_generation(deployment))
        generation = _text(value) if value is not None else "0"
        self._generations[deployment] = (now, generation)
        return generation

    async def read(
        self,
        *,
        deployment: str,
        generation: str,
        segment: str,
        kind: str,
        offers: Sequence[str],
        policy: ArmPolicy,
        feature_key: str | None,
    ) -> tuple[Statistics, dict[str, str]]:
        """Features and statistics for one Invoke, in one round trip; a segment's arm statistics
        from this replica's copy when it is younger than statistics_max_age (see follow_updates)."""
        if kind == "arms" and feature_key is None and self._statistics_max_age > 0:
            key = redis_keys.arm_statistics(deployment, generation, segment)
            cached = self._arm_hashes.get(key)
            now = time.monotonic()
            if cached is None or now - cached[0] >= self._statistics_max_age:
                self._arm_hashes.pop(key, None)
                if len(self._arm_hashes) >= ARM_HASHES_KEPT:
                    del self._arm_hashes[next(iter(self._arm_hashes))]  # the oldest
                cached = (now, await self._redis.hgetall(key))
                self._arm_hashes[key] = cached
            return Statistics(arms=parse_arms(cached[1], policy, self.now())), {}
        pipeline = self._redis.pipeline(transaction=False)
        if feature_key is not None:
            pipeline.hgetall(feature_key)
        if kind == "arms":
            pipeline.hgetall(redis_keys.arm_statistics(deployment, generation, segment))
        elif kind == "naive_bayes":
            pipeline.hgetall(redis_keys.naive_bayes_counts(deployment, generation))
        else:
            for offer in offers:
                pipeline.hmget(redis_keys.linear_model(deployment, generation, offer), "a", "b")
        replies = await pipeline.execute()
        features: dict[str, str] = {}
        if feature_key is not None:
            features = {_text(k): _text(v) for k, v in replies.pop(0).items()}
        statistics = Statistics()
        if kind == "arms":
            statistics.arms = parse_arms(replies[0], policy, self.now())
        elif kind == "naive_bayes":
            statistics.naive_bayes = {_text(k): float(v) for k, v in replies[0].items()}
        else:
            linear = {}
            for offer, (a, b) in zip(offers, replies, strict=True):
                if a is not None and b is not None:
                    vector = np.array(json.loads(b), dtype=float)
                    d = len(vector)
                    linear[offer] = LinearState(np.array(json.loads(a), dtype=float).reshape(d, d), vector)
            statistics.linear = linear
        return statistics, features

    async def queue_arm_update(
        self,
        pipeline: Any,
        key: str,
        policy: ArmPolicy,
        updates: Sequence[tuple[str, float, float]],
        now: float,
    ) -> None:
        if not updates:
            return
        args: list[Any] = [now, policy.half_life_seconds, policy.window_seconds, policy.count_cap]
        for offer, impressions, successes in updates:
            args += [offer, impressions, successes]
        learned = any(successes for _, _, successes in updates)
        # EVAL with the body, not a registered Script: redis-py checks SCRIPT EXISTS before every
        # pipeline that holds a Script (one more round trip per Invoke); Redis caches the compiled
        # body by its SHA either way, and EVAL cannot fail with NOSCRIPT after a Redis restart.
        pipeline.eval(UPDATE_ARMS, 1, key, *args)
        if learned:  # a response: every replica (this one at once) drops its copy of the segment
            self._arm_hashes.pop(key, None)
            pipeline.publish(redis_keys.ARM_UPDATES_CHANNEL, key)

    def forget_arm_statistics(self) -> None:
        """Drop every copy of arm statistics (the update feed was interrupted)."""
        self._arm_hashes.clear()

    async def follow_updates(self, on_subscribed: Callable[[], None] | None = None) -> None:
        """Until cancelled: drop this replica's copy of a segment's arm statistics as soon as any
        replica learns into it (a Respond publishes the key). Copies kept between responses only
        miss the impressions of the last statistics_max_age; when the feed breaks, every copy is
        dropped and it resubscribes with backoff, and copies still age out meanwhile."""
        if self._statistics_max_age <= 0:
            return
        delay = UPDATE_FEED_RETRY_SECONDS
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(redis_keys.ARM_UPDATES_CHANNEL)
                    self.forget_arm_statistics()  # anything learned before the subscription
                    delay = UPDATE_FEED_RETRY_SECONDS
                    if on_subscribed is not None:
                        on_subscribed()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._arm_hashes.pop(_text(message["data"]), None)
            except (RedisError, OSError) as exc:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    # Closing the subscription while being cancelled can raise a connection error
                    # in place of the cancellation: stop, do not resubscribe.
                    raise asyncio.CancelledError from exc
                self.forget_arm_statistics()
                logger.warning("arm update feed interrupted (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, UPDATE_FEED_RETRY_MAX_SECONDS)

    def queue_naive_bayes_update(
        self, pipeline: Any, key: str, offer: str, context: Mapping[str, str], field: str, amount: float
    ) -> None:
        pipeline.hincrbyfloat(key, f"{offer}|{field}", amount)
        for name, value in context.items():
            pipeline.hincrbyfloat(key, f"{offer}|{name}={value}|{field}", amount)

    async def queue_linear_update(
        self, pipeline: Any, key: str, vector: Sequence[float], reward: float
    ) -> None:
        pipeline.eval(UPDATE_LINEAR, 1, key, len(vector), reward, *vector)

    async def mark_responses(self, uuid: str, offers: Sequence[str]) -> list[str] | None:
        """Offers not answered before (None when the contact is gone)."""
        reply = await self._mark_responses(keys=[redis_keys.contact(uuid)], args=list(offers))
        if reply is None:
            return None
        return [_text(item) for item in reply]
