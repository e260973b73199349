"""Cases: the time of one training step, xp beside hand-written loops; glibc's malloc thresholds.

Two models on scikit-learn's digits, AdamW, one torch thread, no dropout:

- tiny: MLP 64-128-128-10, batch 64, steps 101-2000 (under a millisecond a step);
- small: MLP 64-512-512-10, batch 64, steps 101-1000 (a few milliseconds a step).

Each round runs, in its own process: xp (:mod:`benchmarks.xp_fit`: MLflow on, logging
every 10 steps), xp with glibc's thresholds set by ``mallopt`` first
(:mod:`benchmarks.alloc`), and the hand-written loops of :mod:`benchmarks.loop` (the
plain one with a ``DataLoader``; on the tiny model also the tuned one that slices
in-memory tensors; on the small model also the plain one with ``MALLOC_*`` variables).
The tiny round also runs xp logging every step, and MLflow's own logging calls, for the
logging case; where ``pip install -e ".[bench]"`` installed them, both rounds also run the
plain loop through Lightning Fabric and accelerate. Rounds are interleaved, and measured
once for all the cases that read them.
"""

from __future__ import annotations

import importlib.util
import statistics
from dataclasses import dataclass
from functools import partial
from typing import Any

from benchmarks import Skipped
from benchmarks.harness import MALLOC_ENV, Workdir, interleave, run_json
from benchmarks.mlflow_log import TIMED_CALLS


@dataclass(frozen=True)
class Model:
    hidden: tuple[int, ...]
    batch_size: int
    steps: int
    warmup: int

    def quick(self) -> Model:
        return Model(self.hidden, self.batch_size, steps=30, warmup=10)


TINY = Model(hidden=(128, 128), batch_size=64, steps=2000, warmup=100)
SMALL = Model(hidden=(512, 512), batch_size=64, steps=1000, warmup=100)

ANCHORS = {"fabric": "lightning", "accelerate": "accelerate"}
"""Frameworks to compare with, and the package each needs."""

SAME_WORK = [
    "trainer.max_epochs=null",
    "trainer.val_interval_epochs=0",
    "checkpoint.interval_epochs=0",
    "scheduler=constant",
    "optim.paramwise.bias_decay_mult=1",
    "optim.paramwise.norm_decay_mult=1",
    "model.dropout=0",
    "experiment_name=bench",
]
"""What makes xp do the baseline's work: no validation or checkpoints, a constant lr, one
AdamW param group with weight decay 0.01 on every parameter, no dropout."""

_cache: dict[tuple[str, int, bool], dict[str, list[dict[str, Any]]]] = {}


def xp_overrides(model: Model) -> list[str]:
    return [
        *SAME_WORK,
        f"model.hidden_sizes=[{','.join(map(str, model.hidden))}]",
        f"data.batch_size={model.batch_size}",
    ]


def _xp(work: Workdir, model: Model, *overrides: str, tune_malloc: bool = False) -> dict[str, Any]:
    args = ["--warmup", str(model.warmup), "--steps", str(model.steps)]
    if tune_malloc:
        args.append("--tune-malloc")
    result = run_json(
        ["-m", "benchmarks.xp_fit", "--launch", str(work.fresh()), *args, "--",
         *xp_overrides(model), *overrides],
    )  # fmt: skip
    if result["stored_points"] != result["metric_points"]:
        raise RuntimeError(
            f"xp logged {result['metric_points']} metric points but the store holds "
            f"{result['stored_points']}"
        )
    return result


def _loop(model: Model, loader: str, framework: str = "torch", **env: str) -> dict[str, Any]:
    return run_json(
        ["-m", "benchmarks.loop", "--loader", loader, "--batch-size", str(model.batch_size),
         "--steps", str(model.steps), "--warmup", str(model.warmup),
         "--hidden", *map(str, model.hidden), "--framework", framework],
        **env,
    )  # fmt: skip


def _installed(framework: str) -> bool:
    return importlib.util.find_spec(ANCHORS[framework]) is not None


def _mlflow_reference(work: Workdir, quick: bool) -> dict[str, Any]:
    launch = work.fresh()
    calls = 10 if quick else TIMED_CALLS
    return run_json(
        ["-m", "benchmarks.mlflow_log", "--store", str(launch / "outputs" / "mlflow.db"),
         "--calls", str(calls)],
    )  # fmt: skip


