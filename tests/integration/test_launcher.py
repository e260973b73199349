"""xp's own launcher (strategy.nproc_per_node > 1): its workers live and die with it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.procs import alive, children, wait_gone, writer_pids

pytestmark = pytest.mark.slow


def test_kill_9_of_the_launcher_stops_its_workers_and_the_run_resumes(workdir, store) -> None:
    args = ["strategy=ddp", "strategy.nproc_per_node=2", "experiment_name=orphans",
            "trainer.max_epochs=400", "checkpoint.interval_steps=5"]  # fmt: skip
    launcher = subprocess.Popen(
        [sys.executable, "-m", "xp", *args],
        cwd=workdir,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not list((workdir / "outputs" / "orphans").glob("*/checkpoints/step_*.pt")):
        assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.1)
    workers = children(launcher.pid)
    assert len(workers) == 2
    deadline = time.monotonic() + 60
    while not (writers := writer_pids(launcher.pid, descendants=True)):
        assert time.monotonic() < deadline, "rank 0 started no MLflow writer"
        time.sleep(0.1)
    killed = time.monotonic()
    launcher.kill()
    launcher.wait()
    for pid in workers:
        wait_gone(pid, f"worker {pid} trains on after its launcher was killed", timeout_s=30)
    stopped_s = time.monotonic() - killed
    for pid in writers:  # rank 0's writer marks the run KILLED, then goes too
        wait_gone(pid, f"MLflow writer {pid} is left behind by the killed run", timeout_s=30)
    assert not any(alive(pid) for pid in workers + writers)
    # "Within seconds" (README): the workers poll their launcher each second, then save.
    assert stopped_s < 10, f"the workers took {stopped_s:.1f} s to stop"

    experiment = store.get_experiment_by_name("orphans")
    (run,) = store.search_runs([experiment.experiment_id])
    # The workers were told to stop (SIGTERM): they saved and marked the run KILLED.
    assert run.info.status == "KILLED"
    latest = sorted((workdir / "outputs" / "orphans").glob("*/checkpoints/step_*.pt"))[-1]
    steps = int(latest.stem.split("_")[1]) + 5
    resumed = subprocess.run(
        [sys.executable, "-m", "xp", f"resume={run.info.run_id}", f"trainer.max_steps={steps}"],
        cwd=workdir, env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert store.get_run(run.info.run_id).info.status == "FINISHED"
