"""Plugins: user code in the decision loop (ecosystem.Ai's pre- and post-score plugins), found by
name among the installed packages and bound to a deployment with typed, validated parameters.

A plugin is a class in any installed package, declared under the entry point group
`liveloop.plugins` (the entry point's name is the plugin's name):

    [project.entry-points."liveloop.plugins"]
    loyalty_boost = "my_plugins.boost:LoyaltyBoost"

The class says its `stage`, its parameters as a pydantic model (`Params`, a `PluginParams`), and
takes them validated when a deployment binds it; one instance per deployment and revision, so a
plugin sees only the requests of the deployment that named it. By stage:

- **pre_score** `pre_score(PreScoreInput) -> Sequence[Offer]`: the offers to keep (a subset of the
  input's, in any order), from the request's context, params and features.
- **post_score** `post_score(PostScoreInput) -> PostScore`: a factor per offer that multiplies its
  score, and/or a cap on offers of one category in the result. Both reach the scorer and the
  ranking before they draw, so the logged propensities stay exact; for the same reason a factor
  depends on the offer, the context and the params, never on the draw (the plugin sees no scores).

- **reward** `reward(RewardInput) -> Reward`: on Respond, the reward a response earned (from what
  the client sent: its reward, its `payload`, the contact's context) and a learning weight: the
  statistics learn reward x weight, the decision log keeps both (that runtime's `reward` and
  `learning_reward`). Reward plugins run in order, each seeing the reward so far.

The built-in plugins (builtin_plugins.py: `exclude_offers`, `value_weighting`, `category_cap`) are
plugins of this same interface. Publish validates a spec's plugins against the installed ones (the
name, the stage, the parameters, each error naming its field), and so does every replica when it
prepares a revision (a replica without the plugin rejects the revision and keeps serving its last).

A plugin that raises, returns something malformed or runs past its `budget_ms` is skipped for that
request by default (`on_error: skip`: the request goes on without it, the reply warns, the replica
counts it), or fails the request (`on_error: fail`). The budget is measured, not enforced: Python
cannot stop a function that does not return, so a plugin that never returns still blocks its
replica.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from libs.common.deployment_spec import Corpus as CorpusSpec
from libs.common.deployment_spec import Offer, PluginErrorPolicy, PluginRef, PluginStage
from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.policy.context import Context

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "liveloop.plugins"


class PluginParams(BaseModel):
    """Base of a plugin's parameters: unknown fields are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(PluginParams):
    pass


# A deployment's corpora (its spec's `corpora`): name -> key -> row. Read-only.
Corpora = Mapping[str, Mapping[str, Mapping[str, Any]]]
NO_CORPORA: Corpora = MappingProxyType({})


def corpora_of(spec_corpora: Mapping[str, CorpusSpec]) -> Corpora:
    """The spec's corpora indexed by their key column's value (as text), read-only."""
    return MappingProxyType(
        {
            name: MappingProxyType({str(row[corpus.key]): MappingProxyType(dict(row)) for row in corpus.rows})
            for name, corpus in spec_corpora.items()
        }
    )


@dataclass(frozen=True)
class PreScoreInput:
    deployment: str
    customer: str
    offers: Sequence[Offer]  # eligible so far
    context: Mapping[str, str | float]  # every context variable
    params: Mapping[str, Any]  # the request's params
    features: Mapping[str, Any]  # the customer's online features
    corpora: Corpora = field(default_factory=lambda: NO_CORPORA)  # name -> key -> row


@dataclass(frozen=True)
class PostScoreInput:
    deployment: str
    customer: str
    offers: Sequence[Offer]  # eligible, in the order the factors are wanted
    context: Mapping[str, str | float]
    params: Mapping[str, Any]
    corpora: Corpora = field(default_factory=lambda: NO_CORPORA)


@dataclass(frozen=True)
class PostScore:
    factors: Sequence[float] | None = None  # one per offer, finite and >= 0; None: unchanged
    max_per_category: int | None = None  # at most this many offers of one category; None: no cap


@dataclass(frozen=True)
class RewardInput:
    deployment: str
    uuid: str
    accepted: Sequence[str]  # offer ids the response credits
    reward: float  # so far: as sent, the deployment's default, or the previous reward plugin's
    payload: Mapping[str, Any]  # what the client sent with the response, as JSON
    channel: str  # the channel the response came through (Respond's channel_name)
    context: Mapping[str, str]  # the contact's categorical context
    segment: str
    corpora: Corpora = field(default_factory=lambda: NO_CORPORA)


