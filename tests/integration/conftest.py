from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def workdir(tmp_path: Path, _empty_mlflow_db: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory to launch ``python -m xp`` in, with a prepared empty store at its default place.

    Copying the store only skips MLflow's ~2 s of migrations; the runs still find it at
    ``outputs/mlflow.db`` exactly as on a user's machine.
    """
    (tmp_path / "outputs").mkdir()
    shutil.copyfile(_empty_mlflow_db, tmp_path / "outputs" / "mlflow.db")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "XP_TIMESTAMP", "XP_LAUNCH_DIR"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def xp(workdir: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real CLI in ``workdir``, one torch thread (2 cores here), output captured."""

    def _run(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        return subprocess.run(
            [sys.executable, "-m", "xp", *args],
            cwd=workdir,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return _run


@pytest.fixture
def store(workdir: Path):
    """An MlflowClient on the store the CLI writes to."""
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{(workdir / 'outputs' / 'mlflow.db').as_posix()}")
