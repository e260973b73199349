"""xp.tracking when the store or the writer fails: a killed writer, a store that takes
nothing, a training process killed with ``kill -9``, and the writer's lock files."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.procs import wait_gone, writer_pids
from tests.unit.test_tracking import (
    history,
    make_tracker,
    needs_proc,
    read_json,
    start_training,
)
from xp.config import TrackingConfig
from xp.tracking import TrackingError, TrackingIncomplete


@pytest.fixture
def log() -> logging.Logger:
    """A logger that reaches caplog whatever other tests did to the ``xp`` logger."""
    logger = logging.getLogger("tests.tracking")
    logger.propagate = True
    return logger


@pytest.fixture(autouse=True)
def _no_tracking_uri_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp directory of the writers this test starts (they inherit $TMPDIR)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    return temp


def lock_files(temp: Path) -> list[str]:
    return sorted(p.name for p in temp.glob("xp-mlflow-writer-*.lock"))


class locked_store:
    """Holds an exclusive transaction on a SQLite store: its writers wait, then fail."""

    def __init__(self, uri: str) -> None:
        self.connection = sqlite3.connect(uri[len("sqlite:///") :], isolation_level=None)

    def __enter__(self) -> sqlite3.Connection:
        self.connection.execute("BEGIN EXCLUSIVE")
        return self.connection

    def __exit__(self, *exc: object) -> None:
        self.connection.execute("ROLLBACK")
        self.connection.close()


def wait_for(condition: object, message: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


# --------------------------------------------------------------------------- a killed writer


@needs_proc
def test_a_killed_writer_is_noticed_and_the_run_is_reported_incomplete_until_resumed(
    mlflow_uri: str,
    tmp_path: Path,
    temp_dir: Path,
    log: logging.Logger,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = make_tracker(mlflow_uri, tmp_path, log)
    tracker.start()
    for step in range(10):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    wait_for(lambda: tracker.written_through_step == 9, "the first points were not written")
    (writer,) = writer_pids(os.getpid())
    os.kill(writer, signal.SIGKILL)
    wait_for(lambda: "SIGKILL" in caplog.text, "the writer's death went unnoticed")

    # Training goes on: nothing raises, nothing waits.
    for step in range(10, 30):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    config = tmp_path / "config.yaml"
    config.write_text("a: 1\n")
    tracker.log_artifact(config)
    with pytest.raises(TrackingIncomplete) as caught:
        tracker.close()

    error = caught.value
    assert (error.missing_points, error.first_missing_step) == (20, 10)
    assert error.missing_writes == [f"artifact {config}"]
    assert not error.status_recorded
    assert "the MLflow writer process died mid-run" in str(error)
    assert f"`python -m xp resume={tracker.run_id}`" in str(error)
    assert caplog.text.count("SIGKILL while the run trains") == 1
    client = MlflowClient(mlflow_uri)
    assert history(client, tracker.run_id, "train/loss") == [(s, float(s)) for s in range(10)]
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    assert lock_files(temp_dir) == [f"xp-mlflow-writer-{tracker.run_id}.lock"]  # it was killed
    # The next writer, of any run, removes what a killed one left: they do not pile up.
    other = make_tracker(mlflow_uri, tmp_path, log)
    other.start()
    other.wait_ready(timeout=60)
    assert lock_files(temp_dir) == [f"xp-mlflow-writer-{other.run_id}.lock"]
    other.close()
    assert lock_files(temp_dir) == []

    # What resume= does: re-open the run and replay the checkpoint's unstored points.
    again = make_tracker(mlflow_uri, tmp_path, log, run_id=tracker.run_id)
    again.start()
    for step in range(30):
        again.log_metrics({"train/loss": float(step)}, step=step)
    again.close()
    assert history(client, tracker.run_id, "train/loss") == [(s, float(s)) for s in range(30)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert lock_files(temp_dir) == []


# ------------------------------------------------------------- a store that takes nothing


def test_points_beyond_the_buffer_bound_drop_oldest_and_resume_restores_them(
    mlflow_uri: str,
    tmp_path: Path,
    log: logging.Logger,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = TrackingConfig(flush_interval_s=1.0, max_buffered_points=10)
    tracker = make_tracker(mlflow_uri, tmp_path, log, settings=settings)
    tracker.start()
    tracker.wait_ready(timeout=60)
    with locked_store(mlflow_uri):
        for step in range(50):  # handed over at once, while the store takes nothing
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        wait_for(lambda: "max_buffered_points=10" in caplog.text, "the dropping went unsaid")
    with pytest.raises(TrackingIncomplete) as caught:
        tracker.close()

    error = caught.value
    assert (error.missing_points, error.first_missing_step) == (40, 0)
    assert error.status_recorded  # the store answered again: the run ended
    assert "40 metric points (from step 0 on) are missing" in str(error)
    assert "beyond tracking.max_buffered_points=10" in str(error)
    assert "close_timeout_s" not in str(error).split("HINT")[0]  # the store answered
    client = MlflowClient(mlflow_uri)
    assert history(client, tracker.run_id, "train/loss") == [(s, float(s)) for s in range(40, 50)]
    # The trainer keeps every point above this step in its checkpoints: all the dropped ones.
    assert tracker.written_through_step == -1
    assert caplog.text.count("max_buffered_points=10") == 1

    again = make_tracker(mlflow_uri, tmp_path, log, run_id=tracker.run_id)
    again.start()
    for step in range(50):  # the checkpoint's unstored points, replayed by resume=
        again.log_metrics({"train/loss": float(step)}, step=step)
    again.close()
    assert history(client, tracker.run_id, "train/loss") == [(s, float(s)) for s in range(50)]


def test_bad_settings_name_the_key(mlflow_uri: str, tmp_path: Path, log: logging.Logger) -> None:
    settings = TrackingConfig(close_timeout_s=0)
    with pytest.raises(ValueError, match=r"tracking\.close_timeout_s=0 must be greater than 0"):
        make_tracker(mlflow_uri, tmp_path, log, settings=settings)


# --------------------------------------------------------------------------- the lock files


def test_lock_files_are_removed_and_still_keep_a_second_writer_out(
    mlflow_uri: str,
    tmp_path: Path,
    temp_dir: Path,
    log: logging.Logger,
) -> None:
    first = make_tracker(mlflow_uri, tmp_path, log)
    first.start()
    first.wait_ready(timeout=60)
    assert lock_files(temp_dir) == [f"xp-mlflow-writer-{first.run_id}.lock"]
    second = make_tracker(mlflow_uri, tmp_path, log, run_id=first.run_id)
    second.start()
    with pytest.raises(TrackingError, match="not ready after"):
        second.wait_ready(timeout=3)  # it waits for the first writer to end
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.close()
    second.wait_ready(timeout=60)
    second.log_metrics({"train/loss": 0.5}, step=1)
    second.close()

    assert lock_files(temp_dir) == []
    client = MlflowClient(mlflow_uri)
    assert history(client, first.run_id, "train/loss") == [(0, 1.0), (1, 0.5)]
    assert client.get_run(first.run_id).info.status == "FINISHED"


# ---------------------------------------------------------------- kill -9 of the training


@pytest.mark.slow
@needs_proc
def test_writer_of_a_killed_training_leaves_within_seconds_even_when_the_store_hangs(
    mlflow_uri: str, tmp_path: Path, temp_dir: Path
) -> None:
    proc = start_training(tmp_path, mlflow_uri, "kill")
    try:
        run_id = read_json(proc)["run_id"]
        (writer,) = writer_pids(proc.pid)
        with locked_store(mlflow_uri):  # every write waits 20 s (MLflow's busy timeout), then fails
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            read_json(proc)  # everything is handed over
            proc.kill()
            proc.wait(timeout=60)
            wait_gone(writer, "the writer outlived its training process", timeout_s=15)
    finally:
        proc.kill()
    assert lock_files(temp_dir) == []
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "RUNNING"  # resume= ends it


AT_START = """
import json, sys, time
from pathlib import Path
from xp.config import TrackingConfig
from xp.tracking import MlflowTracker

