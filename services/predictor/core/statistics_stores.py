"""Statistics stores: each kind of statistics a scorer reads (arm counts, naive Bayes counts, linear
models) owns, in one place, its keys' reading, its impression update (on Invoke), its reward update
(on Respond) and the Lua that makes them atomic. Every replica reads and writes the same keys, so a
response learned on one replica changes what every replica scores on its next request.

A store queues its commands on the caller's pipeline, so the decision engine sends a request's
reads (and then its writes) to Redis in as few round trips as the request needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common import redis_keys
from libs.common.redis_batch import queue_script
from libs.policy.context import Context
from libs.policy.deployment import VariantPlan
from libs.policy.scorers import LinearScorer
from libs.policy.statistics import (
    CHANGE_TEST_BUCKETS,
    CHANGE_TEST_THRESHOLD,
    SEGMENT_CLOCK_FIELD,
    ArmFields,
    ArmPolicy,
    LinearState,
    Statistics,
    StatisticsKind,
)

logger = logging.getLogger(__name__)

ARM_HASHES_KEPT = 10_000  # segments whose arm statistics a replica keeps (statistics_max_age > 0)
UPDATE_FEED_RETRY_SECONDS = 0.2
UPDATE_FEED_RETRY_MAX_SECONDS = 5.0

# KEYS[1] = arm statistics hash. ARGV: now, half_life (0 = none), window (0 = none), cap (0 = none),
# half-life in impressions (0 = none), change detection (1 = on), then triples (offer, impressions
# to add, successes to add). Per arm: decay the evidence to now (and, by impressions, to the
# segment's impression clock after this call's impressions), add, test the arm's full buckets for a
# change (libs/policy/statistics.py: changed, with the same arithmetic), cap, and keep a two-bucket
# sliding window when one is set.
UPDATE_ARMS = (
    """
local now = tonumber(ARGV[1])
local half_life = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local half_life_impressions = tonumber(ARGV[5])
local detect = ARGV[6] == '1'
local buckets, changed
if detect then  -- only a deployment that asks pays for defining the test
  buckets = {"""
    + ", ".join(repr(size) for size in CHANGE_TEST_BUCKETS)
    + """}
  local threshold = """
    + repr(CHANGE_TEST_THRESHOLD)
    + """
  local function divergence(p, q)
    local value = 0.0
    if p > 0 then value = value + p * math.log(p / q) end
    if p < 1 then value = value + (1 - p) * math.log((1 - p) / (1 - q)) end
    return value
  end
  changed = function(bn, bs, hn, hs)
    if hn < bn or bn <= 0 then return false end
    local pooled = (bs + hs) / (bn + hn)
    if pooled <= 0 or pooled >= 1 then return false end
    local recent = math.min(math.max(bs / bn, 0.0), 1.0)
    local old = math.min(math.max(hs / hn, 0.0), 1.0)
    return bn * divergence(recent, pooled) + hn * divergence(old, pooled) > threshold
  end
end
local clock = 0
if half_life_impressions > 0 then
  clock = tonumber(redis.call('HGET', KEYS[1], '|imp')) or 0
  for i = 7, #ARGV, 3 do clock = clock + tonumber(ARGV[i + 1]) end
  redis.call('HSET', KEYS[1], '|imp', string.format('%.17g', clock))
end
for i = 7, #ARGV, 3 do
  local offer = ARGV[i]
  local dn = tonumber(ARGV[i + 1])
  local ds = tonumber(ARGV[i + 2])
  local v = redis.call('HMGET', KEYS[1], offer .. '|n', offer .. '|s', offer .. '|t',
                      offer .. '|wn', offer .. '|ws', offer .. '|pn', offer .. '|ps', offer .. '|wb',
                      offer .. '|c')
  local n = tonumber(v[1]) or 0
  local s = tonumber(v[2]) or 0
  local t = tonumber(v[3]) or now
  if half_life > 0 and now > t then
    local f = math.pow(0.5, (now - t) / half_life)
    n = n * f
    s = s * f
  end
  if half_life_impressions > 0 then
    local c = tonumber(v[9]) or clock
    if clock > c then
      local f = math.pow(0.5, (clock - c) / half_life_impressions)
      n = n * f
      s = s * f
    end
    redis.call('HSET', KEYS[1], offer .. '|c', string.format('%.17g', clock))
  end
  n = n + dn
  s = s + ds
  if detect then
    local restarted = false
    for level = 1, #buckets do
      local name = offer .. '|b' .. (level - 1)
      local b = redis.call('HMGET', KEYS[1], name .. 'n', name .. 's')
      local bn = (tonumber(b[1]) or 0) + dn
      local bs = (tonumber(b[2]) or 0) + ds
      if bn >= buckets[level] then
        if (not restarted) and changed(bn, bs, n - bn, s - bs) then
          n = bn
          s = bs
          restarted = true
        end
        bn = 0
        bs = 0
      end
      redis.call('HSET', KEYS[1], name .. 'n', string.format('%.17g', bn), name .. 's',
                 string.format('%.17g', bs))
    end
    if restarted then
      for level = 1, #buckets do
        local name = offer .. '|b' .. (level - 1)
        redis.call('HSET', KEYS[1], name .. 'n', '0', name .. 's', '0')
      end
      redis.call('HINCRBYFLOAT', KEYS[1], offer .. '|r', 1)
    end
  end
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
)
assert SEGMENT_CLOCK_FIELD == "|imp"  # the field UPDATE_ARMS keeps the segment's impression clock in

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

