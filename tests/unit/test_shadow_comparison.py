"""The shadow comparison's arithmetic on small hand-made logs: agreement, IPS and SNIPS from the
live contact's logged first-slot distribution, and shadow decisions left out with a note."""

from __future__ import annotations

import pyarrow as pa
import pytest

from services.monitor.core.shadow_comparison import compare_shadows

pytestmark = pytest.mark.timeout(30)


def contacts(*rows: tuple[str, list[str], list[int], str]) -> pa.Table:
    """(uuid, eligible, first-slot counts out of their sum, shown first) with epsilon 0."""
    return pa.Table.from_pylist(
        [
            {"uuid": u, "eligible": e, "epsilon": 0.0, "outcomes": sum(c), "counts": c, "shown": [s]}
            for u, e, c, s in rows
        ]
    )


def test_agreement_ips_and_snips_by_hand() -> None:
    live = contacts(
        ("u1", ["a", "b"], [1, 1], "a"),  # P(a first) = 1/2
        ("u2", ["a", "b"], [1, 3], "b"),  # P(b first) = 3/4
        ("u3", ["a", "b"], [1, 1], "a"),
        ("u4", ["a", "b"], [1, 1], "b"),
    )
    responses = pa.Table.from_pylist(
        [
            {"uuid": "u1", "new_offers": ["a"], "credited_reward": 1.0, "late": False},
            {"uuid": "u2", "new_offers": ["b"], "credited_reward": 2.0, "late": False},
            {"uuid": "u3", "new_offers": ["a"], "credited_reward": 5.0, "late": True},  # late: no reward
        ]
    )
    shadows = pa.Table.from_pylist(
        [
            {"shadow": "cand", "shadow_of": "u1", "shown": ["a"]},  # agrees, reward 1, weight 2
            {"shadow": "cand", "shadow_of": "u2", "shown": ["b"]},  # agrees, reward 2, weight 4/3
            {"shadow": "cand", "shadow_of": "u3", "shown": ["b"]},  # disagrees
            {"shadow": "cand", "shadow_of": "u4", "shown": ["c"]},  # c was not eligible live
            {"shadow": "cand", "shadow_of": "gone", "shown": ["a"]},  # its live contact is not in the window
        ]
    )
    (row,) = compare_shadows(live, responses, shadows)
    assert (row.shadow, row.live_decisions, row.compared, row.not_comparable) == ("cand", 4, 3, 1)
    assert row.agreement == pytest.approx(2 / 3)
    assert row.live_value == pytest.approx(3 / 3)
    assert row.agreed_value == pytest.approx(1.5)
    terms, weights = [2 * 1.0, 4 / 3 * 2.0, 0.0], [2.0, 4 / 3, 0.0]
    assert row.estimates["ips"].value == pytest.approx(sum(terms) / 3)
    assert row.estimates["snips"].value == pytest.approx(sum(terms) / sum(weights))
    assert any("1 shadow decisions have no live contact" in note for note in row.notes)
    assert any(
        "1 shadow decisions put first an offer the live decision could not show" in n for n in row.notes
    )
