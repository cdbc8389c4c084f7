"""The whole WebSocket handshake, fuzzed against a real pod with authentication on.

Every attempt (path, query, headers, subprotocols, tokens) must end in one of:
- 101 and the welcome frame (a valid token that allows the path's group);
- 101 and a close frame whose code is the one relay documents for that input (README close-code
  table, `CloseCode`): 1008, 4500, 4501, 4001 or 4503 here. 1011 (a bug in relay) fails the test;
- an HTTP 4xx, only for a request that is not a well-formed WebSocket handshake. Which, and why:
  400 from uvicorn's HTTP parser (httptools: "Invalid HTTP request received.") for control or
  non-ASCII bytes in the request line or control bytes in a header value; 400 from the websockets
  library for a missing or repeated Sec-WebSocket-Key, a missing or wrong Sec-WebSocket-Version,
  or a Sec-WebSocket-Protocol that is not a list of tokens.
Then no line the pod logged, at INFO or at DEBUG (where the websockets library logs raw handshakes),
may contain a token that was sent, the JWT secret, the API key or the Redis password.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from service.auth import origin_allowed, origin_of, token_from
from service.protocol import SUBPROTOCOL, CloseCode, group_from_path
from tests import tokens
from tests.helpers import (
    PodProcess,
    closed_with,
    join,
    metric,
    running_pod,
    scrape,
    start_pod_process,
    ws_url,
)

pytestmark = pytest.mark.integration

# Secrets the pod is configured with: none of them may ever reach its output.
API_KEY = "fuzz-api-key-" + base64.b32encode(os.urandom(10)).decode()
REDIS_PASSWORD = "fuzz-redis-pw-" + base64.b32encode(os.urandom(10)).decode()
ALLOWED_ORIGINS = ["https://app.example", "https://*.app.example"]

# websockets (the default RELAY_WS_IMPL's parser) reads handshake lines of up to 8 KiB and 128
# headers. Past those uvicorn never sent the 414/431 websockets prepares (service/transport.py now
# does): the fuzz keeps to lines under that, and the last test checks the answers past it.
MAX_LINE = 8000

# What relay answers for each refusal, and the label it counts it under.
COUNTED = {
    CloseCode.POLICY_VIOLATION: "origin",
    CloseCode.BAD_GROUP_NAME: "invalid_group",
    CloseCode.UNAUTHORIZED: "unauthorized",
    CloseCode.TOKEN_EXPIRED: "token_expired",
    CloseCode.FORBIDDEN: "forbidden",
}


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each as often as its weight (shrinking towards the first)."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


# -- tokens -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    value: str
    verdict: str  # "valid", "expired" or "bad"
    groups: tuple[str, ...] = ()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
b64ish = st.from_regex(r"[A-Za-z0-9_\-]{0,60}", fullmatch=True)
group_claims = st.sampled_from([("*",), ("chat", "team.*"), ("g",), ()])

valid = st.builds(
    lambda groups, sub: Token(tokens.hs256(groups=list(groups), sub=sub), "valid", groups),
    group_claims,
    st.sampled_from(["alice", "bob"]),
)
bad_tokens = st.one_of(
    st.sampled_from(sorted(set(tokens.malformed().values()))).filter(lambda t: len(t) < 4000),
    st.builds(lambda: tokens.hs256(secret="another-secret-of-thirty-two-bytes!!")),
    st.builds(tokens.unsigned),
    st.builds(tokens.rs256),
    st.builds(lambda alg: tokens.crafted({"alg": alg}), json_values),
    st.builds(
        tokens.crafted,
        st.dictionaries(
            st.sampled_from(["alg", "kid", "typ", "crit", "jku"]) | st.text(max_size=4), json_values
        ),
    ),
    st.builds(lambda a, b, c: f"{a}.{b}.{c}", b64ish, b64ish, b64ish),
    st.text(max_size=120),
    st.sampled_from([tokens.SECRET, API_KEY, REDIS_PASSWORD]),  # secrets sent as tokens stay secret
    st.integers(1000, 2500).map(lambda n: tokens.hs256(pad="x" * n)[:-3] + "AAA"),  # long, forged
).map(lambda value: Token(value, "bad"))
any_token = weighted(
    (3, valid),
    (2, st.builds(lambda: Token(tokens.hs256(exp=int(time.time()) - 60), "expired"))),
    (4, bad_tokens),
)


# -- handshakes ---------------------------------------------------------------------------------


@dataclass
class Handshake:
    target: bytes  # path and query, as on the request line
    headers: list[tuple[bytes, bytes]]
    well_formed: bool
    tokens: list[Token] = field(default_factory=list)  # credentials sent: the log scan looks for them


TOKEN_CHARS = r"[A-Za-z0-9_.!#$%&'*+^`|~-]"  # RFC 9110 token characters (subprotocol names)
URL_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "#?%")
paths = weighted(
    (6, st.sampled_from(["/g", "/chat", "/team.red", "/a/b", "/g%2Fh", "/%67"])),
    (1, st.sampled_from(["/", "//", "/g/", "/..", "/%", "*", "/g?", "/a%20b"])),
    (1, st.text(max_size=40).map(lambda t: "/" + quote(t, safe="/"))),  # unicode, percent-encoded
    (1, st.text(alphabet=URL_SAFE, max_size=40).map(lambda t: "/" + t)),
    (1, st.integers(100, 3000).map(lambda n: "/" + "p" * n)),  # very long
).map(lambda p: (p.encode(), True))
malformed_paths = (
    st.text(min_size=1, max_size=20)
    .map(lambda t: (("/" + t).encode(), False))
    .filter(
        lambda p: any(b < 0x21 or b > 0x7E for b in p[0])  # control, space or non-ASCII bytes
    )
)


@st.composite
def handshakes(draw: st.DrawFn) -> Handshake:
    path, well_formed = draw(weighted((9, paths), (1, malformed_paths)))
    shake = Handshake(path, [], well_formed)

    def token() -> Token:
        t: Token = draw(any_token)
        shake.tokens.append(t)
        return t

    query_parts = draw(
        st.lists(
            st.sampled_from(
                ["token"] * 4 + ["raw token", "TOKEN", "%74oken", "empty", "bare", "other", "garbage"]
            ),
            max_size=4,
        )
    )
    parts: list[str] = []
    for kind in query_parts:
        if kind == "token":
            parts.append("token=" + quote(token().value, safe=""))
        elif kind == "raw token":  # unencoded when it can be
            value = token().value
            parts.append("token=" + (value if re.fullmatch(r"[\w.~-]*", value, re.ASCII) else quote(value)))
        elif kind in ("TOKEN", "%74oken"):  # not relay's parameter name: never read, still secret
            parts.append(kind + "=" + quote(token().value, safe=""))
        elif kind == "empty":
            parts.append("token=")
        elif kind == "bare":
            parts.append("token")
        elif kind == "other":
            parts.append(quote(draw(st.text(max_size=10))) + "=" + quote(draw(st.text(max_size=30))))
        else:
            parts.append(quote(draw(st.text(max_size=30)), safe="=&;+"))
    empty_query: bool = draw(st.booleans())  # `/g?`
    if parts or empty_query:
        shake.target += b"?" + draw(st.sampled_from(["&", ";"])).join(parts).encode()

    auth = draw(
        st.sampled_from(["none", "none", "Bearer ", "bearer ", "BEARER  ", "Token ", "Basic", "Bearer"])
    )
    if auth == "Basic":
        credentials = base64.b64encode(f"alice:{REDIS_PASSWORD}".encode()).decode()
        shake.tokens.append(Token(credentials, "bad"))
        shake.headers.append((b"Authorization", b"Basic " + credentials.encode()))
    elif auth == "Bearer":
        shake.headers.append((b"Authorization", b"Bearer"))
    elif auth != "none":
        raw = token().value.replace("\r", "").replace("\n", "").encode()  # uvicorn reads it as latin-1
        if any((b < 0x20 and b != 0x09) or b == 0x7F for b in raw):
            shake.well_formed = False  # control bytes in a header value: httptools answers 400
        shake.headers.append((b"Authorization", auth.encode() + raw + draw(st.sampled_from([b"", b"  "]))))

    origin = draw(
        weighted(
            (6, st.none()),
            (2, st.sampled_from(["https://app.example", "https://APP.example", "https://x.app.example"])),
            (
                1,
                st.sampled_from(
                    ["null", "https://evil.example", "https://app.example.evil", "https://" + "o" * 3000]
                ),
            ),
            (1, st.text(alphabet=URL_SAFE + " ", max_size=40)),
        )
    )
    if origin is not None:
        shake.headers.append((b"Origin", origin.strip().encode()))

    protocols = draw(
        weighted(
            (6, st.none()),
            (
                3,
                st.lists(
                    st.sampled_from([SUBPROTOCOL, "chat", "relay.v2", "v1"])
                    | st.from_regex(TOKEN_CHARS + "{1,12}", fullmatch=True),
                    min_size=1,
                    max_size=4,
                ).map(", ".join),
            ),
            (
                1,
                st.sampled_from(
                    ["", ",", "relay.v1,,chat", "relay.v1, ", "relay v1", '"relay.v1"', "relay.v1;q=1"]
                ),
            ),
        )
    )
    if protocols is not None:
        shake.headers.append((b"Sec-WebSocket-Protocol", protocols.encode()))
        items = protocols.split(",")
        if not all(re.fullmatch(r"\s*" + TOKEN_CHARS + r"+\s*", item) for item in items):
            shake.well_formed = False  # not a list of tokens: websockets answers 400

    for name, value in draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["X-Forwarded-For", "Cookie", "User-Agent", "X-Request-Id", "Accept-Language"]
                )
                | st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True),
                st.text(alphabet=URL_SAFE + " ", max_size=60)
                | st.integers(1000, 7000).map(lambda n: "v" * n),
            ),
            max_size=20,
        )
    ):
        shake.headers.append((name.encode(), value.strip().encode()))

    key = base64.b64encode(os.urandom(16))
    version = b"13"
    mistake = draw(
        st.sampled_from(["none"] * 40 + ["no key", "two keys", "bad key", "version 8", "no version"])
    )
    if mistake != "none":
        shake.well_formed = False  # websockets answers 400: a missing, repeated or bad key or version
    if mistake == "two keys":
        shake.headers.append((b"Sec-WebSocket-Key", base64.b64encode(os.urandom(16))))
    if mistake != "no key":
        shake.headers.append((b"Sec-WebSocket-Key", b"not-a-key" if mistake == "bad key" else key))
    if mistake != "no version":
        shake.headers.append((b"Sec-WebSocket-Version", b"8" if mistake == "version 8" else version))
    assume(len(shake.target) <= MAX_LINE and all(len(n) + len(v) <= MAX_LINE for n, v in shake.headers))
    return shake


# -- the client ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    kind: str  # "welcome", "close" or "http"
    status: int
    code: int | None = None

    def __str__(self) -> str:
        return {"welcome": "welcome", "close": f"close {self.code}", "http": f"HTTP {self.status}"}[self.kind]


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed without a close frame (the client sees 1006): {self._buffer!r}")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise AssertionError(
                    f"connection closed without an HTTP response (got {self._buffer[:200]!r})"
                )
            self._buffer += chunk
        data, _, self._buffer = self._buffer.partition(marker)
        return data

    def frame(self) -> tuple[int, bytes]:
        first, second = self.exactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self.exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self.exactly(8))
        return first & 0x0F, self.exactly(length)


def _masked_close(code: int) -> bytes:
    mask = os.urandom(4)
    payload = struct.pack("!H", code)
    return bytes([0x88, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def attempt(port: int, shake: Handshake, timeout: float = 5.0) -> Outcome:
    request = b"GET " + shake.target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    request += b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    request += b"".join(name + b": " + value + b"\r\n" for name, value in shake.headers) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before reading it all
            sock.sendall(request)
        reader = _Reader(sock)
        try:
            head = reader.until(b"\r\n\r\n")
        except TimeoutError:
            raise AssertionError(f"no HTTP response within {timeout} s") from None
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            return Outcome("http", status)
        opcode, payload = reader.frame()
        if opcode == 0x8:
            return Outcome("close", 101, struct.unpack("!H", payload[:2])[0] if payload else None)
        assert opcode == 0x1, (opcode, payload)
        assert "channel_id" in json.loads(payload)["message"], payload
        sock.sendall(_masked_close(1000))
        while reader.frame()[0] != 0x8:  # wait for relay's close: the socket is released before the next
            pass
        return Outcome("welcome", 101)


def expected(shake: Handshake) -> Outcome:
    """What relay must answer a well-formed handshake, from the same rules it documents: the Origin
    check, then the path's group, then the token (the first non-empty `?token=`, else `Bearer`)."""
    target = shake.target.decode()
    raw_path, _, query = target.partition("?")
    scope = {"query_string": query.encode(), "headers": [(n.lower(), v) for n, v in shake.headers]}
    if not origin_allowed(origin_of(scope), ALLOWED_ORIGINS):
        return Outcome("close", 101, CloseCode.POLICY_VIOLATION)
    protocols = [
        p.strip()
        for n, v in shake.headers
        if n.lower() == b"sec-websocket-protocol"
        for p in v.decode().split(",")
    ]
    path = unquote(raw_path)
    group = group_from_path(path)
    if group is None and not (SUBPROTOCOL in protocols and path == "/"):
        return Outcome("close", 101, CloseCode.BAD_GROUP_NAME)
    sent = token_from(scope)
    verdicts = {t.value: t for t in shake.tokens}
    token = verdicts.get(sent) if sent else None
    if token is None or token.verdict == "bad":
        return Outcome("close", 101, CloseCode.UNAUTHORIZED)
    if token.verdict == "expired":
        return Outcome("close", 101, CloseCode.TOKEN_EXPIRED)
    if group is not None and not any(fnmatchcase(group, p) for p in token.groups):
        return Outcome("close", 101, CloseCode.FORBIDDEN)
    return Outcome("welcome", 101)


