"""After start-up a pod freezes what exists (the collector never walks it again) and collects less
often (service/server.py `settle_gc`). In a child process: freezing the test process would keep
every test's garbage."""

from __future__ import annotations

import json
import subprocess
import sys

from service.server import GC_THRESHOLDS
from tests.helpers import ROOT


def test_settle_gc_freezes_start_up_objects_and_sets_the_thresholds() -> None:
    code = (
        "import gc, json; from service.server import settle_gc; settle_gc(); "
        "print(json.dumps([gc.get_freeze_count(), gc.get_threshold()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    frozen, thresholds = json.loads(out.stdout)
    assert frozen > 10_000  # the modules, settings and app made at start-up
    assert tuple(thresholds) == GC_THRESHOLDS
