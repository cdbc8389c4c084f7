"""The test project's manage.py (tests/test_relay_channels_django.py runs it with .venv-load)."""

# Django and Channels live in .venv-load; mypy runs in .venv, where they are not installed.
# mypy: disable-error-code="import-not-found,import-untyped"

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
