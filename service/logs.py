"""Logging: structlog to stdout, JSON by default and readable on a terminal, uvicorn's logs too.

Named `logs` rather than `logging` so it never shadows the standard library module.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

# uvicorn logs every WebSocket handshake, open and close at INFO; relay's `socket.closed` line
# replaces them (at thousands of connections per second they would cost more than the relaying).
_HANDSHAKE_LINES = ('%s - "WebSocket %s"', "connection open", "connection closed")


# At DEBUG, the WebSocket library logs raw handshake lines: the request line carries ?token=... and
# a header line may carry Authorization. Credentials never reach the output.
_SECRETS = re.compile(r"(?i)(token=)[^&\s\"']+|(authorization:\s*)\S.*")


class _DropHandshakeLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_HANDSHAKE_LINES))


class _RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message.lower() or "authorization" in message.lower():
            record.msg = _SECRETS.sub(lambda m: (m.group(1) or m.group(2)) + "[redacted]", message)
            record.args = None
        return True


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
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.dict_tracebacks if as_json else structlog.dev.set_exc_info,
            renderer,
        ],
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
                structlog.processors.dict_tracebacks if as_json else structlog.dev.set_exc_info,
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
