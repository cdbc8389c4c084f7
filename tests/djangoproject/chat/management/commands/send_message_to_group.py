"""`manage.py send_message_to_group GROUP JSON [--async]`: publish from a management command, from
sync code (async_to_sync), or from async code run with asyncio.run."""

# Django and Channels live in .venv-load; mypy runs in .venv, where they are not installed.
# mypy: disable-error-code="import-not-found,import-untyped"

import asyncio
import json
from typing import Any

from django.core.management.base import BaseCommand

from chat.publish import asend_message_to_group, send_message_to_group


class Command(BaseCommand):  # type: ignore[misc]
    help = "send_message_to_group from the command line"

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("group")
        parser.add_argument("message", help="JSON")
        parser.add_argument("--async", action="store_true", dest="run_async")

    def handle(self, *args: Any, group: str, message: str, run_async: bool, **options: Any) -> None:
        content = json.loads(message)
        if run_async:
            asyncio.run(asend_message_to_group(group, content))
        else:
            send_message_to_group(group, content)
