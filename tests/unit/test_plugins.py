"""User plugins (libs/policy/plugins.py): found by entry point among the installed packages, an
upgraded package picked up on the next discovery without a restart, and a plugin that raises,
returns something malformed or runs past its budget skipped (or failing the request) by its
deployment's choice. The packages here are real distributions on sys.path
(tests/plugin_packages.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.deployment_spec import Offer, PluginRef
from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.policy.context import Context
from libs.policy.plugins import (
    PluginChain,
    PluginSkip,
    RewardInput,
    bind_plugins,
    installed_plugins,
    plugin_versions,
)
from tests.plugin_packages import install_plugin_package

pytestmark = pytest.mark.timeout(30)

OFFERS = [Offer(id="a", price=1.0), Offer(id="b", price=2.0), Offer(id="c", price=3.0)]
NO_CONTEXT = Context({}, "all", {}, ())


ENTRY_POINTS = {"drop_first": "DropFirst", "price_power": "PricePower", "broken": "Missing"}


def install(site: Path, version: str, module_body: str) -> None:
    install_plugin_package(site, version, module_body, ENTRY_POINTS)


PLUGINS_V1 = """
    from typing import ClassVar
    from libs.common.deployment_spec import PluginStage
    from libs.policy.plugins import PluginParams, PostScore

    class DropFirst:
        stage: ClassVar[PluginStage] = PluginStage.PRE_SCORE

        class Params(PluginParams):
            how_many: int = 1

        def __init__(self, params):
            self.how_many = params.how_many

        def pre_score(self, request):
            return list(request.offers)[self.how_many:]

    class PricePower:
        stage: ClassVar[PluginStage] = PluginStage.POST_SCORE

        class Params(PluginParams):
            power: float = 1.0

        def __init__(self, params):
            self.power = params.power

        def post_score(self, request):
            return PostScore(factors=[offer.price ** self.power for offer in request.offers])
"""


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("acme_plugins", None)


def chain(*plugins: dict[str, Any]) -> PluginChain:
    return bind_plugins([PluginRef.model_validate(plugin) for plugin in plugins])


def kept(plugins: PluginChain, skips: list[PluginSkip] | None = None) -> list[str]:
    offers = plugins.filter("d", "c", OFFERS, NO_CONTEXT, {}, {}, [] if skips is None else skips)
    return [offer.id for offer in offers]


def test_an_installed_package_is_found_by_entry_point_and_an_upgrade_is_picked_up(site: Path) -> None:
    install(site, "1.0", PLUGINS_V1)
    assert plugin_versions()["drop_first"] == "1.0"
    assert "broken" not in installed_plugins()  # an entry point that does not load is left out
    assert kept(chain({"name": "drop_first", "stage": "pre_score"})) == ["b", "c"]

    # Upgraded in place, as `pip install -U` does: the next discovery has the new code.
    install(
        site, "1.1", PLUGINS_V1.replace("list(request.offers)[self.how_many:]", "list(request.offers)[:-1]")
    )
    assert plugin_versions()["drop_first"] == "1.1"
    assert kept(chain({"name": "drop_first", "stage": "pre_score"})) == ["a", "b"]


def test_a_plugin_cannot_take_a_builtin_name(site: Path) -> None:
    install(site, "1.0", PLUGINS_V1)
    install_plugin_package(site, "1.0", PLUGINS_V1, {"exclude_offers": "DropFirst"})
    assert installed_plugins()["exclude_offers"].distribution == "liveloop"


def test_parameters_are_validated_by_the_plugins_own_model(site: Path) -> None:
    install(site, "1.0", PLUGINS_V1)
    with pytest.raises(InvalidArgument) as refused:
        chain({"name": "drop_first", "stage": "pre_score", "params": {"how_many": "many"}})
    assert refused.value.field == "plugins[0].params.how_many"
    with pytest.raises(InvalidArgument) as unknown:
        chain({"name": "drop_second", "stage": "pre_score"})
    assert unknown.value.field == "plugins[0].name"
    assert "drop_first (pre_score)" in str(unknown.value)


FAULTY = """
    from typing import ClassVar
    from libs.common.deployment_spec import PluginStage, Offer
    from libs.policy.plugins import PluginParams, PostScore

    class DropFirst:
        stage: ClassVar[PluginStage] = PluginStage.PRE_SCORE

        class Params(PluginParams):
            fault: str = "raise"

        def __init__(self, params):
            self.fault = params.fault

        def pre_score(self, request):
            if self.fault == "raise":
                raise RuntimeError("the lookup table is gone")
            if self.fault == "stranger":
                return [Offer(id="not-given")]
            if self.fault == "text":
                return "a"
            return list(request.offers)[1:]

    class PricePower:
        stage: ClassVar[PluginStage] = PluginStage.POST_SCORE

        class Params(PluginParams):
            fault: str = "count"

        def __init__(self, params):
            self.fault = params.fault

        def post_score(self, request):
            if self.fault == "count":
                return PostScore(factors=[2.0])
            if self.fault == "negative":
                return PostScore(factors=[-1.0] * len(request.offers))
            if self.fault == "nan":
                return PostScore(factors=[float("nan")] * len(request.offers))
            if self.fault == "cap":
                return PostScore(max_per_category=0)
            return {"factors": [1.0] * len(request.offers)}