@dataclass(frozen=True)
class Reward:
    reward: float  # finite, magnitude at most 1e9 (not negative where the statistics count successes)
    learning_weight: float = 1.0  # finite, >= 0: the statistics learn reward x learning_weight


# The largest reward magnitude a plugin may return (as a client may send: see decision.py), and
# the largest learning weight; what the statistics learn (reward x weight) stays within the first.
MAX_REWARD_MAGNITUDE = 1e9
MAX_LEARNING_WEIGHT = 1000.0


class PreScorePlugin(Protocol):
    stage: ClassVar[PluginStage]
    Params: ClassVar[type[PluginParams]]

    def pre_score(self, request: PreScoreInput) -> Sequence[Offer]: ...


class PostScorePlugin(Protocol):
    stage: ClassVar[PluginStage]
    Params: ClassVar[type[PluginParams]]

    def post_score(self, request: PostScoreInput) -> PostScore: ...


class RewardPlugin(Protocol):
    stage: ClassVar[PluginStage]
    Params: ClassVar[type[PluginParams]]

    def reward(self, request: RewardInput) -> Reward: ...


@dataclass(frozen=True)
class InstalledPlugin:
    name: str
    stage: PluginStage
    version: str  # of the distribution that declares it ("builtin" for liveloop's own)
    distribution: str
    factory: type[Any]

    @property
    def params_model(self) -> type[PluginParams]:
        model: type[PluginParams] = getattr(self.factory, "Params", NoParams)
        return model


def _builtin() -> dict[str, InstalledPlugin]:
    from libs.policy import builtin_plugins

    return {
        name: InstalledPlugin(name, factory.stage, "builtin", "liveloop", factory)
        for name, factory in builtin_plugins.BUILTIN.items()
    }


# The classes discovery loaded, by (distribution, version, entry point value), and the version of
# its distribution each plugin module was imported from: a package upgraded in place is imported
# again, so the next revision naming it runs the new code without a restart. (A package changed
# without a new version, as in editable development, needs a restart.)
_loaded: dict[tuple[str, str, str], type[Any]] = {}
_module_versions: dict[str, tuple[str, str]] = {}


def installed_plugins() -> dict[str, InstalledPlugin]:
    """Every plugin this process can run: the built-ins, then the entry points of
    `liveloop.plugins` as installed now (read again on every call: a config change is when a new
    or upgraded plugin package is picked up). An entry point that does not load, or that reuses a
    built-in's name, is logged and left out."""
    found = _builtin()
    importlib.invalidate_caches()
    try:
        entries = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as error:  # a package with broken metadata must not stop the built-ins
        logger.warning("cannot read the installed packages' plugins: %s", error)
        return found
    for entry in entries:
        distribution = entry.dist.name if entry.dist is not None else "?"
        version = entry.dist.version if entry.dist is not None else "?"
        if entry.name in found:
            logger.warning("plugin %s from %s ignored: that name is taken", entry.name, distribution)
            continue
        try:
            factory = _load(entry, distribution, version)
            stage = _checked_stage(factory)
        except Exception as error:  # a broken package must not stop the others
            logger.warning("plugin %s from %s %s does not load: %s", entry.name, distribution, version, error)
            continue
        found[entry.name] = InstalledPlugin(entry.name, stage, version, distribution, factory)
    return found


def _checked_stage(factory: Any) -> PluginStage:
    """The plugin class's stage, once it is seen to be a plugin: a class, with a stage, the method
    of that stage and a Params that is a PluginParams (TypeError naming what is missing)."""
    if not isinstance(factory, type):
        raise TypeError(f"{factory!r} is not a class")
    stage = PluginStage(str(getattr(factory, "stage", "")))
    if not callable(getattr(factory, stage.value, None)):
        raise TypeError(f"{factory.__name__} is a {stage.value} plugin without a {stage.value} method")
    params = getattr(factory, "Params", NoParams)
    if not (isinstance(params, type) and issubclass(params, PluginParams)):
        raise TypeError(f"{factory.__name__}.Params is not a PluginParams (a pydantic model)")
    return stage


def _load(entry: importlib.metadata.EntryPoint, distribution: str, version: str) -> type[Any]:
    key = (distribution, version, entry.value)
    if key in _loaded:
        return _loaded[key]
    module_name = entry.value.split(":")[0].strip().split(".")[0]  # the whole top-level package
    if _module_versions.get(module_name, (distribution, version)) != (distribution, version):
        for name in [
            name for name in sys.modules if name == module_name or name.startswith(module_name + ".")
        ]:
            del sys.modules[name]  # imported from an older version: import it again
    _module_versions[module_name] = (distribution, version)
    factory: type[Any] = entry.load()
    _loaded[key] = factory
    return factory


