"""Gap fill: a pod delivers each history group's messages in offset order, once, without holes.

Every message of a group that keeps history carries its position (epoch, offset). The sequencer
remembers, per group with local members, the last offset this pod delivered. The next one is
delivered; one already delivered (a retried publish, an overlap with a fill) is dropped; a jump means
this pod missed something (its link to Redis dropped, Redis was paused): the live messages are held
back while the missing range is read from history and delivered first, in order. Whatever history
no longer holds is counted as lost, and only that. After the link comes back (RESYNC) every group
reads what was published meanwhile, even if nothing new arrives to show the gap.

hub -> Sequencer.accept -> (in order) fan_out; fills run as tasks, one per group at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from service import metrics
from service.broker import Broker, BrokerUnavailable, Envelope

log = structlog.get_logger("relay.sequencer")

FanOut = Callable[[Envelope], None]


class _Stream:
    """This pod's place in one group: the position last delivered, and messages held during a fill."""

    __slots__ = ("epoch", "filling", "held", "limit", "offset")

    def __init__(self, limit: int) -> None:
        self.epoch: str | None = None  # None until the first message since the pod subscribed
        self.offset = 0
        self.limit = limit  # the group's history size: no fill reads further back
        self.filling: asyncio.Task[None] | None = None
        self.held: list[Envelope] = []


class Sequencer:
    """Per-group ordering for the hub's groups that keep history."""

    def __init__(self, broker: Broker, fan_out: FanOut) -> None:
        self._broker = broker
        self._fan_out = fan_out
        self._streams: dict[str, _Stream] = {}

    def track(self, channel: str, limit: int) -> None:
        """Start keeping order for `channel` (its first local member joined)."""
        self._streams.setdefault(channel, _Stream(limit))

    def forget(self, channel: str) -> None:
        """Its last local member left: a fill under way delivers to nobody and ends."""
        stream = self._streams.pop(channel, None)
        if stream is not None and stream.filling is not None:
            stream.filling.cancel()

    def tracks(self, channel: str) -> bool:
        return channel in self._streams

    def begin(self, channel: str, epoch: str, offset: int) -> None:
        """Where the group stood when the pod subscribed (a join's read of its history): the first
        message after it may already be missing, and a resync must know where to read from.
        Ignored once the pod has seen a message of the group."""
        stream = self._streams.get(channel)
        if stream is not None and stream.epoch is None and epoch:
            stream.epoch, stream.offset = epoch, offset

    def accept(self, envelope: Envelope) -> None:
        """Deliver `envelope` in its place: now, after a fill, or not at all (a duplicate)."""
        stream = self._streams.get(envelope.channel)
        if stream is None:
            self._fan_out(envelope)
            return
        if stream.filling is not None:
            stream.held.append(envelope)
            return
        if stream.epoch != envelope.epoch:
            if stream.epoch is not None:  # the group's history was lost (expired, Redis emptied)
                metrics.EPOCH_CHANGES.inc()
                log.warning("sequencer.epoch_changed", channel_kind="group", offset=envelope.offset)
            stream.epoch, stream.offset = envelope.epoch, envelope.offset
            self._fan_out(envelope)
            return
        if envelope.offset <= stream.offset:
            metrics.DUPLICATES_DROPPED.inc()
            return
        if envelope.offset > stream.offset + 1:
            stream.held.append(envelope)
            stream.filling = self._spawn(envelope.channel, stream, envelope.offset - 1)
            return
        stream.offset = envelope.offset
        self._fan_out(envelope)

    def resync(self) -> None:
        """The link to the bus came back: read what every group may have published meanwhile."""
        for channel, stream in self._streams.items():
            if stream.filling is None and stream.epoch is not None:
                stream.filling = self._spawn(channel, stream, None)

    def stop(self) -> None:
        for stream in self._streams.values():
            if stream.filling is not None:
                stream.filling.cancel()

    def _spawn(self, channel: str, stream: _Stream, upto: int | None) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(
            self._fill(channel, stream, upto), name="sequencer.fill"
        )

    async def _fill(self, channel: str, stream: _Stream, upto: int | None) -> None:
        """Deliver offsets after stream.offset (up to `upto`, or all there are) from history."""
        epoch = stream.epoch
        wanted = stream.limit if upto is None else min(upto - stream.offset, stream.limit)
        try:
            metrics.HISTORY_READS.labels("gap" if upto is not None else "resync").inc()
            history = await self._broker.history(channel, stream.offset, max(wanted, 1))
            if history.epoch == epoch:
                for offset, frame in history.entries:
                    if upto is not None and offset > upto:
                        break
                    self._lost(stream, offset - stream.offset - 1)  # older than history reaches
                    stream.offset = offset
                    metrics.GAP_MESSAGES.labels("filled").inc()
                    self._fan_out(Envelope(channel, frame, 0.0, epoch=history.epoch, offset=offset))
            elif history.epoch:
                metrics.EPOCH_CHANGES.inc()  # the live messages held, or the next one, restart the count
        except BrokerUnavailable:
            log.warning("sequencer.fill_failed", missing=(upto or stream.offset) - stream.offset)
        finally:
            if upto is not None and stream.offset < upto:
                self._lost(stream, upto - stream.offset)
                stream.offset = upto
            stream.filling = None
            held, stream.held = stream.held, []
            if self._streams.get(channel) is stream:
                for index, envelope in enumerate(held):
                    if stream.filling is not None:  # another gap: hold the rest behind its fill
                        stream.held.extend(held[index:])
                        break
                    self.accept(envelope)

    @staticmethod
    def _lost(stream: _Stream, count: int) -> None:
        if count > 0:
            metrics.GAP_MESSAGES.labels("lost").inc(count)
            log.warning("sequencer.messages_lost", count=count, after=stream.offset)
