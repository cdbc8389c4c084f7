"""Locust load test for relay (or anything speaking the seed protocol).

    .venv-load/bin/locust -f loadtest/locustfile.py --headless --host ws://127.0.0.1:8000 \
        --load-profile steady --summary-json /tmp/steady.json [--processes 2]

Subscribers (websocket-client under gevent) join groups of a profile's sizes; publishers send at a
fixed open-loop rate; every message carries publisher id, sequence and send time, and receivers
keep exact latency percentiles (loadtest.stats.Histogram: Locust rounds to milliseconds) and count
loss, duplicates and order violations. Workers ship cumulative snapshots to the master with their
stats reports; the master merges them, writes the JSON summary, and exits non-zero when the
profile's SLO is broken or the load generator itself was saturated (the run is then invalid).

Profiles set the users (subscribers + publishers: `-u` must match, or the run is refused with the
numbers; change `--subscribers` instead), the spawn rate (`-r` overrides it) and the run time (`-t`
overrides it); any `--slo-*` flag overrides the profile's bound. The host is read when each run
starts, so the one typed in the web UI is used (http:// and https:// are taken as ws:// and wss://),
and every run in the same UI starts from fresh measurements. Several pods:
`--extra-hosts ws://127.0.0.1:8002,ws://...` (connections go round-robin).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import gevent
import websocket
from locust import User, constant, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loadtest.stats import (
    DUPLICATE,
    IN_ORDER,
    LATE,
    LATE_SEND,
    SATURATED_LAG_MS,
    Health,
    Histogram,
    Ledger,
    Slo,
    summarize,
)

log = logging.getLogger("relay-load")


@dataclass
class Profile:
    subscribers: int
    groups: list[float]  # relative group sizes (subscribers are spread by these weights)
    publishers: int
    rate: float  # publishes per second, all publishers together
    warmup: float  # seconds from the start before publishers start (everyone connected)
    publish: float  # seconds of publishing
    drain: float  # seconds after publishing before the run ends
    spawn_rate: float = 200.0
    lifetime: tuple[float, float] | None = None  # storm: a subscriber reconnects after U(a, b) s
    kill_at: float | None = None  # pod-kill: run --kill-command this many seconds in
    payload: int = 0
    slo: Slo = field(default_factory=Slo)

    @property
    def run_time(self) -> float:
        return self.warmup + self.publish + self.drain


def _skewed(groups: int, large: float = 0.5, s: float = 1.1) -> list[float]:
    zipf = [1 / (i + 1) ** s for i in range(groups - 1)]
    total = sum(zipf)
    return [large, *((1 - large) * z / total for z in zipf)]


PROFILES: dict[str, Profile] = {
    # CI: a collapse detector, not a benchmark.
    "smoke": Profile(
        20,
        [1.0] * 4,
        2,
        20,
        warmup=3,
        publish=6,
        drain=4,
        spawn_rate=50,
        slo=Slo(
            p99_ms=500, max_loss_ratio=0, max_duplicates=0, max_order_violations=0, max_connect_error_ratio=0
        ),
    ),
    "steady": Profile(
        1000,
        [1.0] * 100,
        10,
        200,
        warmup=15,
        publish=60,
        drain=5,
        spawn_rate=200,
        slo=Slo(p99_ms=100, max_loss_ratio=0, max_duplicates=0, max_order_violations=0),
    ),
    "large-group": Profile(
        1000,
        [1.0],
        4,
        20,
        warmup=15,
        publish=60,
        drain=5,
        spawn_rate=200,
        slo=Slo(p99_ms=100, max_loss_ratio=0, max_duplicates=0, max_order_violations=0),
    ),
    "skewed": Profile(
        1000,
        _skewed(50),
        10,
        100,
        warmup=15,
        publish=60,
        drain=5,
        spawn_rate=200,
        slo=Slo(p99_ms=100, max_loss_ratio=0, max_duplicates=0, max_order_violations=0),
    ),
    "storm": Profile(
        500,
        [1.0] * 50,
        2,
        50,
        warmup=5,
        publish=40,
        drain=5,
        spawn_rate=500,
        lifetime=(1.0, 4.0),
        slo=Slo(p99_ms=250, max_duplicates=0, max_order_violations=0, max_connect_error_ratio=0.01),
    ),
    "soak": Profile(
        200,
        [1.0] * 20,
        4,
        50,
        warmup=10,
        publish=1800,
        drain=5,
        spawn_rate=100,
        slo=Slo(p99_ms=100, p999_ms=500, max_loss_ratio=0, max_duplicates=0, max_order_violations=0),
    ),
    "pod-kill": Profile(
        200,
        [1.0] * 20,
        4,
        50,
        warmup=10,
        publish=40,
        drain=5,
        spawn_rate=100,
        kill_at=25,
        # On loopback there is no Service to drop the dead pod: each of its clients' first reconnect
        # has even odds of hitting it and being refused once (then the host is skipped for 5 s), so
        # about a quarter of all connects fail; what must hold is order, no duplicates, and reconnects.
        slo=Slo(max_duplicates=0, max_order_violations=0, max_connect_error_ratio=0.25),
    ),
}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--load-profile", choices=sorted(PROFILES), default="smoke", help="load profile")
    parser.add_argument("--extra-hosts", default="", help="more ws:// pods, comma-separated")
    parser.add_argument("--summary-json", default="", help="write the merged JSON summary here")
    parser.add_argument("--publish-seconds", type=float, default=0.0, help="override the profile's")
    parser.add_argument("--publish-rate", type=float, default=0.0, help="override the profile's")
    parser.add_argument("--subscribers", type=int, default=0, help="override the profile's")
    parser.add_argument("--kill-command", default="", help="pod-kill: the command that kills one pod")
    parser.add_argument("--slo-p99-ms", type=float, default=None, help="override the profile's p99 bound")
    parser.add_argument("--slo-max-loss", type=float, default=None, help="override the profile's loss bound")
    parser.add_argument(
        "--no-locust-deliveries",
        dest="locust_deliveries",
        action="store_false",
        help="do not report each delivery to Locust's stats (saves generator CPU at high rates)",
    )


HOST_DOWN_SECONDS = 5.0


class State:
    """This process's measurements (a worker's, or the whole run's in local mode)."""

    def __init__(self) -> None:
        self.snapshots: dict[str, dict[str, Any]] = {}  # master: worker id -> latest snapshot
        self.counter = itertools.count()
        self.lag_ticker: Any = None
        self.reset()

    def reset(self) -> None:
        """Fresh measurements for a run: the first, or another one started from the web UI."""
        self.profile: Profile = PROFILES["smoke"]
        self.name = "smoke"
        self.spawn_rate = self.profile.spawn_rate
        self.hosts: list[str] = []
        self.host_cycle: Any = None
        if self.lag_ticker is not None:
            self.lag_ticker.kill(block=False)
        self.lag_ticker = None
        self.histogram = Histogram()
        self.reconnect = Histogram()  # pod-kill/storm: from a socket's loss to its next welcome
        self.ledger = Ledger()
        self.connections: dict[str, Any] = {"ok": 0, "errors": 0, "error_kinds": {}, "close_codes": {}}
        self.health = Health()
        self.start_wall = 0.0
        self.cpu0 = 0.0
        self.deliveries_to_locust = False
        self.snapshots.clear()
        # Set when the run stops. websocket-client's close() swallows every exception with a bare
        # `except:`, Locust's GreenletExit included, so a user killed inside close() would live on and
        # reconnect: the loops check this flag instead of relying on the kill alone.
        self.stopping = False
        self.down: dict[str, float] = {}  # host -> until when it counts as down

    def next_host(self) -> str:
        """The next host round-robin, skipping one that refused a connection in the last few
        seconds, as a Service drops a dead pod's endpoint (pod-kill on loopback has no Service)."""
        if not self.hosts:
            raise StopUser()  # the run is being refused (_start): nothing to connect to
        now = time.time()
        for _ in range(len(self.hosts)):
            host = str(next(self.host_cycle))
            if self.down.get(host, 0.0) <= now:
                return host
        return host

    def count(self, kind: str, key: str) -> None:
        bucket = self.connections[kind]
        bucket[key] = bucket.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        self.health.cpu_seconds = time.process_time() - self.cpu0
        self.health.wall_seconds = time.time() - self.start_wall if self.start_wall else 0.0
        return {
            "histogram": self.histogram.to_dict(),
            "reconnect": self.reconnect.to_dict(),
            "ledger": self.ledger.to_dict(),
            "connections": self.connections,
            "health": self.health.to_dict(),
        }