tracker = MlflowTracker(
    TrackingConfig(flush_interval_s=30.0), tracking_uri=sys.argv[1], experiment_name="exp",
    run_name="run",
)
tracker.set_tags({"xp.set_before_start": "yes"})
tracker.start()
tracker.wait_ready(timeout=60)
tracker.set_tags({"xp.torch": "2.13"})
tracker.log_artifact(Path(sys.argv[2]))
print(json.dumps({"run_id": tracker.run_id}), flush=True)
time.sleep(600)  # until killed
"""


@pytest.mark.slow
@needs_proc
def test_tags_and_artifacts_sent_at_start_survive_a_kill(mlflow_uri: str, tmp_path: Path) -> None:
    # Long before the next flush (30 s), the process is killed: what it asked for at start
    # (the searchable tags, env.json) is in the store all the same.
    script = tmp_path / "start.py"
    script.write_text(AT_START)
    env_json = tmp_path / "env.json"
    env_json.write_text('{"torch": "2.13"}')
    proc = subprocess.Popen(
        [sys.executable, str(script), mlflow_uri, str(env_json)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        run_id = read_json(proc)["run_id"]
        (writer,) = writer_pids(proc.pid)
        time.sleep(0.5)
        proc.kill()
        proc.wait(timeout=60)
        wait_gone(writer, "the writer outlived its training process", timeout_s=15)
    finally:
        proc.kill()
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.data.tags["xp.set_before_start"] == "yes"
    assert run.data.tags["xp.torch"] == "2.13"
    assert [a.path for a in client.list_artifacts(run_id)] == ["env.json"]
    assert run.info.status == "RUNNING"
