"""``python -m benchmarks``: xp beside hand-written PyTorch, as ratios, into RESULTS.md."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from benchmarks import ddp

HERE = Path(__file__).resolve().parent

CASES = {
    "ddp": (
        ddp.measure,
        "DDP, 2 CPU ranks, digits MLP, batch 64/rank, AdamW",
        "hand-written torch DDP script (DataLoader + DistributedSampler)",
        "samples/s, in-process steady state (steps 101-1000)",
        0.97,
    ),
}


def _ratio_row(name: str, results: dict[str, list[float]]) -> str:
    _, what, baseline, unit, target = CASES[name]
    xp, base = results["xp"], results["baseline"]
    ratios = [a / b for a, b in zip(xp, base, strict=True)]
    ratio = statistics.median(ratios)
    verdict = "met" if ratio >= target else "MISSED"
    return (
        f"| {what} | {baseline} | {unit} | {statistics.median(xp):.0f} "
        f"| {statistics.median(base):.0f} | {ratio:.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
        f"| >= {target} ({verdict}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps: checks it runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    rows = []
    for name in args.cases:
        results = CASES[name][0](rounds, args.quick)
        rows.append(_ratio_row(name, results))
        print(rows[-1], flush=True)
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
        ]
    )
    args.out.write_text(table)
    print(f"\nWrote {args.out}")


if __name__ == "__main__":
    main()