# -- the pod and the log scan -------------------------------------------------------------------


@dataclass
class FuzzedPod:
    pod: PodProcess
    reader: threading.Thread
    outcomes: Counter[str] = field(default_factory=Counter)
    sent: list[Token] = field(default_factory=list)
    public: list[bytes] = field(default_factory=list)  # what was sent that the pod may log


def start(level: str) -> FuzzedPod:
    pod = start_pod_process(
        {
            "RELAY_JWT_SECRET": tokens.SECRET,
            "RELAY_API_KEYS": API_KEY,
            "RELAY_REDIS_PASSWORD": REDIS_PASSWORD,
            "RELAY_BROKER_URL": "memory://",
            "RELAY_ALLOWED_ORIGINS": ",".join(ALLOWED_ORIGINS),
            "RELAY_CONNECT_RATE": "0",
            "RELAY_USER_CONNECT_RATE": "0",
            "RELAY_USER_MAX_CONNECTIONS": "0",
            "RELAY_DRAIN_DELAY": "0",
            "RELAY_LOG_LEVEL": level,
        }
    )
    assert pod.proc.poll() is None, "\n".join(pod.proc.communicate()[0].splitlines()[-20:])
    stdout = pod.proc.stdout
    assert stdout is not None
    # DEBUG output is far more than a pipe holds: read it as it comes, or the pod blocks on a write.
    reader = threading.Thread(target=lambda: pod.output.extend(iter(stdout.readline, "")), daemon=True)
    reader.start()
    return FuzzedPod(pod, reader)


