"""The alert engine: evaluates the alert rules (alert_rules.py) every `interval_seconds`, keeps the
alerts in SQL (alert_store.py), sets the firing gauge and hands what changed to the webhooks.

Each rule reports the conditions holding now (findings). A finding fires once it has held for the
rule's `for`; while it waits it is pending, in this process's memory only (a restart starts its
wait again). A firing alert whose condition no longer holds resolves, except where its rule could
not tell this time (its data source failed or has no data yet): there it stays as it is, so an
unreachable config service or metrics page never resolves nor fires anything.

Data: the per-minute rollups (uptake, traffic, latency, explore share), the config service
(replicas), a drift source (features, score), the decision log consumer (lag, trimmed entries)
and the metrics pages of the services (RPC error shares).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from libs.common.distribution_drift import SCORE
from libs.common.errors import InvalidArgument, LiveloopError
from services.monitor.core import metrics
from services.monitor.core.alert_rules import (
    SEVERITY_RANK,
    AlertRule,
    AlertRules,
    DecisionLogLagRule,
    DecisionLogTrimmedRule,
    ErrorRateRule,
    ExploreShareRule,
    FeatureDriftRule,
    LatencyBurnRateRule,
    NoTrafficRule,
    ReplicaNackRule,
    ReplicaStaleRule,
    ScoreDriftRule,
    Severity,
    UptakeDropRule,
    burn_rate,
    compare_uptake,
    slow_fraction,
    whole_minutes,
)
from services.monitor.core.alert_store import Alert, AlertStore, Finding, Transitions
from services.monitor.core.decision_consumer import DecisionLogConsumer, stop_if_cancelled
from services.monitor.core.monitor_service import DeploymentConfig, ReplicaState
from services.monitor.core.rollup_store import RollupStore
from services.monitor.core.rollups import LatencyCounts, minute_of
from services.monitor.core.rpc_counters import RpcCounters, counter_increase, fetch_rpc_counters
from services.monitor.core.webhooks import WebhookNotifier

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECONDS = 30.0
DEFAULT_RESOLVED_RETENTION_SECONDS = 14 * 86400.0
DEFAULT_SCRAPE_TIMEOUT_SECONDS = 5.0
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


# -- drift -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureDrift:
    """How far one model input (or the predicted score, named "score") has moved from training."""

    name: str
    psi: float
    severity: Severity


class DriftSource(Protocol):
    async def drift(self, deployment: str) -> list[FeatureDrift]:
        """The deployment's drift now: one entry per model input, and one named "score"; an empty
        list when there is nothing to compare (no model, no reference, too few values). Called once
        per deployment and evaluation (both drift kinds share it): cache across calls if costly.
        An error (LiveloopError, OSError, SQLAlchemyError) leaves the drift alerts as they are."""


# -- what a rule could not decide --------------------------------------------------------------


@dataclass(frozen=True)
class Undecided:
    """Where a rule could not tell this time: its firing alerts there stay as they are."""

    deployment: str | None = None  # None: every deployment
    labels: Mapping[str, str] = field(default_factory=dict)

    def covers(self, deployment: str, labels: Mapping[str, str]) -> bool:
        if self.deployment is not None and self.deployment != deployment:
            return False
        return all(labels.get(key) == value for key, value in self.labels.items())


EVERYWHERE = Undecided()


@dataclass
class RuleOutcome:
    findings: list[Finding] = field(default_factory=list)
    undecided: list[Undecided] = field(default_factory=list)

    def covers(self, deployment: str, labels: Mapping[str, str]) -> bool:
        return any(scope.covers(deployment, labels) for scope in self.undecided)


class _NoData(Exception):
    """A rule's source is not configured or has nothing yet."""


SampleT = TypeVar("SampleT")


