"""Respond in one Redis round trip: a script that reads the contact and, where it can, answers it
in the same step, as `DecisionEngine.respond` would in Python (learn, log, mark).

It can when the contact was served from arm statistics under the config revision this replica
serves now (the whole config's revision, not the deployment's): Invoke then wrote into the contact
what the answer needs of that revision (`facts`: the revision, the reward window, the default
reward, the arm policy and the statistics key), so nothing the answer depends on is known to Python
alone. A replica that follows only some deployments does not use the script (the deployment of a
contact it does not serve is answered as Python answers it: logged, not learned). Everything else is left to Python, and the script
then replies with the contact as it read it, so Python's answer costs the one round trip more it
always did, not two: another revision (a publish since the Invoke), statistics other than arms, a
deployment with reward plugins (Invoke writes no facts then), an accepted offer named other than
by its id, a negative reward (which arm statistics refuse with an error Python words). The Python answer stays the reference: the tests answer the same
contacts both ways and compare the log entry, the statistics and the marks.

Replies: [0], no contact; [1, [field, value, ...]], the contact, left to Python; [2, learned,
late, duplicate, deployment, statistics key, count of accepted, accepted ids..., fresh ids...],
answered. The script touches the statistics key the contact names, which it cannot declare
before reading the contact (one Redis; a cluster would need the key in the contact's slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from libs.common import decision_log, redis_keys
from libs.common.deployment_spec import RewardSettings
from libs.common.redis_batch import queue_script
from libs.policy.statistics import ArmPolicy
from services.predictor.core.options_store import DECISION_LOG_MAX_LENGTH
from services.predictor.core.statistics_stores import UPDATE_ARMS

# The contact's field holding the facts; absent where Python answers (statistics other than arms).
# The facts start with their format, so a contact written by an older replica, whose facts the
# script would misread, is left to Python (which reads none of them).
FACTS_FIELD = "answer"
FACTS_FORMAT = "f3"  # f2 had one number fewer (no change detection)

# KEYS[1]: the contact, KEYS[2]: the decision log stream. ARGV: 1 the replica's config revision,
# 2 the uuid, 3 now, 4 the event time, 5 the reward as sent ('' for none), 6 the channel, 7 the
# replica, 8 the latency so far in ms, 9 the log's schema version, 10 the log's length cap, 11 the
# arm-updates channel, then the accepted offers.
RESPOND = (
    """-- liveloop respond
local function update_arms(KEYS, ARGV)
"""
    + UPDATE_ARMS
    + """
end
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {0} end
local contact = {}
for i = 1, #fields, 2 do contact[fields[i]] = fields[i + 1] end
local leave = {1, fields}
local facts = contact['"""
    + FACTS_FIELD
    + """']
if facts == nil then return leave end
local served, reward_window, default_reward, half_life, window, cap, half_life_impressions, detect, arms =
  string.match(facts, '^"""
    + FACTS_FORMAT
    + """|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.+)$')
if arms == nil or served ~= ARGV[1] then return leave end
local reward = ARGV[5]
if reward ~= '' and tonumber(reward) < 0 then return leave end
local shown = {}
for _, offer in ipairs(cjson.decode(contact['offers'])) do shown[offer] = true end
local accepted, fresh, seen = {}, {}, {}
for i = 12, #ARGV do
  local offer = ARGV[i]
  if not shown[offer] then return leave end
  if not seen[offer] then
    seen[offer] = true
    accepted[#accepted + 1] = offer
    if contact['accepted|' .. offer] == nil then fresh[#fresh + 1] = offer end
  end
end
local late = tonumber(ARGV[4]) - tonumber(contact['time']) > tonumber(reward_window)
local duplicate = (#accepted > 0 and #fresh == 0) or (#accepted == 0 and contact['responded'] == '1')
local credited = reward
if credited == '' then credited = default_reward end
local learned = (not late) and #fresh > 0
if learned then
  local updates = {ARGV[3], half_life, window, cap, half_life_impressions, detect == '1.0' and '1' or '0'}
  for _, offer in ipairs(fresh) do
    updates[#updates + 1] = offer
    updates[#updates + 1] = '0'
    updates[#updates + 1] = credited
  end
  update_arms({arms}, updates)
  redis.call('PUBLISH', ARGV[11], arms)
end
local function texts(list)
  local out = {}
  for i, text in ipairs(list) do out[i] = cjson.encode(text) end
  return '[' .. table.concat(out, ',') .. ']'
end
local function flag(value) if value then return 'true' end return 'false' end
local body = '{"time":' .. ARGV[3]
  .. ',"deployment":' .. cjson.encode(contact['deployment'])
  .. ',"accepted":' .. texts(accepted)
  .. ',"learned_offers":' .. (learned and texts(fresh) or '[]')
  .. ',"reward":' .. (reward == '' and 'null' or reward)
  .. ',"channel":' .. cjson.encode(ARGV[6])
  .. ',"learned":' .. flag(learned)
  .. ',"late":' .. flag(late)
  .. ',"duplicate":' .. flag(duplicate)
  .. ',"replica":' .. cjson.encode(ARGV[7])
  .. ',"new_offers":' .. texts(fresh)
  .. ',"credited_reward":' .. credited
  .. ',"contact_time":' .. contact['time']
  .. ',"segment":' .. cjson.encode(contact['segment'])
  .. ',"variant":' .. cjson.encode(contact['variant'] or '')
  .. ',"revision":' .. contact['revision']
  .. ',"latency_ms":' .. ARGV[8] .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[10], '*', 'kind', 'response', 'uuid', ARGV[2],
           'schema', ARGV[9], 'body', body)
local marks = {}
for _, offer in ipairs(fresh) do
  marks[#marks + 1] = 'accepted|' .. offer
  marks[#marks + 1] = '1'
end
if contact['responded'] ~= '1' then
  marks[#marks + 1] = 'responded'
  marks[#marks + 1] = '1'
end
if #marks > 0 then redis.call('HSET', KEYS[1], unpack(marks)) end
local reply = {2, learned and 1 or 0, late and 1 or 0, duplicate and 1 or 0, contact['deployment'], arms, #accepted}
for _, offer in ipairs(accepted) do reply[#reply + 1] = offer end
for _, offer in ipairs(fresh) do reply[#reply + 1] = offer end
return reply
"""
)


