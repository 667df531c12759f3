"""Decision-log records made up for the monitor's tests: contacts and the responses to them."""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Sequence

from libs.common.decision_log import Contact, FirstSlot, Response, ShownOffer

OFFERS = ("alpha", "bravo", "charlie", "delta")


def contact(
    deployment: str,
    *,
    time: float,
    shown: Sequence[str] = ("alpha", "bravo"),
    segment: str = "north",
    variant: str = "",
    revision: int = 1,
    replica: str = "predictor-1",
    explored: Sequence[bool] | None = None,
    latency_ms: float = 2.0,
    features: dict[str, str] | None = None,
    uuid: str | None = None,
) -> Contact:
    flags = list(explored) if explored is not None else [False] * len(shown)
    counts = [64] * len(OFFERS)
    return Contact(
        uuid=uuid or uuid_module.uuid4().hex,
        time=time,
        deployment=deployment,
        campaign=deployment,
        channel="app",
        config_revision=revision,
        variant=variant,
        replica=replica,
        options_generation="0",
        customer="c-1",
        segment=segment,
        context={"region": segment},
        features=features or {},
        eligible=list(OFFERS),
        eligible_scores=[0.5, 0.4, 0.3, 0.2],
        first_slot=FirstSlot(0.0, sum(counts), counts),
        shown=[
            ShownOffer(offer, rank, 0.5, 0.25 if rank == 1 else 1 / 3, flags[rank - 1])
            for rank, offer in enumerate(shown, start=1)
        ],
        explore=any(flags),
        model="",
        latency_ms=latency_ms,
    )


def response(
    to: Contact,
    accepted: Sequence[str],
    *,
    time: float | None = None,
    reward: float = 1.0,
    late: bool = False,
    duplicate: bool = False,
    replica: str = "predictor-2",
    new_offers: Sequence[str] | None = None,
) -> Response:
    fresh = list(accepted) if new_offers is None else list(new_offers)
    return Response(
        uuid=to.uuid,
        time=to.time + 1 if time is None else time,
        deployment=to.deployment,
        accepted=list(accepted),
        learned_offers=[] if late or duplicate else fresh,
        reward=reward,
        channel="app",
        learned=bool(fresh) and not late and not duplicate,
        late=late,
        duplicate=duplicate,
        replica=replica,
        new_offers=[] if duplicate else fresh,
        credited_reward=reward,
        contact_time=to.time,
        segment=to.segment,
        variant=to.variant,
        config_revision=to.config_revision,
        latency_ms=1.0,
    )
