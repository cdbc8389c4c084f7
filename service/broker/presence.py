"""Group presence in Redis: the keys, and the Redis Functions library that writes and reads them.

For a group G (channel `g:{G}`), all under the group's hash tag and so in one cluster slot:

    <prefix>:pc:{G}   a sorted set: connection id -> the time (Redis ms) its entry expires
    <prefix>:pi:{G}   a hash: connection id -> "<claims JSON>\\n<user>" (user "" for no token `sub`;
                      compact JSON has no newline, so the first one ends the claims, whatever the user)
    <prefix>:pu:{G}   a hash: user -> how many of the group's connections are theirs
    <prefix>:pn:{G}   a hash: user -> the allow-listed claims of their latest connection (JSON)
    <prefix>:pa:{G}   a set: users whose join was announced and whose leave was not yet (events)
    <prefix>:pl:{G}   a sorted set: user -> when their leave is due (a user back before then: none)

`relay_presence_update_v1` is one atomic step per group and batch of changes from one pod: it first
drops every entry whose expiry passed (a crashed pod's connections, at most the TTL late) and
announces the leaves that are due, then removes the batch's leaving connections, adds its joining
ones and pushes back the expiry of the ones it refreshes; it answers the ids it was asked to refresh
that Redis does not hold (lost in an outage, or to a Redis restarted empty), which the pod adds
again. `relay_presence_read_v1` cleans up the same way and answers the counts (ZCARD and HLEN, O(1)
after the cleanup) and, if asked, up to `limit` users. Times come from Redis's own clock (TIME), so
the pods' clocks do not matter. Every key's expiry is pushed back on each update: a group nobody
refreshes any more vanishes whole.

Join and leave events are at the user level: a join when a user's first connection arrives and the
user was not announced already; a leave `grace` after their last connection went, if none came back
meanwhile. They are published on the group's channel as `E <sent_at>\\n<frame>` (service/broker/
wire.py), where `frame` is the v1 frame members receive (docs/presence.md).

A library of its own beside relay_v1 (service/broker/history.py), so that loading it never replaces
the history functions a pod of an earlier version loaded, and the other way round, during a rollout.
"""

from __future__ import annotations

from typing import Any

from service.broker import Member, Present

UPDATE = b"relay_presence_update_v1"
READ = b"relay_presence_read_v1"
KEYS = (b"pc:", b"pi:", b"pu:", b"pn:", b"pa:", b"pl:")

