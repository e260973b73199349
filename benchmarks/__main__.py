"""``python -m benchmarks``: xp beside hand-written PyTorch, as ratios, into RESULTS.md."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import Skipped, callbacks, checkpoint, ddp, startup, step, sweep

HERE = Path(__file__).resolve().parent
MECHANISMS = HERE / "MECHANISMS.md"
"""What each of xp's speed mechanisms buys (hand-written), appended to every table."""

Results = dict[str, Any]
"""Per-round measurements: ``xp`` and ``baseline``, and whatever else a case's note reads."""

STEP_ROUNDS = 11
"""Rounds of the step cases: their runs are seconds long and this machine is shared."""


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
    absolute: bool = False
    """The target bounds xp's own value (in ``unit``), not the ratio."""
    rounds: int = 5
    """Interleaved rounds unless ``--rounds`` says otherwise; cases that share runs agree."""


TINY = "digits MLP 64-128-128-10, batch 64, AdamW, steps 101-2000"
SMALL = "digits MLP 64-512-512-10, batch 64, AdamW, steps 101-1000"
STEADY = "ms/step, in-process steady state (MLflow run ready before step 1)"
_anchor_cases = {
    f"{framework}_{size}": Case(
        partial(step.measure_anchor, framework, size),
        f"step, {size} model, xp vs {name}",
        f"the plain loop through {name} (CPU)",
        STEADY,
        1.0,
        higher_is_better=False,
        note=step.cpu_note,
        rounds=STEP_ROUNDS,
    )
    for framework, name in (("fabric", "Lightning Fabric"), ("accelerate", "accelerate"))
    for size in ("tiny", "small")
}