# KEYS[1] = linear model hash of one offer. ARGV: reward, x_1..x_d. The impression already added
# x x^T to A; a response adds reward * x to b only.
ADD_TO_B = """
local raw = redis.call('HGET', KEYS[1], 'b')
if not raw then return 0 end
local b = cjson.decode(raw)
if #b ~= #ARGV - 1 then return 0 end  -- a model of other features: this contact does not fit it
local reward = tonumber(ARGV[1])
for i = 1, #b do b[i] = b[i] + reward * tonumber(ARGV[1 + i]) end
redis.call('HSET', KEYS[1], 'b', cjson.encode(b))
return 1
"""

# KEYS[1] = naive Bayes counts of one deployment. ARGV: amount, field_1..field_k. One script per
# request, so another replica never reads a request's impressions (or rewards) half counted.
ADD_COUNTS = """
local amount = ARGV[1]
for i = 2, #ARGV do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], amount) end
return 1
"""


@dataclass(frozen=True)
class Scope:
    """Whose statistics: one deployment's live options generation and one segment of it."""

    deployment: str
    generation: str
    segment: str


# Reads its own replies (in the order it queued them) off the pipeline's replies.
StatisticsReader = Callable[[Iterator[Any]], Statistics]


# What a store's keys depend on, so the engine knows when it can read them with the features.
KeyedBy = Literal["deployment", "segment", "eligible_offers"]


class StatisticsStore(Protocol):
    kind: StatisticsKind
    keyed_by: KeyedBy
    takes_negative_rewards: bool  # counts of successes cannot go down; a linear model's b can

    def kept(self, scope: Scope, policy: ArmPolicy, now: float) -> Statistics | None:
        """Statistics this replica may use without asking Redis (None: ask)."""
        ...

    def queue_read(
        self, pipeline: Any, scope: Scope, offers: Sequence[str], policy: ArmPolicy, now: float
    ) -> StatisticsReader:
        """Queue what scoring these offers needs (perhaps nothing); the reader parses the replies."""
        ...

    def contact_fields(self, plan: VariantPlan, context: Context) -> dict[str, str]:
        """What the reward update will need from the contact, beyond its context."""
        ...

    def queue_impressions(
        self,
        pipeline: Any,
        scope: Scope,
        shown: Sequence[str],
        plan: VariantPlan,
        context: Context,
        now: float,
    ) -> None: ...

    def queue_rewards(
        self,
        pipeline: Any,
        scope: Scope,
        contact: Mapping[str, str],
        offers: Sequence[str],
        reward: float,
        plan: VariantPlan,
        now: float,
    ) -> bool:
        """Queue the learning of `offers` from this contact; False when the contact cannot teach
        the statistics served now (it was scored over other features)."""
        ...


