"""Group history in Redis: the keys, and the two scripts that write and read them.

For a group G (channel `g:{G}`), all under the same hash tag and so in one cluster slot:

    <prefix>:h:{G}   a stream, entry ID `<offset>-1`, field `f` = the frame members receive
    <prefix>:m:{G}   a hash: `e` the epoch, `o` the last offset assigned
    <prefix>:i:{G}   a sorted set: idempotency key -> offset, the last DEDUPE_WINDOW keys

`APPEND` assigns the next offset, stores the frame in the capped stream, refreshes the expiry of all
three keys and publishes the positioned envelope (service/broker/wire.py, version 2): one round
trip, atomic. A new epoch begins whenever the hash is gone (never written, expired with the rest,
or Redis restarted empty): the stream and the idempotency keys of the old one are dropped with it.
`READ` returns the epoch, the last offset and a range of entries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from service.broker import History

DEDUPE_WINDOW = 1000  # idempotency keys remembered per group (at least; the history size if larger)


@dataclass(frozen=True)
class Script:
    source: bytes

    @property
    def sha(self) -> bytes:
        return hashlib.sha1(self.source).hexdigest().encode()


# KEYS: stream, meta, seen. ARGV: channel, publish command, frame, sent_at, size, ttl (ms),
# a new epoch (used only if the group has none), idempotency key ("" for none), dedupe window.
APPEND = Script(
    b"""
local stream, meta, seen = KEYS[1], KEYS[2], KEYS[3]
local key = ARGV[8]
local epoch = redis.call('HGET', meta, 'e')
if epoch and key ~= '' then
  local prior = redis.call('ZSCORE', seen, key)
  if prior then return {epoch, tonumber(prior), -1} end
end
if not epoch then
  epoch = ARGV[7]
  redis.call('DEL', stream, seen)
  redis.call('HSET', meta, 'e', epoch)
end
local offset = string.format('%d', redis.call('HINCRBY', meta, 'o', 1))
redis.call('XADD', stream, 'MAXLEN', ARGV[5], offset .. '-1', 'f', ARGV[3])
redis.call('PEXPIRE', stream, ARGV[6])
redis.call('PEXPIRE', meta, ARGV[6])
if key ~= '' then
  redis.call('ZADD', seen, offset, key)
  redis.call('ZREMRANGEBYRANK', seen, 0, -1 - tonumber(ARGV[9]))
  redis.call('PEXPIRE', seen, ARGV[6])
end
local head = '2 ' .. ARGV[4] .. ' ' .. epoch .. ' ' .. offset .. '\\n'
local pods = redis.call(ARGV[2], ARGV[1], head .. ARGV[3])
return {epoch, tonumber(offset), pods}
"""
)

# KEYS: stream, meta, seen. ARGV: the offset to read after ("" for the last entries), how many (0:
# the position only; Redis answers COUNT 0 with nil), and, to give a group that has no history yet
# an epoch now (offset 0), that epoch and the ttl in ms (else "" and "").
READ = Script(
    b"""
local epoch = redis.call('HGET', KEYS[2], 'e') or ''
if epoch == '' and ARGV[3] ~= '' then
  epoch = ARGV[3]
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('HSET', KEYS[2], 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
local top = tonumber(redis.call('HGET', KEYS[2], 'o') or '0')
local entries = {}
if ARGV[1] == '' and ARGV[2] ~= '0' then
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[2])
elseif ARGV[2] ~= '0' then
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1] .. '-1', '+', 'COUNT', ARGV[2])
end
return {epoch, top, entries}
"""
)


def keys(prefix: bytes, channel: str) -> tuple[bytes, bytes, bytes]:
    """The stream, hash and idempotency set of group channel `g:{G}`."""
    tag = channel[2:].encode()  # "{G}": the hash tag the channel carries too
    return prefix + b"h:" + tag, prefix + b"m:" + tag, prefix + b"i:" + tag


def parse_read(reply: Any, newest_first: bool) -> History:
    """READ's reply as a History, entries oldest first."""
    epoch, top, raw = reply
    entries = [(int(entry_id.partition(b"-")[0]), fields[1].decode()) for entry_id, fields in raw]
    if newest_first:
        entries.reverse()
    return History(epoch.decode(), int(top), entries)
