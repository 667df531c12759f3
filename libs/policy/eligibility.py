"""Which offers a customer may be shown: the offers' eligibility rules over the context values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from libs.common.deployment_spec import EligibilityRule, Offer, RuleOperator


def rule_holds(rule: EligibilityRule, value: str | float | None) -> bool:
    if value is None:
        return False
    target = rule.value
    if rule.operator in (RuleOperator.IN, RuleOperator.NOT_IN):
        assert isinstance(target, list)
        inside = any(str(value) == str(t) or _same_number(value, t) for t in target)
        return inside if rule.operator is RuleOperator.IN else not inside
    if rule.operator in (RuleOperator.EQ, RuleOperator.NE):
        equal = str(value) == str(target) or _same_number(value, target)
        return equal if rule.operator is RuleOperator.EQ else not equal
    try:
        number, bound = float(value), float(target)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return {
        RuleOperator.GT: number > bound,
        RuleOperator.GE: number >= bound,
        RuleOperator.LT: number < bound,
        RuleOperator.LE: number <= bound,
    }[rule.operator]


def _same_number(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def eligible_offers(offers: Sequence[Offer], values: Mapping[str, str | float]) -> list[Offer]:
    """The offers with a positive weighting whose every rule holds for these context values."""
    return [
        offer
        for offer in offers
        if offer.weighting > 0
        and all(rule_holds(rule, values.get(rule.variable)) for rule in offer.eligibility)
    ]


class EligibilityRules:
    """`eligible_offers` for one deployment's offers, remembered per combination of the values its
    rules read (a customer's channel, segment, ...): a few combinations serve most requests, and
    evaluating every rule of every offer was a twentieth of an Invoke's policy work."""

    MAX_REMEMBERED = 4096
    # Values longer than this (free text a client sent) are not remembered: a key holds its values.
    MAX_REMEMBERED_CHARS = 64

    def __init__(self, offers: Sequence[Offer]) -> None:
        self._offers = tuple(offers)
        self._variables = tuple(sorted({rule.variable for offer in offers for rule in offer.eligibility}))
        self._remembered: dict[tuple[Any, ...], tuple[Offer, ...]] = {}

    def eligible(self, values: Mapping[str, str | float]) -> list[Offer]:
        # The type is part of the key: 1 and 1.0 are equal keys, but not equal text.
        read = tuple(map(values.get, self._variables))
        if any(isinstance(value, str) and len(value) > self.MAX_REMEMBERED_CHARS for value in read):
            return eligible_offers(self._offers, values)
        key = tuple((type(value), value) for value in read)
        offers = self._remembered.get(key)
        if offers is None:
            if len(self._remembered) >= self.MAX_REMEMBERED:
                self._remembered.clear()
            offers = self._remembered[key] = tuple(eligible_offers(self._offers, values))
        return list(offers)
