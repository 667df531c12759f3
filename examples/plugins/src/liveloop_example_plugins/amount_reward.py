"""A reward plugin: the reward of a response is an amount the client sends with it (what the
customer spent, say), scaled and capped; a response without one keeps the reward it had (as sent,
or the deployment's default). Responses through some channels (Respond's channel_name) can count
for less in learning.

    {"name": "amount_reward", "stage": "reward",
     "params": {"field": "amount", "scale": 0.01, "cap": 50, "channel_weights": {"call-centre": 0.5}}}

(For statistics that count successes, such as Thompson sampling's, a reward above 1 counts as
more than one success: scale amounts into [0, 1] there, or use a deployment whose statistics take
any value.)
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

from pydantic import Field

from libs.common.deployment_spec import PluginStage
from libs.policy.plugins import PluginParams, Reward, RewardInput


class AmountReward:
    stage: ClassVar[PluginStage] = PluginStage.REWARD

    class Params(PluginParams):
        field: str = Field("amount", min_length=1, description="The payload's field holding the amount")
        scale: float = Field(1.0, gt=0, allow_inf_nan=False, description="Reward = amount x scale")
        cap: float = Field(1.0, gt=0, le=1e9, allow_inf_nan=False, description="The largest reward")
        channel_weights: dict[str, Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)]] = Field(
            default_factory=dict, description="Learning weight by the response's channel (default 1)"
        )

    def __init__(self, params: Params) -> None:
        self._params = params

    def reward(self, request: RewardInput) -> Reward:
        params = self._params
        weight = params.channel_weights.get(request.channel, 1.0)
        amount = request.payload.get(params.field)
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount):
            return Reward(request.reward, weight)
        return Reward(min(max(float(amount) * params.scale, 0.0), params.cap), weight)
