"""From a request to context values: params in every form ecosystem.Ai clients send, feature lookup
results, virtual variables, and the segment key that selects arm statistics.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from libs.common.deployment_spec import (
    ConcatTransform,
    ContextSource,
    DeploymentSpec,
    DiscretizeTransform,
    VariableKind,
)
from libs.common.errors import InvalidArgument

MAX_PARAMS_BYTES = 64 * 1024
MAX_NUMBER_OF_OFFERS = 1000
MAX_NUMBER_OF_OFFERS = 1000


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_params(value: Any, field: str = "params") -> dict[str, Any]:
    """A JSON object, a JSON string, or a URL-encoded JSON string (all occur in the wild); an object
    may give its values as parallel arrays, {"input": [names], "value": [values]} (the ecosystem.Ai
    runtime's form), which become name -> value beside any other keys."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return _named_values(value, field)
    if not isinstance(value, str):
        raise InvalidArgument("must be a JSON object or a string holding one", field=field)
    if len(value) > MAX_PARAMS_BYTES:
        raise InvalidArgument(f"is {len(value)} characters; the limit is {MAX_PARAMS_BYTES}", field=field)
    text = value.strip()
    if text[:1] != "{" and "%7B" in text[:8].upper():
        text = urllib.parse.unquote_plus(text).strip()
    try:
        decoded = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"is not valid JSON: {exc}", field=field) from None
    except RecursionError:  # e.g. "[[[[..." nested deeper than the decoder recurses
        raise InvalidArgument("is nested too deeply", field=field) from None
    if _ESCAPED_SURROGATE.search(text):  # a "\ud800" escape: valid JSON, and text nothing can store
        try:
            json.dumps(decoded, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidArgument(
                "holds a \\u escape of half a surrogate pair, which is no character", field=field
            ) from None
    if isinstance(decoded, str):  # doubly encoded: a JSON string holding the object
        return parse_params(decoded, field)
    if not isinstance(decoded, dict):
        raise InvalidArgument("must decode to a JSON object", field=field)
    return _named_values(decoded, field)


def _named_values(params: dict[str, Any], field: str) -> dict[str, Any]:
    names, values = params.get("input"), params.get("value")
    if names is None or values is None:
        return params
    if isinstance(names, str) and not isinstance(values, list):  # one name, one value
        names, values = [names], [values]
    if not isinstance(names, list) or not isinstance(values, list):
        raise InvalidArgument(
            "input and value must both be lists (names and their values), or a name and a value",
            field=f"{field}.input",
        )
    if len(names) != len(values):
        raise InvalidArgument(
            f"holds {len(values)} values for the {len(names)} names in input", field=f"{field}.value"
        )
    if not all(isinstance(name, str) and name for name in names):
        raise InvalidArgument("must be a list of names (non-empty strings)", field=f"{field}.input")
    rest = {key: item for key, item in params.items() if key not in ("input", "value")}
    return {**rest, **dict(zip(names, values, strict=True))}


def parse_number_of_offers(value: Any, default: int, available: int) -> int:
    """`numberoffers` as a number or a numeric string; unset or 0 means the deployment's default
    (at most the offers there are: the caller asked for nothing wrong)."""
    if value is None or value == "":
        count = 0
    elif isinstance(value, bool):
        raise InvalidArgument("must be a positive whole number", field="numberoffers")
    elif isinstance(value, int | float):
        if not math.isfinite(value) or value != int(value):
            raise InvalidArgument(f"must be a positive whole number, got {value}", field="numberoffers")
        count = int(value)
    elif isinstance(value, str):
        try:
            count = int(value.strip())
        except ValueError:
            raise InvalidArgument(
                f"must be a positive whole number, got {value[:40]!r}", field="numberoffers"
            ) from None
    else:
        raise InvalidArgument("must be a number or a numeric string", field="numberoffers")
    if count == 0:
        return min(default, available)
    # Not the number itself when it is huge: 1e300 has 301 digits.
    asked = str(count) if abs(count) < 10**9 else f"a {len(str(abs(count)))}-digit number"
    if count < 0:
        raise InvalidArgument(f"must be positive, got {asked}", field="numberoffers")
    if count > MAX_NUMBER_OF_OFFERS:
        raise InvalidArgument(f"must be at most {MAX_NUMBER_OF_OFFERS}, got {asked}", field="numberoffers")
    # More than there are: as many as are eligible, and the reply's warnings say so (as the
    # ecosystem.Ai runtime answers a client asking for 10 of 7 offers).
    return count


@dataclass(frozen=True)
class Context:
    values: dict[str, str | float]  # every context variable, after defaults and transforms
    segment: str  # the categorical segment variables joined, e.g. "age_band=adult|gender=f"
    numeric: dict[str, float]  # numeric variables, for contextual (linear) algorithms
    warnings: tuple[str, ...]


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _as_label(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def derive_context(
    spec: DeploymentSpec, features: Mapping[str, Any], params: Mapping[str, Any], channel: str
) -> Context:
    """Context values from features and params (params override), defaults on a miss, then
    virtual variables in declaration order."""
    values: dict[str, str | float] = {}
    warnings: list[str] = []
    merged_params = {"channel": channel, **params} if channel else dict(params)
    for variable in spec.context_variables:
        raw: Any = None
        if variable.source is ContextSource.VIRTUAL:
            transform = variable.transform
            if isinstance(transform, DiscretizeTransform):
                number = _as_number(values.get(transform.input))
                if number is None:
                    raw = variable.default
                else:
                    index = sum(1 for edge in transform.edges if number >= edge)
                    raw = transform.labels[index]
            elif isinstance(transform, ConcatTransform):
                raw = transform.separator.join(_as_label(values.get(name, "")) for name in transform.inputs)
        else:
            if variable.name in params:  # params supply context directly, overriding the lookup
                raw = params[variable.name]
            elif variable.source is ContextSource.PARAM:
                raw = merged_params.get(variable.field)
            else:
                raw = features.get(variable.field)
            if raw is None or raw == "":
                raw = variable.default
                if variable.default is None:
                    warnings.append(f"context variable '{variable.name}' has no value and no default")
        if variable.kind is VariableKind.NUMERIC:
            number = _as_number(raw)
            if number is None:
                default = _as_number(variable.default)
                if raw is not None:
                    warnings.append(f"context variable '{variable.name}' is not numeric: {raw!r}")
                number = default if default is not None else 0.0
            values[variable.name] = number
        else:
            values[variable.name] = _as_label(raw) if raw is not None else ""
    segment = "|".join(f"{name}={values[name]}" for name in spec.segment_variables) or "all"
    numeric = {k: float(v) for k, v in values.items() if isinstance(v, float)}
    return Context(values, segment, numeric, tuple(warnings))


def segment_reads_features(spec: DeploymentSpec) -> bool:
    """Whether a customer's segment can depend on their online features (a segment variable is a
    feature, or is derived from one); if not, the segment is known from the request alone."""
    reads: dict[str, bool] = {}
    for variable in spec.context_variables:  # declaration order: a virtual one reads earlier ones
        transform = variable.transform
        if isinstance(transform, DiscretizeTransform):
            reads[variable.name] = reads.get(transform.input, False)
        elif isinstance(transform, ConcatTransform):
            reads[variable.name] = any(reads.get(name, False) for name in transform.inputs)
        else:
            reads[variable.name] = variable.source is ContextSource.FEATURE
    return any(reads.get(name, False) for name in spec.segment_variables)
