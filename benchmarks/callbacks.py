"""Cases: what callbacks cost the tiny model's step, as ratios to the loop before callbacks.

Each round runs :mod:`benchmarks.callback_fit` once per variant, each in its own process:
the training loop as it was before callbacks (``before``, the baseline of every row), and
today's loop with no callbacks, with EarlyStopping, and with EMA. The rows share the runs.
"""

from __future__ import annotations

import statistics
from functools import partial
from typing import Any

from benchmarks import Skipped
from benchmarks.harness import interleave, run_json
from benchmarks.step import TINY, Model

_cache: dict[tuple[int, bool], dict[str, list[dict[str, Any]]]] = {}


def _fit(model: Model, variant: str) -> dict[str, Any]:
    return run_json(
        ["-m", "benchmarks.callback_fit", "--variant", variant, "--warmup", str(model.warmup),
         "--steps", str(model.steps), "--hidden", *map(str, model.hidden),
         "--batch-size", str(model.batch_size)],
    )  # fmt: skip


def _rounds(rounds: int, quick: bool) -> dict[str, list[dict[str, Any]]]:
    key = (rounds, quick)
    if key not in _cache:
        from benchmarks.callback_fit import VARIANTS

        model = TINY.quick() if quick else TINY
        try:
            _fit(model.quick(), "before")  # needs git and the baseline commit
        except RuntimeError as e:
            raise Skipped(f"the loop before callbacks is not readable from git ({e})") from e
        variants = {name: partial(_fit, model, name) for name in VARIANTS}
        _cache[key] = interleave(rounds, variants, parallel=quick)
    return _cache[key]


def _ms(runs: list[dict[str, Any]], field: str = "step_s") -> list[float]:
    return [r[field] * 1e3 for r in runs]


def measure(variant: str, rounds: int, quick: bool) -> dict[str, list[float]]:
    """ms per step: today's loop with ``variant``'s callbacks, and the loop before them."""
    runs = _rounds(rounds, quick)
    return {
        "xp": _ms(runs[variant]),
        "baseline": _ms(runs["before"]),
        "xp_cpu": _ms(runs[variant], "cpu_step_s"),
        "baseline_cpu": _ms(runs["before"], "cpu_step_s"),
    }


def note(results: dict[str, list[float]]) -> str:
    ratios = [a / b for a, b in zip(results["xp_cpu"], results["baseline_cpu"], strict=True)]
    return (
        f"CPU time of the training thread per step (`time.thread_time`): "
        f"{statistics.median(results['xp_cpu']):.3g} ms vs "
        f"{statistics.median(results['baseline_cpu']):.3g} ms before callbacks, ratio "
        f"{statistics.median(ratios):.3f} (median)."
    )