class ArmStatistics:
    """One hash per segment, `<offer>|<field>`, updated by UPDATE_ARMS. A replica may keep a
    segment's hash for up to `max_age` seconds: a response drops every replica's copy at once
    (published on ARM_UPDATES_CHANNEL, followed by `follow_updates`), so a kept copy only misses
    the impressions of the last `max_age`."""

    kind: StatisticsKind = "arms"
    keyed_by: KeyedBy = "segment"
    takes_negative_rewards = False

    def __init__(self, redis: Redis, max_age: float = 0.0) -> None:
        self._redis = redis
        self._max_age = max_age
        self._kept: dict[str, tuple[float, ArmFields]] = {}

    def kept(self, scope: Scope, policy: ArmPolicy, now: float) -> Statistics | None:
        """This replica's copy of the segment's statistics, if it is younger than max_age."""
        if self._max_age <= 0:
            return None
        kept = self._kept.get(redis_keys.arm_statistics(scope.deployment, scope.generation, scope.segment))
        if kept is None or time.monotonic() - kept[0] >= self._max_age:
            return None
        return Statistics(arms=kept[1].at(policy, now))

    def queue_read(
        self, pipeline: Any, scope: Scope, offers: Sequence[str], policy: ArmPolicy, now: float
    ) -> StatisticsReader:
        kept = self.kept(scope, policy, now)
        if kept is not None:
            return lambda _: kept
        key = redis_keys.arm_statistics(scope.deployment, scope.generation, scope.segment)
        pipeline.hgetall(key)

        def read(replies: Iterator[Any]) -> Statistics:
            fields = ArmFields.read(next(replies))
            if self._max_age > 0:
                self._keep(key, fields)
            return Statistics(arms=fields.at(policy, now))

        return read

    def _keep(self, key: str, fields: ArmFields) -> None:
        self._kept.pop(key, None)
        if len(self._kept) >= ARM_HASHES_KEPT:
            del self._kept[next(iter(self._kept))]  # the oldest
        self._kept[key] = (time.monotonic(), fields)

    def contact_fields(self, plan: VariantPlan, context: Context) -> dict[str, str]:
        return {}

    def queue_impressions(
        self,
        pipeline: Any,
        scope: Scope,
        shown: Sequence[str],
        plan: VariantPlan,
        context: Context,
        now: float,
    ) -> None:
        self.queue_update(pipeline, scope, plan.policy, [(offer, 1.0, 0.0) for offer in shown], now)

    def queue_rewards(
        self,
        pipeline: Any,
        scope: Scope,
        contact: Mapping[str, str],
        offers: Sequence[str],
        reward: float,
        plan: VariantPlan,
        now: float,
    ) -> bool:
        self.queue_update(pipeline, scope, plan.policy, [(offer, 0.0, reward) for offer in offers], now)
        return True

    def queue_update(
        self,
        pipeline: Any,
        scope: Scope,
        policy: ArmPolicy,
        updates: Sequence[tuple[str, float, float]],
        now: float,
    ) -> None:
        """Add (impressions, successes) per offer, decayed, windowed and capped by `policy`."""
        if not updates:
            return
        key = redis_keys.arm_statistics(scope.deployment, scope.generation, scope.segment)
        args: list[Any] = [
            now,
            policy.half_life_seconds,
            policy.window_seconds,
            policy.count_cap,
            policy.half_life_impressions,
            int(policy.change_detection),
        ]
        for offer, impressions, successes in updates:
            args += [offer, impressions, successes]
        queue_script(pipeline, UPDATE_ARMS, [key], args)
        if any(successes for _, _, successes in updates):
            # A response: every replica (this one at once) drops its copy of the segment.
            self.learned(key)
            pipeline.publish(redis_keys.ARM_UPDATES_CHANNEL, key)

    def learned(self, key: str) -> None:
        """A response learned into the segment's hash `key`: this replica drops its copy at once
        (the others when the key reaches them on ARM_UPDATES_CHANNEL)."""
        self._kept.pop(key, None)

    def forget(self) -> None:
        """Drop every kept copy (the update feed was interrupted)."""
        self._kept.clear()

    async def follow_updates(self, on_subscribed: Callable[[], None] | None = None) -> None:
        """Until cancelled: drop this replica's copy of a segment's arm statistics as soon as any
        replica learns into it (a Respond publishes the key). When the feed breaks, every copy is
        dropped and it resubscribes with backoff; copies still age out meanwhile."""
        if self._max_age <= 0:
            return
        delay = UPDATE_FEED_RETRY_SECONDS
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(redis_keys.ARM_UPDATES_CHANNEL)
                    self.forget()  # anything learned before the subscription
                    delay = UPDATE_FEED_RETRY_SECONDS
                    if on_subscribed is not None:
                        on_subscribed()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._kept.pop(_text(message["data"]), None)
            except (RedisError, OSError) as exc:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    # Closing the subscription while being cancelled can raise a connection error
                    # in place of the cancellation: stop, do not resubscribe.
                    raise asyncio.CancelledError from exc
                self.forget()
                logger.warning("arm update feed interrupted (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, UPDATE_FEED_RETRY_MAX_SECONDS)


class NaiveBayesCounts:
    """One hash per deployment: `<offer>|n`, `<offer>|s` and the same per context value
    (`<offer>|<variable>=<value>|n|s`), each a HINCRBYFLOAT."""

    kind: StatisticsKind = "naive_bayes"
    keyed_by: KeyedBy = "deployment"
    takes_negative_rewards = False

    def kept(self, scope: Scope, policy: ArmPolicy, now: float) -> Statistics | None:
        return None

    def queue_read(
        self, pipeline: Any, scope: Scope, offers: Sequence[str], policy: ArmPolicy, now: float
    ) -> StatisticsReader:
        pipeline.hgetall(redis_keys.naive_bayes_counts(scope.deployment, scope.generation))
        return lambda replies: Statistics(naive_bayes={_text(k): float(v) for k, v in next(replies).items()})

    def contact_fields(self, plan: VariantPlan, context: Context) -> dict[str, str]:
        return {}  # the contact's categorical context is all it needs

    def queue_impressions(
        self,
        pipeline: Any,
        scope: Scope,
        shown: Sequence[str],
        plan: VariantPlan,
        context: Context,
        now: float,
    ) -> None:
        categorical = {k: v for k, v in context.values.items() if isinstance(v, str)}
        self._queue_counts(pipeline, scope, shown, categorical, "n", 1.0)

    def queue_rewards(
        self,
        pipeline: Any,
        scope: Scope,
        contact: Mapping[str, str],
        offers: Sequence[str],
        reward: float,
        plan: VariantPlan,
        now: float,
    ) -> bool:
        categorical = json.loads(contact.get("context", "{}"))
        self._queue_counts(pipeline, scope, offers, categorical, "s", reward)
        return True

    @staticmethod
    def _queue_counts(
        pipeline: Any,
        scope: Scope,
        offers: Sequence[str],
        context: Mapping[str, str],
        field: str,
        amount: float,
    ) -> None:
        if not offers:
            return
        fields = [
            name
            for offer in offers
            for name in (f"{offer}|{field}", *(f"{offer}|{k}={v}|{field}" for k, v in context.items()))
        ]
        key = redis_keys.naive_bayes_counts(scope.deployment, scope.generation)
        queue_script(pipeline, ADD_COUNTS, [key], [repr(float(amount)), *fields])


class LinearModels:
    """One hash per offer with A (d x d) and b (d), as JSON arrays: A += x x^T on an impression
    (UPDATE_LINEAR), b += reward x on a response (ADD_TO_B). The contact keeps x."""

    kind: StatisticsKind = "linear"
    keyed_by: KeyedBy = "eligible_offers"
    takes_negative_rewards = True

    def kept(self, scope: Scope, policy: ArmPolicy, now: float) -> Statistics | None:
        return None

    def queue_read(
        self, pipeline: Any, scope: Scope, offers: Sequence[str], policy: ArmPolicy, now: float
    ) -> StatisticsReader:
        for offer in offers:
            pipeline.hmget(redis_keys.linear_model(scope.deployment, scope.generation, offer), "a", "b")

        def read(replies: Iterator[Any]) -> Statistics:
            linear = {}
            for offer in offers:
                a, b = next(replies)
                if a is not None and b is not None:
                    vector = np.array(json.loads(b), dtype=float)
                    d = len(vector)
                    linear[offer] = LinearState(np.array(json.loads(a), dtype=float).reshape(d, d), vector)
            return Statistics(linear=linear)

        return read

    @staticmethod
    def _vector(plan: VariantPlan, context: Context) -> list[float]:
        scorer = plan.scorer
        return scorer.vector(context.numeric).tolist() if isinstance(scorer, LinearScorer) else []

    def contact_fields(self, plan: VariantPlan, context: Context) -> dict[str, str]:
        return {"vector": json.dumps(self._vector(plan, context))}

    def queue_impressions(
        self,
        pipeline: Any,
        scope: Scope,
        shown: Sequence[str],
        plan: VariantPlan,
        context: Context,
        now: float,
    ) -> None:
        vector = self._vector(plan, context)
        for offer in shown:
            self.queue_update(pipeline, scope, offer, vector, 0.0)

    def queue_update(
        self, pipeline: Any, scope: Scope, offer: str, vector: Sequence[float], reward: float
    ) -> None:
        """A += x x^T, b += reward x (a model of another dimension starts again at zero)."""
        key = redis_keys.linear_model(scope.deployment, scope.generation, offer)
        queue_script(pipeline, UPDATE_LINEAR, [key], [len(vector), reward, *vector])

    def queue_rewards(
        self,
        pipeline: Any,
        scope: Scope,
        contact: Mapping[str, str],
        offers: Sequence[str],
        reward: float,
        plan: VariantPlan,
        now: float,
    ) -> bool:
        vector = json.loads(contact.get("vector", "[]"))
        # A contact scored before the algorithm or its features changed has no vector that fits
        # the linear models now served: logged, not learned.
        if not isinstance(plan.scorer, LinearScorer) or len(vector) != plan.scorer.dimension:
            return False
        for offer in offers:
            key = redis_keys.linear_model(scope.deployment, scope.generation, offer)
            queue_script(pipeline, ADD_TO_B, [key], [reward, *vector])
        return True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