def stop(fuzzed: FuzzedPod) -> list[str]:
    fuzzed.pod.terminate()
    assert fuzzed.pod.proc.wait(timeout=20) == 0
    fuzzed.reader.join(timeout=10)
    if fuzzed.pod.proc.stdout is not None:
        fuzzed.pod.proc.stdout.close()
    return fuzzed.pod.output


def needles(fuzzed: FuzzedPod) -> set[str]:
    """Every credential sent (in the forms it was sent in) and every configured secret. Strings too
    short to be told from ordinary text, or that were also sent where relay may log them (a path,
    another header), are left out: finding them would prove nothing."""
    found = {tokens.SECRET, API_KEY, REDIS_PASSWORD}
    public = b"\n".join(fuzzed.public).decode("latin-1")
    public += "\n" + unquote(public)
    for token in fuzzed.sent:
        value = token.value
        forms = {value, quote(value, safe=""), quote(value), value[:40]}
        if value.count(".") == 2:
            forms.add(value.rsplit(".", 1)[1])  # the signature
        found |= {f for f in forms if len(f) >= 16 and f not in public}
    return found


def check_logs(lines: list[str], fuzzed: FuzzedPod) -> int:
    """Asserts no secret and no error is in the pod's output; the number of secrets looked for."""
    secrets = needles(fuzzed)
    leaks = [(secret[:24], line[:300]) for line in lines for secret in secrets if secret in line]
    assert leaks == [], f"secrets in {len(leaks)} log lines, first: {leaks[:3]}"
    errors = [line for line in lines if '"level": "error"' in line or '"level": "critical"' in line]
    assert errors == [], errors[:3]
    return len(secrets)


