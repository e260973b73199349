"""Many runs writing to one store at once: the team's server, and the default SQLite file.

Each run is an :class:`xp.tracking.MlflowTracker` with its own writer process, as each
``python -m xp`` has: what meets the store at once is what eight runs send (experiment
creation racing, params, tags, artifacts, metrics, the runs' ends), without eight
trainings' worth of torch imports on two cores.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from tests.server.conftest import SECRET_ENV, Server
from xp.config import TrackingConfig
from xp.tracking import MlflowTracker, default_artifact_location

pytestmark = pytest.mark.slow

STEPS = 300
KEYS = ("train/loss", "train/lr", "train/samples_per_s")
SETTINGS = TrackingConfig(flush_interval_s=0.1, close_timeout_s=60)


def run_at_once(uri: str, n: int, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    """``n`` runs of the experiment ``crowd``, started together; their run ids."""
    logger = logging.getLogger("tests.server.load")
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="tests.server.load")
    note = tmp_path / "note.txt"
    note.write_text("a file each run uploads\n")
    trackers = [
        MlflowTracker(
            SETTINGS,
            tracking_uri=uri,
            experiment_name="crowd",
            run_name=f"run{i}",
            tags={"xp.member": str(i)},
            params={f"p{j}": str(j) for j in range(150)},  # two batches of params
            artifact_location=default_artifact_location(uri, "crowd"),
            logger=logger,
        )
        for i in range(n)
    ]
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def train(tracker: MlflowTracker) -> None:
        try:
            start.wait()
            tracker.start()
            tracker.log_artifact(note)
            for step in range(1, STEPS + 1):
                tracker.log_metrics({key: step / 7 for key in KEYS}, step)
                if step % 50 == 0:
                    tracker.set_tags({"xp.progress": str(step)})
            tracker.close("FINISHED")
        except BaseException as e:  # reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=train, args=(t,)) for t in trackers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return [t.run_id for t in trackers]


def assert_complete(
    client,
    run_ids: list[str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert len(run.data.params) == 150
        assert run.data.tags["xp.progress"] == str(STEPS)
        assert [a.path for a in client.list_artifacts(run_id)] == ["note.txt"]
        for key in KEYS:
            assert [m.step for m in client.get_metric_history(run_id, key)] == list(
                range(1, STEPS + 1)
            ), (run_id, key)
    said = caplog.text.lower()
    assert "locked" not in said and "did not take" not in said, caplog.text
    # What the writer processes themselves printed (they share this process's stderr).
    out, err = capfd.readouterr()
    printed = (out + err).lower()
    assert "locked" not in printed and "traceback" not in printed, out + err


def test_eight_runs_at_once_on_the_server(
    team: Server,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {**team.env, **SECRET_ENV}.items():
        monkeypatch.setenv(name, value)
    run_ids = run_at_once(team.uri, 8, tmp_path, caplog)
    assert len(set(run_ids)) == 8
    assert_complete(team.client(), run_ids, caplog, capfd)


def test_four_runs_at_once_on_sqlite(
    mlflow_uri: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The default store (outputs/mlflow.db): SQLite takes one writer at a time."""
    from mlflow import MlflowClient

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    run_ids = run_at_once(mlflow_uri, 4, tmp_path, caplog)
    assert_complete(MlflowClient(mlflow_uri), run_ids, caplog, capfd)
