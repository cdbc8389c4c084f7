"""What `service.logs` writes: tracebacks without local variables, credentials redacted.

Each case configures logging in a fresh interpreter (configure_logging changes process-wide state)
and reads what it printed, as an operator's log collector would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from service.logs import exception_summary, redact
from tests.helpers import ROOT

SECRET = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQtZm9yLXRlc3Rz.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"

EMIT = textwrap.dedent(
    """
    import logging, sys
    import structlog
    from service.logs import configure_logging

    configure_logging(as_json=sys.argv[1] == "json", level="DEBUG")

    def verify(token):
        header = {"alg": 1}
        return header["alg"].startswith("HS")  # AttributeError, with the token in a local

    log = logging.getLogger("uvicorn.error")
    try:
        verify(sys.argv[2])
    except AttributeError:
        structlog.get_logger("relay.socket").exception("structlog.exception")
        log.error("Exception in ASGI application\\n", exc_info=True)
    log.debug("< GET /g?token=%s HTTP/1.1", sys.argv[2])
    log.debug("< GET /g?a=1&%%74oken=%s HTTP/1.1", sys.argv[2])
    log.debug("< %s: %s", "Authorization", "Bearer " + sys.argv[2])
    log.debug("headers %r", [(b"authorization", b"Bearer " + sys.argv[2].encode())])
    log.debug("< Cookie: session=%s", sys.argv[2])
    """
)


def emitted(log_format: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", EMIT, log_format, SECRET], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_json_tracebacks_name_the_frames_but_carry_no_locals() -> None:
    lines = [json.loads(line) for line in emitted("json").splitlines()]
    tracebacks = [line for line in lines if "exception" in line]
    assert [t["event"] for t in tracebacks] == ["structlog.exception", "Exception in ASGI application\n"]
    for line in tracebacks:
        frames = line["exception"][0]["frames"]
        assert [f["name"] for f in frames][-1] == "verify"  # still useful: where it broke
        assert all("locals" not in f for f in frames), frames
    assert SECRET[:20] not in json.dumps(lines)
    assert sum("[redacted]" in line["event"] for line in lines) == 5


def test_console_tracebacks_carry_no_locals() -> None:
    text = emitted("console")
    assert text.count("Traceback (most recent call last)") == 2
    assert "in verify" in text and "AttributeError" in text
    assert SECRET[:20] not in text and "header = " not in text


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("< GET /g?token=abc.def.ghi HTTP/1.1", "< GET /g?token=[redacted] HTTP/1.1"),
        ("< GET /g?a=1&TOKEN=x&b=2 HTTP/1.1", "< GET /g?a=[redacted]&TOKEN=[redacted]&b=[redacted] HTTP/1.1"),
        ("< GET /g?%74oken=x;y HTTP/1.1", "< GET /g?%74oken=[redacted];y HTTP/1.1"),
        ("< authorization: Basic dXNlcjpwYXNz", "< authorization: [redacted]"),
        ("< Proxy-Authorization: Bearer x", "< Proxy-Authorization: [redacted]"),
        ("< Cookie: a=b; c=d", "< Cookie: [redacted]"),
        (
            "headers [(b'authorization', b'Bearer x.y.z')]",
            "headers [(b'authorization', b'Bearer [redacted]')]",
        ),
        ('127.0.0.1 - "GET /?token=x HTTP/1.1" 404', '127.0.0.1 - "GET /?token=[redacted] HTTP/1.1" 404'),
        ("Started server process [42]", "Started server process [42]"),
        ("< GET /chat HTTP/1.1", "< GET /chat HTTP/1.1"),
    ],
)
def test_redaction(line: str, shown: str) -> None:
    assert redact(line) == shown


def test_exception_summary_names_the_error_and_where_but_not_its_message() -> None:
    def parse(token: str) -> int:
        return int(token)

    try:
        parse(SECRET)
    except ValueError as exc:
        summary = exception_summary(exc)
    assert summary["error"] == "ValueError"
    assert summary["at"][-1].startswith("tests/test_logs.py:") and summary["at"][-1].endswith("in parse")
    assert SECRET[:20] not in repr(summary)