FUZZ_SETTINGS = settings(
    max_examples=300,
    derandomize=True,  # the same examples every run: CI stays predictable, a failure reproduces
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_every_handshake_gets_a_documented_answer_and_no_secret_is_logged(level: str) -> None:
    fuzzed = start(level)
    try:

        @FUZZ_SETTINGS
        @given(shake=handshakes())
        def fuzz(shake: Handshake) -> None:
            fuzzed.sent += shake.tokens
            credential_headers = (b"authorization",)
            fuzzed.public += [shake.target.split(b"?")[0]]
            fuzzed.public += [v for n, v in shake.headers if n.lower() not in credential_headers]
            outcome = attempt(fuzzed.pod.port, shake)
            fuzzed.outcomes[str(outcome)] += 1
            if shake.well_formed:
                assert outcome == expected(shake), (shake, outcome)
            elif outcome.kind == "http":
                assert 400 <= outcome.status < 500, (shake, outcome)
            elif outcome.kind == "close":
                assert outcome.code in set(COUNTED), (shake, outcome)

        fuzz()
        assert fuzzed.pod.proc.poll() is None, "the pod died"
        port = fuzzed.pod.internal_port
        for code, reason in COUNTED.items():  # every refusal counted under its reason
            seen = fuzzed.outcomes[f"close {int(code)}"]
            assert scrape(port, "relay_connections_rejected_total", reason=reason) == seen, reason
        assert scrape(port, "relay_connections_rejected_total", reason="internal_error") == 0
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        lines = stop(fuzzed)
    # The fuzz reached every answer it exists to check, so passing means something.
    for answer in (
        "welcome",
        "close 1008",
        "close 4500",
        "close 4501",
        "close 4001",
        "close 4503",
        "HTTP 400",
    ):
        assert fuzzed.outcomes[answer] > 0, (answer, fuzzed.outcomes)
    looked_for = check_logs(lines, fuzzed)
    print(f"{level}: {dict(fuzzed.outcomes)}; {len(lines)} log lines, none with any of {looked_for} secrets")
    if level == "DEBUG":  # the raw handshakes were logged, and redacted
        assert any("token=[redacted]" in line for line in lines)


# -- the answers the fuzz relies on, one by one --------------------------------------------------


async def test_every_malformed_token_is_closed_with_4501_and_counted() -> None:
    # Tokens whose URL fits the handshake limits (the longer ones: see the last test).
    malformed = {name: t for name, t in tokens.malformed().items() if len(quote(t, safe="")) < MAX_LINE - 100}
    async with running_pod(jwt_secret=tokens.SECRET) as pod:
        before = metric("relay_connections_rejected_total", reason="unauthorized")
        for name, token in malformed.items():
            assert await closed_with(ws_url(pod, "/chat?token=" + quote(token, safe=""))) == 4501, name
            if token.isascii() and token.isprintable():
                bearer = {"Authorization": f"Bearer {token}"}
                assert await closed_with(ws_url(pod, "/chat"), additional_headers=bearer) == 4501, name
        counted = metric("relay_connections_rejected_total", reason="unauthorized") - before
        assert counted == sum(1 + (t.isascii() and t.isprintable()) for t in malformed.values())
        assert metric("relay_connections_rejected_total", reason="internal_error") == 0


async def test_a_bug_while_admitting_closes_with_1011_counted_and_logs_no_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = tokens.hs256()

    def broken(sent: str | None) -> None:  # a bug that puts the client's input in its message
        raise ValueError(f"invalid literal for int() with base 10: {sent!r}")

    async with running_pod(jwt_secret=tokens.SECRET) as pod:
        monkeypatch.setattr(pod.pod.auth, "authenticate", broken)
        before = metric("relay_connections_rejected_total", reason="internal_error")
        with capture_logs() as logs:
            assert await closed_with(ws_url(pod, "/chat?token=" + token)) == CloseCode.INTERNAL_ERROR
        assert metric("relay_connections_rejected_total", reason="internal_error") == before + 1
        [line] = [entry for entry in logs if entry["event"] == "socket.admit_failed"]
        assert line["log_level"] == "error" and line["error"] == "ValueError"
        assert any("in _admit" in frame for frame in line["at"]), line
        assert token[:16] not in repr(logs)
        monkeypatch.undo()
        assert (await join(ws_url(pod, "/chat?token=" + token))).channel_id  # the pod goes on


def test_a_handshake_past_the_websockets_limits_gets_an_http_error() -> None:
    fuzzed = start("INFO")
    key = [(b"Sec-WebSocket-Key", base64.b64encode(os.urandom(16))), (b"Sec-WebSocket-Version", b"13")]
    try:
        for shake in (
            Handshake(b"/g?token=" + b"a" * 9000, key, True),
            Handshake(b"/g", [*key, (b"X-Big", b"v" * 9000)], True),
            Handshake(b"/g", key + [(b"X-H%d" % i, b"v") for i in range(200)], True),
        ):
            outcome = attempt(fuzzed.pod.port, shake, timeout=2)
            assert outcome.kind == "http" and outcome.status in (414, 431), outcome
    finally:
        stop(fuzzed)
