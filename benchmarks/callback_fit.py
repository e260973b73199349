"""One run of the callbacks case: ``Trainer.fit`` on the tiny model, with a variant's callbacks.

Variants: ``before`` (the training loop as it was before callbacks existed: ``xp/trainer.py``
at commit :data:`BEFORE`, read from git), ``none`` (today's loop, no callbacks),
``early_stopping`` (EarlyStopping on val/loss that never stops) and ``ema`` (EMA, decay
0.999, every step, validating the average). Everything else is the same: digits MLP
64-128-128-10, batch 64, AdamW, one torch thread, validation every epoch, logging every
10 steps into a sink that only notes the clock (no MLflow: its cost is the step cases'),
no checkpoints. The step time is taken between two log steps (``--warmup`` and
``--steps``), validations included. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BEFORE = "67f70206565f8640da52cb5dde178eb2aa874bf5"
"""The last commit whose training loop had no callbacks (issue 15's baseline)."""
VARIANTS = ("before", "none", "early_stopping", "ema")


class _Clock:
    """A metric sink that notes the clocks at two log steps and stores nothing."""

    written_through_step = 1 << 62  # everything "stored": the trainer keeps no backlog

    def __init__(self, first: int, last: int) -> None:
        self.wanted = (first, last)
        self.marks: dict[int, tuple[float, float]] = {}

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if step in self.wanted:
            self.marks[step] = (time.perf_counter(), time.thread_time())


def trainer_before() -> ModuleType:
    """``xp/trainer.py`` as it was at :data:`BEFORE`, imported under a name of its own."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE}:xp/trainer.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    name = "xp_trainer_before"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being defined
    exec(compile(source, f"xp/trainer.py@{BEFORE[:7]}", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import torch

    from xp import trainer as today
    from xp.callback import EMA, Callback, EarlyStopping
    from xp.checkpoint import Checkpointer
    from xp.config import AdamWConfig, CheckpointConfig, RandomnessConfig, TrainerConfig
    from xp.data import EpochLoader, digits
    from xp.model import MLP
    from xp.optim import OptimSpec
    from xp.strategy import SingleDeviceStrategy
    from xp.task import SupervisedTask

    loop = trainer_before() if args.variant == "before" else today
    callbacks: dict[str, Callback] = {
        "none": {},
        "before": {},
        "early_stopping": {"early_stopping": EarlyStopping(patience=1 << 30)},
        "ema": {"ema": EMA(decay=0.999)},
    }[args.variant]
    with tempfile.TemporaryDirectory(prefix="xp-bench-callbacks-") as tmp:
        strategy = SingleDeviceStrategy(
            log_dir=Path(tmp) / "run",
            experiment_name="bench",
            randomness=RandomnessConfig(seed=0),
            threads_per_process=1,
        )
        data = digits()
        common = {"batch_size": args.batch_size, "seed": 0}
        train = EpochLoader(data.train, shuffle=True, **common)
        val = EpochLoader(data.val, shuffle=False, pad=False, **common)
        settings = TrainerConfig(max_epochs=None, max_steps=args.steps, log_interval_steps=10)
        length = loop.training_length(settings, batches_per_epoch=len(train))
        prepared = strategy.prepare(
            lambda: MLP(64, args.hidden, 10, dropout=0.0),
            optim=OptimSpec(partial(torch.optim.AdamW, lr=1e-3), AdamWConfig(lr=1e-3)),
        )
        clock = _Clock(args.warmup, args.steps)
        options: dict[str, Any] = {"callbacks": callbacks} if args.variant != "before" else {}
        trainer = loop.Trainer(
            strategy,
            prepared,
            train_loader=train,
            val_loader=val,
            settings=settings,
            length=length,
            checkpointer=Checkpointer(strategy.checkpoint_dir),
            task=SupervisedTask(),
            checkpoint=CheckpointConfig(interval_epochs=0),
            tracker=clock,
            **options,
        )
        trainer.fit()
        strategy.teardown()
    (wall0, cpu0), (wall1, cpu1) = clock.marks[args.warmup], clock.marks[args.steps]
    steps = args.steps - args.warmup
    print(json.dumps({"step_s": (wall1 - wall0) / steps, "cpu_step_s": (cpu1 - cpu0) / steps}))


if __name__ == "__main__":
    main()
