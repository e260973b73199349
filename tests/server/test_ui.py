"""``python -m xp ui`` serves artifacts from beside its store, wherever it was started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import REPO, free_port, stop_tree, wait_for

pytestmark = pytest.mark.slow


def xp_ui(cwd: Path, store: str, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "XP_"))}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner processes
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "xp", "ui", "--tracking-uri", store, "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_artifacts_logged_through_xp_ui_land_beside_the_store(
    tmp_path: Path, _empty_mlflow_db: Path
) -> None:
    import shutil

    from mlflow import MlflowClient

    outputs = tmp_path / "project" / "outputs"
    outputs.mkdir(parents=True)
    shutil.copyfile(_empty_mlflow_db, outputs / "mlflow.db")
    store = f"sqlite:///{(outputs / 'mlflow.db').as_posix()}"

    port = free_port()
    ui = xp_ui(tmp_path / "somewhere", store, port)
    try:
        wait_for(lambda: healthy(port) or ui.poll() is not None, "xp ui", 120)
        assert ui.poll() is None, "xp ui exited"
        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment = client.create_experiment("through-the-ui")
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "logged through xp ui\n", "notes/hello.txt")
        client.set_terminated(run.info.run_id)
    finally:
        stop_tree(ui.pid)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    (kept,) = (outputs / "mlartifacts").rglob("hello.txt")
    assert run.info.run_id in str(kept)
    assert not (tmp_path / "somewhere" / "mlartifacts").exists()

    port = free_port()
    ui = xp_ui(tmp_path / "elsewhere", store, port)  # another directory, the same store
    try:
        wait_for(lambda: healthy(port) or ui.poll() is not None, "xp ui", 120)
        client = MlflowClient(f"http://127.0.0.1:{port}")
        got = client.download_artifacts(run.info.run_id, "notes/hello.txt", str(tmp_path))
        assert Path(got).read_text() == "logged through xp ui\n"
    finally:
        stop_tree(ui.pid)