CASES = {
    "step_tiny": Case(
        step.measure_tiny,
        f"step overhead, tiny: {TINY}; xp logs to MLflow every 10 steps",
        "plain loop: DataLoader(shuffle=True), loss.item() every 10 steps, no MLflow",
        STEADY,
        1.0,
        higher_is_better=False,
        note=step.cpu_note,
        rounds=STEP_ROUNDS,
    ),
    "step_tiny_tuned": Case(
        step.measure_tiny_tuned,
        "step overhead, tiny (same runs)",
        "tuned loop: batches sliced from the in-memory tensors by index",
        STEADY,
        1.05,
        higher_is_better=False,
        note=step.cpu_note,
        rounds=STEP_ROUNDS,
    ),
    "step_small": Case(
        step.measure_small,
        f"step overhead, small: {SMALL}; xp logs to MLflow every 10 steps",
        "plain loop: DataLoader(shuffle=True), no MLflow",
        STEADY,
        1.02,
        higher_is_better=False,
        note=step.cpu_note,
        rounds=STEP_ROUNDS,
    ),
    "alloc_tiny": Case(
        step.measure_alloc_tiny,
        "allocator, tiny: xp with mallopt(M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=2 GiB) "
        "at start-up (same runs)",
        "xp as it is (glibc defaults)",
        STEADY,
        0.98,
        higher_is_better=False,
        note=step.alloc_note,
        rounds=STEP_ROUNDS,
    ),
    "alloc_small": Case(
        step.measure_alloc_small,
        "allocator, small: xp with the same mallopt at start-up (same runs)",
        "xp as it is (glibc defaults)",
        STEADY,
        0.98,
        higher_is_better=False,
        note=step.alloc_note,
        rounds=STEP_ROUNDS,
    ),
    "logging": Case(
        step.measure_logging,
        "logging every step: training-thread time per scalar (tiny model, 4 scalars a step; "
        "the log_metrics call plus the CPU of the tracker's threads in the training process)",
        "MlflowClient.log_metric per scalar, same SQLite store type",
        "us per scalar, in-process steady state",
        10.0,
        higher_is_better=False,
        note=step.logging_note,
        absolute=True,
        rounds=STEP_ROUNDS,
    ),
    "startup": Case(
        startup.measure,
        "start-up: launch to the end of step 100, `python -m xp` (MLflow on; the end is "
        "train/loss's MLflow timestamp at step 100), tiny model",
        "the plain loop without MLflow (prints time.time() at step 100)",
        "s from the launch",
        1.05,
        higher_is_better=False,
        note=startup.note,
        rounds=STEP_ROUNDS,
    ),
    "startup_exit": Case(
        startup.measure_exit,
        "a whole run: launch to the end of `python -m xp`, 100 steps, MLflow run closed "
        "(same runs)",
        "the plain loop without MLflow, launch to its end",
        "s from the launch",
        1.0,
        higher_is_better=False,
        note=startup.exit_note,
        rounds=STEP_ROUNDS,
    ),
    "memory": Case(
        startup.measure_memory,
        "memory of a run's process tree: `python -m xp`'s composing parent, training "
        "process and MLflow writer (same runs)",
        "the plain loop with MLflow in its own process (params, the loss every 10 steps, "
        "the config as an artifact)",
        "MiB, sum of each process's peak RSS",
        1.0,
        higher_is_better=False,
        note=startup.memory_note,
        rounds=STEP_ROUNDS,
    ),
    **{
        f"sweep_{launcher}_{jobs}": Case(
            partial(sweep.measure, launcher, index),
            f"sweep of {jobs} one-epoch jobs of the default experiment, {how} "
            "(`python -m xp -m optim.lr=...`, parent and child runs, the summary)",
            "the Hydra + MLflow glue written by hand (benchmarks/glue.py), same jobs",
            "s, launch to exit",
            1.5,
            higher_is_better=False,
            note=sweep.note,
            rounds=3,
        )
        for launcher, how in (
            ("basic", "Hydra's basic launcher"),
            ("joblib", "joblib launcher, n_jobs=2"),
        )
        for index, jobs in enumerate(sweep.SIZES)
    },
    "sweep_ddp": Case(
        sweep.measure_ddp,
        f"distributed jobs in a sweep (strategy=ddp strategy.nproc_per_node=2, one epoch "
        f"each, {sweep.DDP_JOBS} jobs), steady time per job",
        "one torchrun launch of the hand-written DDP script per job (no MLflow)",
        "s per job",
        1.5,
        higher_is_better=False,
        note=sweep.ddp_note,
        rounds=3,
    ),
    "ddp": Case(
        ddp.measure,
        "DDP, 2 CPU ranks, digits MLP, batch 64/rank, AdamW",
        "hand-written torch DDP script (DataLoader + DistributedSampler)",
        "samples/s, in-process steady state (steps 1001-3000)",
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
    "checkpoint_stall_fsdp": Case(
        checkpoint.measure_fsdp_stall,
        "training-thread stall per checkpoint, same state, FSDP on 1 rank: save_checkpoint "
        "with checkpoint.async_save (DCP async_save, until it returns)",
        "the same save_checkpoint, synchronous (DCP save, extra.pt, marker)",
        "seconds blocked",
        0.2,
        higher_is_better=False,
        note=checkpoint.fsdp_stall_note,
        rounds=3,
    ),
    **_anchor_cases,
    **{
        f"callbacks_{variant}": Case(
            partial(callbacks.measure, variant),
            f"step, tiny model, {what} (validation every epoch, no MLflow or checkpoints)",
            "the same loop before callbacks existed (xp/trainer.py at 67f7020)",
            "ms/step, in-process steady state (steps 101-2000)",
            target,
            higher_is_better=False,
            note=callbacks.note,
            rounds=STEP_ROUNDS,
        )
        for variant, what, target in (
            ("none", "no callbacks", 1.01),
            ("early_stopping", "EarlyStopping on val/loss (never stopping)", 1.01),
            ("ema", "EMA(decay=0.999) every step, validating the average", 1.05),
        )
    },
}


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ratio_row(name: str, results: Results, rounds: int) -> str:
    case = CASES[name]
    xp, base = results["xp"], results["baseline"]
    ratios = [a / b for a, b in zip(xp, base, strict=True)]
    ratio = statistics.median(ratios)
    value = statistics.median(xp) if case.absolute else ratio
    met = value >= case.target if case.higher_is_better else value <= case.target
    bound = ">=" if case.higher_is_better else "<="
    target = f"{'xp ' if case.absolute else ''}{bound} {case.target}"
    return (
        f"| {case.what} | {case.baseline} | {case.unit} | {rounds} "
        f"| {_num(statistics.median(xp))} ({_num(min(xp))}-{_num(max(xp))}) "
        f"| {_num(statistics.median(base))} ({_num(min(base))}-{_num(max(base))}) "
        f"| {ratio:.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
        f"| {target} ({'met' if met else 'MISSED'}) |"
    )


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def _temp_out() -> Path:
    """Where ``--quick`` writes its table: a quick check is not a measurement."""
    handle, name = tempfile.mkstemp(prefix="xp-benchmarks-quick-", suffix=".md")
    os.close(handle)
    return Path(name)


def _skipped_row(name: str, reason: str) -> str:
    case = CASES[name]
    return f"| {case.what} | {case.baseline} | {case.unit} | 0 | - | - | - | skipped: {reason} |"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few steps and one round of each case: checks that it runs, measures nothing; "
        "writes a temporary file (printed) unless --out is given, never RESULTS.md",
    )
    parser.add_argument("--rounds", type=int, default=None, help="default: each case's own")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"default: {HERE / 'RESULTS.md'} (--quick: a temp file)",
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = HERE / "RESULTS.md" if not args.quick else _temp_out()
    rows, notes = [], []
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    for name in args.cases:
        case = CASES[name]
        rounds = 1 if args.quick else args.rounds or case.rounds
        try:
            results = case.measure(rounds, args.quick)
        except Skipped as e:
            rows.append(_skipped_row(name, str(e)))
            print(rows[-1], flush=True)
            continue
        rows.append(_ratio_row(name, results, rounds))
        print(rows[-1], flush=True)
        if case.note is not None:
            notes.append(f"- {name}: {case.note(results)}")
            print(notes[-1], flush=True)
    table = "\n".join(
        [
            f"# Benchmarks{' (quick check, not a measurement)' if args.quick else ''}",
            "",
            f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, one torch thread per process; "
            f"{time.perf_counter() - started:.0f} s in all; load average (1, 5, 15 min) "
            f"{_load(load_at_start)} at the start, {_load(os.getloadavg())} at the end. Each "
            "case runs xp and its baseline interleaved over its rounds; values are medians "
            "(min-max), ratio = xp / baseline per round.",
            "",
            "| case | baseline | measure | rounds | xp | baseline | ratio | target |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            *([*notes, ""] if notes else []),
            *([MECHANISMS.read_text()] if MECHANISMS.is_file() and not args.quick else []),
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"\nWrote {args.out}")


if __name__ == "__main__":
    main()