STATE = State()


def _hosts(environment: Environment) -> list[str]:
    """The pods to connect to: the host (--host, or the web UI's field) and --extra-hosts."""
    given = [environment.host or "", *environment.parsed_options.extra_hosts.split(",")]
    hosts = []
    for host in (h.strip() for h in given):
        for http, ws in (("http://", "ws://"), ("https://", "wss://")):
            if host.startswith(http):
                host = ws + host[len(http) :]
        if host:
            hosts.append(host)
    return hosts


def _users(p: Profile) -> int:
    return p.subscribers + p.publishers


def _profile(env: Environment) -> Profile:
    o = env.parsed_options
    p = PROFILES[o.load_profile]
    if o.publish_seconds:
        p = replace(p, publish=o.publish_seconds)
    if o.publish_rate:
        p = replace(p, rate=o.publish_rate)
    if o.subscribers:
        p = replace(p, subscribers=o.subscribers)
    slo = p.slo
    if o.slo_p99_ms is not None:
        slo = replace(slo, p99_ms=o.slo_p99_ms)
    if o.slo_max_loss is not None:
        slo = replace(slo, max_loss_ratio=o.slo_max_loss)
    return replace(p, slo=slo)


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    o = environment.parsed_options
    if o is None:
        return
    p = _profile(environment)
    if o.num_users is not None and o.num_users != _users(p):
        log.error(_wrong_users(o.load_profile, p, o.num_users))
        sys.exit(2)
    o.num_users = _users(p)  # what the web UI's form shows
    if o.spawn_rate is None:
        o.spawn_rate = p.spawn_rate
    if not o.run_time:
        o.run_time = int(p.run_time + p.subscribers / o.spawn_rate + 1)
    runner = environment.runner
    if isinstance(runner, MasterRunner):

        def on_report(client_id: str, data: dict[str, Any]) -> None:
            if "relay" in data:
                STATE.snapshots[client_id] = data["relay"]

        events.worker_report.add_listener(on_report)
    elif isinstance(runner, WorkerRunner):

        def to_master(client_id: str, data: dict[str, Any]) -> None:
            data["relay"] = STATE.snapshot()

        events.report_to_master.add_listener(to_master)


