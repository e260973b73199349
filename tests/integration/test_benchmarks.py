"""The benchmarks run (a few steps each) and write their table; they measure nothing here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
CASES = ("checkpoint_save", "checkpoint_stall")


@pytest.mark.slow
def test_quick_benchmarks_write_their_table_elsewhere_than_the_results() -> None:
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    result = subprocess.run(
        # Two cheap cases (about 3 s each; a step case starts a dozen processes): every
        # case runs in `python -m benchmarks --quick`, which takes minutes; the test suite
        # checks the quick check's own contract on a few.
        [sys.executable, "-m", "benchmarks", "--quick", "--cases", *CASES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # A quick check is not a measurement: the tracked RESULTS.md stays as it was, and the
    # table goes to a temporary file that the command names.
    assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before
    (written,) = re.findall(r"^Wrote (.+)$", result.stdout, re.MULTILINE)
    out = Path(written)
    assert out.resolve() != RESULTS.resolve()
    table = out.read_text()
    out.unlink()
    assert table.startswith("# Benchmarks (quick check, not a measurement)")
    for row in ("| checkpoint save, ", "| training-thread stall per checkpoint, "):
        assert row in table
    assert table.count("\n|") == 2 + len(CASES)  # header, rule, one row per case
