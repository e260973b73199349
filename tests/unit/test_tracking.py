"""xp.tracking against real MLflow stores: a SQLite file, and one real server (slow)."""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.procs import alive, wait_gone, writer_pids
from xp import tracking
from xp.config import ServerDownAtStart, TrackingConfig
from xp.tracking import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    MlflowTracker,
    TrackingError,
    TrackingIncomplete,
    default_artifact_location,
    default_tracking_uri,
    drop_early_writer,
    flatten_params,
    start_early_writer,
)

FAST = TrackingConfig(flush_interval_s=0.05)


@pytest.fixture
def log() -> logging.Logger:
    """A logger that reaches caplog whatever other tests did to the ``xp`` logger."""
    logger = logging.getLogger("tests.tracking")
    logger.propagate = True
    return logger


def make_tracker(uri: str, tmp_path: Path, log: logging.Logger, **kwargs: object) -> MlflowTracker:
    options: dict = {
        "tracking_uri": uri,
        "experiment_name": "exp",
        "run_name": "run",
        "artifact_location": default_artifact_location(uri, "exp"),
        "logger": log,
    }
    options.update(kwargs)
    settings = options.pop("settings", FAST)
    return MlflowTracker(settings, **options)  # type: ignore[arg-type]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            found |= artifact_paths(client, run_id, info.path)
        else:
            found.add(info.path)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- runs


