"""Stopping a run cleanly: stop signals, and the Slurm requeue after a preemption warning.

SIGTERM, SIGINT and SIGUSR1 ask the loop to stop after the current step; it saves a
checkpoint and the run ends KILLED with exit status 128 + the signal.

Under Slurm, SIGUSR1 is the warning a job asks for (``--signal=USR1@120``, or
``scancel --signal=USR1``): rank 0 requeues the job once the run is saved and closed. A
SIGTERM never requeues: Slurm sends it to cancel a job (``scancel``), and when it requeues
or preempts one itself (``scontrol requeue``, ``PreemptMode=REQUEUE``), so a cancelled job
stays cancelled. Either way a requeued job runs its script again, and each ``python -m xp``
in it continues its own run (:func:`requeued_run`): the MLflow run this job started with
the same command.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xp.resume import ResumeTarget
    from xp.strategy.base import Strategy
    from xp.trainer import Trainer

REQUEUE_SIGNALS = (signal.SIGUSR1,)
"""The stop signals after which a Slurm job requeues itself."""


_HELD: list[int] = []
"""The warning (SIGUSR1) that came before the loop could take it (:func:`hold_warnings`)."""


def hold_warnings() -> None:
    """Keep a SIGUSR1 that comes before training starts, for the loop to take at its start.

    Slurm sends its warning (``--signal=USR1@T``, ``scancel --signal=USR1``) to every
    process of the job step when its time comes, also while ``python -m xp`` still
    imports, composes or downloads what a requeued job resumes. USR1's default action
    would end the process there: the step fails and the job is not requeued. Held, the
    loop stops at its first point where the ranks agree, saves, and the job requeues as
    for a warning during training. ``python -m xp`` calls this first thing; its forked
    training process and a launcher's workers inherit it or call it too.
    """
    if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        signal.signal(signal.SIGUSR1, _hold)
        # And once the process ends, after its run: Python's exit puts USR1's default
        # action back, and a warning then would end a job step whose run has finished as
        # failed. Registered first, this runs last of the exit hooks.
        atexit.register(signal.signal, signal.SIGUSR1, signal.SIG_IGN)


def _hold(signum: int, frame: Any) -> None:
    if not _HELD:
        _HELD.append(signum)


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

    from xp.trainer import TrainingStopped

    previous = {sig: signal.signal(sig, handler) for sig in stops}
    if _HELD:  # a warning before the loop started: it stops at its first chance
        trainer.request_stop(_HELD.pop())
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
    """Requeue the Slurm job after its warning (SIGUSR1); it resumes itself into this run.

    Rank 0 asks once the run is saved and its MLflow run closed (KILLED): Slurm then ends
    the job's processes and starts the job again.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not strategy.is_main_process or signum not in REQUEUE_SIGNALS:
        return
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        strategy.logger.error(
            "Could not requeue Slurm job %s (%s); requeue it yourself (scontrol requeue %s): "
            "it resumes this run.",
            job,
            e,
            job,
        )
        return
    if result.returncode == 0:
        strategy.logger.warning("Requeued Slurm job %s; it will resume this run.", job)
    elif "pending" in result.stderr.lower():
        # Requeued already (scontrol requeue from outside, a preemption): nothing to do.
        strategy.logger.warning("Slurm job %s is requeued; it will resume this run.", job)
    else:
        strategy.logger.error(
            "scontrol requeue %s failed: %s; requeue it yourself: it resumes this run.",
            job,
            result.stderr.strip(),
        )


def requeued_run(tags: Mapping[str, str], *, tracking_uri: str) -> Any | None:
    """The MLflow run this Slurm job started before it was requeued, with these ``tags``.

    A requeued job starts again from the top: each ``python -m xp`` in its script finds
    the run it started, the newest run tagged with the job's id (``xp.slurm_job_id``)
    and its overrides (``xp.overrides``); a sweep's job (submitit) by its config hash.
    None when there is none (the job was requeued before that run began).
    """
    from xp.tracking import client

    job = os.environ["SLURM_JOB_ID"]
    store = client(tracking_uri)
    experiments = [e.experiment_id for e in store.search_experiments()]
    if not experiments:
        return None
    runs = store.search_runs(
        experiments,
        filter_string=f"tags.`xp.slurm_job_id` = '{job}'",
        order_by=["attributes.start_time DESC"],
    )
    return next(
        (r for r in runs if all(r.data.tags.get(k, "") == v for k, v in tags.items())), None
    )


def fail_requeued_run(run: Any, reason: str, *, tracking_uri: str) -> None:
    """End ``run`` FAILED with ``reason`` (tag ``xp.error``): its requeued job cannot go on."""
    from xp.tracking import ERROR_TAG, client

    store = client(tracking_uri)
    store.set_tag(run.info.run_id, ERROR_TAG, reason[:5000])
    store.set_terminated(run.info.run_id, "FAILED")


ALREADY_FINISHED = "!finished"
"""What rank 0 hands the other ranks when a requeued job's run had finished already."""


def requeued_target(
    overrides: Sequence[str], *, tracking_uri: str, outputs: Path
) -> ResumeTarget | None:
    """In a requeued Slurm job: the run this command continues; None to start anew.

    Raises:
        ResumeError: The job's run cannot be resumed (its checkpoints are gone); the run
            is marked FAILED with the reason, so it does not read RUNNING or KILLED forever.
        SystemExit: 0 when the job's run had FINISHED before the requeue.
    """
    from xp.log import say
    from xp.resume import ResumeError, resolve

    job = os.environ["SLURM_JOB_ID"]
    run = requeued_run({"xp.overrides": " ".join(overrides)}, tracking_uri=tracking_uri)
    if run is None:
        return None
    run_id = run.info.run_id
    if run.info.status == "FINISHED":
        say(
            f"xp: Slurm job {job} was requeued, but this command's run {run_id} had finished; "
            "nothing to train."
        )
        raise SystemExit(0)
    try:
        return resolve(run_id, tracking_uri=tracking_uri, experiment_name=None, outputs=outputs)
    except ResumeError as e:
        reason = (
            f"Slurm job {job} was requeued to resume its MLflow run {run_id} "
            f"({run.data.tags.get('xp.run_dir', 'its run directory')}), but it cannot: {e} "
            "The run is marked FAILED."
        )
        fail_requeued_run(run, reason, tracking_uri=tracking_uri)
        raise ResumeError(reason) from None