"""


# Another version: discovery keeps the classes it loaded by distribution and version.
FAULTY_VERSION = "2.0"


@pytest.mark.parametrize("fault", ["raise", "stranger", "text"])
def test_a_failing_pre_score_plugin_is_skipped_or_fails_the_request(site: Path, fault: str) -> None:
    install(site, FAULTY_VERSION, FAULTY)
    plugin = {"name": "drop_first", "stage": "pre_score", "params": {"fault": fault}}
    skips: list[PluginSkip] = []
    assert kept(chain(plugin), skips) == ["a", "b", "c"]  # went on without it
    assert [(skip.plugin, skip.reason) for skip in skips] == [("drop_first", "error")]
    with pytest.raises(FailedPrecondition) as failed:
        kept(chain({**plugin, "on_error": "fail"}))
    assert "drop_first 2.0" in str(failed.value)


@pytest.mark.parametrize("fault", ["count", "negative", "nan", "cap", "dict"])
def test_a_malformed_post_score_result_is_skipped(site: Path, fault: str) -> None:
    install(site, FAULTY_VERSION, FAULTY)
    plugins = chain(
        {"name": "price_power", "stage": "post_score", "params": {"fault": fault}},
        {"name": "value_weighting", "stage": "post_score", "params": {"basis": "price"}},
    )
    skips: list[PluginSkip] = []
    factors, cap = plugins.post_score_factors("d", "c", OFFERS, NO_CONTEXT, {}, skips)
    assert factors.tolist() == [1.0, 2.0, 3.0]  # the other plugin still applied
    assert cap is None
    assert [(skip.plugin, skip.reason) for skip in skips] == [("price_power", "error")]


def test_a_plugin_past_its_budget_is_skipped(site: Path) -> None:
    install(site, "1.0", PLUGINS_V1)
    # Any call takes longer than a nanosecond: the budget is measured on every request.
    plugin = {"name": "drop_first", "stage": "pre_score", "budget_ms": 1e-6}
    skips: list[PluginSkip] = []
    assert kept(chain(plugin), skips) == ["a", "b", "c"]
    assert [(skip.plugin, skip.reason) for skip in skips] == [("drop_first", "budget")]
    with pytest.raises(FailedPrecondition):
        kept(chain({**plugin, "on_error": "fail"}))
    within: list[PluginSkip] = []
    assert kept(chain({**plugin, "budget_ms": 1000}), within) == ["b", "c"]
    assert within == []


def test_each_deployment_binds_its_own_instance(site: Path) -> None:
    install(site, "1.0", PLUGINS_V1)
    one = chain({"name": "drop_first", "stage": "pre_score", "params": {"how_many": 1}})
    two = chain({"name": "drop_first", "stage": "pre_score", "params": {"how_many": 2}})
    assert one.pre_score[0].instance is not two.pre_score[0].instance
    assert (kept(one), kept(two)) == (["b", "c"], ["c"])


REWARDS = """
    from typing import ClassVar
    from libs.common.deployment_spec import PluginStage
    from libs.policy.plugins import PluginParams, Reward

    class Doubling:
        stage: ClassVar[PluginStage] = PluginStage.REWARD

        class Params(PluginParams):
            fault: str = ""
            weight: float = 1.0

        def __init__(self, params):
            self.fault = params.fault
            self.weight = params.weight

        def reward(self, request):
            faults = {
                "type": lambda: 2.0,
                "nan": lambda: Reward(float("nan")),
                "huge": lambda: Reward(1e10),
                "negative": lambda: Reward(-1.0),
                "weight": lambda: Reward(1.0, -0.5),
                "raise": lambda: 1 / 0,
            }
            if self.fault:
                return faults[self.fault]()
            return Reward(request.reward * 2 + request.payload.get("bonus", 0), self.weight)