def _rounds(size: str, rounds: int, quick: bool) -> dict[str, list[dict[str, Any]]]:
    key = (size, rounds, quick)
    if key in _cache:
        return _cache[key]
    model = TINY if size == "tiny" else SMALL
    if quick:
        model = model.quick()
    work = Workdir()
    try:
        variants = {
            "xp": partial(_xp, work, model),
            "xp_tuned_malloc": partial(_xp, work, model, tune_malloc=True),
            "plain": partial(_loop, model, "dataloader"),
        }
        if size == "tiny":
            variants["slice"] = partial(_loop, model, "slice")
            variants["xp_log_every_step"] = partial(
                _xp, work, model, "trainer.log_interval_steps=1"
            )
            variants["mlflow"] = partial(_mlflow_reference, work, quick)
        else:
            variants["plain_malloc_env"] = partial(_loop, model, "dataloader", **MALLOC_ENV)
        for framework in ANCHORS:
            if _installed(framework):
                variants[framework] = partial(_loop, model, "dataloader", framework)
        _cache[key] = interleave(rounds, variants, parallel=quick)
    finally:
        work.close()
    return _cache[key]


def _ms(runs: list[dict[str, Any]], field: str = "step_s") -> list[float]:
    return [r[field] * 1e3 for r in runs]


def _pair(size: str, xp: str, baseline: str, rounds: int, quick: bool) -> dict[str, list[float]]:
    runs = _rounds(size, rounds, quick)
    return {
        "xp": _ms(runs[xp]),
        "baseline": _ms(runs[baseline]),
        "xp_cpu": _ms(runs[xp], "cpu_step_s"),
        "baseline_cpu": _ms(runs[baseline], "cpu_step_s"),
        "xp_minflt": [r["minflt"] for r in runs[xp]],
        "baseline_minflt": [r["minflt"] for r in runs[baseline]],
    }


def measure_tiny(rounds: int, quick: bool) -> dict[str, list[float]]:
    """ms per step: xp and the plain DataLoader loop, tiny model."""
    return _pair("tiny", "xp", "plain", rounds, quick)


def measure_tiny_tuned(rounds: int, quick: bool) -> dict[str, list[float]]:
    """ms per step: xp and the loop that slices in-memory tensors, tiny model."""
    return _pair("tiny", "xp", "slice", rounds, quick)


def measure_small(rounds: int, quick: bool) -> dict[str, list[float]]:
    """ms per step: xp and the plain DataLoader loop, small model."""
    return _pair("small", "xp", "plain", rounds, quick)


def measure_alloc_tiny(rounds: int, quick: bool) -> dict[str, list[float]]:
    """ms per step: xp with mallopt at start-up, and xp as it is, tiny model."""
    return _pair("tiny", "xp_tuned_malloc", "xp", rounds, quick)


def measure_alloc_small(rounds: int, quick: bool) -> dict[str, list[float]]:
    """ms per step: xp with mallopt at start-up, and xp as it is; the plain loop both ways."""
    results = _pair("small", "xp_tuned_malloc", "xp", rounds, quick)
    runs = _rounds("small", rounds, quick)
    results["plain"] = _ms(runs["plain"])
    results["plain_env"] = _ms(runs["plain_malloc_env"])
    results["plain_minflt"] = [r["minflt"] for r in runs["plain"]]
    results["plain_env_minflt"] = [r["minflt"] for r in runs["plain_malloc_env"]]
    return results


def measure_anchor(framework: str, size: str, rounds: int, quick: bool) -> dict[str, list[float]]:
    """ms per step: xp and the plain loop through ``framework``."""
    if not _installed(framework):
        raise Skipped(f"{ANCHORS[framework]} is not installed (pip install -e '.[bench]')")
    return _pair(size, "xp", framework, rounds, quick)


