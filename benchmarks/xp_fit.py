"""xp's side of the step and logging cases: ``Trainer.fit`` on objects built as ``xp.run`` does.

Composes ``conf/`` with the given overrides, builds everything with ``xp.build.build`` and
``xp.build.build_tracker`` (MLflow on, into ``<launch>/outputs/mlflow.db``), waits until
the MLflow run exists, then trains. Waiting keeps MLflow's start-up (seconds of imports
in a background thread) out of the steady state; the start-up case measures it.

The trainer's tracker is wrapped in :class:`_Clock`, which notes the time when the
trainer hands over the metrics of the first and last measured step (every
``trainer.log_interval_steps``) and what the handing over costs; xp runs unchanged.
Afterwards the store is read back: every metric point must be there. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class _Clock:
    """A tracker in front of the real one: notes the clocks at two steps, forwards all."""

    def __init__(self, tracker: Any, first: int, last: int) -> None:
        self.tracker = tracker
        self.wanted = (first, last)
        self.marks: dict[int, tuple[float, float]] = {}
        self.call_s = 0.0
        self.scalars = 0

    @property
    def written_through_step(self) -> int:
        return int(self.tracker.written_through_step)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        now = time.perf_counter()
        if step in self.wanted:
            self.marks[step] = (now, time.thread_time())
        self.tracker.log_metrics(metrics, step)
        self.call_s += time.perf_counter() - now
        self.scalars += len(metrics)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launch", type=Path, required=True, help="holds outputs/mlflow.db")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--tune-malloc", action="store_true", help="mallopt before anything")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.tune_malloc:
        from benchmarks.alloc import tune_malloc

        if not tune_malloc():
            raise SystemExit("mallopt is not available here (not glibc)")

    from hydra import compose, initialize_config_dir

    from xp.__main__ import CONF_DIR
    from xp.build import build, build_tracker, build_trainer
    from xp.config import register_schemas
    from xp.rundir import register_resolvers

    os.environ["XP_LAUNCH_DIR"] = str(args.launch)
    os.environ["XP_TIMESTAMP"] = f"bench_{os.getpid()}"
    register_resolvers()
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*args.overrides, f"trainer.max_steps={args.steps}"])
    built = build(cfg, args.launch / "outputs" / "run")
    strategy = built.strategy
    tracker = build_tracker(cfg, strategy, built.tracking)
    assert tracker is not None
    clock = _Clock(tracker, args.warmup, args.steps)
    trainer = build_trainer(built)
    trainer.tracker = clock
    # The CPU time of this process's other threads from start() to the end of close(): the
    # tracker's sender and receiver, all they ever did (what they could take via the GIL).
    before = time.process_time() - time.thread_time()
    tracker.start()
    tracker.wait_ready()
    trainer.fit()
    tracker.close("FINISHED")
    tracker_threads_s = time.process_time() - time.thread_time() - before
    strategy.teardown()
    (wall0, cpu0), (wall1, cpu1) = clock.marks[args.warmup], clock.marks[args.steps]
    steps = args.steps - args.warmup
    print(
        json.dumps(
            {
                "step_s": (wall1 - wall0) / steps,
                "cpu_step_s": (cpu1 - cpu0) / steps,
                "tracker_threads_cpu_s_per_scalar": tracker_threads_s / max(1, clock.scalars),
                "log_call_s_per_scalar": clock.call_s / max(1, clock.scalars),
                "scalars_per_step": clock.scalars / args.steps,
                "minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
                "metric_points": clock.scalars,
                "stored_points": _stored_points(args.launch, tracker.run_id),
            }
        )
    )


def _stored_points(launch: Path, run_id: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(launch / 'outputs' / 'mlflow.db').as_posix()}")
    keys = client.get_run(run_id).data.metrics
    return sum(len(client.get_metric_history(run_id, key)) for key in keys)


if __name__ == "__main__":
    main()
