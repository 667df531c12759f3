"""The predictor's own Prometheus metrics (the RPC counters and latencies are libs/common/telemetry's)."""

from __future__ import annotations

from prometheus_client import Counter

MODEL_INPUT_DEFAULTS = Counter(
    "liveloop_predictor_model_input_defaults_total",
    "Invokes scored by a bound model without a value for one of its inputs (the training mean or no "
    "category stood in: train/serve skew), by deployment, model and input",
    ["deployment", "model", "input"],
)

PLUGIN_SKIPS = Counter(
    "liveloop_predictor_plugin_skips_total",
    "Requests that went on without a plugin (it raised, returned something malformed or ran past its "
    "budget; the deployment says on_error: skip), by deployment, plugin and reason (error, budget)",
    ["deployment", "plugin", "reason"],
)

SHADOW_DECISIONS = Counter(
    "liveloop_predictor_shadow_decisions_total",
    "Shadow decisions (a deployment's `shadow`, computed for a live request, logged, never served), by "
    "live deployment, shadow and outcome: logged; busy (too many in flight, not computed); "
    "nothing_eligible; not_served (the shadow is not served by this replica); failed",
    ["deployment", "shadow", "outcome"],
)