def plugin_versions() -> dict[str, str]:
    """name -> version of every plugin this process can run (what a replica reports)."""
    return {name: plugin.version for name, plugin in sorted(installed_plugins().items())}


@dataclass(frozen=True)
class PluginSkip:
    """A plugin left out of one request: its name and why."""

    plugin: str
    reason: str  # "error" or "budget"
    detail: str


@dataclass(frozen=True)
class BoundPlugin:
    name: str
    stage: PluginStage
    version: str
    instance: Any
    on_error: PluginErrorPolicy
    budget_seconds: float

    def run(self, request: Any, check: Callable[[Any], Any], skips: list[PluginSkip]) -> Any:
        """The plugin's checked result for the request, or None when it is skipped (noted in
        `skips`); raises FailedPrecondition instead where the deployment says to fail."""
        started = time.perf_counter()
        try:
            result = check(getattr(self.instance, self.stage.value)(request))  # pre_score, post_score, reward
        except Exception as error:
            return self._failed("error", f"{type(error).__name__}: {error}", skips)
        elapsed = time.perf_counter() - started
        if elapsed > self.budget_seconds:
            detail = f"took {elapsed * 1000:.1f} ms, its budget is {self.budget_seconds * 1000:g} ms"
            return self._failed("budget", detail, skips)
        return result

    def _failed(self, reason: str, detail: str, skips: list[PluginSkip]) -> None:
        if self.on_error is PluginErrorPolicy.FAIL:
            raise FailedPrecondition(
                f"plugin {self.name} {self.version} failed ({reason}): {detail}", field="plugins"
            )
        skips.append(PluginSkip(self.name, reason, detail))
        return None


@dataclass
class PluginChain:
    pre_score: list[BoundPlugin] = field(default_factory=list)
    post_score: list[BoundPlugin] = field(default_factory=list)
    reward: list[BoundPlugin] = field(default_factory=list)
    corpora: Corpora = field(default_factory=lambda: NO_CORPORA)  # what the plugins may read

    def is_current(self) -> bool:
        """Whether every installed plugin of the chain is still at the version it was bound from
        (False after a package upgrade or removal: bind the spec again)."""
        bound = {plugin.name: plugin.version for plugin in (*self.pre_score, *self.post_score, *self.reward)}
        if all(version == "builtin" for version in bound.values()):
            return True  # nothing to look up
        installed = plugin_versions()
        return all(installed.get(name) == version for name, version in bound.items())

    def filter(
        self,
        deployment: str,
        customer: str,
        offers: list[Offer],
        context: Context,
        params: Mapping[str, Any],
        features: Mapping[str, Any],
        skips: list[PluginSkip],
    ) -> list[Offer]:
        for plugin in self.pre_score:
            request = PreScoreInput(
                deployment, customer, tuple(offers), context.values, params, features, self.corpora
            )
            kept = plugin.run(request, _offers_within(offers), skips)
            if kept is not None:
                offers = kept
        return offers

    def post_score_factors(
        self,
        deployment: str,
        customer: str,
        offers: Sequence[Offer],
        context: Context,
        params: Mapping[str, Any],
        skips: list[PluginSkip],
    ) -> tuple[np.ndarray, int | None]:
        """The product of every post-score plugin's factors, and the tightest category cap."""
        factors, limit = np.ones(len(offers)), None
        for plugin in self.post_score:
            request = PostScoreInput(
                deployment, customer, tuple(offers), context.values, params, self.corpora
            )
            result = plugin.run(request, _post_score_of(len(offers)), skips)
            if result is None:
                continue
            more, cap = result
            if more is not None:
                factors = factors * more
            if cap is not None:
                limit = cap if limit is None else min(limit, cap)
        return factors, limit

    def rewarded(
        self, request: RewardInput, takes_negative: bool, skips: list[PluginSkip]
    ) -> tuple[float, float]:
        """The reward and the learning weight after every reward plugin (a skipped one leaves
        them as they were); `takes_negative`: whether the statistics learn negative rewards."""
        reward, weight = request.reward, 1.0
        for plugin in self.reward:
            result = plugin.run(
                dataclasses.replace(request, reward=reward, corpora=self.corpora),
                _reward_of(takes_negative, weight),
                skips,
            )
            if result is not None:
                reward, weight = result[0], weight * result[1]
        return reward, weight


