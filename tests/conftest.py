"""Fixtures shared by every test folder."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with every migration applied (about 2 s, so once a session)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db.as_posix()}").search_experiments(max_results=1)
    return db


@pytest.fixture
def mlflow_uri(_empty_mlflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty MLflow SQLite store of this test's own; returns its ``sqlite:///`` URI.

    Artifacts of experiments created without an artifact location (and of the
    ``Default`` experiment) land in ``<tmp_path>/mlflow/mlartifacts``, never in the
    working directory's ``./mlruns``.
    """
    root = tmp_path / "mlflow"
    root.mkdir()
    db = root / "mlflow.db"
    shutil.copyfile(_empty_mlflow_db, db)
    artifacts = root / "mlartifacts"
    with sqlite3.connect(db) as connection:
        connection.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            ((artifacts / "0").as_uri(),),
        )
    connection.close()
    # MLflow's client reads its default artifact root for a SQL store from this variable
    # (mlflow.tracking._tracking_service.utils._get_sqlalchemy_store); subprocesses inherit it.
    monkeypatch.setenv("_MLFLOW_SERVER_ARTIFACT_ROOT", artifacts.as_uri())
    return f"sqlite:///{db.as_posix()}"


@pytest.fixture(autouse=True)
def _restore_environment():
    """Every test leaves os.environ and the default process group as it found them."""
    import os
    import sys

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _no_writer_left_behind():
    """A test that starts an MLflow writer in the test process ends it: one left running
    serves (or confuses) every test after it."""
    import os
    import signal
    import sys
    import time

    from tests.procs import writer_pids

    if not Path("/proc/self/stat").exists():
        yield
        return
    before = set(writer_pids(os.getpid()))
    yield
    if "xp.tracking" in sys.modules:
        # Its process-wide writer state (a spare writer, a sweep's kept one) is this test's:
        # the tests a worker runs after it, in any order, start without it.
        from xp.tracking import drop_early_writer, keep_writers

        drop_early_writer()
        keep_writers(False)
    deadline = time.monotonic() + 10
    while (left := set(writer_pids(os.getpid())) - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"the test left MLflow writer processes running: {sorted(left)}"


# The suite runs on several processes (pytest-xdist, ``-n auto`` in pyproject.toml): many
# tests wait on processes they start (CLI runs, servers, a cluster's requeues), and another
# worker uses the cores meanwhile.
_MAX_WORKERS = 4
"""More workers than this oversubscribe the cores: every CLI test starts a training
process, an MLflow writer and often several ranks of its own."""

_ONE_WORKER_EACH = {"slurm": "slurm", "server": "server"}
"""Folders whose tests share one real service started once per worker (the local Slurm
cluster, PostgreSQL with its MLflow server): they run on one worker, one after another."""


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    import os

    return max(1, min(_MAX_WORKERS, len(os.sched_getaffinity(0))))


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = _folder(item)
        if folder is not None:
            item.add_marker(pytest.mark.xdist_group(_ONE_WORKER_EACH[folder]))
    # The cluster's tests first: minutes of one worker's time, mostly waiting on its jobs'
    # requeues, while the other workers run the rest; last, they were the suite's tail.
    items.sort(key=lambda item: _folder(item) != "slurm")


def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """On the controller: each worker marks a grouped test's node id "@<group>", and the
    schedule follows those marks. Under a pytest that xdist cannot mark for, the groups are
    silently ignored and two workers would share one cluster (pytest-dev/pytest-xdist#1386)."""
    lost = [i for i in ids if i.split("/")[1:2] in (["slurm"], ["server"]) and "@" not in i]
    if lost and node.config.getvalue("dist") == "loadgroup":
        pytest.exit(
            f"pytest-xdist's --dist loadgroup does not group under pytest {pytest.__version__}"
            f" ({lost[0]} has no @group), so tests/slurm and tests/server would run on several"
            f' workers at once: pip install -e ".[test]" (it pins pytest<9.2), or use -n 0',
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def _folder(item: pytest.Item) -> str | None:
    folder = Path(str(item.path)).parent.name
    return folder if folder in _ONE_WORKER_EACH else None


_SKIPPED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        # Without the "@group" that --dist loadgroup appends: a node id pytest takes again.
        nodeid, _, group = report.nodeid.rpartition("@")
        _SKIPPED.append(nodeid if group in _ONE_WORKER_EACH.values() else report.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """With ``XP_SKIPPED_TESTS=<file>``, list the skipped tests there, one node id a line.

    ``.ci/run`` runs them again once the optional extras are installed.
    """
    import os

    out = os.environ.get("XP_SKIPPED_TESTS")
    if out and not hasattr(session.config, "workerinput"):  # the controller, with all reports
        Path(out).write_text("".join(f"{nodeid}\n" for nodeid in dict.fromkeys(_SKIPPED)))
