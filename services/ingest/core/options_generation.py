"""Generating a deployment's options store from history, in the predictor's Redis layout.

History is a table of presentations: one row per offer shown, with `offer` (id or name), `accepted`
(0/1 or true/false) and optionally `presented` (a count, default 1), plus a column for each segment
variable of the deployment. The prior of an offer x segment is worth `weight` pseudo-observations
(fewer when the history has fewer presentations of it) at the historical take-up rate:
alpha = w x acceptances / presentations and beta = w - alpha, with w = min(weight, presentations).

A new generation is written under new keys and becomes live with one SET of the generation pointer,
so the predictor never sees half of it. `generate` starts from the priors alone; `update` carries
over everything already learned and adds priors only for options that are new.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from redis import Redis
from sqlalchemy import Engine

from libs.common import redis_keys
from libs.common.deployment_spec import DeploymentSpec
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.ingest.core import catalog
from services.ingest.core.columns import check_name

OLD_GENERATION_TTL_SECONDS = 24 * 3600
DEFAULT_PRIOR_WEIGHT = 100.0  # pseudo-observations per arm when the request leaves it to the server
# The generation a predictor reads while no pointer exists (it learns into it from the first Respond).
INITIAL_GENERATION = "0"


@dataclass(frozen=True)
class OptionsResult:
    deployment: str
    generation: str
    arms_created: int
    arms_updated: int
    arms_kept: int
    arms_removed: int
    offers: int
    segments: int
    history_rows: int
    dry_run: bool


def _history(
    engine: Engine, table_name: str, spec: DeploymentSpec
) -> tuple[dict[tuple[str, str], tuple[float, float]], int]:
    """(offer id, segment) -> (presentations, acceptances), and the number of history rows."""
    check_name(table_name, "history_table")
    with engine.connect() as connection:
        known = connection.execute(
            sa.select(catalog.tables.c.name).where(catalog.tables.c.name == table_name)
        ).first()
    if known is None:
        raise NotFound(f"no table '{table_name}' in the offline store", field="history_table")
    table = sa.Table(table_name, sa.MetaData(), autoload_with=engine)
    segment_columns = spec.segment_variables
    missing = [c for c in ("offer", "accepted", *segment_columns) if c not in table.c]
    if missing:
        raise FailedPrecondition(
            f"history table '{table_name}' lacks column(s) {missing}; it needs offer, accepted and the segment "
            f"variables {segment_columns}",
            field="history_table",
        )
    presented = table.c["presented"] if "presented" in table.c else sa.literal(1)
    accepted = sa.cast(table.c["accepted"], sa.Integer)
    query = sa.select(
        table.c["offer"],
        *[table.c[c] for c in segment_columns],
        sa.func.sum(presented).label("presentations"),
        sa.func.sum(accepted * presented if "presented" not in table.c else accepted).label("acceptances"),
        sa.func.count().label("rows"),
    ).group_by(table.c["offer"], *[table.c[c] for c in segment_columns])
    by_name = {offer.name: offer.id for offer in spec.offers}
    ids = {offer.id for offer in spec.offers}
    counts: dict[tuple[str, str], tuple[float, float]] = {}
    rows = 0
    with engine.connect() as connection:
        for row in connection.execute(query):
            rows += int(row.rows)
            offer = str(row.offer)
            offer_id = offer if offer in ids else by_name.get(offer)
            if offer_id is None:
                continue  # history of offers the deployment no longer has
            segment = "|".join(f"{c}={_label(row._mapping[c])}" for c in segment_columns) or "all"
            n, s = counts.get((offer_id, segment), (0.0, 0.0))
            counts[(offer_id, segment)] = (n + float(row.presentations or 0), s + float(row.acceptances or 0))
    return counts, rows


def _label(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def _decode(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
        for k, v in raw.items()
    }


def generate_options(
    engine: Engine,
    redis: Redis,
    spec: DeploymentSpec,
    *,
    history_table: str,
    prior_weight: float,
    update: bool,
    dry_run: bool,
) -> OptionsResult:
    if prior_weight < 0:
        raise InvalidArgument("must not be negative", field="prior_weight")
    weight = prior_weight or DEFAULT_PRIOR_WEIGHT
    counts, history_rows = _history(engine, history_table, spec) if history_table else ({}, 0)
    deployment = spec.name
    pointer = redis_keys.options_generation(deployment)
    old = redis.get(pointer)
    old_generation = (old.decode() if isinstance(old, bytes) else old) or INITIAL_GENERATION
    new_generation = f"g{int(time.time() * 1000)}"
    prefix_old = redis_keys.arm_statistics(deployment, old_generation, "")

    carried: dict[str, dict[str, str]] = {}
    if update:
        for key in redis.scan_iter(match=prefix_old + "*", count=500):
            name = key.decode() if isinstance(key, bytes) else key
            carried[name[len(prefix_old) :]] = _decode(redis.hgetall(name))
    offer_ids = {offer.id for offer in spec.offers}
    created = updated = kept = removed = 0
    arms: dict[str, dict[str, str]] = {}
    for segment, fields in carried.items():
        for field_name, value in fields.items():
            offer = field_name.rpartition("|")[0]
            # The segment's impression clock goes with its arms: their `c` readings are against it.
            if offer in offer_ids or field_name == redis_keys.SEGMENT_CLOCK_FIELD:
                arms.setdefault(segment, {})[field_name] = value
        offers = {f.rpartition("|")[0] for f in fields if f != redis_keys.SEGMENT_CLOCK_FIELD}
        removed += len(offers - offer_ids)
        kept += len(offers & offer_ids)
    for (offer, segment), (presentations, acceptances) in counts.items():
        existing = arms.setdefault(segment, {})
        if update and f"{offer}|n" in existing:
            continue  # learned already; keep it
        if f"{offer}|pa" in existing:
            updated += 1
        else:
            created += 1
        pseudo = min(weight, presentations)
        rate = min(max(acceptances / presentations, 0.0), 1.0) if presentations > 0 else 0.0
        existing[f"{offer}|pa"] = repr(pseudo * rate)
        existing[f"{offer}|pb"] = repr(pseudo * (1.0 - rate))
    kept -= updated  # an arm carried over with new priors counts as updated, not kept
    segments = {segment for segment in arms if arms[segment]}
    result = OptionsResult(
        deployment,
        new_generation if not dry_run else old_generation,
        created,
        updated,
        kept,
        removed,
        len(spec.offers),
        len(segments),
        history_rows,
        dry_run,
    )
    if dry_run:
        return result
    pipeline = redis.pipeline(transaction=False)
    for segment, fields in arms.items():
        if fields:
            key = redis_keys.arm_statistics(deployment, new_generation, segment)
            pipeline.hset(key, mapping=dict(fields))  # type: ignore[arg-type]
    pipeline.execute()
    # The switch: one SET makes the whole generation live at once.
    redis.set(pointer, new_generation)
    # Replicas read the old generation for up to a second more (they cache the pointer): let it age out.
    for key in redis.scan_iter(match=prefix_old + "*", count=500):
        redis.expire(key, OLD_GENERATION_TTL_SECONDS)
    return result


def spec_from_json(spec_json: str) -> DeploymentSpec:
    from libs.common.deployment_spec import deployment_spec_from_mapping

    return deployment_spec_from_mapping(json.loads(spec_json))