def measure_logging(rounds: int, quick: bool) -> dict[str, list[float]]:
    """us on the training thread per scalar logged every step (xp), per log_metric (MLflow)."""
    runs = _rounds("tiny", rounds, quick)
    every, default = runs["xp_log_every_step"], runs["xp"]
    # The trainer logs the same scalars at every step instead of every 10th: the extra
    # step time, over the extra scalars, is what one scalar costs the training thread.
    extra = [
        (a["step_s"] - b["step_s"]) / (a["scalars_per_step"] - b["scalars_per_step"]) * 1e6
        for a, b in zip(every, default, strict=True)
    ]
    refs = runs["mlflow"]
    call_us = [r["log_call_s_per_scalar"] * 1e6 for r in every]
    threads_us = [r["tracker_threads_cpu_s_per_scalar"] * 1e6 for r in every]
    return {
        # Measured directly: the log_metrics call, plus all the CPU the tracker's threads in
        # the training process used (the most they can take from the training thread; the
        # MLflow writing itself is another process). The step-time difference is in the
        # note: two ~1 ms step times that a loaded machine moves by more than the effect.
        "xp": [c + t for c, t in zip(call_us, threads_us, strict=True)],
        "extra_us": extra,
        "baseline": [r["log_metric_s"] * 1e6 for r in refs],
        "async_us": [r["log_metric_async_s"] * 1e6 for r in refs],
        "batch_us": [r["log_batch_s_per_metric"] * 1e6 for r in refs],
        "call_us": call_us,
        "cpu_us": [
            (a["cpu_step_s"] - b["cpu_step_s"])
            / (a["scalars_per_step"] - b["scalars_per_step"])
            * 1e6
            for a, b in zip(every, default, strict=True)
        ],
        "threads_us": threads_us,
        "step_every_ms": _ms(every),
        "step_default_ms": _ms(default),
        "points": [r["metric_points"] for r in every],
        "stored": [r["stored_points"] for r in every],
    }


# --------------------------------------------------------------------------- notes


def _med(values: list[float]) -> float:
    return statistics.median(values)


def cpu_note(results: dict[str, list[float]]) -> str:
    ratio = _med([a / b for a, b in zip(results["xp_cpu"], results["baseline_cpu"], strict=True)])
    return (
        f"CPU time of the training thread per step (`time.thread_time`, which other processes' "
        f"load disturbs less): xp {_med(results['xp_cpu']):.3g} ms, baseline "
        f"{_med(results['baseline_cpu']):.3g} ms, ratio {ratio:.3f} (median)."
    )


def alloc_note(results: dict[str, list[float]]) -> str:
    text = (
        f"minor page faults per process (median): xp {_med(results['baseline_minflt']):.0f}, "
        f"with mallopt {_med(results['xp_minflt']):.0f}"
    )
    if "plain" in results:
        ratio = _med([a / b for a, b in zip(results["plain_env"], results["plain"], strict=True)])
        text += (
            f"; the plain loop with `MALLOC_MMAP_THRESHOLD_=33554432 "
            f"MALLOC_TRIM_THRESHOLD_=4294967296` took {_med(results['plain_env']):.3g} ms/step "
            f"vs {_med(results['plain']):.3g} without (ratio {ratio:.3f}), page faults "
            f"{_med(results['plain_env_minflt']):.0f} vs {_med(results['plain_minflt']):.0f}"
        )
    return text + "."


def logging_note(results: dict[str, list[float]]) -> str:
    lost = [p - s for p, s in zip(results["points"], results["stored"], strict=True)]
    return (
        f"xp's step: {_med(results['step_every_ms']):.3g} ms logging 4 scalars every step vs "
        f"{_med(results['step_default_ms']):.3g} ms every 10th: {_med(results['extra_us']):.2g} us "
        f"more per extra scalar ({min(results['extra_us']):.3g} to {max(results['extra_us']):.3g}: "
        f"the difference of two noisy step times). Per scalar, the training "
        f"thread's own CPU time grew {_med(results['cpu_us']):.2g} us, and the `log_metrics` "
        f"call alone took {_med(results['call_us']):.2g} us (MLflow's writing runs in the "
        f"tracker's writer process, not under the training process's GIL; the tracker's "
        f"threads in the training process, sender and receiver, used "
        f"{_med(results['threads_us']):.2g} us of CPU per scalar from start() to the end of "
        f"close(), the most they could take from the training thread). The store held "
        f"{min(results['stored']):.0f} of {max(results['points']):.0f} points after every "
        f"run ({max(lost):.0f} lost). MLflow's own costs per scalar, same store type (SQLite): "
        f"`log_metric` {_med(results['baseline']):.0f} us, `log_metric(synchronous=False)` "
        f"{_med(results['async_us']):.0f} us, a `log_batch` of 40 buffered metrics "
        f"{_med(results['batch_us']):.0f} us."
    )