"""
REWARDS_VERSION = "3.0"


def rewarded(
    plugins: PluginChain, skips: list[PluginSkip], takes_negative: bool = False
) -> tuple[float, float]:
    request = RewardInput("d", "u", ["a"], 1.5, {"bonus": 1}, "app", {"region": "north"}, "region=north")
    return plugins.rewarded(request, takes_negative, skips)


def test_reward_plugins_run_in_order_each_on_the_reward_so_far(site: Path) -> None:
    install_plugin_package(site, REWARDS_VERSION, REWARDS, {"doubling": "Doubling"})
    plugins = chain(
        {"name": "doubling", "stage": "reward", "params": {"weight": 0.5}},
        {"name": "doubling", "stage": "reward", "params": {"weight": 0.5}},
    )
    skips: list[PluginSkip] = []
    assert rewarded(plugins, skips) == ((1.5 * 2 + 1) * 2 + 1, 0.25)
    assert skips == []


@pytest.mark.parametrize("fault", ["type", "nan", "huge", "negative", "weight", "raise"])
def test_a_bad_reward_is_skipped_keeping_the_reward_so_far(site: Path, fault: str) -> None:
    install_plugin_package(site, REWARDS_VERSION, REWARDS, {"doubling": "Doubling"})
    plugins = chain(
        {"name": "doubling", "stage": "reward", "params": {"fault": fault}},
        {"name": "doubling", "stage": "reward"},
    )
    skips: list[PluginSkip] = []
    assert rewarded(plugins, skips) == (1.5 * 2 + 1, 1.0)  # the second ran on the reward as sent
    assert [(skip.plugin, skip.reason) for skip in skips] == [("doubling", "error")]
    with pytest.raises(FailedPrecondition):
        rewarded(
            chain({"name": "doubling", "stage": "reward", "params": {"fault": fault}, "on_error": "fail"}), []
        )


def test_a_negative_reward_is_fine_where_the_statistics_take_one(site: Path) -> None:
    install_plugin_package(site, REWARDS_VERSION, REWARDS, {"doubling": "Doubling"})
    skips: list[PluginSkip] = []
    plugins = chain({"name": "doubling", "stage": "reward", "params": {"fault": "negative"}})
    assert rewarded(plugins, skips, takes_negative=True) == (-1.0, 1.0)
    assert skips == []


MALFORMED = """
    from dataclasses import dataclass
    from typing import ClassVar
    from libs.common.deployment_spec import PluginStage

    class NoMethod:
        stage: ClassVar[PluginStage] = PluginStage.PRE_SCORE

        def prescore(self, request):  # a typo: not the stage's method
            return list(request.offers)

    class DataclassParams:
        stage: ClassVar[PluginStage] = PluginStage.PRE_SCORE

        @dataclass
        class Params:
            n: int = 1

        def pre_score(self, request):
            return list(request.offers)

    NOT_A_CLASS = 3
"""


def test_a_class_that_is_not_a_plugin_is_left_out_at_discovery(site: Path) -> None:
    install_plugin_package(
        site,
        "4.0",
        MALFORMED,
        {"no_method": "NoMethod", "dataclass_params": "DataclassParams", "number": "NOT_A_CLASS"},
    )
    installed = installed_plugins()
    assert not {"no_method", "dataclass_params", "number"} & set(installed)
    with pytest.raises(InvalidArgument) as unknown:
        chain({"name": "no_method", "stage": "pre_score"})
    assert unknown.value.field == "plugins[0].name"


def test_an_upgrade_reimports_the_whole_package(site: Path) -> None:
    """The plugin's module and a helper module beside it, in one package: both are the new code."""
    package = site / "acme_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("FACTOR = 2.0\n")
    body = """
        from typing import ClassVar
        from libs.common.deployment_spec import PluginStage
        from libs.policy.plugins import PluginParams, PostScore
        from acme_pkg.helper import FACTOR

        class Scaled:
            stage: ClassVar[PluginStage] = PluginStage.POST_SCORE
            Params = PluginParams

            def __init__(self, params):
                pass

            def post_score(self, request):
                return PostScore(factors=[FACTOR] * len(request.offers))
    """
    install_plugin_package(site, "5.0", body, {"scaled": "Scaled"}, module="acme_pkg.plugin")
    plugins = chain({"name": "scaled", "stage": "post_score"})
    assert plugins.post_score_factors("d", "c", OFFERS, NO_CONTEXT, {}, [])[0].tolist() == [2.0, 2.0, 2.0]
    (package / "helper.py").write_text("FACTOR = 7.0\n")
    install_plugin_package(site, "5.1", body, {"scaled": "Scaled"}, module="acme_pkg.plugin")
    plugins = chain({"name": "scaled", "stage": "post_score"})
    assert plugins.post_score_factors("d", "c", OFFERS, NO_CONTEXT, {}, [])[0].tolist() == [7.0, 7.0, 7.0]


def test_what_would_be_learned_is_bounded(site: Path) -> None:
    install_plugin_package(site, REWARDS_VERSION, REWARDS, {"doubling": "Doubling"})
    heavy = {"name": "doubling", "stage": "reward", "params": {"weight": 1000}}
    skips: list[PluginSkip] = []
    # rewards 4, 9, then 19 with weights 1e3, 1e6, then 1e9: 1.9e10 would be learned, above 1e9
    assert rewarded(chain(heavy, heavy, heavy), skips) == (9.0, 1e6)
    assert [(skip.plugin, skip.reason) for skip in skips] == [("doubling", "error")]
    with pytest.raises(InvalidArgument) as refused:
        chain({"name": "amount_reward", "stage": "reward", "params": {"channel_weights": {"app": -1}}})
    assert refused.value.field == "plugins[0].params.channel_weights.app"
