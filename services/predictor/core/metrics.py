"""The predictor's own Prometheus metrics (the RPC counters and latencies are libs/common/telemetry's)."""

from __future__ import annotations

from prometheus_client import Counter

MODEL_INPUT_DEFAULTS = Counter(
    "liveloop_predictor_model_input_defaults_total",
    "Invokes scored by a bound model without a value for one of its inputs (the training mean or no "
    "category stood in: train/serve skew), by deployment, model and input",
    ["deployment", "model", "input"],
)
