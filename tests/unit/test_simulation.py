"""Decision-quality simulation: seeded environments, the regret bookkeeping, the in-memory twin of
the options store's Lua update (checked against real Redis), and `liveloop simulate --engine memory`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from libs.cli.main import app
from libs.common import redis_keys
from libs.policy.statistics import ArmPolicy, parse_arms
from libs.simulation.environments import (
    SIMULATION_START,
    OraclePolicy,
    PolicySettings,
    Round,
    make_environment,
    make_round,
    policy_rng,
    simulation_spec,
)
from libs.simulation.in_memory import ArmHash, InMemoryPolicy, update_arm_fields
from libs.simulation.runs import RunRecorder, rounds_to_window_share, run_in_memory, run_policy
from services.predictor.core.engine_simulation import run_with_redis
from services.predictor.core.options_store import OptionsStore
from services.predictor.core.statistics_stores import Scope

pytestmark = pytest.mark.timeout(60)


# Environments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["stationary", "reversed", "segments"])
def test_the_same_seed_gives_the_same_environment(name: str) -> None:
    first = make_environment(name, rounds=2_000, seed=7)
    again = make_environment(name, rounds=2_000, seed=7)
    other = make_environment(name, rounds=2_000, seed=8)
    for field in ("before", "after", "segment_of_round", "click_draw"):
        assert np.array_equal(getattr(first, field), getattr(again, field)), field
    assert not np.array_equal(first.click_draw, other.click_draw)
    if name == "segments":
        assert not np.array_equal(first.before, other.before)


def test_stationary_take_up_is_evenly_spaced_from_2_to_10_percent() -> None:
    environment = make_environment("stationary", rounds=100, seed=1)
    assert environment.offers == tuple(f"offer-{i:02d}" for i in range(1, 11))
    assert environment.segments == ("all",)
    assert environment.change_round is None
    assert np.allclose(environment.before, [np.linspace(0.02, 0.10, 10)])
    assert environment.best_offer(99) == 9


def test_reversed_flips_the_order_at_half_time() -> None:
    environment = make_environment("reversed", rounds=1_000, seed=1)
    assert environment.change_round == 500
    assert environment.best_offer(499) == 9
    assert environment.best_offer(500) == 0
    assert np.allclose(environment.after[0], environment.before[0][::-1])


def test_segments_draw_a_matrix_per_segment_and_redraw_it_at_half_time() -> None:
    environment = make_environment("segments", rounds=4_000, seed=3)
    assert environment.segments == ("s1", "s2", "s3", "s4")
    assert environment.before.shape == environment.after.shape == (4, 10)
    assert environment.before.min() >= 0.02
    assert environment.before.max() <= 0.10
    assert not np.allclose(environment.before, environment.after)
    assert environment.change_round == 2_000
    counts = np.bincount(environment.segment_of_round, minlength=4)
    assert counts.min() > 800  # customers spread over the segments
    round_ = make_round(environment, 5)
    assert round_.params == {"segment": environment.segments[environment.segment_of_round[5]]}
    assert round_.now == SIMULATION_START + 5


def test_bad_environment_arguments_name_the_field() -> None:
    from libs.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as raised:
        make_environment("drifting", rounds=10, seed=1)
    assert raised.value.field == "environment"
    with pytest.raises(InvalidArgument) as raised:
        make_environment("stationary", rounds=10, seed=1, low=0.3, high=0.1)
    assert raised.value.field == "take_up"


# Regret and recovery ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["stationary", "reversed", "segments"])
def test_the_oracle_has_zero_regret(name: str) -> None:
    environment = make_environment(name, rounds=3_000, seed=11)
    report = run_policy(environment, OraclePolicy(environment), engine="oracle", label="oracle")
    assert report.regret == 0.0
    assert report.regret_curve[-1] == (3_000, 0.0)
    assert report.expected_clicks == pytest.approx(report.oracle_expected_clicks)
    assert report.best_share_last_window == 1.0
    assert report.convergence_rounds == report.near_best_convergence_rounds == 500
    if environment.change_round is not None:
        assert report.recovery_rounds == report.near_best_recovery_rounds == 500


def test_regret_is_the_expected_take_up_the_policy_gave_up() -> None:
    environment = make_environment("reversed", rounds=1_000, seed=2)
    recorder = RunRecorder(environment)
    for index in range(1_000):
        recorder.record(index, 0, environment.clicked(index, 0))  # always offer-01
    report = recorder.report(engine="fixed", policy="first offer", wall_seconds=1.0, sample_every=250)
    # offer-01 is the worst (2% vs 10%) before the change and the best after it.
    assert report.regret_before_change == pytest.approx(500 * 0.08)
    assert report.regret_after_change == pytest.approx(0.0)
    assert report.regret == pytest.approx(40.0)
    assert report.oracle_expected_clicks == pytest.approx(100.0)
    assert [point for point, _ in report.regret_curve] == [250, 500, 750, 1000]
    assert report.regret_curve[1][1] == pytest.approx(40.0)
    assert report.recovery_rounds == 500
    assert report.convergence_rounds is None
    assert report.near_best_convergence_rounds is None  # 2% is 8 points below the best
    assert report.clicks == int(sum(environment.clicked(i, 0) for i in range(1_000)))
    assert report.ctr == pytest.approx(report.clicks / 1_000)


def test_rounds_to_window_share_is_the_end_of_the_first_qualifying_window() -> None:
    best = np.zeros(2_000, dtype=bool)
    best[300:] = True  # settles at round 300
    # the first 500-round window with >= 450 best choices is [250, 750): 50 misses in it
    assert rounds_to_window_share(best) == 750
    assert rounds_to_window_share(best, window=100, share=1.0) == 400
    assert rounds_to_window_share(np.zeros(2_000, dtype=bool)) is None
    assert rounds_to_window_share(np.ones(100, dtype=bool)) is None  # shorter than a window


# The in-memory engine -----------------------------------------------------------------------------


def test_in_memory_runs_are_reproducible_and_thompson_learns() -> None:
    environment = make_environment("stationary", rounds=3_000, seed=5, offers=4, low=0.05, high=0.30)
    first = run_in_memory(environment, PolicySettings())
    again = run_in_memory(environment, PolicySettings())
    assert first.regret == again.regret
    assert first.clicks == again.clicks
    uniform = run_in_memory(environment, PolicySettings(algorithm="uniform"))
    assert first.regret < uniform.regret / 3
    assert first.best_share_last_window > 0.8
    assert 0.2 < uniform.best_share_last_window < 0.32


def test_update_arm_fields_decays_adds_and_caps_like_the_script() -> None:
    fields: ArmHash = {}
    policy = ArmPolicy(half_life_seconds=10.0)
    update_arm_fields(fields, policy, [("a", 1.0, 0.0)], 100.0)
    update_arm_fields(fields, policy, [("a", 0.0, 1.0)], 100.0)
    update_arm_fields(fields, policy, [("a", 1.0, 0.0)], 110.0)  # one half-life later
    assert float(fields["a|n"]) == 0.5 * 1.0 + 1.0
    assert float(fields["a|s"]) == 0.5
    assert float(fields["a|t"]) == 110.0
    # reading decays to the reader's now with the same half-life
    arms = parse_arms(fields, policy, 120.0)
    assert arms["a"].impressions == pytest.approx(0.75)
    capped: ArmHash = {}
    update_arm_fields(capped, ArmPolicy(count_cap=10.0), [("b", 20.0, 4.0)], 1.0)
    assert float(capped["b|n"]) == 10.0
    assert float(capped["b|s"]) == 2.0


def test_a_half_life_in_impressions_forgets_by_the_segments_traffic_not_the_clock() -> None:
    """Evidence halves every `half_life_impressions` impressions of any offer in the segment, so the
    same sequence forgets the same however fast it arrives; an arm that is not shown still ages."""
    policy = ArmPolicy(half_life_impressions=100.0)
    slow: ArmHash = {}
    fast: ArmHash = {}
    for index in range(10):  # a: 10 impressions, 4 successes
        for fields, step in ((slow, 60.0), (fast, 0.001)):
            update_arm_fields(fields, policy, [("a", 1.0, float(index < 4))], index * step)
    for index in range(100):  # then b alone, 100 impressions: a's evidence is one half-life old
        for fields, step in ((slow, 60.0), (fast, 0.001)):
            update_arm_fields(fields, policy, [("b", 1.0, 0.0)], (10 + index) * step)
    assert {k: v for k, v in slow.items() if not k.endswith("|t")} == {
        k: v for k, v in fast.items() if not k.endswith("|t")
    }
    arms = parse_arms(slow, policy, 1e9)  # no time decay: any reading time gives the same
    # The k-th newest impression of the segment weighs 0.5 ** (k / 100): a's ten are 100 to 109 old.
    assert arms["a"].impressions == pytest.approx(sum(0.5 ** ((100 + k) / 100) for k in range(10)))
    assert arms["a"].successes == pytest.approx(sum(0.5 ** ((100 + k) / 100) for k in range(6, 10)))
    assert arms["b"].impressions == pytest.approx(sum(0.5 ** (k / 100) for k in range(100)))
    assert float(slow["|imp"]) == 110.0


def test_the_simulation_spec_declares_the_segment_only_where_asked() -> None:
    environment = make_environment("segments", rounds=10, seed=1)
    with_context = simulation_spec(environment, PolicySettings(half_life_seconds=900), "sim-a")
    assert with_context.segment_variables == ["segment"]
    assert with_context.algorithm.half_life_seconds == 900  # type: ignore[union-attr]
    blind = simulation_spec(environment, PolicySettings(use_segment=False), "sim-b")
    assert blind.segment_variables == []
    uniform = simulation_spec(environment, PolicySettings(algorithm="uniform"), "sim-c")
    assert uniform.exploration_epsilon == 1.0
    informed = PolicySettings(half_life_seconds=8000, beta0=20.0)
    spec = simulation_spec(environment, informed, "sim-d")
    assert (spec.algorithm.alpha0, spec.algorithm.beta0) == (1.0, 20.0)  # type: ignore[union-attr]
    assert informed.label == "thompson prior=Beta(1,20) half-life=8000s"


# The twin against Redis ---------------------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.mark.integration
@pytest.mark.parametrize(
    "policy",
    [
        ArmPolicy(),
        ArmPolicy(half_life_seconds=37.5),
        ArmPolicy(half_life_seconds=20.0, count_cap=15.0),
        ArmPolicy(window_seconds=30.0),
        ArmPolicy(half_life_impressions=7.5),
        ArmPolicy(half_life_seconds=40.0, half_life_impressions=12.0, count_cap=30.0),
        ArmPolicy(change_detection=True),
    ],
    ids=[
        "plain",
        "half-life",
        "half-life+cap",
        "window",
        "impressions",
        "impressions+time+cap",
        "detection",
    ],
)
async def test_in_memory_update_equals_the_lua_update(redis_client: Redis, policy: ArmPolicy) -> None:
    """The same sequence of impressions and successes, at irregular times, through UPDATE_ARMS in
    Redis and through update_arm_fields, leaves the same hash (every field, every digit)."""
    store = OptionsStore(redis_client)
    scope = Scope(f"twin-{random.getrandbits(32):x}", "0", "all")
    key = redis_keys.arm_statistics(scope.deployment, scope.generation, scope.segment)
    rng = random.Random(42)
    fields: ArmHash = {}
    now = SIMULATION_START
    for step in range(300):
        now += rng.choice([0.0, 0.5, 1.0, 3.0, 17.25, 61.0])
        take_up = 0.05 if step < 150 else 0.6  # a change half way, for change detection to find
        updates = [
            (rng.choice(["a", "b", "c"]), float(rng.random() < 0.7), float(rng.random() < take_up))
            for _ in range(rng.randint(1, 2))
        ]
        pipeline = store.pipeline()
        store.arms.queue_update(pipeline, scope, policy, updates, now)
        await store.send(pipeline)
        update_arm_fields(fields, policy, updates, now)
    stored: ArmHash = {_text(k): _text(v) for k, v in (await redis_client.hgetall(key)).items()}
    await redis_client.delete(key)
    assert stored == fields
    assert parse_arms(stored, policy, now + 5.0) == parse_arms(fields, policy, now + 5.0)
    if policy == ArmPolicy(change_detection=True):  # the change was found: some arm restarted
        assert any(name.endswith("|r") for name in stored)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "policy"),
    [
        ("reversed", PolicySettings(half_life_seconds=60.0)),
        ("segments", PolicySettings(half_life_seconds=200.0)),
        ("stationary", PolicySettings(algorithm="epsilon_greedy", epsilon=0.2)),
    ],
)
async def test_the_in_memory_engine_makes_the_engines_choices(
    redis_client: Redis, name: str, policy: PolicySettings
) -> None:
    """Same seed, same rounds: the DecisionEngine over Redis (contact join, Lua updates, decay on a
    simulated clock) and the in-memory engine choose the same offer every round."""
    environment = make_environment(name, rounds=400, seed=9)
    in_redis = await run_with_redis(environment, policy, redis_client, sample_every=1)
    in_memory = run_policy(
        environment,
        InMemoryPolicy(simulation_spec(environment, policy, "sim-twin"), policy_rng(environment.seed)),
        engine="memory",
        label=policy.label,
        sample_every=1,
    )
    assert in_redis.regret_curve == in_memory.regret_curve
    assert in_redis.clicks == in_memory.clicks
    leftovers = [key async for key in redis_client.scan_iter(match="ll:arms:sim-*")]
    assert leftovers == []  # the run cleaned up after itself


# The command --------------------------------------------------------------------------------------


def test_simulate_command_reports_json() -> None:
    result = CliRunner().invoke(
        app,
        ["simulate", "--environment", "reversed", "--rounds", "2000", "--half-life", "300", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["engine"] == "memory"
    assert report["rounds"] == 2_000
    assert report["change_round"] == 1_000
    assert report["policy"] == "thompson half-life=300s"
    assert report["regret"] == pytest.approx(report["regret_curve"][-1][1])
    assert len(report["take_up"]["take_up_after"][0]) == 10


def test_simulate_command_prints_a_summary_and_refuses_an_unknown_engine() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--rounds", "600", "--algorithm", "epsilon_greedy"])
    assert result.exit_code == 0, result.output
    assert "regret (expected)" in result.stdout
    refused = runner.invoke(app, ["simulate", "--engine", "redis", "--rounds", "10"])
    assert refused.exit_code == 2
    assert "memory" in refused.output  # the engines there are
    invalid = runner.invoke(app, ["simulate", "--rounds", "10", "--prior", "0,1"])
    assert invalid.exit_code == 2
    assert "algorithm.alpha0" in invalid.output


def test_gradual_and_single_offer_environments() -> None:
    """`gradual`: the rates move linearly from the stationary order to the reversed one over 20k
    rounds from half time; `single`: only the worst offer changes, and becomes the best."""
    gradual = make_environment("gradual", rounds=100_000, seed=3)
    assert (gradual.change_round, gradual.drift_rounds) == (50_000, 20_000)
    assert np.array_equal(gradual.take_up(49_999), gradual.before)
    assert np.allclose(gradual.take_up(60_000), (gradual.before + gradual.after) / 2)
    assert np.array_equal(gradual.take_up(70_000), gradual.after)
    assert gradual.best_offer(70_000) == 0
    single = make_environment("single", rounds=1_000, seed=3)
    changed = np.flatnonzero(single.before[0] != single.after[0])
    assert changed.tolist() == [0]
    assert single.best_offer(499) == 9
    assert single.best_offer(500) == 0
    assert single.after[0, 0] == pytest.approx(0.10 + 0.08 / 9)
    report = run_in_memory(
        make_environment("gradual", rounds=2_000, seed=1), PolicySettings(algorithm="uniform")
    )
    assert report.regret > 0


def test_forgetting_settings_reach_the_spec_and_the_arm_policy() -> None:
    from libs.common.errors import InvalidArgument

    environment = make_environment("reversed", rounds=10, seed=1)
    spec = simulation_spec(environment, PolicySettings(change_detection=True), "sim-f")
    assert ArmPolicy.from_algorithm(spec.algorithm).change_detection
    spec = simulation_spec(environment, PolicySettings(half_life_impressions=500), "sim-h")
    assert ArmPolicy.from_algorithm(spec.algorithm).half_life_impressions == 500.0
    with pytest.raises(InvalidArgument, match="change_detection: it decides what to forget itself"):
        simulation_spec(environment, PolicySettings(change_detection=True, half_life_seconds=900), "sim-i")
    assert PolicySettings(change_detection=True).label == "thompson change-detection"
    with pytest.raises(InvalidArgument, match="change_detection"):  # Thompson sampling's only
        simulation_spec(environment, PolicySettings("epsilon_greedy", change_detection=True), "sim-g")


def test_in_a_gradual_drift_recovery_counts_from_when_the_best_offer_changes() -> None:
    """In `gradual` every rate is equal half way through the drift, and offer 0 is the best from
    then on: an oracle recovers in the first window after that, and a policy that keeps the old best
    until the drift ends recovers that much later."""
    environment = make_environment("gradual", rounds=20_000, seed=2)  # a drift of 4,000 rounds from 10,000
    oracle = run_policy(environment, OraclePolicy(environment), engine="oracle", label="oracle")
    assert oracle.recovery_rounds == 500

    class Late:
        def choose(self, round: Round) -> int:
            return 9 if round.index < 14_000 else 0

        def learn(self, round: Round, offer: int, clicked: bool) -> None:
            return None

    late = run_policy(environment, Late(), engine="late", label="late")
    # The rates cross at 12,000 (all equal, offer 0 best from then); offer 0 from 14,000; the first
    # window with 90% best choices ends 450 rounds after that.
    assert late.recovery_rounds == 2_000 + 450
