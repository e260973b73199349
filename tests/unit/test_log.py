"""What several ranks print to one console stays one line per message."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

WRITER = """
import sys
from xp.log import say
rank = sys.argv[1]
for i in range(2000):
    line = f"xp: rank {{rank}}/2 finished; log_dir /tmp/outputs/{{i}}; MLflow run " + "a" * 32
    {call}(line{extra})
"""
LINE = re.compile(r"xp: rank (\d)/2 finished; log_dir /tmp/outputs/(\d+); MLflow run a{32}")


def _two_writers_on_one_pipe(call: str, extra: str = "") -> list[str]:
    """What two unbuffered processes writing to the same pipe leave there, line by line."""
    code = WRITER.format(call=call, extra=extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    read_end, write_end = os.pipe()
    writers = [
        subprocess.Popen([sys.executable, "-c", code, str(rank)], stdout=write_end, env=env)
        for rank in (0, 1)
    ]
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        out = pipe.read()
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    return out.splitlines()


def test_ranks_sharing_a_console_never_splice_their_lines() -> None:
    lines = _two_writers_on_one_pipe("say")
    assert len(lines) == 4000
    assert all(LINE.fullmatch(line) for line in lines), [
        line for line in lines if not LINE.fullmatch(line)
    ][:3]
    seen = {(m[1], m[2]) for m in map(LINE.fullmatch, lines) if m}
    assert len(seen) == 4000


def test_say_writes_to_the_stream_it_is_given(capfd: pytest.CaptureFixture[str]) -> None:
    from xp.log import say

    say("xp: error: one line", file=sys.stderr)
    say("xp: done")
    assert capfd.readouterr() == ("xp: done\n", "xp: error: one line\n")