def _wrong_users(name: str, p: Profile, users: int) -> str:
    return (
        f"the {name} profile runs {_users(p)} users ({p.subscribers} subscribers and {p.publishers} "
        f"publishers), not {users}: leave the number of users at {_users(p)} (or leave out -u), "
        "and change the subscribers with --subscribers or pick another --load-profile"
    )


def _refuse(environment: Environment, why: str) -> None:
    """Stop this run before it connects anything, saying why (in the log and the web UI's log)."""
    log.error("relay load test refused: %s", why)
    STATE.hosts = []
    environment.process_exit_code = 2
    runner = environment.runner
    if runner is not None and not isinstance(runner, WorkerRunner):
        gevent.spawn(runner.quit if environment.parsed_options.headless else runner.stop)


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    """A new run (the first, or another from the web UI): fresh measurements, and the profile, host,
    users and spawn rate as given for this run."""
    o = environment.parsed_options
    STATE.reset()
    p = STATE.profile = _profile(environment)
    STATE.name = o.load_profile
    STATE.deliveries_to_locust = o.locust_deliveries
    STATE.spawn_rate = o.spawn_rate or p.spawn_rate
    Subscriber.fixed_count = p.subscribers
    Publisher.fixed_count = p.publishers
    STATE.hosts = _hosts(environment)
    STATE.host_cycle = itertools.cycle(STATE.hosts)
    runner = environment.runner
    if not STATE.hosts:
        return _refuse(
            environment, "no host: give --host ws://<pod>:8000, or type it in the web UI's Host field"
        )
    wrong = [h for h in STATE.hosts if not h.startswith(("ws://", "wss://"))]
    if wrong:
        return _refuse(environment, f"hosts must be ws:// or wss:// URLs of relay pods, not {wrong}")
    users = getattr(runner, "target_user_count", None)
    if not isinstance(runner, WorkerRunner) and users is not None and users != _users(p):
        return _refuse(environment, _wrong_users(STATE.name, p, users))
    STATE.start_wall = time.time()
    STATE.cpu0 = time.process_time()
    if not isinstance(runner, MasterRunner):
        STATE.lag_ticker = gevent.spawn(_lag_ticker, environment)
    cmd = o.kill_command
    if p.kill_at is not None and cmd and not isinstance(runner, WorkerRunner):

        def kill() -> None:
            log.warning("pod-kill: running %s", cmd)
            subprocess.run(shlex.split(cmd), check=False)

        gevent.spawn_later(p.kill_at + p.subscribers / STATE.spawn_rate, kill)
    return None


