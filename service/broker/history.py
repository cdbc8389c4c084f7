"""Group history in Redis: the keys, and the Redis Functions library that writes and reads them.

For a group G (channel `g:{G}`), all under the same hash tag and so in one cluster slot:

    <prefix>:h:{G}   a stream, entry ID `<offset>-1`, field `f` = the frame members receive
    <prefix>:m:{G}   a hash: `e` the epoch, `o` the last offset assigned
    <prefix>:i:{G}   a sorted set: idempotency key -> offset, the last max(1000, size) keys

`relay_append_v1` assigns the next offset, stores the frame in the capped stream, refreshes the
expiry of all three keys and publishes the positioned envelope (service/broker/wire.py, version 2):
one round trip, atomic. A new epoch begins whenever the hash is gone (never written, expired with
the rest, or Redis restarted empty): the stream and the idempotency keys of the old one are dropped
with it. `relay_read_v1` returns the epoch, the last offset and a range of entries.

A library (FUNCTION LOAD, Redis 7+) rather than a script each caller sends: the pods load it on every
primary whenever they connect, and other writers (the Django channel layer, relay_channels) call it
by name, so there is one copy of this code and one set of semantics. The names carry a version: a
later change gets new names, so pods of two versions can share a Redis during a rollout.
"""

from __future__ import annotations

from typing import Any

from service.broker import History

APPEND = b"relay_append_v1"
READ = b"relay_read_v1"
DEDUPE_WINDOW = 1000  # idempotency keys kept per group: max(this, size); the library says 1000 too

LIBRARY = b"""#!lua name=relay_v1

-- KEYS: stream, meta, seen. ARGV: channel, publish command (PUBLISH or SPUBLISH), frame, sent_at,
-- size, ttl (ms), a new epoch (used only if the group has none), idempotency key ("" for none).
-- Returns {epoch, offset, pods reached}; pods is -1 when the key had stored the message already.
local function append(keys, args)
  local stream, meta, seen = keys[1], keys[2], keys[3]
  local key = args[8]
  local epoch = redis.call('HGET', meta, 'e')
  if epoch and key ~= '' then
    local prior = redis.call('ZSCORE', seen, key)
    if prior then return {epoch, tonumber(prior), -1} end
  end
  if not epoch then
    epoch = args[7]
    redis.call('DEL', stream, seen)
    redis.call('HSET', meta, 'e', epoch)
  end
  local offset = string.format('%d', redis.call('HINCRBY', meta, 'o', 1))
  redis.call('XADD', stream, 'MAXLEN', args[5], offset .. '-1', 'f', args[3])
  redis.call('PEXPIRE', stream, args[6])
  redis.call('PEXPIRE', meta, args[6])
  if key ~= '' then
    redis.call('ZADD', seen, offset, key)
    redis.call('ZREMRANGEBYRANK', seen, 0, -1 - math.max(1000, tonumber(args[5])))
    redis.call('PEXPIRE', seen, args[6])
  end
  local head = '2 ' .. args[4] .. ' ' .. epoch .. ' ' .. offset .. '\\n'
  local pods = redis.call(args[2], args[1], head .. args[3])
  return {epoch, tonumber(offset), pods}
end

-- KEYS: stream, meta, seen. ARGV: the offset to read after ("" for the last entries), how many (0:
-- the position only; Redis answers COUNT 0 with nil), and, to give a group that has no history yet
-- an epoch now (offset 0), that epoch and the ttl in ms (else "" and "").
local function read(keys, args)
  local epoch = redis.call('HGET', keys[2], 'e') or ''
  if epoch == '' and args[3] ~= '' then
    epoch = args[3]
    redis.call('DEL', keys[1], keys[3])
    redis.call('HSET', keys[2], 'e', epoch, 'o', 0)
    redis.call('PEXPIRE', keys[2], args[4])
  end
  local top = tonumber(redis.call('HGET', keys[2], 'o') or '0')
  local entries = {}
  if args[1] == '' and args[2] ~= '0' then
    entries = redis.call('XREVRANGE', keys[1], '+', '-', 'COUNT', args[2])
  elseif args[2] ~= '0' then
    entries = redis.call('XRANGE', keys[1], '(' .. args[1] .. '-1', '+', 'COUNT', args[2])
  end
  return {epoch, top, entries}
end

redis.register_function('relay_append_v1', append)
redis.register_function('relay_read_v1', read)
"""


def keys(prefix: bytes, channel: str) -> tuple[bytes, bytes, bytes]:
    """The stream, hash and idempotency set of group channel `g:{G}`."""
    tag = channel[2:].encode()  # "{G}": the hash tag the channel carries too
    return prefix + b"h:" + tag, prefix + b"m:" + tag, prefix + b"i:" + tag


def parse_read(reply: Any, newest_first: bool) -> History:
    """`relay_read_v1`'s reply as a History, entries oldest first."""
    epoch, top, raw = reply
    entries = [(int(entry_id.partition(b"-")[0]), fields[1].decode()) for entry_id, fields in raw]
    if newest_first:
        entries.reverse()
    return History(epoch.decode(), int(top), entries)