def test_run_holds_every_param_tag_and_metric_point(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger
) -> None:
    config = {f"group{i}": {"value": i, "name": f"n{i}"} for i in range(80)}
    config["long"] = {"text": "x" * 10_000}
    params = flatten_params(config)
    assert len(params) > 100
    tracker = make_tracker(
        mlflow_uri, tmp_path, log, params=params, tags={"xp.git_commit": "abc123"}
    )
    tracker.start()
    for step in range(2000):
        tracker.log_metrics({"train/loss": step * 0.5, "train/acc": step / 2000}, step=step)
    tracker.set_tags({"xp.late": "yes"})
    tracker.close()

    client = MlflowClient(mlflow_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert history(client, tracker.run_id, "train/loss") == [(s, s * 0.5) for s in range(2000)]
    assert history(client, tracker.run_id, "train/acc") == [(s, s / 2000) for s in range(2000)]
    assert run.data.params == params
    assert len(run.data.params["long.text"]) == MAX_PARAM_VAL_LENGTH
    assert run.data.params["long.text"].endswith("...")
    assert run.data.tags["xp.git_commit"] == "abc123"
    assert run.data.tags["xp.late"] == "yes"
    assert tracker.unwritten_metrics == 0
    # Artifacts of a SQLite store go under the launch dir's outputs/, not ./mlruns.
    assert run.info.artifact_uri.startswith((tmp_path / "mlflow" / "mlartifacts" / "exp").as_uri())


def test_run_times_span_its_metrics_however_late_the_writer_creates_it(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger
) -> None:
    # The writer imports mlflow and creates the run a second or more after start() (in a
    # sweep, after short jobs trained): the run still starts when its training started.
    started_ms = int(time.time() * 1000)
    tracker = make_tracker(mlflow_uri, tmp_path, log, start_time_ms=started_ms)
    tracker.start()
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.wait_ready(timeout=60)
    tracker.log_metrics({"train/loss": 0.5}, step=1)
    closed_ms = int(time.time() * 1000)
    tracker.close()

    client = MlflowClient(mlflow_uri)
    info = client.get_run(tracker.run_id).info
    stamps = [m.timestamp for m in client.get_metric_history(tracker.run_id, "train/loss")]
    assert info.start_time == started_ms <= min(stamps)
    assert max(stamps) <= closed_ms <= info.end_time <= closed_ms + 1000

    # Without a start time given, the tracker's creation is the start.
    before_ms = int(time.time() * 1000)
    tracker = make_tracker(mlflow_uri, tmp_path, log)
    tracker.start()
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.close()
    info = client.get_run(tracker.run_id).info
    (point,) = client.get_metric_history(tracker.run_id, "train/loss")
    assert before_ms <= info.start_time <= point.timestamp <= info.end_time


def test_metric_values_may_be_0dim_tensors(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger
) -> None:
    torch = pytest.importorskip("torch")
    tracker = make_tracker(mlflow_uri, tmp_path, log)
    tracker.start()
    for step in range(3):
        loss = torch.tensor(0.25 * step, requires_grad=True) * 2
        tracker.log_metrics({"train/loss": loss.detach(), "train/lr": 0.1}, step=step)
    tracker.close()

    client = MlflowClient(mlflow_uri)
    assert history(client, tracker.run_id, "train/loss") == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert history(client, tracker.run_id, "train/lr") == [(0, 0.1), (1, 0.1), (2, 0.1)]


def test_bad_metric_keys_and_values_are_dropped_with_a_warning(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = make_tracker(mlflow_uri, tmp_path, log)
    tracker.start()
    tracker.log_metrics({"train/loss": 1.0, "bad key?": 2.0, "val/acc": "n/a"}, step=0)  # type: ignore[dict-item]
    tracker.close()

    client = MlflowClient(mlflow_uri)
    assert history(client, tracker.run_id, "train/loss") == [(0, 1.0)]
    assert "'bad key?' is not valid" in caplog.text
    assert "'val/acc' got a str that cannot be read as a number" in caplog.text
    assert tracker.unwritten_metrics == 2


def test_artifacts_and_checkpoints_land_in_the_run(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger
) -> None:
    (tmp_path / "config.yaml").write_text("a: 1\n")
    report = tmp_path / "report"
    (report / "sub").mkdir(parents=True)
    (report / "summary.txt").write_text("ok")
    (report / "sub" / "plot.csv").write_text("1,2")
    small = tmp_path / "step_00000010.pt"
    small.write_bytes(b"\0" * 1024)
    sharded = tmp_path / "step_00000020"
    sharded.mkdir()
    (sharded / "rank0.pt").write_bytes(b"\0" * 1024)
    big = tmp_path / "step_00000030.pt"
    big.write_bytes(b"\0" * 4 * 2**20)

    settings = TrackingConfig(flush_interval_s=0.05, checkpoint_artifact_max_mb=1.0)
    tracker = make_tracker(mlflow_uri, tmp_path, log, settings=settings)
    tracker.start()
    tracker.log_artifact(tmp_path / "config.yaml")
    tracker.log_artifact(tmp_path / "config.yaml", artifact_path="hydra")
    tracker.log_artifacts(report, artifact_path="report")
    tracker.log_checkpoint(small)
    tracker.log_checkpoint(sharded)
    tracker.log_checkpoint(big)
    tracker.close()

    client = MlflowClient(mlflow_uri)
    assert artifact_paths(client, tracker.run_id) == {
        "config.yaml",
        "hydra/config.yaml",
        "report/summary.txt",
        "report/sub/plot.csv",
        "checkpoints/step_00000010.pt",
        "checkpoints/step_00000020/rank0.pt",
    }
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["xp.checkpoint_location"] == str(big.absolute())


def test_logging_a_missing_file_fails_at_the_call(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger
) -> None:
    tracker = make_tracker(mlflow_uri, tmp_path, log)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        tracker.log_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(NotADirectoryError, match="log_artifact for a single file"):
        (tmp_path / "file.txt").write_text("x")
        tracker.log_artifacts(tmp_path / "file.txt")


def test_failed_run_records_the_error(mlflow_uri: str, tmp_path: Path, log: logging.Logger) -> None:
    error = "Traceback (most recent call last):\n" + "  frame\n" * 2000 + "ValueError: boom"
    tracker = make_tracker(mlflow_uri, tmp_path, log)
    tracker.start()
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.close("FAILED", error=error)
    tracker.close("FINISHED")  # idempotent: the first status stays

    client = MlflowClient(mlflow_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["xp.error"] == error[:5000]
    local = client.download_artifacts(tracker.run_id, "error.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == error
    assert history(client, tracker.run_id, "train/loss") == [(1, 1.0)]


def test_killed_run_and_bad_status(mlflow_uri: str, tmp_path: Path, log: logging.Logger) -> None:
    tracker = make_tracker(mlflow_uri, tmp_path, log)
    tracker.start()
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracker.close("DONE")
    tracker.close("KILLED")
    assert MlflowClient(mlflow_uri).get_run(tracker.run_id).info.status == "KILLED"


def test_reopened_run_continues(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_tracker(mlflow_uri, tmp_path, log, params={"optim.lr": "0.1"})
    first.start()
    first.log_metrics({"train/loss": 3.0}, step=10)
    first.close()

    client = MlflowClient(mlflow_uri)
    again = make_tracker(
        mlflow_uri,
        tmp_path,
        log,
        run_id=first.run_id,
        params={"optim.lr": "0.2", "trainer.max_epochs": "40"},
    )
    again.start()
    again.wait_ready(timeout=30)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    again.log_metrics({"train/loss": 2.0}, step=20)
    again.close()

    run = client.get_run(first.run_id)
    assert again.run_id == first.run_id
    assert run.info.status == "FINISHED"
    assert history(client, first.run_id, "train/loss") == [(10, 3.0), (20, 2.0)]
    assert run.data.params == {"optim.lr": "0.1", "trainer.max_epochs": "40"}
    assert "optim.lr: '0.1' -> '0.2'" in caplog.text
    assert len(client.search_runs(run.info.experiment_id)) == 1


# --------------------------------------------------------------------------- the writer process


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@needs_proc
def test_writer_process_runs_without_torch_and_exits_on_close(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger
) -> None:
    pytest.importorskip("torch")  # loaded here, so the check below means something
    tracker = make_tracker(mlflow_uri, tmp_path, log)
    tracker.start()
    tracker.wait_ready(timeout=60)
    (writer,) = writer_pids(os.getpid())
    assert "libtorch" not in Path(f"/proc/{writer}/maps").read_text()
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.close()

    assert not alive(writer)
    assert writer_pids(os.getpid()) == []
    assert history(MlflowClient(mlflow_uri), tracker.run_id, "train/loss") == [(0, 1.0)]


@needs_proc
def test_an_early_writer_serves_the_first_run(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger
) -> None:
    # python -m xp starts it first thing, so mlflow is imported while torch is.
    start_early_writer()
    (early,) = writer_pids(os.getpid())
    tracker = make_tracker(mlflow_uri, tmp_path, log)
    tracker.start()
    tracker.wait_ready(timeout=60)
    assert writer_pids(os.getpid()) == [early]  # taken, not a second writer
    for step in range(20):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    tracker.close()
    assert not alive(early)
    client = MlflowClient(mlflow_uri)
    assert history(client, tracker.run_id, "train/loss") == [(s, float(s)) for s in range(20)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


@needs_proc
def test_an_early_writer_leaves_when_the_config_turns_tracking_off() -> None:
    start_early_writer()
    (early,) = writer_pids(os.getpid())
    drop_early_writer()  # what xp.run does for tracking.enabled=false
    wait_gone(early, "the dropped writer is still there")
    assert writer_pids(os.getpid()) == []


UNUSED = """
import os, sys
from xp.tracking import start_early_writer
start_early_writer()
print(os.getpid(), flush=True)
sys.stdin.readline()
"""


@needs_proc
def test_an_early_writer_never_used_leaves_with_its_process(tmp_path: Path) -> None:
    # A config with tracking off never takes it: it must not linger.
    proc = subprocess.Popen(
        [sys.executable, "-c", UNUSED], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        proc.stdout.readline()
        (writer,) = writer_pids(proc.pid)
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
        wait_gone(writer, "the unused writer outlived its process")
    finally:
        proc.kill()


TRAINING = """
import json, sys, time
from xp.config import TrackingConfig
from xp.tracking import MlflowTracker

tracker = MlflowTracker(
    TrackingConfig(flush_interval_s=0.05), tracking_uri=sys.argv[1], experiment_name="exp",
    run_name="run",
)
tracker.start()
tracker.wait_ready(timeout=60)
print(json.dumps({"run_id": tracker.run_id}), flush=True)
sys.stdin.readline()
for step in range(100):
    tracker.log_metrics({"train/loss": float(step)}, step=step)
    tracker.set_tags({"xp.last_step": str(step)}) if step == 99 else None
time.sleep(1.0)  # twenty flush intervals: all of it is handed over
print(json.dumps({"mlflow_imported": "mlflow" in sys.modules}), flush=True)
if sys.argv[2] == "close":
    tracker.close()
    print(json.dumps({"unwritten": tracker.unwritten_metrics}), flush=True)
else:
    time.sleep(600)  # until killed
"""


def start_training(tmp_path: Path, uri: str, end: str) -> subprocess.Popen[str]:
    script = tmp_path / "train.py"
    script.write_text(TRAINING)
    return subprocess.Popen(
        [sys.executable, str(script), uri, end],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def read_json(proc: subprocess.Popen[str]) -> dict:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the training process ended early ({proc.wait(timeout=60)})"
    return json.loads(line)


@pytest.mark.slow
def test_training_process_never_imports_mlflow(mlflow_uri: str, tmp_path: Path) -> None:
    proc = start_training(tmp_path, mlflow_uri, "close")
    try:
        run_id = read_json(proc)["run_id"]
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert read_json(proc) == {"mlflow_imported": False}
        assert read_json(proc) == {"unwritten": 0}
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    client = MlflowClient(mlflow_uri)
    assert history(client, run_id, "train/loss") == [(s, float(s)) for s in range(100)]
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
@needs_proc
def test_killed_training_leaves_no_writer_and_keeps_what_it_handed_over(
    mlflow_uri: str, tmp_path: Path
) -> None:
    database = mlflow_uri[len("sqlite:///") :]
    proc = start_training(tmp_path, mlflow_uri, "kill")
    try:
        run_id = read_json(proc)["run_id"]
        (writer,) = writer_pids(proc.pid)
        # Another process holds the store: the writer gets the points but cannot write them
        # before the training process is gone.
        lock = sqlite3.connect(database, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            read_json(proc)
            proc.kill()
            proc.wait(timeout=60)
            time.sleep(0.5)
            stored = lock.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid = ?", (run_id,))
            assert stored.fetchone() == (0,)  # so what is there below came after the kill
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        wait_gone(writer, "the writer outlived its training process")
    finally:
        proc.kill()
    client = MlflowClient(mlflow_uri)
    assert history(client, run_id, "train/loss") == [(s, float(s)) for s in range(100)]
    run = client.get_run(run_id)
    assert run.data.tags["xp.last_step"] == "99"
    assert run.info.status == "RUNNING"  # nobody ended it: a resume can continue it


def test_run_that_cannot_be_created_fails_on_the_training_thread(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger
) -> None:
    client = MlflowClient(mlflow_uri)
    client.delete_experiment(client.create_experiment("gone"))
    tracker = make_tracker(mlflow_uri, tmp_path, log, experiment_name="gone")
    tracker.start()
    with pytest.raises(TrackingError, match=r"deleted experiment.*mlflow experiments restore"):
        tracker.wait_ready(timeout=30)
    with pytest.raises(TrackingError, match="deleted experiment"):
        tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.close("FAILED")  # already said: close() does not raise it again


def test_unusable_store_is_raised_by_close_when_nothing_else_did(
    tmp_path: Path, log: logging.Logger
) -> None:
    not_a_db = tmp_path / "mlflow.db"
    not_a_db.write_text("these are notes, not a database\n" * 100)
    uri = f"sqlite:///{not_a_db.as_posix()}"
    tracker = make_tracker(uri, tmp_path, log)
    tracker.start()
    with pytest.raises(TrackingError, match=re.escape(f"could not be created in {uri}")):
        tracker.close()


def test_unreachable_server_fails_at_start(tmp_path: Path, log: logging.Logger) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    stop = TrackingConfig(flush_interval_s=0.05, server_down_at_start=ServerDownAtStart.stop)
    tracker = make_tracker(uri, tmp_path, log, settings=stop)
    with pytest.raises(
        TrackingError, match=rf"{re.escape(uri)}.*mlflow server --host 127\.0\.0\.1"
    ):
        tracker.start()
    # Credentials in the URI are not printed.
    tracker = make_tracker(with_credentials(uri), tmp_path, log, settings=stop)
    with pytest.raises(TrackingError) as caught:
        tracker.start()
    assert "tracking_uri='http://xpuser:***@127.0.0.1:" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_system_metrics_are_recorded(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    settings = TrackingConfig(flush_interval_s=0.05, system_metrics=True)
    tracker = make_tracker(mlflow_uri, tmp_path, log, settings=settings)
    tracker.start()
    tracker.wait_ready(timeout=30)
    time.sleep(0.5)
    tracker.close()

    metrics = MlflowClient(mlflow_uri).get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics


def test_an_outage_is_reported_once_when_the_store_comes_back_with_a_backlog(
    tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    # CI saw a second warning for one outage: the writer said the store takes writes again,
    # and the stall watch ran before the writer's progress message came, measured the
    # whole outage as a stall, and warned anew. The stall watch counts from the recovery.
    caplog.set_level(logging.INFO, logger=log.name)
    tracker = make_tracker("sqlite:///unused.db", tmp_path, log)
    tracker._ready.set()
    tracker._sent_points = 5000  # the backlog the writer is still working through
    tracker._busy_since = tracker._last_progress = time.monotonic() - 2 * tracking._STALL_WARN_S

    tracker._writer_saw_store(False, "did not take metrics (connection refused)")
    tracker._writer_saw_store(True, "")  # its first batch went through
    tracker._watch_for_stall()  # before the writer's progress message arrives

    assert caplog.text.count("training goes on") == 1
    assert caplog.text.count("takes writes again") == 1
    assert not tracker._store_down


PASSWORD = "pw-s3cret-9f1"
"""In the tracking URIs of the server tests: it must never be printed."""


def with_credentials(uri: str) -> str:
    return uri.replace("http://", f"http://xpuser:{PASSWORD}@")


@pytest.mark.slow
def test_server_that_stops_answering_ends_the_run_incomplete_within_close_timeout(
    mlflow_uri: str,
    tmp_path: Path,
    log: logging.Logger,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SIGSTOP: the server accepts connections and never answers, so each request would
    # hang for MLflow's own timeouts (minutes). Training goes on, one warning says so, the
    # points arrive once it answers again; if it never does, close() gives up after
    # tracking.close_timeout_s and says what is missing.
    monkeypatch.setattr(tracking, "_STALL_WARN_S", 1.0)
    caplog.set_level(logging.INFO, logger=log.name)
    settings = TrackingConfig(flush_interval_s=0.05, close_timeout_s=2.0)
    with mlflow_server(mlflow_uri, tmp_path) as (uri, server):
        tracker = make_tracker(
            with_credentials(uri), tmp_path, log, artifact_location=None, settings=settings
        )
        tracker.start()
        for step in range(100):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        (tmp_path / "config.yaml").write_text("a: 1\n")
        tracker.log_artifact(tmp_path / "config.yaml")
        deadline = time.monotonic() + 60
        while tracker.written_through_step < 99 or not artifact_paths(
            MlflowClient(uri), tracker.run_id
        ):
            assert time.monotonic() < deadline, "the metrics and artifact did not reach the server"
            time.sleep(0.1)

        os.killpg(server.pid, signal.SIGSTOP)
        try:
            for step in range(100, 150):
                tracker.log_metrics({"train/loss": float(step)}, step=step)
            while "does not answer" not in caplog.text:
                assert time.monotonic() < deadline, "the stalled store was not reported"
                time.sleep(0.05)
            # It answers again: the points it missed arrive.
            os.killpg(server.pid, signal.SIGCONT)
            while tracker.written_through_step < 149 or "takes writes again" not in caplog.text:
                assert time.monotonic() < deadline, "the points did not arrive after the stall"
                time.sleep(0.05)
            assert caplog.text.count("does not answer") == 1

            # It stops answering for good: close() gives up.
            os.killpg(server.pid, signal.SIGSTOP)
            for step in range(150, 200):
                tracker.log_metrics({"train/loss": float(step)}, step=step)
            tracker.set_tags({"xp.best_step": "170"})
            started = time.monotonic()
            with pytest.raises(TrackingIncomplete) as caught:
                tracker.close()
            waited_s = time.monotonic() - started
        finally:
            os.killpg(server.pid, signal.SIGCONT)

    assert waited_s < 30  # close_timeout_s and a grace, not minutes of MLflow retries
    error = caught.value
    assert (error.missing_points, error.first_missing_step) == (50, 150)
    assert error.missing_writes == ["tags ['xp.best_step']"]
    assert not error.status_recorded
    message = str(error)
    assert "50 metric points (from step 150 on)" in message
    assert "still shows RUNNING there, not FINISHED" in message
    assert "tracking.close_timeout_s=2" in message
    assert f"run `python -m xp resume={tracker.run_id}` once the store answers again" in message
    assert PASSWORD not in caplog.text + message + "".join(capfd.readouterr())
    client = MlflowClient(mlflow_uri)
    assert history(client, tracker.run_id, "train/loss") == [(s, float(s)) for s in range(150)]
    assert client.get_run(tracker.run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_server_restart_mid_run_loses_nothing(
    mlflow_uri: str,
    tmp_path: Path,
    log: logging.Logger,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The writer gets xp's short HTTP retries only where the environment sets none.
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    caplog.set_level(logging.INFO, logger=log.name)
    with mlflow_server(mlflow_uri, tmp_path) as (uri, server):
        # Credentials in the URI: MLflow quotes the URI in its errors, xp never does.
        port = int(uri.rsplit(":", 1)[1])
        uri = with_credentials(uri)
        tracker = make_tracker(uri, tmp_path, log, artifact_location=None)
        tracker.start()
        tracker.wait_ready(timeout=60)
        for step in range(50):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        deadline = time.monotonic() + 30
        while tracker.written_through_step < 49:
            assert time.monotonic() < deadline, "metrics did not reach the server"
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        for step in range(50, 100):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        while "training goes on" not in caplog.text:
            assert time.monotonic() < deadline, "the failed write was not reported"
            time.sleep(0.05)
    with mlflow_server(mlflow_uri, tmp_path, port=port):
        tracker.close()

    client = MlflowClient(mlflow_uri)
    assert history(client, tracker.run_id, "train/loss") == [(s, float(s)) for s in range(100)]
    assert caplog.text.count("training goes on") == 1
    assert "API request to http://xpuser:***@127.0.0.1" in caplog.text  # MLflow's own words
    assert PASSWORD not in caplog.text + "".join(capfd.readouterr())
    assert "takes writes again" in caplog.text
    assert tracker.unwritten_metrics == 0
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_server_down_at_start_then_up_mid_run_gets_the_whole_run(
    mlflow_uri: str, tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    # tracking.server_down_at_start=buffer (the default): training starts at once; the run
    # is created when the server answers, with the time it really started, and gets every
    # point logged meanwhile.
    caplog.set_level(logging.INFO, logger=log.name)
    port = free_port()
    started_ms = int(time.time() * 1000)
    tracker = make_tracker(f"http://127.0.0.1:{port}", tmp_path, log, artifact_location=None)
    tracker.start()
    assert "does not answer as the run starts" in caplog.text
    for step in range(50):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    time.sleep(1.0)  # the run trains on while nobody answers
    with mlflow_server(mlflow_uri, tmp_path, port=port) as (uri, _):
        for step in range(50, 100):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        deadline = time.monotonic() + 60
        while tracker.written_through_step < 99:
            assert time.monotonic() < deadline, "the points did not arrive once it answered"
            time.sleep(0.05)
        run_id = tracker.run_id
        tracker.close()
        run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    # Created late, it starts when the run did, not when the server came up.
    assert started_ms <= run.info.start_time <= started_ms + 1000
    assert history(MlflowClient(mlflow_uri), run_id, "train/loss") == [
        (s, float(s)) for s in range(100)
    ]
    assert caplog.text.count("training goes on") == 1
    assert "takes writes again" in caplog.text


class mlflow_server:
    """``mlflow server`` on a free local port over ``backend_uri``; killed on exit."""

    def __init__(self, backend_uri: str, tmp_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        self.log = tmp_path / f"server-{time.monotonic_ns()}.log"

    def __enter__(self) -> tuple[str, subprocess.Popen[bytes]]:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    return self.uri, self.process
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    pytest.fail(f"mlflow server did not start:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


# --------------------------------------------------------------------------- params


class Color(str, enum.Enum):
    red = "red"


def test_flatten_params() -> None:
    flat = flatten_params(
        {
            "optim": {"lr": 0.001, "betas": (0.9, 0.999), "clip_grad": {"max_norm": None}},
            "model": {"hidden_sizes": [128, 128], "colors": [Color.red]},
            "strategy": {"device": Color.red},
            "scheduler": {},
            "stages": [{"name": "warmup", "epochs": 2}, {"name": "main", "epochs": 10}],
            "weird key!": {"x@y": 1},
            "long": "v" * (MAX_PARAM_VAL_LENGTH + 1),
            "k" * 300: 1,
        }
    )
    assert flat["optim.lr"] == "0.001"
    assert flat["optim.betas"] == "[0.9, 0.999]"
    assert flat["optim.clip_grad.max_norm"] == "None"
    assert flat["model.hidden_sizes"] == "[128, 128]"
    assert flat["model.colors"] == "['red']"
    assert flat["strategy.device"] == "red"
    assert flat["scheduler"] == "{}"
    assert flat["stages.0.name"] == "warmup"
    assert flat["stages.1.epochs"] == "10"
    assert flat["weird key_.x_y"] == "1"
    assert flat["long"] == "v" * (MAX_PARAM_VAL_LENGTH - 3) + "..."
    assert flat["k" * (MAX_ENTITY_KEY_LENGTH - 3) + "..."] == "1"


def test_copied_limits_match_mlflow() -> None:
    from mlflow.utils import validation

    from xp import tracking

    for name in (
        "MAX_PARAM_VAL_LENGTH",
        "MAX_TAG_VAL_LENGTH",
        "MAX_ENTITY_KEY_LENGTH",
        "MAX_PARAMS_TAGS_PER_BATCH",
        "MAX_METRICS_PER_BATCH",
    ):
        assert getattr(tracking, name) == getattr(validation, name), name


# --------------------------------------------------------------------------- defaults


def test_default_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.as_posix()}/outputs/mlflow.db"
    assert (tmp_path / "outputs").is_dir()
    expected = (tmp_path / "outputs/mlartifacts/my_exp_1").as_uri()
    assert default_artifact_location(uri, "my exp/1") == expected

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    assert default_artifact_location("http://127.0.0.1:5000", "exp") is None


@pytest.mark.slow
def test_importing_tracking_stays_light() -> None:
    code = (
        "import sys, xp.tracking; "
        "print(sorted({'mlflow', 'torch', 'omegaconf', 'hydra'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


@pytest.fixture(autouse=True)
def _no_tracking_uri_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