def _lag_ticker(env: Environment, interval: float = 0.01, every: float = 1.0) -> None:
    """How late the gevent hub wakes a sleeping greenlet: the generator's event-loop lag. Each
    second's worst goes to Locust as "generator lag", a failure when it means saturation."""
    worst, report_at = 0.0, time.perf_counter() + every
    while True:
        due = time.perf_counter() + interval
        gevent.sleep(interval)
        now = time.perf_counter()
        lag = max(0.0, now - due)
        STATE.health.lag.record(lag)
        worst = max(worst, lag)
        if now >= report_at:
            saturated = worst * 1000 > SATURATED_LAG_MS
            _event(
                env,
                "GEN",
                "generator lag (worst per second)",
                worst,
                GeneratorSaturated() if saturated else None,
            )
            worst, report_at = 0.0, now + every


class GeneratorSaturated(Exception):
    def __str__(self) -> str:
        return f"the load generator woke over {SATURATED_LAG_MS:.0f} ms late: the run is invalid"


class Duplicate(Exception):
    def __str__(self) -> str:
        return "a message arrived twice"


class OutOfOrder(Exception):
    def __str__(self) -> str:
        return "a message arrived after a later one of its publisher"


class Gap(Exception):
    def __str__(self) -> str:
        return "messages skipped (missing until they arrive late; counted lost at the end if they never do)"


class Lost(Exception):
    def __str__(self) -> str:
        return "a message never reached a member (counted when the run ends)"


class LateSend(Exception):
    def __str__(self) -> str:
        return f"a publish left over {LATE_SEND * 1000:.0f} ms behind its open-loop schedule"


def _event(env: Environment, kind: str, name: str, seconds: float, exc: Exception | None = None) -> None:
    env.events.request.fire(
        request_type=kind,
        name=name,
        response_time=seconds * 1000,
        response_length=0,
        exception=exc,
        context={},
    )


@events.test_stopping.add_listener
def _stopping(**_: Any) -> None:
    STATE.stopping = True


