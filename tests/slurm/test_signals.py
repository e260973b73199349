"""The processes xp starts beside the training survive the signals Slurm sends to every
process of a job step, and leave the run to the training process (no cluster needed)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.integration.conftest import workdir
from tests.procs import alive, writer_pids
from xp.config import TrackingConfig
from xp.tracking import MlflowTracker

# --signal=USR1@T and scancel --signal=USR1 (the warning), submitit's USR2, srun's
# forwarded Ctrl-C, and the SIGTERM of scancel, scontrol requeue and the time limit.
SLURM_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM)
_ = workdir  # the CLI tests' working directory with its default store


@pytest.mark.slow
def test_the_mlflow_writer_survives_slurm_signals_and_records_the_stop(mlflow_uri: str) -> None:
    tracker = MlflowTracker(
        TrackingConfig(flush_interval_s=0.2),
        tracking_uri=mlflow_uri,
        experiment_name="exp",
        run_name="run",
    )
    tracker.start()
    tracker.wait_ready(timeout=60)
    (writer,) = writer_pids(os.getpid())
    for step in range(1, 301):
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    for signum in SLURM_SIGNALS:  # as Slurm does: every process of the step gets them
        os.kill(writer, signum)
    time.sleep(0.5)
    assert alive(writer), "the MLflow writer died of a signal meant for the training process"
    for step in range(301, 601):
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    tracker.close("KILLED", error="Stopped by SIGUSR1.")

    store = MlflowClient(mlflow_uri)
    run = store.get_run(tracker.run_id)
    assert run.info.status == "KILLED"  # not RUNNING until a requeued job comes
    steps = [m.step for m in store.get_metric_history(tracker.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 601))  # every point written, none left for later


@pytest.mark.slow
@pytest.mark.parametrize("fork", ["1", "0"], ids=["forked", "one-process"])
def test_a_warning_before_training_starts_is_kept_for_the_loop(workdir: Path, fork: str) -> None:
    """Slurm's warning (USR1) comes whenever its time comes: also while ``python -m xp``
    still imports, composes or resumes (a requeued job starting up). It must not end the
    process (USR1's default action), which would fail the job step without a requeue:
    the loop takes it at its start, trains one step, saves and stops as for a warning
    during training. Forked (``python -m xp`` on a terminal) and in one process (a task
    of srun, ``XP_FORK=0``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "XP_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "xp", "trainer.max_steps=500", "experiment_name=early"],
        cwd=workdir,
        env={**env, "OMP_NUM_THREADS": "1", "XP_FORK": fork},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # xp has started (0.1-0.3 s), torch has not imported yet (1 s and more)
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert "Stopped by SIGUSR1 at step 1;" in err, err[-3000:]
    store = MlflowClient(f"sqlite:///{workdir / 'outputs' / 'mlflow.db'}")
    (run,) = store.search_runs([store.get_experiment_by_name("early").experiment_id])
    assert run.info.status == "KILLED"
    (run_dir,) = (workdir / "outputs" / "early").iterdir()
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*.pt")] == ["step_00000001.pt"]


def test_a_warning_as_the_process_ends_after_its_run_does_not_fail_it() -> None:
    """Slurm's warning can come as the training process exits, its run finished: Python's
    exit puts USR1's default action back, and a warning then would end the process as
    killed (the job step, and so the job, FAILED). It is ignored from the exit on."""
    script = (
        "import torch\n"  # a process with torch to free at exit, as a run's has: a while
        "from xp.stop import hold_warnings\n"
        "hold_warnings()\n"
        "print('ready', flush=True)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    while process.poll() is None:  # the warning, again and again, until the process is gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGUSR1)
        time.sleep(0.002)
    assert process.returncode == 0
