"""Logging: structlog to stdout, JSON by default and readable on a terminal, uvicorn's logs too.

Named `logs` rather than `logging` so it never shadows the standard library module.

No secret reaches the output: logged tracebacks never carry local variables (structlog and Rich show
them by default, and a handshake's locals hold the token), uvicorn's handshake lines are dropped, and
query values, credential headers and bearer tokens in standard library log lines are redacted.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

# uvicorn logs every WebSocket handshake, open and close at INFO; relay's `socket.closed` line
# replaces them (at thousands of connections per second they would cost more than the relaying).
_HANDSHAKE_LINES = ('%s - "WebSocket %s"', "connection open", "connection closed")


# At DEBUG, the WebSocket library logs raw handshake lines: the request line carries ?token=... and
# a header line may carry Authorization. Credentials never reach the output: every query parameter's
# value is redacted (a client may spell the name `%74oken`), and so are credential header lines and
# anything following `Bearer`.
_SECRETS = re.compile(
    r"""(?i)([?&;][^=&;\s"'#]*=)[^&;\s"'#]+"""
    r"|((?:proxy-)?authorization:\s*|cookie:\s*)\S.*"
    r"""|(bearer\s+)[^\s"',]+"""
)


def redact(message: str) -> str:
    """`message` with query values, credential headers and bearer tokens replaced by [redacted]."""
    return _SECRETS.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "[redacted]", message)


class _DropHandshakeLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_HANDSHAKE_LINES))


class _RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg = redacted
            record.args = None
        return True


# Tracebacks as JSON, without locals: the frames (file, line, function) and the exception only.
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))


def exception_summary(exc: BaseException) -> dict[str, Any]:
    """What a log line may say about an exception raised on a client's input: its type and where it
    was raised, never its message (`int(token)` puts the token in the message) nor any locals."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {
        "error": type(exc).__name__,
        "at": [
            f"{os.path.relpath(frame.filename, root)}:{frame.lineno} in {frame.name}"
            for frame in traceback.extract_tb(exc.__traceback__)
        ],
    }


def use_json(log_format: str) -> bool:
    """`auto` means console output on a terminal, JSON everywhere else (containers, files)."""
    return log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())


def configure_logging(as_json: bool, level: str = "INFO") -> None:
    """Configure structlog and route the standard library's loggers (uvicorn's) through it."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        # plain_traceback: Rich's tracebacks (the default when Rich is installed) show locals too.
        else structlog.dev.ConsoleRenderer(
            colors=sys.stdout.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    tracebacks = _DICT_TRACEBACKS if as_json else structlog.dev.set_exc_info
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                tracebacks,
                renderer,
            ],
        )
    )
    handler.addFilter(_DropHandshakeLines())
    handler.addFilter(_RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
