"""`python -m service`: read settings, configure logging, run one pod until it is drained."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from service.config import Settings, SettingsError
from service.logs import configure_logging, use_json
from service.server import serve


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = Settings.from_args(argv)
    except SettingsError as exc:
        sys.exit(f"relay: invalid setting: {exc}")
    configure_logging(use_json(settings.log_format), settings.log_level)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard] on Linux and macOS
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            runner.run(serve(settings))
        except SettingsError as exc:  # read at start-up: key files, group rules
            sys.exit(f"relay: invalid setting: {exc}")


if __name__ == "__main__":
    main()