@events.quitting.add_listener
def _quit(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner) or not STATE.start_wall:  # a worker, or no run ever started
        return
    parts = list(STATE.snapshots.values()) if isinstance(runner, MasterRunner) else [STATE.snapshot()]
    histogram, reconnect = Histogram(), Histogram()
    connections: dict[str, Any] = {"ok": 0, "errors": 0, "error_kinds": {}, "close_codes": {}}
    for part in parts:
        histogram.merge(Histogram.from_dict(part["histogram"]))
        reconnect.merge(Histogram.from_dict(part["reconnect"]))
        c = part["connections"]
        connections["ok"] += c["ok"]
        connections["errors"] += c["errors"]
        for kind in ("error_kinds", "close_codes"):
            for k, v in c[kind].items():
                connections[kind][k] = connections[kind].get(k, 0) + v
    p = STATE.profile
    summary = summarize(
        histogram=histogram,
        ledger=Ledger.merged(part["ledger"] for part in parts),
        connections=connections,
        generators=[part["health"] for part in parts],
        seconds=p.publish,
        slo=p.slo,
        profile=STATE.name,
        grace=p.drain * 0.8,
    )
    summary["workers_reporting"] = len(parts)
    summary["reconnect"] = reconnect.summary()
    summary["hosts"] = STATE.hosts
    path = environment.parsed_options.summary_json
    text = json.dumps(summary, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    lat, acc = summary["latency"], summary["accounting"]
    for _ in range(min(acc["lost"], MAX_LOST_EVENTS)):  # into Locust's final stats and CSV
        _event(environment, "WS", "lost", 0.0, Lost())
    log.warning(
        "relay summary: %d deliveries (%.0f/s) p50 %.2f p99 %.2f p99.9 %.2f max %.2f ms; "
        "lost %d of %d, %d duplicates, %d out of order; connects %d ok %d failed",
        summary["deliveries"],
        summary["delivered_per_s"],
        lat["p50_ms"],
        lat["p99_ms"],
        lat["p999_ms"],
        lat["max_ms"],
        acc["lost"],
        acc["expected"],
        acc["duplicates"],
        acc["order_violations"],
        connections["ok"],
        connections["errors"],
    )
    for why in summary["generator"]["saturated"]:
        log.error("RUN INVALID: the load generator was saturated: %s", why)
    for why in summary["slo_violations"]:
        log.error("SLO broken: %s", why)
    if not summary["ok"]:
        environment.process_exit_code = 1


def _fire(env: Environment, name: str, started: float, exc: Exception | None = None) -> None:
    env.events.request.fire(
        request_type="WS",
        name=name,
        response_time=(time.perf_counter() - started) * 1000,
        response_length=0,
        exception=exc,
        context={},
    )


def _connect(user: User, path: str) -> tuple[websocket.WebSocket, str]:
    """Open a socket to the next host and read the welcome frame; counted either way."""
    host = STATE.next_host()
    started = time.perf_counter()
    try:
        ws = websocket.create_connection(host.rstrip("/") + path, timeout=30, enable_multithread=False)
        welcome = json.loads(ws.recv())
        channel = welcome["message"]["channel_id"]
    except Exception as exc:
        if isinstance(exc, ConnectionRefusedError):
            STATE.down[host] = time.time() + HOST_DOWN_SECONDS
        STATE.connections["errors"] += 1
        STATE.count("error_kinds", type(exc).__name__)
        _fire(user.environment, "connect", started, exc)
        raise
    STATE.connections["ok"] += 1
    _fire(user.environment, "connect", started)
    return ws, channel


class Subscriber(User):
    """A member of one group, chosen by the profile's group weights; records every delivery."""

    wait_time = constant(0)
    fixed_count = 1

    def on_start(self) -> None:
        p = STATE.profile
        rng = random.Random()
        self.lt_group = "lt-" + str(rng.choices(range(len(p.groups)), p.groups)[0])
        self.rid = uuid.uuid4().hex[:12]

    @task
    def listen(self) -> None:
        p = STATE.profile
        lost_at: float | None = None
        backoff = 0.1
        while True:
            if STATE.stopping:
                raise StopUser()
            try:
                ws, _ = _connect(self, "/" + self.lt_group)
            except Exception:
                lost_at = lost_at or time.perf_counter()
                gevent.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            if lost_at is not None:
                STATE.reconnect.record(time.perf_counter() - lost_at)
                lost_at = None
            receiver = STATE.ledger.receiver(f"{self.rid}-{next(STATE.counter)}", self.lt_group, time.time())
            until = time.time() + rng_lifetime(p) if p.lifetime else None
            code = self._receive(ws, receiver, until)
            receiver.left = time.time()
            if STATE.stopping:
                raise StopUser()
            if code is None:  # our own lifetime ended: a planned disconnect, reconnect at once
                continue
            STATE.count("close_codes", str(code))
            lost_at = time.perf_counter()

    def _receive(self, ws: websocket.WebSocket, receiver: Any, until: float | None) -> int | None:
        env, histogram, to_locust = self.environment, STATE.histogram, STATE.deliveries_to_locust
        if until is not None:
            ws.settimeout(max(0.01, until - time.time()))
        try:
            while True:
                try:
                    op, fr = ws.recv_data_frame(True)
                except websocket.WebSocketTimeoutException:
                    if until is not None and time.time() >= until:
                        ws.close()
                        return None
                    continue
                if op == websocket.ABNF.OPCODE_CLOSE:  # the server closed the socket
                    return int.from_bytes(fr.data[:2], "big") if len(fr.data) >= 2 else 1005
                if op != websocket.ABNF.OPCODE_TEXT:
                    continue
                data = fr.data
                now = time.time()
                try:
                    m = json.loads(data)["message"]
                    latency = now - m["t"]
                    seen = receiver.see(m["p"], m["s"])
                except (KeyError, TypeError, ValueError):
                    continue
                histogram.record(latency)
                if to_locust:
                    env.events.request.fire(
                        request_type="WS",
                        name="deliver",
                        response_time=latency * 1000,
                        response_length=len(data),
                        exception=None,
                        context={},
                    )
                if seen != IN_ORDER:
                    _event(env, "WS", "delivery order", latency, SEEN[seen] if seen < 0 else Gap())
                if until is not None:
                    left = until - time.time()
                    if left <= 0:
                        ws.close()
                        return None
                    ws.settimeout(left)
        except websocket.WebSocketConnectionClosedException:
            return 1006
        except OSError:
            return 1006
        finally:
            if STATE.stopping:  # no close handshake with 1,000 sockets at once: just drop them
                ws.shutdown()
            elif until is None:
                ws.close()


MAX_LOST_EVENTS = 100_000  # beyond this the JSON summary's count is the only record
SEEN: dict[int, Exception] = {DUPLICATE: Duplicate(), LATE: OutOfOrder()}


def rng_lifetime(p: Profile) -> float:
    assert p.lifetime is not None
    return random.uniform(*p.lifetime)


class Publisher(User):
    """Sends at a fixed open-loop rate: message k leaves at start + k / rate, late or not."""

    wait_time = constant(0)
    fixed_count = 1

    @task
    def publish(self) -> None:
        p = STATE.profile
        rate = p.rate / max(1, p.publishers)
        pid = uuid.uuid4().hex[:10]
        ws, _ = _connect(self, f"/lt-pub-{pid}")
        start = STATE.start_wall + p.warmup + p.subscribers / STATE.spawn_rate
        gevent.sleep(max(0.0, start - time.time()))
        groups = [f"lt-{i}" for i in range(len(p.groups))]
        rng = random.Random()
        total = int(rate * p.publish)
        pad = "x" * p.payload
        k = 0
        while k < total and not STATE.stopping:
            due = start + k / rate
            now = time.time()
            if due > now:
                gevent.sleep(due - now)
                now = time.time()
            STATE.health.sends += 1
            if now - due > LATE_SEND:
                STATE.health.late_sends += 1
                _event(self.environment, "GEN", "publish schedule", now - due, LateSend())
            group = rng.choices(groups, p.groups)[0]
            seq = STATE.ledger.sending(pid, group, now)
            body = {"task": "send_message_to_group", "group_name": group, "p": pid, "s": seq, "t": now}
            if pad:
                body["pad"] = pad
            try:
                ws.send(json.dumps(body))
            except Exception:  # the pod went away (pod-kill): this one never left; reconnect
                STATE.ledger.unsend(pid, group)
                ws.close()
                gevent.sleep(0.2)
                try:
                    ws, _ = _connect(self, f"/lt-pub-{pid}")
                except Exception:
                    gevent.sleep(0.5)
                k = max(k, int((time.time() - start) * rate))  # what fell due while away was never sent
                continue
            k += 1
        ws.close()
        while True:  # done: idle until the run ends
            gevent.sleep(3600)