class SampleHistory(Generic[SampleT]):
    """Values of a counter at past evaluations, to take increases over a window."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, SampleT]] = deque()

    def reference(self, cutoff: float) -> SampleT | None:
        """The newest sample at or before `cutoff`, else the oldest one; None before any."""
        chosen = self._samples[0][1] if self._samples else None
        for when, value in self._samples:
            if when > cutoff:
                break
            chosen = value
        return chosen

    def add(self, when: float, value: SampleT, keep_seconds: float) -> None:
        self._samples.append((when, value))
        # Keep one sample at or before the oldest cutoff anyone will ask about.
        while len(self._samples) > 1 and self._samples[1][0] <= when - keep_seconds:
            self._samples.popleft()


# -- the engine --------------------------------------------------------------------------------


class AlertEngine:
    def __init__(
        self,
        rules: AlertRules,
        store: RollupStore,
        *,
        config: DeploymentConfig | None = None,
        drift: DriftSource | None = None,
        decision_log: DecisionLogConsumer | None = None,
        metrics_urls: Sequence[str] = (),
        external_url: str = "",
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
        resolved_retention_seconds: float = DEFAULT_RESOLVED_RETENTION_SECONDS,
        scrape_timeout_seconds: float = DEFAULT_SCRAPE_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for url in metrics_urls:
            if not url.startswith(("http://", "https://")):
                raise InvalidArgument(f"{url!r} is not an http(s) URL", field="metrics_urls")
        if interval_seconds <= 0:
            raise InvalidArgument("must be longer than zero", field="interval_seconds")
        self.rules = rules
        self.store = store
        self.alerts = AlertStore(store.engine)
        self.config = config
        self.drift = drift
        self.decision_log = decision_log
        self.metrics_urls = tuple(metrics_urls)
        self.notifier = WebhookNotifier(rules.receivers, external_url=external_url)
        self.interval_seconds = interval_seconds
        self.resolved_retention_seconds = resolved_retention_seconds
        self.scrape_timeout_seconds = scrape_timeout_seconds
        self.rule_errors: dict[str, str] = {}  # rule name -> why it could not be evaluated last time
        self._clock = clock
        self._pending: dict[str, tuple[float, Finding]] = {}  # alert id -> (holding since, finding)
        self._trimmed_history: SampleHistory[int] = SampleHistory()
        self._scrape_history: dict[str, SampleHistory[RpcCounters]] = {}
        self._gauge_labels: set[tuple[str, str]] = set()
        self._logged_errors: set[tuple[str, str]] = set()

    async def run(self) -> None:
        """Evaluate every interval until cancelled; the webhook senders run alongside."""
        senders = asyncio.create_task(self.notifier.run(), name="alert-webhooks")
        try:
            while True:
                try:
                    await self.evaluate_once(self._clock())
                except Exception:
                    logger.exception("alert evaluation failed; retrying at the next interval")
                stop_if_cancelled()
                await asyncio.sleep(self.interval_seconds)
        finally:
            senders.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await senders

    async def evaluate_once(self, now: float) -> Transitions:
        """Evaluate every rule at `now` (epoch seconds), record what changed, notify it."""
        round_ = _Round(self, now)
        outcomes: dict[str, RuleOutcome] = {}
        for rule in self.rules.rules:
            self.rule_errors.pop(rule.name, None)
            try:
                outcomes[rule.name] = await self._evaluate(rule, round_)
            except _NoData as exc:
                outcomes[rule.name] = RuleOutcome(undecided=[EVERYWHERE])
                self.rule_errors[rule.name] = str(exc)
            except Exception as exc:
                outcomes[rule.name] = RuleOutcome(undecided=[EVERYWHERE])
                self._log_failure(rule.name, exc)
            if rule.name not in self.rule_errors:
                # Recovered: the next failure of this rule is logged again.
                self._logged_errors = {key for key in self._logged_errors if key[0] != rule.name}
        round_.commit()
        findings = [finding for outcome in outcomes.values() for finding in outcome.findings]
        ready = self._update_pending(now, findings, outcomes)

        def undecided(alert: Alert) -> bool:
            outcome = outcomes.get(alert.rule)
            return outcome is None or outcome.covers(alert.deployment, alert.labels)

        transitions = await asyncio.to_thread(
            self.alerts.record,
            now,
            findings,
            ready,
            rule_names={rule.name for rule in self.rules.rules},
            undecided=undecided,
            retention_seconds=self.resolved_retention_seconds,
        )
        self._set_gauge(transitions.firing_counts)
        if transitions.notable:
            self.notifier.notify(transitions.notable)
        if self.notifier.receivers:
            firing = await asyncio.to_thread(self.alerts.firing)
            self.notifier.repeat(firing, now, just_sent=transitions.notable)
        return transitions

    async def list_alerts(
        self,
        deployment: str = "",
        include_resolved: bool = False,
        min_severity: Severity | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Alert], str, int]:
        """(alerts newest first, next page token or "", total matching); page_size 0: the default."""
        if page_size < 0:
            raise InvalidArgument("must not be negative", field="page.page_size")
        size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
        page = await asyncio.to_thread(
            self.alerts.list_alerts,
            deployment=deployment,
            include_resolved=include_resolved,
            min_severity=None if min_severity == "ok" else min_severity,
            page_size=size,
            page_token=page_token,
        )
        return page.alerts, page.next_page_token, page.total

    # -- bookkeeping -----------------------------------------------------------------------------

    def _update_pending(
        self, now: float, findings: Sequence[Finding], outcomes: Mapping[str, RuleOutcome]
    ) -> set[str]:
        waits = {rule.name: rule.for_seconds for rule in self.rules.rules}
        holding = {finding.id for finding in findings}
        for alert_id, (_since, finding) in list(self._pending.items()):
            outcome = outcomes.get(finding.rule)
            if alert_id in holding:
                continue
            if outcome is None or not outcome.covers(finding.deployment, finding.labels):
                del self._pending[alert_id]
        ready = set()
        for finding in findings:
            since, _ = self._pending.get(finding.id, (now, finding))
            self._pending[finding.id] = (since, finding)
            if now - since >= waits.get(finding.rule, 0.0):
                ready.add(finding.id)
        return ready

    def _set_gauge(self, counts: Mapping[tuple[str, str], int]) -> None:
        for rule, severity in self._gauge_labels - set(counts):
            metrics.ALERTS_FIRING.labels(rule, severity).set(0)
        for (rule, severity), count in counts.items():
            metrics.ALERTS_FIRING.labels(rule, severity).set(count)
        self._gauge_labels |= set(counts)

    def _log_failure(self, rule: str, exc: Exception) -> None:
        self.rule_errors[rule] = f"{type(exc).__name__}: {exc}"
        expected = isinstance(exc, LiveloopError | OSError) or type(exc).__module__.startswith("sqlalchemy")
        key = (rule, type(exc).__name__)
        if key in self._logged_errors:
            logger.debug("alert rule %s not evaluated: %s", rule, exc)
            return
        self._logged_errors.add(key)  # once per rule and kind of error: an outage is not a log flood
        if expected:
            logger.warning("alert rule %s not evaluated, its alerts stay as they are: %s", rule, exc)
        else:
            logger.exception("alert rule %s failed, its alerts stay as they are", rule)

    # -- rules -------------------------------------------------------------------------------------

    async def _evaluate(self, rule: AlertRule, round_: _Round) -> RuleOutcome:
        if isinstance(rule, UptakeDropRule):
            return await self._uptake_drop(rule, round_)
        if isinstance(rule, NoTrafficRule):
            return await self._no_traffic(rule, round_)
        if isinstance(rule, ReplicaStaleRule | ReplicaNackRule):
            return await self._replicas(rule, round_)
        if isinstance(rule, FeatureDriftRule | ScoreDriftRule):
            return await self._drift(rule, round_)
        if isinstance(rule, ErrorRateRule):
            return await self._error_rate(rule, round_)
        if isinstance(rule, LatencyBurnRateRule):
            return await self._latency_burn_rate(rule, round_)
        if isinstance(rule, ExploreShareRule):
            return await self._explore_share(rule, round_)
        if isinstance(rule, DecisionLogLagRule):
            return self._decision_log_lag(rule)
        return await self._decision_log_trimmed(rule, round_)

    async def _uptake_drop(self, rule: UptakeDropRule, round_: _Round) -> RuleOutcome:
        # Leave out the minutes whose contacts may still get responses.
        end = minute_of(round_.now - rule.response_delay)
        recent_start = end - whole_minutes(rule.recent_window)
        baseline_start = recent_start - whole_minutes(rule.baseline_window)
        outcome = RuleOutcome()
        for deployment in await round_.deployments(rule):
            recent = await asyncio.to_thread(self.store.window, deployment, recent_start, end)
            baseline = await asyncio.to_thread(self.store.window, deployment, baseline_start, recent_start)
            for offer, now_totals in sorted(recent.by_offer.items()):
                before = baseline.by_offer.get(offer)
                if before is None or min(now_totals.impressions, before.impressions) < rule.min_impressions:
                    continue
                test = compare_uptake(
                    now_totals.accepted, now_totals.impressions, before.accepted, before.impressions
                )
                if test.p_value < rule.significance and test.relative_drop >= rule.min_relative_drop:
                    outcome.findings.append(
                        _finding(
                            rule,
                            deployment,
                            value=test.relative_drop,
                            threshold=rule.min_relative_drop,
                            summary=(
                                f"uptake of offer {offer} fell {test.relative_drop:.0%}: "
                                f"{test.recent_rate:.2%} of {now_totals.impressions} impressions over "
                                f"{_span(end - recent_start)} to {_clock_time(end)} against "
                                f"{test.baseline_rate:.2%} of {before.impressions} over the "
                                f"{_span(recent_start - baseline_start)} before (p = {test.p_value:.2g})"
                            ),
                            labels={"offer": offer},
                        )
                    )
        return outcome

    async def _no_traffic(self, rule: NoTrafficRule, round_: _Round) -> RuleOutcome:
        end = minute_of(round_.now) + 60  # the current minute counts: any Invoke in it is traffic
        recent_start = end - whole_minutes(rule.window)
        baseline_start = recent_start - whole_minutes(rule.baseline_window)
        outcome = RuleOutcome()
        for deployment in await round_.deployments(rule):
            recent = await asyncio.to_thread(self.store.invoke_series, deployment, recent_start, end)
            if sum(calls for _minute, calls, _latency in recent):
                continue
            before = await asyncio.to_thread(
                self.store.invoke_series, deployment, baseline_start, recent_start
            )
            earlier = sum(calls for _minute, calls, _latency in before)
            if earlier:
                outcome.findings.append(
                    _finding(
                        rule,
                        deployment,
                        value=0,
                        threshold=1,
                        summary=(
                            f"no Invoke of {deployment} in the last {_span(end - recent_start)}, "
                            f"{earlier} in the {_span(recent_start - baseline_start)} before"
                        ),
                    )
                )
        return outcome

    async def _replicas(self, rule: ReplicaStaleRule | ReplicaNackRule, round_: _Round) -> RuleOutcome:
        outcome = RuleOutcome()
        for replica in await round_.replica_states():
            if not replica.connected:
                continue  # what a gone replica serves does not matter
            labels = {"replica": replica.replica_id}
            for deployment in replica.deployments or [""]:
                if not rule.watches(deployment):
                    continue
                if isinstance(rule, ReplicaStaleRule):
                    if replica.revisions_behind >= rule.min_revisions_behind:
                        outcome.findings.append(
                            _finding(
                                rule,
                                deployment,
                                value=replica.revisions_behind,
                                threshold=rule.min_revisions_behind,
                                summary=(
                                    f"replica {replica.replica_id} is {replica.revisions_behind} config "
                                    f"revision(s) behind (at {replica.applied_revision}, stale for "
                                    f"{replica.staleness_seconds:.0f}s)"
                                ),
                                labels=labels,
                            )
                        )
                    continue
                rejected = await self._rejected_head(replica, deployment, round_)
                if rejected is None:
                    outcome.undecided.append(Undecided(deployment, labels))
                elif rejected:
                    outcome.findings.append(
                        _finding(
                            rule,
                            deployment,
                            value=replica.last_nack_revision,
                            threshold=replica.applied_revision,
                            summary=(
                                f"replica {replica.replica_id} rejected revision {replica.last_nack_revision}"
                                f"{' of ' + deployment if deployment else ''} and still serves revision "
                                f"{replica.applied_revision}: {replica.last_nack_reason[:300]}"
                            ),
                            labels=labels,
                        )
                    )
        return outcome

    @staticmethod
    async def _rejected_head(replica: ReplicaState, deployment: str, round_: _Round) -> bool | None:
        """Whether the replica's last NACK is of the deployment's head and nothing newer was applied;
        None when the head cannot be read now."""
        if replica.last_nack_revision <= 0 or replica.last_nack_revision <= replica.applied_revision:
            return False
        if not deployment:
            return True
        try:
            head = await round_.head_revision(deployment)
        except LiveloopError:
            return None
        return head is not None and replica.last_nack_revision >= head

    async def _drift(self, rule: FeatureDriftRule | ScoreDriftRule, round_: _Round) -> RuleOutcome:
        if self.drift is None:
            raise _NoData("no drift source")
        outcome = RuleOutcome()
        for deployment in await round_.deployments(rule):
            try:
                results = await round_.drift(deployment)
            except Exception as exc:
                self._log_failure(rule.name, exc)
                outcome.undecided.append(Undecided(deployment))
                continue
            for result in results:
                is_score = result.name == SCORE
                if is_score != isinstance(rule, ScoreDriftRule):
                    continue
                if SEVERITY_RANK[result.severity] < SEVERITY_RANK[rule.severity] or result.psi < rule.min_psi:
                    continue
                what = "the predicted score" if is_score else f"feature {result.name}"
                outcome.findings.append(
                    Finding(
                        rule=rule.name,
                        kind=rule.kind,
                        deployment=deployment,
                        severity=result.severity,
                        value=result.psi,
                        threshold=rule.min_psi,
                        summary=f"{what} of {deployment} drifted from training: PSI {result.psi:.3f} ({result.severity})",
                        labels={} if is_score else {"feature": result.name},
                    )
                )
        return outcome

    async def _error_rate(self, rule: ErrorRateRule, round_: _Round) -> RuleOutcome:
        if not self.metrics_urls:
            raise _NoData("no metrics URLs configured")
        outcome = RuleOutcome()
        for url, scraped in (await round_.scrapes()).items():
            labels = {"instance": url}
            history = self._scrape_history.get(url)
            before = history.reference(round_.now - rule.window) if history is not None else None
            if isinstance(scraped, Exception) or before is None:
                outcome.undecided.append(Undecided("", labels))  # unreachable, or its first scrape
                continue
            total = errors = 0.0
            for (service, method, code), count in counter_increase(scraped, before).items():
                if service != rule.service or (rule.methods and method not in rule.methods):
                    continue
                total += count
                if code in rule.error_codes:
                    errors += count
            if total >= rule.min_requests and errors / total > rule.max_error_share:
                outcome.findings.append(
                    _finding(
                        rule,
                        "",
                        value=errors / total,
                        threshold=rule.max_error_share,
                        summary=(
                            f"{errors / total:.1%} of {total:.0f} {rule.service} RPCs at {url} failed "
                            f"({', '.join(rule.error_codes)}) since {_clock_time(round_.now - rule.window)}"
                        ),
                        labels={**labels, "service": rule.service},
                    )
                )
        return outcome

    async def _latency_burn_rate(self, rule: LatencyBurnRateRule, round_: _Round) -> RuleOutcome:
        end = minute_of(round_.now) + 60
        longest = max(whole_minutes(pair.long) for pair in rule.windows)
        outcome = RuleOutcome()
        for deployment in await round_.deployments(rule):
            series = await asyncio.to_thread(self.store.invoke_series, deployment, end - longest, end)
            burning = []
            for pair in rule.windows:
                long_counts = _merged(series, end - whole_minutes(pair.long))
                short_counts = _merged(series, end - whole_minutes(pair.short))
                if short_counts.calls < rule.min_calls:
                    continue
                long_burn = burn_rate(slow_fraction(long_counts, rule.threshold_seconds), rule.objective)
                short_burn = burn_rate(slow_fraction(short_counts, rule.threshold_seconds), rule.objective)
                if long_burn > pair.burn_rate and short_burn > pair.burn_rate:
                    burning.append((SEVERITY_RANK[rule.severity_of(pair)], long_burn, short_burn, pair))
            if not burning:
                continue
            _rank, long_burn, short_burn, pair = max(burning, key=lambda entry: (entry[0], entry[1]))
            budget = 1 - rule.objective
            outcome.findings.append(
                Finding(
                    rule=rule.name,
                    kind=rule.kind,
                    deployment=deployment,
                    severity=rule.severity_of(pair),
                    value=long_burn,
                    threshold=pair.burn_rate,
                    summary=(
                        f"Invoke of {deployment} burns its latency budget ({budget:.2%} slower than "
                        f"{rule.threshold_seconds:g}s) {long_burn:.1f}x too fast over {_span(pair.long)} "
                        f"and {short_burn:.1f}x over {_span(pair.short)} (alert above {pair.burn_rate:g}x)"
                    ),
                )
            )
        return outcome

    async def _explore_share(self, rule: ExploreShareRule, round_: _Round) -> RuleOutcome:
        end = minute_of(round_.now) + 60
        start = end - whole_minutes(rule.window)
        outcome = RuleOutcome()
        for deployment in await round_.deployments(rule):
            totals = await asyncio.to_thread(self.store.window, deployment, start, end)
            impressions = totals.impressions
            if impressions < rule.min_impressions:
                continue
            share = sum(row.explored_impressions for row in totals.by_offer.values()) / impressions
            if rule.min_share <= share <= rule.max_share:
                continue
            bound = rule.min_share if share < rule.min_share else rule.max_share
            outcome.findings.append(
                _finding(
                    rule,
                    deployment,
                    value=share,
                    threshold=bound,
                    summary=(
                        f"explore share of {deployment} is {share:.1%} of {impressions} impressions over "
                        f"{_span(end - start)}, outside [{rule.min_share:.1%}, {rule.max_share:.1%}]"
                    ),
                )
            )
        return outcome

    def _decision_log_lag(self, rule: DecisionLogLagRule) -> RuleOutcome:
        lag = self.decision_log.state.lag if self.decision_log is not None else None
        if lag is None:
            raise _NoData("the decision log consumer has not measured its lag")
        outcome = RuleOutcome()
        if lag > rule.max_lag:
            outcome.findings.append(
                _finding(
                    rule,
                    "",
                    value=lag,
                    threshold=rule.max_lag,
                    summary=f"the monitor is {lag} decision log entries behind (more than {rule.max_lag})",
                )
            )
        return outcome

    async def _decision_log_trimmed(self, rule: DecisionLogTrimmedRule, round_: _Round) -> RuleOutcome:
        now_count = await round_.trimmed()
        before = self._trimmed_history.reference(round_.now - rule.window)
        if before is None:
            raise _NoData("the first count of trimmed entries is the reference")
        outcome = RuleOutcome()
        if now_count > before:
            since = "the last evaluation" if rule.window == 0 else _span(rule.window) + " ago"
            outcome.findings.append(
                _finding(
                    rule,
                    "",
                    value=now_count - before,
                    threshold=0,
                    summary=(
                        f"{now_count - before} decision log entries were trimmed before the monitor read "
                        f"them since {since} (the stream's cap is too small for the monitor's pace)"
                    ),
                )
            )
        return outcome


class _Round:
    """One evaluation: the data several rules share, read once."""

    def __init__(self, engine: AlertEngine, now: float) -> None:
        self.engine = engine
        self.now = now
        self._deployments: list[str] | None = None
        self._replicas: list[ReplicaState] | None = None
        self._heads: dict[str, int | None] = {}
        self._drift: dict[str, list[FeatureDrift]] = {}
        self._scrapes: dict[str, RpcCounters | Exception] | None = None
        self._trimmed: int | None = None

    async def deployments(self, rule: AlertRule) -> list[str]:
        if rule.deployments:
            return list(rule.deployments)
        if self._deployments is None:
            self._deployments = sorted(await asyncio.to_thread(self.engine.store.deployments))
        return self._deployments

    async def replica_states(self) -> list[ReplicaState]:
        if self.engine.config is None:
            raise _NoData("no config service")
        if self._replicas is None:
            self._replicas = await self.engine.config.replica_states()
        return self._replicas

    async def head_revision(self, deployment: str) -> int | None:
        if deployment not in self._heads:
            assert self.engine.config is not None  # replica rules read the replicas first
            self._heads[deployment] = await self.engine.config.head_revision(deployment)
        return self._heads[deployment]

    async def drift(self, deployment: str) -> list[FeatureDrift]:
        if deployment not in self._drift:
            assert self.engine.drift is not None
            self._drift[deployment] = await self.engine.drift.drift(deployment)
        return self._drift[deployment]

    async def scrapes(self) -> dict[str, RpcCounters | Exception]:
        if self._scrapes is None:
            timeout = self.engine.scrape_timeout_seconds
            results = await asyncio.gather(
                *(asyncio.to_thread(fetch_rpc_counters, url, timeout) for url in self.engine.metrics_urls),
                return_exceptions=True,
            )
            self._scrapes = {}
            for url, result in zip(self.engine.metrics_urls, results, strict=True):
                if isinstance(result, BaseException) and not isinstance(result, Exception):
                    raise result
                self._scrapes[url] = result
        return self._scrapes

    async def trimmed(self) -> int:
        consumer = self.engine.decision_log
        if consumer is None:
            raise _NoData("no decision log consumer")
        if self._trimmed is None:
            self._trimmed = await asyncio.to_thread(self.engine.store.trimmed, consumer.options.stream)
        return self._trimmed

    def commit(self) -> None:
        """What this round read becomes the reference of later ones."""
        rules = self.engine.rules.rules
        if self._trimmed is not None:
            keep = max(
                (rule.window for rule in rules if isinstance(rule, DecisionLogTrimmedRule)), default=0.0
            )
            self.engine._trimmed_history.add(self.now, self._trimmed, keep)
        if self._scrapes is not None:
            keep = max((rule.window for rule in rules if isinstance(rule, ErrorRateRule)), default=0.0)
            for url, scraped in self._scrapes.items():
                if not isinstance(scraped, Exception):
                    self.engine._scrape_history.setdefault(url, SampleHistory()).add(self.now, scraped, keep)


def _finding(
    rule: AlertRule,
    deployment: str,
    *,
    value: float,
    threshold: float,
    summary: str,
    labels: Mapping[str, str] | None = None,
) -> Finding:
    return Finding(
        rule=rule.name,
        kind=rule.kind,
        deployment=deployment,
        severity=rule.severity,
        value=float(value),
        threshold=float(threshold),
        summary=summary,
        labels=dict(labels or {}),
    )


def _merged(series: Sequence[tuple[int, int, LatencyCounts]], start: int) -> LatencyCounts:
    total = LatencyCounts()
    for minute, _calls, latency in series:
        if minute >= start:
            total.merge(latency)
    return total


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _clock_time(epoch_seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch_seconds))
