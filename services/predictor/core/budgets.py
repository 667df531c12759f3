"""Offer budgets (a prediction activator): an offer may be shown only so much per period across
every replica. Each shown budgeted offer is consumed in Redis by one script, all of a request's
offers or none, after the ranking and before the reply; an offer whose budget would overflow is
refused, and the request is ranked again without it. A replica remembers an exhausted offer until
its period ends (what a period used only grows), so it is left out before ranking from then on and
costs no round trip more; the reply says why it is absent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from libs.common import redis_keys
from libs.common.deployment_spec import Offer, OfferBudget
from libs.common.redis_batch import queue_script

PERIOD_SECONDS = {"hour": 3600, "day": 86400, "week": 7 * 86400}
# The Unix epoch was a Thursday: weeks start on Mondays, the first of them 4 days later.
WEEK_OFFSET_SECONDS = 4 * 86400

# KEYS: one budget counter per offer. ARGV: for each, the amount to add, the limit and the seconds
# the counter lives (0: for ever). Adds every amount only if none passes its limit; otherwise adds
# nothing and returns the 1-based indexes of the counters that would pass.
CONSUME = """
local refused = {}
for i = 1, #KEYS do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  local amount = tonumber(ARGV[3 * i - 2])
  if used + amount > tonumber(ARGV[3 * i - 1]) + 1e-9 then refused[#refused + 1] = i end
end
if #refused > 0 then return refused end
for i = 1, #KEYS do
  redis.call('INCRBYFLOAT', KEYS[i], ARGV[3 * i - 2])
  local ttl = tonumber(ARGV[3 * i])
  if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
end
return refused
"""


def period_start(budget: OfferBudget, now: float) -> int:
    """The start of the budget period `now` falls in (0 for a total budget)."""
    if budget.period == "total":
        return 0
    length = PERIOD_SECONDS[budget.period]
    offset = WEEK_OFFSET_SECONDS if budget.period == "week" else 0
    return int(math.floor((now - offset) / length) * length + offset)


def describe(budget: OfferBudget) -> str:
    unit = "presentations" if budget.measure == "presentations" else "in value"
    per = "in total" if budget.period == "total" else f"per {budget.period}"
    return f"{budget.limit:g} {unit} {per}"


class BudgetLedger:
    """This replica's memory of exhausted offers, and the consuming script's queueing."""

    def __init__(self) -> None:
        self._exhausted: dict[tuple[str, str], int] = {}  # (deployment, offer) -> period start

    def exhausted(self, deployment: str, offer: Offer, now: float) -> bool:
        budget = offer.budget
        return budget is not None and self._exhausted.get((deployment, offer.id)) == period_start(budget, now)

    def remember(self, deployment: str, offer: Offer, now: float) -> None:
        if offer.budget is not None:
            self._exhausted[(deployment, offer.id)] = period_start(offer.budget, now)

    @staticmethod
    def queue_consume(pipeline: Any, deployment: str, offers: Sequence[Offer], now: float) -> None:
        """Consume one presentation of each budgeted offer, all or none (the reply: the 1-based
        indexes of the offers refused)."""
        keys: list[str] = []
        args: list[Any] = []
        for offer in offers:
            budget = offer.budget
            assert budget is not None
            start = period_start(budget, now)
            keys.append(redis_keys.offer_budget(deployment, offer.id, start))
            amount = 1.0 if budget.measure == "presentations" else offer.price
            ttl = 0 if budget.period == "total" else 2 * PERIOD_SECONDS[budget.period]
            args += [repr(float(amount)), repr(float(budget.limit)), ttl]
        queue_script(pipeline, CONSUME, keys, args)
