"""``python -m benchmarks``: xp beside hand-written PyTorch, as ratios, into RESULTS.md."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from benchmarks import checkpoint, ddp

HERE = Path(__file__).resolve().parent

Results = dict[str, list[float]]
"""Per-round measurements: ``xp`` and ``baseline``, and any others a case's note reads."""


class Case(NamedTuple):
    measure: Callable[[int, bool], Results]
    """``measure(rounds, quick)``."""
    what: str
    baseline: str
    unit: str
    target: float
    """The ratio xp / baseline to reach."""
    higher_is_better: bool = True
    """Throughput: the ratio must be >= target; a cost (time, memory): <= target."""
    note: Callable[[Results], str] | None = None
    """A line printed under the table (context the row has no column for)."""


CASES = {
    "ddp": Case(
        ddp.measure,
        "DDP, 2 CPU ranks, digits MLP, batch 64/rank, AdamW",
        "hand-written torch DDP script (DataLoader + DistributedSampler)",
        "samples/s, in-process steady state (steps 101-1000)",
        0.97,
    ),
    "checkpoint_save": Case(
        checkpoint.measure_save,
        "checkpoint save, 25 x Linear(2048) + AdamW state (1.26 GB), "
        "SingleDeviceStrategy.save_checkpoint",
        "torch.save of model + optimizer state dicts, fsync'd, same folder",
        "GB/s (file size / wall time)",
        0.9,
        note=checkpoint.save_note,
    ),
    "checkpoint_stall": Case(
        checkpoint.measure_stall,
        "training-thread stall per checkpoint, same state, save_checkpoint through "
        "AsyncCheckpointWriter (until submit returns)",
        "the same save_checkpoint, synchronous",
        "seconds blocked",
        0.2,
        higher_is_better=False,
        note=checkpoint.stall_note,
    ),
}


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ratio_row(name: str, results: Results) -> str:
    case = CASES[name]
    xp, base = results["xp"], results["baseline"]
    ratios = [a / b for a, b in zip(xp, base, strict=True)]
    ratio = statistics.median(ratios)
    met = ratio >= case.target if case.higher_is_better else ratio <= case.target
    bound = ">=" if case.higher_is_better else "<="
    return (
        f"| {case.what} | {case.baseline} | {case.unit} | {_num(statistics.median(xp))} "
        f"| {_num(statistics.median(base))} | {ratio:.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
        f"| {bound} {case.target} ({'met' if met else 'MISSED'}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps: checks it runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    rows, notes = [], []
    for name in args.cases:
        results = CASES[name].measure(rounds, args.quick)
        rows.append(_ratio_row(name, results))
        print(rows[-1], flush=True)
        note = CASES[name].note
        if note is not None:
            notes.append(f"- {name}: {note(results)}")
            print(notes[-1], flush=True)
    table = "\n".join(
        [
            f"# Benchmarks{' (quick check, not a measurement)' if args.quick else ''}",
            "",
            f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {platform.python_version()}, "
            f"{rounds} interleaved rounds; ratio = xp / baseline (median, min-max).",
            "",
            "| case | baseline | measure | xp | baseline | ratio | target |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            *([*notes, ""] if notes else []),
        ]
    )
    args.out.write_text(table)
    print(f"\nWrote {args.out}")


if __name__ == "__main__":
    main()
