"""The in-memory engine: the shared policy (libs/policy) choosing over arm statistics kept in
dicts, updated by `update_arm_fields`, a line-by-line twin of the options store's UPDATE_ARMS Lua
script. No Redis; fast enough for 100k-round runs, and round for round the same choices as the
predictor's engine over Redis (bench/decision_quality.py and the tests check it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from libs.common.deployment_spec import DeploymentSpec
from libs.common.errors import InvalidArgument
from libs.policy.context import Context, derive_context
from libs.policy.deployment import PreparedDeployment
from libs.policy.statistics import (
    CHANGE_TEST_BUCKETS,
    SEGMENT_CLOCK_FIELD,
    ArmPolicy,
    Statistics,
    changed,
    parse_arms,
)
from libs.simulation.environments import Round

# The options store's arm arithmetic, in memory ----------------------------------------------------


ArmHash = dict[bytes | str, bytes | str]  # one arm statistics hash, as HGETALL returns it


def _lua_number(value: float) -> str:
    return "%.17g" % value  # noqa: UP031 - the exact format UPDATE_ARMS writes with string.format


def update_arm_fields(
    fields: ArmHash,
    policy: ArmPolicy,
    updates: Sequence[tuple[str, float, float]],
    now: float,
) -> None:
    """The UPDATE_ARMS Lua script applied to a dict standing in for the Redis hash: decay the
    evidence to now, add, cap, keep the two-bucket window. Mirrors the script step for step
    (including `%.17g` storage), so the same sequence gives the same hash."""

    def number(name: str) -> float | None:
        value = fields.get(name)
        return float(value) if value is not None else None

    half_life = policy.half_life_seconds
    window = policy.window_seconds
    cap = policy.count_cap
    half_life_impressions = policy.half_life_impressions
    clock = 0.0
    if half_life_impressions > 0:
        clock = number(SEGMENT_CLOCK_FIELD) or 0.0
        for _, dn, _ in updates:  # one at a time, as the script adds them
            clock = clock + dn
        fields[SEGMENT_CLOCK_FIELD] = _lua_number(clock)
    for offer, dn, ds in updates:
        n = number(f"{offer}|n") or 0.0
        s = number(f"{offer}|s") or 0.0
        stored_t = number(f"{offer}|t")
        t = stored_t if stored_t is not None else now
        if half_life > 0 and now > t:
            factor = math.pow(0.5, (now - t) / half_life)
            n = n * factor
            s = s * factor
        if half_life_impressions > 0:
            stored_c = number(f"{offer}|c")
            c = stored_c if stored_c is not None else clock
            if clock > c:
                factor = math.pow(0.5, (clock - c) / half_life_impressions)
                n = n * factor
                s = s * factor
            fields[f"{offer}|c"] = _lua_number(clock)
        n = n + dn
        s = s + ds
        if policy.change_detection:
            restarted = False
            for level, size in enumerate(CHANGE_TEST_BUCKETS):
                bucket_n = (number(f"{offer}|b{level}n") or 0.0) + dn
                bucket_s = (number(f"{offer}|b{level}s") or 0.0) + ds
                if bucket_n >= size:
                    if not restarted and changed(bucket_n, bucket_s, n - bucket_n, s - bucket_s):
                        n, s, restarted = bucket_n, bucket_s, True
                    bucket_n = bucket_s = 0.0
                fields[f"{offer}|b{level}n"] = _lua_number(bucket_n)
                fields[f"{offer}|b{level}s"] = _lua_number(bucket_s)
            if restarted:  # every bucket starts again with the evidence kept
                for level in range(len(CHANGE_TEST_BUCKETS)):
                    fields[f"{offer}|b{level}n"] = _lua_number(0.0)
                    fields[f"{offer}|b{level}s"] = _lua_number(0.0)
                fields[f"{offer}|r"] = _lua_number((number(f"{offer}|r") or 0.0) + 1.0)
        if s > n:
            n = s
        if cap > 0 and n > cap:
            s = s * cap / n
            n = cap
        if now > t:
            t = now
        fields[f"{offer}|n"] = _lua_number(n)
        fields[f"{offer}|s"] = _lua_number(s)
        fields[f"{offer}|t"] = _lua_number(t)
        if window > 0:
            wn = number(f"{offer}|wn") or 0.0
            ws = number(f"{offer}|ws") or 0.0
            pn = number(f"{offer}|pn") or 0.0
            ps = number(f"{offer}|ps") or 0.0
            wb = number(f"{offer}|wb") or 0.0
            bucket = math.floor(now / window) * window
            if bucket > wb:
                if bucket - wb >= 2 * window:
                    pn = ps = 0.0
                else:
                    pn, ps = wn, ws
                wn = ws = 0.0
                wb = bucket
            wn = wn + dn
            ws = ws + ds
            fields[f"{offer}|wn"] = _lua_number(wn)
            fields[f"{offer}|ws"] = _lua_number(ws)
            fields[f"{offer}|pn"] = _lua_number(pn)
            fields[f"{offer}|ps"] = _lua_number(ps)
            fields[f"{offer}|wb"] = _lua_number(wb)


class InMemoryPolicy:
    """The predictor's decision step without Redis: the same prepared deployment, the same
    `PreparedDeployment.choose` with the same draws from the random generator in the same order,
    statistics read with `parse_arms` and written with `update_arm_fields`. Serves arm algorithms
    (thompson, epsilon_greedy), which is what simulation specs use."""

    def __init__(self, spec: DeploymentSpec, rng: np.random.Generator) -> None:
        self._prepared = PreparedDeployment.prepare(spec)
        self._rng = rng
        self._arms: dict[str, ArmHash] = {}
        self._index = {offer.id: index for index, offer in enumerate(spec.offers)}
        self._contexts: dict[str, Context] = {}
        if any(plan.scorer.statistics != "arms" for plan in self._prepared.plans.values()):
            raise InvalidArgument("the in-memory engine serves arm algorithms", field="spec")

    def arm_fields(self, segment: str) -> ArmHash:
        """The stand-in for the Redis hash of one segment's arm statistics."""
        return self._arms.setdefault(segment, {})

    def _context(self, params: Mapping[str, Any] | None) -> Context:
        key = "" if params is None else "|".join(f"{k}={v}" for k, v in sorted(params.items()))
        context = self._contexts.get(key)
        if context is None:
            context = self._contexts[key] = derive_context(self._prepared.spec, {}, params or {}, "")
        return context

    def choose(self, round: Round) -> int:
        plan = self._prepared.variant_for(round.customer)
        context = self._context(round.params)
        params = round.params or {}
        statistics = Statistics(arms=parse_arms(self.arm_fields(context.segment), plan.policy, round.now))
        choice = self._prepared.choose(
            plan,
            self._prepared.eligible(context, params),
            context,
            statistics,
            self._rng,
            count=1,
            params=params,
        )
        chosen = choice.offers[0].offer.id
        update_arm_fields(self.arm_fields(context.segment), plan.policy, [(chosen, 1.0, 0.0)], round.now)
        return self._index[chosen]

    def learn(self, round: Round, offer: int, clicked: bool) -> None:
        if not clicked:
            return  # a response without uptake changes no statistics (as in DecisionEngine.respond)
        plan = self._prepared.variant_for(round.customer)
        segment = self._context(round.params).segment
        reward = self._prepared.spec.reward.default_reward
        offer_id = self._prepared.spec.offers[offer].id
        update_arm_fields(self.arm_fields(segment), plan.policy, [(offer_id, 0.0, reward)], round.now)