LIBRARY = b"""#!lua name=relay_presence_v1

-- KEYS: conns, info, users, claims, announced, leaving (see service/broker/presence.py).
-- ARGV (both functions): group name, channel, publish command (PUBLISH or SPUBLISH), sent_at,
-- ttl (ms), grace (ms), events ("1" or "0"), then each function's own.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function announce(k, a, kind, user, claims)
  local frame = '{"group":"' .. a[1] .. '","presence":{"event":"' .. kind .. '","user":' .. cjson.encode(user)
  if claims then frame = frame .. ',"claims":' .. claims end
  redis.call(a[3], a[2], 'E ' .. a[4] .. '\\n' .. frame .. '}}')
end

-- One connection out; `due` is when its user's leave may be announced if it was their last.
local function drop(k, a, id, due)
  local info = redis.call('HGET', k[2], id)
  redis.call('ZREM', k[1], id)
  if not info then return end
  redis.call('HDEL', k[2], id)
  local user = string.sub(info, string.find(info, '\\n', 1, true) + 1)
  if user ~= '' and redis.call('HINCRBY', k[3], user, -1) <= 0 then
    redis.call('HDEL', k[3], user)
    redis.call('HDEL', k[4], user)
    if a[7] == '1' then redis.call('ZADD', k[6], due, user) end
  end
end

-- Expired connections out (their leave is due at once: they have been gone for the TTL), then the
-- leaves whose grace has passed announced, for users who did not come back.
local function clean(k, a, now)
  for _, id in ipairs(redis.call('ZRANGE', k[1], '-inf', now, 'BYSCORE')) do drop(k, a, id, now) end
  for _, user in ipairs(redis.call('ZRANGE', k[6], '-inf', now, 'BYSCORE')) do
    redis.call('ZREM', k[6], user)
    if redis.call('SREM', k[5], user) == 1 then  -- a user back in time is no longer in `leaving`
      announce(k, a, 'leave', user, nil)
    end
  end
end

-- ARGV after the common 7: joins (n), leaves (n), then n joins as (id, user, claims), the leaving
-- ids, and the ids to refresh. Returns the ids to refresh that were not there.
local function update(k, a)
  local now = now_ms()
  clean(k, a, now)
  local joins, leaves = tonumber(a[8]), tonumber(a[9])
  local at = 10
  local expires = string.format('%d', now + tonumber(a[5]))
  for i = at + 3 * joins, at + 3 * joins + leaves - 1 do
    drop(k, a, a[i], string.format('%d', now + tonumber(a[6])))
  end
  for i = at, at + 3 * joins - 1, 3 do
    local id, user, claims = a[i], a[i + 1], a[i + 2]
    if redis.call('ZADD', k[1], expires, id) == 1 then
      redis.call('HSET', k[2], id, claims .. '\\n' .. user)
      if user ~= '' then
        redis.call('HSET', k[4], user, claims)
        if redis.call('HINCRBY', k[3], user, 1) == 1 and a[7] == '1' then
          redis.call('ZREM', k[6], user)
          if redis.call('SADD', k[5], user) == 1 then announce(k, a, 'join', user, claims) end
        end
      end
    end
  end
  local missing = {}
  for i = at + 3 * joins + leaves, #a do
    if redis.call('ZADD', k[1], 'XX', 'CH', expires, a[i]) == 0 and not redis.call('ZSCORE', k[1], a[i]) then
      missing[#missing + 1] = a[i]
    end
  end
  local keep = tonumber(a[5]) + tonumber(a[6]) + 1000
  for i = 1, 6 do redis.call('PEXPIRE', k[i], keep) end
  return missing
end

-- ARGV after the common 7: how many users to list (0: counts only). Returns {connections, users,
-- {user, connections, claims, ...}}.
local function read(k, a)
  clean(k, a, now_ms())
  local limit = tonumber(a[8])
  local listed = {}
  if limit > 0 then
    local cursor, n = '0', 0
    repeat
      local page = redis.call('HSCAN', k[3], cursor, 'COUNT', math.min(limit, 1000))
      cursor = page[1]
      for i = 1, #page[2], 2 do
        if n < limit then
          local user = page[2][i]
          listed[#listed + 1] = user
          listed[#listed + 1] = page[2][i + 1]
          listed[#listed + 1] = redis.call('HGET', k[4], user) or '{}'
          n = n + 1
        end
      end
    until cursor == '0' or n >= limit
  end
  return {redis.call('ZCARD', k[1]), redis.call('HLEN', k[3]), listed}
end

redis.register_function('relay_presence_update_v1', function(keys, args) return update(keys, args) end)
redis.register_function('relay_presence_read_v1', function(keys, args) return read(keys, args) end)
"""


def keys(prefix: bytes, channel: str) -> list[bytes]:
    """The six presence keys of group channel `g:{G}`."""
    tag = channel[2:].encode()  # "{G}": the hash tag the channel carries too
    return [prefix + kind + tag for kind in KEYS]


def parse_read(reply: Any, limit: int) -> Present:
    """`relay_presence_read_v1`'s reply as a Present, members sorted by user."""
    connections, users, flat = reply
    members = [
        Member(flat[i].decode(), int(flat[i + 1]), flat[i + 2].decode()) for i in range(0, len(flat), 3)
    ]
    members.sort(key=lambda m: m.user)
    return Present(int(connections), int(users), members, limit > 0 and int(users) > len(members))