def _reward_of(takes_negative: bool, weight_so_far: float) -> Callable[[Any], tuple[float, float]]:
    def check(result: Any) -> tuple[float, float]:
        if not isinstance(result, Reward):
            raise TypeError(f"reward must return a Reward, not {type(result).__name__}")
        reward, weight = float(result.reward), float(result.learning_weight)
        if not (math.isfinite(reward) and abs(reward) <= MAX_REWARD_MAGNITUDE):
            raise ValueError(
                f"the reward must be finite and of magnitude at most {MAX_REWARD_MAGNITUDE:g}, not {reward}"
            )
        if reward < 0 and not takes_negative:
            raise ValueError(f"the reward {reward} is negative, and these statistics count successes")
        if not (math.isfinite(weight) and 0 <= weight <= MAX_LEARNING_WEIGHT):
            raise ValueError(f"the learning weight must be in [0, {MAX_LEARNING_WEIGHT:g}], not {weight}")
        if abs(reward * weight * weight_so_far) > MAX_REWARD_MAGNITUDE:
            raise ValueError(
                f"what would be learned, {reward * weight * weight_so_far:g}, is above {MAX_REWARD_MAGNITUDE:g}"
            )
        return reward, weight

    return check


def _offers_within(offers: Sequence[Offer]) -> Callable[[Any], list[Offer]]:
    allowed = {offer.id: offer for offer in offers}

    def check(result: Any) -> list[Offer]:
        if isinstance(result, str | bytes) or not isinstance(result, Sequence):
            raise TypeError(f"pre_score must return a sequence of offers, not {type(result).__name__}")
        kept = []
        for offer in result:
            if not isinstance(offer, Offer) or offer.id not in allowed:
                raise ValueError(f"pre_score returned {offer!r}, which is not one of the offers it was given")
            kept.append(allowed[offer.id])
        return kept

    return check


def _post_score_of(count: int) -> Callable[[Any], tuple[np.ndarray | None, int | None]]:
    def check(result: Any) -> tuple[np.ndarray | None, int | None]:
        if not isinstance(result, PostScore):
            raise TypeError(f"post_score must return a PostScore, not {type(result).__name__}")
        factors = None
        if result.factors is not None:
            factors = np.asarray(result.factors, dtype=float)
            if factors.shape != (count,):
                raise ValueError(f"post_score returned {factors.size} factors for {count} offers")
            if not all(math.isfinite(value) and value >= 0 for value in factors.tolist()):
                raise ValueError("post_score factors must be finite and not negative")
        cap = result.max_per_category
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise ValueError(f"max_per_category must be a positive integer, not {cap!r}")
        return factors, cap

    return check


def bind_plugins(
    plugins: Sequence[PluginRef],
    installed: Mapping[str, InstalledPlugin] | None = None,
    corpora: Corpora = NO_CORPORA,
) -> PluginChain:
    """The spec's plugins, each validated and bound to its parameters; InvalidArgument naming the
    field (`plugins[i].name`, `plugins[i].stage`, `plugins[i].params.<field>`) for a plugin that is
    not installed here, one named at the wrong stage, or parameters its `Params` refuses."""
    if installed is None:
        builtin = _builtin()
        # Looking through the installed packages takes about 10-20 ms: only for plugins of others.
        installed = builtin if all(ref.name in builtin for ref in plugins) else installed_plugins()
    chain = PluginChain(corpora=corpora)
    for index, ref in enumerate(plugins):
        where = f"plugins[{index}]"
        plugin = installed.get(ref.name)
        if plugin is None:
            names = ", ".join(f"{p.name} ({p.stage.value})" for p in installed.values())
            raise InvalidArgument(
                f"unknown plugin '{ref.name}'; installed here: {names}", field=f"{where}.name"
            )
        if plugin.stage is not ref.stage:
            raise InvalidArgument(
                f"'{ref.name}' is a {plugin.stage.value} plugin, not {ref.stage.value}",
                field=f"{where}.stage",
            )
        try:
            params = plugin.params_model.model_validate(ref.params)
        except ValidationError as error:
            first = error.errors()[0]
            location = ".".join(str(part) for part in first["loc"])
            raise InvalidArgument(
                f"{first['msg']}", field=f"{where}.params.{location}" if location else f"{where}.params"
            ) from None
        try:
            instance = plugin.factory(params)
        except Exception as error:
            raise InvalidArgument(
                f"'{ref.name}' {plugin.version} refused its parameters: {type(error).__name__}: {error}",
                field=f"{where}.params",
            ) from None
        bound = BoundPlugin(
            ref.name, plugin.stage, plugin.version, instance, ref.on_error, ref.budget_ms / 1000
        )
        {
            PluginStage.PRE_SCORE: chain.pre_score,
            PluginStage.POST_SCORE: chain.post_score,
            PluginStage.REWARD: chain.reward,
        }[plugin.stage].append(bound)
    return chain
