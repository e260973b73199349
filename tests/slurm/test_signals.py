"""The processes xp starts beside the training survive the signals Slurm sends to every
process of a job step, and leave the run to the training process (no cluster needed)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from mlflow import MlflowClient

from tests.procs import alive, writer_pids
from xp.config import TrackingConfig
from xp.tracking import MlflowTracker

# --signal=USR1@T and scancel --signal=USR1 (the warning), submitit's USR2, srun's
# forwarded Ctrl-C, and the SIGTERM of scancel, scontrol requeue and the time limit.
SLURM_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM)


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
