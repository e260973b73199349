"""Stopping a run cleanly: stop signals, and the Slurm requeue after a preemption warning.

SIGTERM, SIGINT and SIGUSR1 (Slurm's warning) ask the loop to stop after the current step;
it saves a checkpoint and the run ends KILLED with exit status 128 + the signal. Under
Slurm the job then requeues itself, and the requeued job resumes the same run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

from xp.strategy.base import Strategy
from xp.trainer import Trainer, TrainingStopped


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM, SIGINT and SIGUSR1 (Slurm's warning) stop after the current step.

    A second Ctrl-C interrupts at once; a SIGTERM beside a Ctrl-C (``python -m xp``'s
    parent passes a SIGINT sent to the process group on as SIGTERM) does not. When the
    loop stops on a signal, the handlers stay while the run saves and closes: a repeated
    SIGTERM (the parent passing on one the process group also got, a scheduler's
    reminder) must not kill the process with its MLflow run half closed. The process ends
    right after.
    """
    stops = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]

    interrupts = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                raise KeyboardInterrupt
        trainer.request_stop(signum)

    previous = {sig: signal.signal(sig, handler) for sig in stops}
    stopped = False
    try:
        yield
    except TrainingStopped:
        stopped = True
        raise
    finally:
        if not stopped:
            for sig, old in previous.items():
                signal.signal(sig, old)


def requeue_on_slurm(strategy: Strategy, signum: int) -> None:
    """Requeue the Slurm job after a preemption warning; it resumes itself into this run."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not strategy.is_main_process or signum not in (signal.SIGUSR1, signal.SIGTERM):
        return
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        strategy.logger.error(
            "Could not requeue Slurm job %s (%s); requeue it yourself, it resumes this run.",
            job,
            e,
        )
        return
    if result.returncode == 0:
        strategy.logger.warning("Requeued Slurm job %s; it will resume this run.", job)
    else:
        strategy.logger.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
