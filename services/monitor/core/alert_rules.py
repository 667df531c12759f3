"""Alert rules: what the monitor watches, read from a YAML file, and the statistics behind them.

A rules file holds `rules:` (a list) and `receivers:` (webhooks, see webhooks.py). Every rule has a
unique `name`, a `kind`, a `severity` (warning or critical), optionally the `deployments` it watches
(default: every deployment in the decision log) and `for`, how long its condition must hold before
it fires (durations are seconds or text like 90s, 15m, 6h, 1d). The rest are the kind's own
parameters; an unknown kind, an unknown parameter or a bad threshold is refused at start with the
line of the file. `services/monitor/alert-rules.yaml` (shipped in the package) is the default and
documents every parameter.

Kinds and what makes them fire (windows are whole minutes of the per-minute rollups):

- uptake_drop, per deployment and offer: the offer's uptake (accepted / impressions) over
  `recent_window` is lower than over the `baseline_window` before it, with a one-sided
  two-proportion z-test p-value below `significance` AND a relative drop of at least
  `min_relative_drop`, and both windows hold at least `min_impressions`. The last `response_delay`
  is left out of the recent window: its contacts still wait for responses, so their uptake is low.
- no_traffic, per deployment: Invokes in the `baseline_window` before the last `window`, none in it.
- replica_stale, per replica and deployment it follows: connected and at least
  `min_revisions_behind` config revisions behind (from the config service).
- replica_nack, per replica and deployment: the replica's last NACK is of the deployment's head
  revision and it has applied nothing since, so it still serves an older config.
- feature_drift / score_drift, per deployment and model input (score_drift: the predicted score):
  the drift source's severity is at least the rule's `severity` (and the PSI at least `min_psi`);
  the alert carries the drift's severity.
- error_rate, per metrics URL (a replica's /metrics): the share of `service`'s RPCs that ended with
  one of `error_codes`, from the increase of `liveloop_rpc_requests_total` over `window`, is above
  `max_error_share` with at least `min_requests` RPCs. Platform-wide (no deployment).
- latency_burn_rate, per deployment: the SLO "`objective` of Invokes take less than
  `threshold_seconds`" burns its error budget `burn_rate` times too fast over BOTH the long and the
  short window of a pair (multi-window, multi-burn-rate alerts from the Google SRE workbook: the
  long window makes it significant, the short one makes it resolve soon after the problem ends).
  Burn rate = slow fraction / (1 - objective). Each pair has its own severity.
- explore_share, per deployment: explored / all impressions over `window` outside
  [`min_share`, `max_share`], with at least `min_impressions`.
- decision_log_lag: the monitor's consumer group is more than `max_lag` entries behind the stream.
- decision_log_trimmed: entries were trimmed from the decision log before the monitor read them
  (lost to the monitor), within the last `window` (0: since the last evaluation).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from libs.common.errors import InvalidArgument
from services.monitor.core.rollups import LATENCY_BUCKETS, LatencyCounts

T = TypeVar("T")
FIELD = "alert_rules_file"
# The rules shipped with liveloop: used when no rules file is configured.
DEFAULT_RULES_FILE = Path(__file__).resolve().parents[1] / "alert-rules.yaml"

Severity = Literal["ok", "warning", "critical"]
RuleSeverity = Literal["warning", "critical"]
SEVERITY_RANK: Mapping[str, int] = {"ok": 0, "warning": 1, "critical": 2}

# Server-side failures; client errors (INVALID_ARGUMENT, NOT_FOUND, ...) are the caller's problem.
SERVER_ERROR_CODES = (
    "UNKNOWN",
    "INTERNAL",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "DATA_LOSS",
    "RESOURCE_EXHAUSTED",
)
GRPC_STATUS_NAMES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)

# -- durations -----------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or text like 90s, 15m, 1h30m, 1d."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like 90s, 15m, 6h or 1d, or a number of seconds")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        parts = _DURATION_PART.findall(text)
        if parts and "".join(number + unit for number, unit in parts) == text:
            return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    raise ValueError(f"must be a duration like 90s, 15m, 6h or 1d, or a number of seconds, not {value!r}")


def _at_least_a_minute(seconds: float) -> float:
    if seconds < 60:
        raise ValueError(f"must be at least 1m (the rollups are per minute), got {seconds:g}s")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
Window = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_at_least_a_minute)]


def whole_minutes(seconds: float) -> int:
    """A window in seconds rounded up to whole minutes."""
    return math.ceil(seconds / 60.0) * 60


# -- rules ---------------------------------------------------------------------------------------


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Kinds that watch the platform rather than a deployment: `deployments` is refused.
    platform_wide: ClassVar[bool] = False

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    severity: RuleSeverity = "warning"
    deployments: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    for_seconds: Duration = Field(0.0, alias="for")
    description: str = ""

    @model_validator(mode="after")
    def _deployments_apply(self) -> Self:
        if self.platform_wide and self.deployments:
            raise ValueError("deployments: this kind watches the platform, not a deployment")
        return self

    def watches(self, deployment: str) -> bool:
        return not self.deployments or deployment in self.deployments


class UptakeDropRule(_Rule):
    kind: Literal["uptake_drop"]
    recent_window: Window = 900.0
    baseline_window: Window = 86400.0
    response_delay: Duration = 300.0
    significance: float = Field(0.01, gt=0, le=0.5)
    min_relative_drop: float = Field(0.2, gt=0, lt=1)
    min_impressions: int = Field(200, ge=1)


class NoTrafficRule(_Rule):
    kind: Literal["no_traffic"]
    window: Window = 600.0
    baseline_window: Window = 86400.0


class ReplicaStaleRule(_Rule):
    kind: Literal["replica_stale"]
    min_revisions_behind: int = Field(1, ge=1)


class ReplicaNackRule(_Rule):
    kind: Literal["replica_nack"]


class FeatureDriftRule(_Rule):
    kind: Literal["feature_drift"]
    min_psi: float = Field(0.0, ge=0)


class ScoreDriftRule(_Rule):
    kind: Literal["score_drift"]
    min_psi: float = Field(0.0, ge=0)


class ErrorRateRule(_Rule):
    platform_wide = True
    kind: Literal["error_rate"]
    service: str = Field("predictor", min_length=1)
    methods: tuple[str, ...] = ()  # e.g. "PredictorService/Invoke"; empty: every method
    error_codes: tuple[str, ...] = Field(SERVER_ERROR_CODES, min_length=1)
    window: Duration = 300.0
    max_error_share: float = Field(0.05, gt=0, lt=1)
    min_requests: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _codes_exist(self) -> Self:
        unknown = sorted(set(self.error_codes) - GRPC_STATUS_NAMES)
        if unknown:
            raise ValueError(f"error_codes: not gRPC status names: {', '.join(unknown)}")
        if "OK" in self.error_codes:
            raise ValueError("error_codes: OK is not an error")
        return self


class BurnRateWindows(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    long: Window
    short: Window
    burn_rate: float = Field(gt=0)
    severity: RuleSeverity | None = None  # default: the rule's

    @model_validator(mode="after")
    def _short_is_shorter(self) -> Self:
        if self.short >= self.long:
            raise ValueError(f"short ({self.short:g}s) must be shorter than long ({self.long:g}s)")
        return self


# Google SRE workbook, "Alerting on SLOs": 2% of a 30-day budget in 1 hour pages, 5% in 6 hours too.
DEFAULT_BURN_RATE_WINDOWS = (
    BurnRateWindows(long=3600, short=300, burn_rate=14.4, severity="critical"),
    BurnRateWindows(long=21600, short=1800, burn_rate=6.0, severity="warning"),
)


class LatencyBurnRateRule(_Rule):
    kind: Literal["latency_burn_rate"]
    objective: float = Field(0.99, gt=0, lt=1)
    threshold_seconds: float = Field(0.1, gt=LATENCY_BUCKETS[0], lt=LATENCY_BUCKETS[-1])
    windows: tuple[BurnRateWindows, ...] = Field(DEFAULT_BURN_RATE_WINDOWS, min_length=1)
    min_calls: int = Field(20, ge=1)  # in the short window: a handful of calls proves nothing

    @model_validator(mode="after")
    def _can_fire(self) -> Self:
        for index, pair in enumerate(self.windows):
            if pair.burn_rate * (1 - self.objective) >= 1:
                raise ValueError(
                    f"windows[{index}].burn_rate: {pair.burn_rate:g} x (1 - objective {self.objective:g}) "
                    "is 1 or more: the rule could never fire"
                )
        return self

    def severity_of(self, pair: BurnRateWindows) -> RuleSeverity:
        return pair.severity or self.severity


class ExploreShareRule(_Rule):
    kind: Literal["explore_share"]
    window: Window = 3600.0
    min_share: float = Field(0.0, ge=0, le=1)
    max_share: float = Field(1.0, ge=0, le=1)
    min_impressions: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> Self:
        if self.min_share > self.max_share:
            raise ValueError(f"min_share ({self.min_share:g}) is above max_share ({self.max_share:g})")
        if self.min_share == 0 and self.max_share == 1:
            raise ValueError("min_share and max_share: at least one must be set, or the rule never fires")
        return self


class DecisionLogLagRule(_Rule):
    platform_wide = True
    kind: Literal["decision_log_lag"]
    max_lag: int = Field(10_000, ge=0)


class DecisionLogTrimmedRule(_Rule):
    platform_wide = True
    kind: Literal["decision_log_trimmed"]
    window: Duration = 0.0  # 0: since the last evaluation


AlertRule = Annotated[
    UptakeDropRule
    | NoTrafficRule
    | ReplicaStaleRule
    | ReplicaNackRule
    | FeatureDriftRule
    | ScoreDriftRule
    | ErrorRateRule
    | LatencyBurnRateRule
    | ExploreShareRule
    | DecisionLogLagRule
    | DecisionLogTrimmedRule,
    Field(discriminator="kind"),
]
_RULE_ADAPTER: TypeAdapter[AlertRule] = TypeAdapter(AlertRule)
KINDS: Mapping[str, type[_Rule]] = {
    "uptake_drop": UptakeDropRule,
    "no_traffic": NoTrafficRule,
    "replica_stale": ReplicaStaleRule,
    "replica_nack": ReplicaNackRule,
    "feature_drift": FeatureDriftRule,
    "score_drift": ScoreDriftRule,
    "error_rate": ErrorRateRule,
    "latency_burn_rate": LatencyBurnRateRule,
    "explore_share": ExploreShareRule,
    "decision_log_lag": DecisionLogLagRule,
    "decision_log_trimmed": DecisionLogTrimmedRule,
}


class WebhookReceiver(BaseModel):
    """Where fired and resolved alerts are posted (Alertmanager's webhook JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    url: str = Field(pattern=r"^https?://[^\s/]+")
    timeout_seconds: float = Field(5.0, gt=0, le=120)
    max_attempts: int = Field(5, ge=1, le=50)
    initial_backoff_seconds: float = Field(1.0, gt=0, le=600)
    max_backoff_seconds: float = Field(60.0, gt=0, le=3600)
    # Every alert still firing is sent again this often (Alertmanager's repeat_interval), and once
    # after the monitor starts; 0: only that once.
    repeat_interval_seconds: float = Field(4 * 3600.0, ge=0, le=7 * 86400)

    @model_validator(mode="after")
    def _backoff_ordered(self) -> Self:
        if self.max_backoff_seconds < self.initial_backoff_seconds:
            raise ValueError("max_backoff_seconds is below initial_backoff_seconds")
        return self


_RECEIVER_ADAPTER = TypeAdapter(WebhookReceiver)


@dataclass(frozen=True)
class AlertRules:
    rules: tuple[AlertRule, ...]
    receivers: tuple[WebhookReceiver, ...]
    source: str  # the file they were read from


# -- loading -------------------------------------------------------------------------------------


def load_rules(path: Path | str | None = None) -> AlertRules:
    """The rules of `path`, or of DEFAULT_RULES_FILE when None; InvalidArgument (alert_rules_file)
    naming the file and line of the first problem."""
    file = DEFAULT_RULES_FILE if path is None else Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        hint = " (the default rules ship in the source tree: set the rules file)" if path is None else ""
        raise InvalidArgument(f"cannot read {file}: {exc.strerror or exc}{hint}", field=FIELD) from None
    return parse_rules(text, source=str(file))


def parse_rules(text: str, source: str = "<rules>") -> AlertRules:
    root = _compose(text, source)
    if root is None:
        return AlertRules((), (), source)
    if not isinstance(root, yaml.MappingNode):
        raise _refusal(source, root, "must be a mapping with a rules: list")
    sections = _mapping(root, source)
    for key, (key_node, _value) in sections.items():
        if key not in ("rules", "receivers"):
            raise _refusal(source, key_node, f"unknown section {key!r} (rules, receivers)")
    rules: list[AlertRule] = []
    names: set[str] = set()
    for node in _sequence(sections.get("rules"), "rules", source):
        rule = _rule(node, source)
        if rule.name in names:
            raise _refusal(source, node, f"rule name {rule.name!r} is used twice")
        names.add(rule.name)
        rules.append(rule)
    receivers: list[WebhookReceiver] = []
    for node in _sequence(sections.get("receivers"), "receivers", source):
        receiver = _validated(_RECEIVER_ADAPTER, node, source, "receiver")
        if any(known.name == receiver.name for known in receivers):
            raise _refusal(source, node, f"receiver name {receiver.name!r} is used twice")
        receivers.append(receiver)
    return AlertRules(tuple(rules), tuple(receivers), source)


def _compose(text: str, source: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise InvalidArgument(f"{source}{line}: not valid YAML: {exc.problem}", field=FIELD) from None
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{source}: not valid YAML: {exc}", field=FIELD) from None


def _refusal(source: str, node: yaml.Node, message: str) -> InvalidArgument:
    return InvalidArgument(f"{source}, line {node.start_mark.line + 1}: {message}", field=FIELD)


def _mapping(node: yaml.MappingNode, source: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """Key text -> (key node, value node); a key given twice is refused (YAML would keep the last)."""
    entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        if key in entries:
            raise _refusal(source, key_node, f"{key!r} is given twice")
        entries[key] = (key_node, value_node)
    return entries


def _sequence(entry: tuple[yaml.Node, yaml.Node] | None, name: str, source: str) -> list[yaml.Node]:
    if entry is None:
        return []
    _key, node = entry
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return []
    if not isinstance(node, yaml.SequenceNode):
        raise _refusal(source, node, f"{name} must be a list")
    return list(node.value)


def _construct(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _rule(node: yaml.Node, source: str) -> AlertRule:
    if not isinstance(node, yaml.MappingNode):
        raise _refusal(source, node, "a rule must be a mapping with name and kind")
    entries = _mapping(node, source)
    name = str(entries["name"][1].value) if "name" in entries else "?"
    if "kind" not in entries:
        raise _refusal(source, node, f"rule {name!r}: kind is required (one of {', '.join(KINDS)})")
    kind_node = entries["kind"][1]
    kind = kind_node.value if isinstance(kind_node, yaml.ScalarNode) else None
    if kind not in KINDS:
        raise _refusal(source, kind_node, f"rule {name!r}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    return _validated(_RULE_ADAPTER, node, source, f"rule {name!r} ({kind})", tag=str(kind))


def _validated(adapter: TypeAdapter[T], node: yaml.Node, source: str, what: str, tag: str = "") -> T:
    try:
        return adapter.validate_python(_construct(node))
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        location = [part for part in error["loc"] if part != tag]
        field = _field_path(location)
        message = str(error["msg"]).removeprefix("Value error, ")
        # A check across fields starts its message with the field it blames: point at that line.
        where = _node_at(node, [*location, *_leading_field(message)])
        if error["type"] == "extra_forbidden":
            message = f"unknown parameter {field!r}"
            field = ""
        raise _refusal(source, where, f"{what}: {field + ': ' if field else ''}{message}") from None


def _node_at(node: yaml.Node, location: Sequence[int | str]) -> yaml.Node:
    """The deepest node along a validation error's location (the key node for a mapping entry)."""
    for part in location:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
            if match is None:
                return node
            key_node, value_node = match
            node = value_node if isinstance(value_node, yaml.MappingNode | yaml.SequenceNode) else key_node
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


_LEADING_FIELD = re.compile(r"^([a-z_]+)((?:\[\d+\]|\.[a-z_]+)*)(?=[:( ])")


def _leading_field(message: str) -> list[int | str]:
    match = _LEADING_FIELD.match(message)
    if match is None:
        return []
    parts: list[int | str] = [match.group(1)]
    for index, name in re.findall(r"\[(\d+)\]|\.([a-z_]+)", match.group(2)):
        parts.append(int(index) if index else name)
    return parts


def _field_path(location: Sequence[int | str]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


# -- statistics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UptakeComparison:
    recent_rate: float
    baseline_rate: float
    relative_drop: float  # (baseline - recent) / baseline; 0 when the baseline is 0
    z: float
    p_value: float  # one-sided: that the recent rate is this much lower by chance


def compare_uptake(
    recent_accepted: int, recent_impressions: int, baseline_accepted: int, baseline_impressions: int
) -> UptakeComparison:
    """Two-proportion z-test (pooled) of H1: recent uptake < baseline uptake."""
    if recent_impressions <= 0 or baseline_impressions <= 0:
        raise ValueError("both windows need impressions")
    recent = recent_accepted / recent_impressions
    baseline = baseline_accepted / baseline_impressions
    pooled = (recent_accepted + baseline_accepted) / (recent_impressions + baseline_impressions)
    variance = pooled * (1 - pooled) * (1 / recent_impressions + 1 / baseline_impressions)
    if variance <= 0:
        # Every impression taken, or none: no evidence of a difference.
        z, p_value = 0.0, 1.0
    else:
        z = (recent - baseline) / math.sqrt(variance)
        p_value = NormalDist().cdf(z)
    drop = (baseline - recent) / baseline if baseline > 0 else 0.0
    return UptakeComparison(recent, baseline, drop, z, p_value)


def slow_fraction(latency: LatencyCounts, threshold_seconds: float) -> float:
    """The share of calls slower than the threshold, from the log-spaced buckets; the bucket that
    holds the threshold counts the part above it (geometric interpolation, as quantiles do)."""
    if latency.calls == 0:
        return 0.0
    if latency.max_seconds <= threshold_seconds:
        return 0.0
    slow = 0.0
    for index, calls in latency.buckets.items():
        low = LATENCY_BUCKETS[index] if index > 0 else 0.0
        high = LATENCY_BUCKETS[index + 1] if index + 1 < len(LATENCY_BUCKETS) else math.inf
        high = min(high, max(latency.max_seconds, low))
        if low >= threshold_seconds:
            slow += calls
        elif high > threshold_seconds:
            share = math.log(high / threshold_seconds) / math.log(high / low) if low > 0 else 1.0
            slow += calls * share
    return min(slow / latency.calls, 1.0)


def burn_rate(bad_fraction: float, objective: float) -> float:
    """How many times faster than sustainable the error budget (1 - objective) is spent."""
    return bad_fraction / (1 - objective)