def contact_facts(
    config_revision: int, reward: RewardSettings, policy: ArmPolicy, statistics_key: str
) -> str:
    """What the script needs of the config that served a contact from arm statistics: the whole
    config's revision (the same revision on the replica that answers means the same config: the
    contact's own `revision` is its deployment's, which stays while others change), then the
    numbers as Python writes them (repr), so Lua reads the same doubles Python would pass."""
    numbers = (
        reward.window_seconds,
        reward.default_reward,
        policy.half_life_seconds,
        policy.window_seconds,
        policy.count_cap,
        policy.half_life_impressions,
        float(policy.change_detection),
    )
    return (
        f"{FACTS_FORMAT}|{config_revision}|"
        + "|".join(repr(float(number)) for number in numbers)
        + "|"
        + statistics_key
    )


@dataclass(frozen=True)
class Respond:
    """A Respond as the script takes it: what the request sent, checked, and what the replica adds."""

    revision: int  # of the whole config this replica serves
    uuid: str
    now: float
    event_time: float
    reward: float | None
    channel: str
    replica: str
    accepted: Sequence[str]  # as sent: ids or names

    def queue(self, pipeline: Any, contact_key: str, latency_ms: float) -> None:
        """Queue the script; `latency_ms`, the request's time so far, goes into its log entry."""
        args: list[Any] = [
            str(self.revision),
            self.uuid,
            repr(float(self.now)),
            repr(float(self.event_time)),
            "" if self.reward is None else repr(float(self.reward)),
            self.channel,
            self.replica,
            repr(round(latency_ms, 3)),
            str(decision_log.SCHEMA_VERSION),
            DECISION_LOG_MAX_LENGTH,
            redis_keys.ARM_UPDATES_CHANNEL,
            *self.accepted,
        ]
        queue_script(pipeline, RESPOND, [contact_key, redis_keys.DECISION_STREAM], args)


@dataclass(frozen=True)
class Answered:
    """What the script did when it answered the contact."""

    learned: bool
    late: bool
    duplicate: bool
    deployment: str
    statistics_key: str
    accepted: list[str]
    fresh: list[str]


def read_answered(reply: Sequence[Any]) -> Answered:
    """The script's reply [2, ...] (see the module's docstring)."""
    texts = [_text(value) for value in reply[4:]]
    count = int(reply[6])
    return Answered(
        learned=bool(int(reply[1])),
        late=bool(int(reply[2])),
        duplicate=bool(int(reply[3])),
        deployment=texts[0],
        statistics_key=texts[1],
        accepted=texts[3 : 3 + count],
        fresh=texts[3 + count :],
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
