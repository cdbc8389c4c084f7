"""The cluster control channel: a server API command reaches every pod, and each one answers.

The pod that takes a request (`POST /api/disconnect`, service/server_api.py) publishes it on
`c:control`, which every pod subscribes to at start, through the broker like any channel (memory://,
Redis, Sentinel and Cluster alike). Each pod, the asker too (one path for all), carries it out on its
own connections (service/commands.py) and publishes what it did to the asker's own channel
`p:<pod_id>`. The publish tells the asker how many pods it reached (Redis counts the subscribers);
it waits for that many answers, up to the request's timeout, and says which pods answered: a pod
that is stopped, or whose link is down, is missing from the answer instead of holding it up.

    request (on c:control):   {"id": <id>, "from": <pod>, "command": <name>, "args": {...}}
    answer (on p:<asker>):    {"id": <id>, "pod": <pod>, "result": {...}}
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from service import channels, metrics
from service.broker import Broker, BrokerUnavailable, Envelope
from service.hub import Hub

log = structlog.get_logger("relay.control")

Args = dict[str, Any]
Result = dict[str, Any]
CarryOut = Callable[[str, Args], Awaitable[Result]]


@dataclass
class Gathered:
    """What the pods said: how many the command reached, and each answer by pod id."""

    reached: int = 0
    answers: dict[str, Result] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def complete(self) -> bool:
        return len(self.answers) >= self.reached

    def add(self, pod: str, result: Result) -> None:
        self.answers[pod] = result
        if self.reached and self.complete:
            self.done.set()


class Control:
    """Asks every pod to carry out a command, and carries out the commands it is asked."""

    def __init__(self, broker: Broker, hub: Hub, pod_id: str, carry_out: CarryOut) -> None:
        self._broker = broker
        self._pod_id = pod_id
        self._carry_out = carry_out
        self._asked: dict[str, Gathered] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        hub.listen(channels.CONTROL, self._on_command)
        hub.listen(channels.pod(pod_id), self._on_answer)

    async def start(self) -> None:
        """Listen on the control channel. With the broker down it is subscribed once the link is up."""
        try:
            await self._broker.subscribe(channels.CONTROL)
        except BrokerUnavailable:
            log.warning("control.channel_pending", reason="broker unavailable at start")

    async def ask(self, command: str, args: Args, timeout: float) -> Gathered:
        """Publish `command` to every pod and gather their answers for up to `timeout` seconds.
        Raises BrokerUnavailable when the command could not be published."""
        request_id = secrets.token_hex(8)
        gathered = self._asked[request_id] = Gathered()
        request = {"id": request_id, "from": self._pod_id, "command": command, "args": args}
        try:
            frame = orjson.dumps(request).decode()
            gathered.reached = await self._broker.publish(Envelope(channels.CONTROL, frame, time.time()))
            if gathered.complete:
                gathered.done.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gathered.done.wait(), timeout)
        finally:
            del self._asked[request_id]
        missing = gathered.reached - len(gathered.answers)
        if missing > 0:
            metrics.SERVER_API_UNANSWERED.inc(missing)
            answered = sorted(gathered.answers)
            log.warning("control.unanswered", command=command, reached=gathered.reached, answered=answered)
        return gathered

    def _on_command(self, envelope: Envelope) -> None:
        try:
            request = orjson.loads(envelope.frame)
            request_id, asker = str(request["id"]), str(request["from"])
            command, args = str(request["command"]), request["args"]
            if not isinstance(args, dict):
                raise TypeError("args")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("control.bad_command", head=envelope.frame[:40])
            return
        task = asyncio.get_running_loop().create_task(self._answer(request_id, asker, command, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, request_id: str, asker: str, command: str, args: Args) -> None:
        try:
            result = await self._carry_out(command, args)
        except Exception as exc:  # a bug here: say so in the answer instead of going silent
            log.exception("control.command_failed", command=command)
            result = {"error": type(exc).__name__}
        answer = {"id": request_id, "pod": self._pod_id, "result": result}
        try:
            frame = orjson.dumps(answer).decode()
            await self._broker.publish(Envelope(channels.pod(asker), frame, time.time()))
        except BrokerUnavailable:
            log.warning("control.answer_lost", command=command, asker=asker)

    def _on_answer(self, envelope: Envelope) -> None:
        try:
            answer = orjson.loads(envelope.frame)
            gathered = self._asked.get(str(answer["id"]))
            pod, result = str(answer["pod"]), answer["result"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("control.bad_answer", head=envelope.frame[:40])
            return
        if gathered is not None and isinstance(result, dict):
            gathered.add(pod, result)
