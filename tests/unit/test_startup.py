"""What a training process does to start quickly (xp.prefork.imports_frozen)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # imports torch in a fresh interpreter

_PROBE = """
import gc, json, sys
from xp.__main__ import import_training_stack

defaults = gc.get_threshold()
import_training_stack()
frozen = gc.get_freeze_count()

class Cycle:
    pass

garbage = Cycle()
garbage.me = garbage
del garbage
import_training_stack()  # a sweep's next job, in the same process
print(json.dumps({
    "imported": all(m in sys.modules for m in ("torch._dynamo", "xp.run")),
    "frozen": frozen,
    "frozen_again": gc.get_freeze_count(),
    "thresholds": [defaults, gc.get_threshold()],
    "enabled": gc.isenabled(),
    "freed": gc.collect(),
}))
"""


def test_the_training_stack_is_frozen_once_and_later_garbage_is_still_collected() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, check=True
    )
    probe = json.loads(out.stdout.splitlines()[-1])
    assert probe["imported"]
    # torch's and xp's objects no collection will scan again (hundreds of thousands)
    assert probe["frozen"] > 100_000
    # A second call (a sweep's next job) freezes nothing: what the job left is collected.
    assert probe["frozen_again"] == probe["frozen"]
    assert probe["freed"] >= 1
    # The collector runs afterwards with the thresholds it had.
    assert probe["enabled"]
    assert probe["thresholds"][0] == probe["thresholds"][1]
