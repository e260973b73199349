"""Many runs writing to the team's server at once (the default SQLite file takes eight at
once in tests/integration/test_rundir.py).

Each run is a ``python -m xp`` started at the same moment as the others, as a team's jobs
or a user's shell loop start them: what meets the store at once is what their MLflow
writers send (the experiment's creation racing, params, tags, the run files and
checkpoints, a metric point every step, the runs' ends).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import Server, start_xp, xp_env

pytestmark = pytest.mark.slow

STEPS = 200
KEYS = ("train/loss", "train/lr", "train/samples_per_s")
ARGS = (
    f"trainer.max_steps={STEPS}",
    "trainer.max_epochs=100",
    "trainer.log_interval_steps=1",  # a point of each key every step
    "trainer.val_interval_epochs=1000",
    "tracking.flush_interval_s=0.1",
    "experiment_name=crowd",
)


def start_at_once(cwds: list[Path], env: dict[str, str]) -> list[subprocess.Popen[str]]:
    return [start_xp(cwd, *ARGS, env=env) for cwd in cwds]


def assert_complete(client: Any, runs: list[subprocess.Popen[str]]) -> None:
    """Every run FINISHED with every point of every key, and nothing about a locked or
    refused store said to the user."""
    said = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        said.append(out + err)
    printed = "\n".join(said).lower()
    for word in ("locked", "traceback", "did not take", " error"):
        assert word not in printed, "\n".join(said)[-4000:]
    experiment = client.get_experiment_by_name("crowd")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == len(runs)
    for run in found:
        assert run.info.status == "FINISHED"
        assert "xp.run_dir" in run.data.tags and run.data.params
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "env.json", "checkpoints"} <= artifacts, artifacts
        for key in KEYS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(1, STEPS + 1)), (run.info.run_id, key)


def test_eight_runs_at_once_on_the_server(team: Server, tmp_path: Path) -> None:
    """Eight ``python -m xp`` against the team's server, each from its own directory."""
    runs = start_at_once([tmp_path / f"user{i}" for i in range(8)], xp_env(team))
    assert_complete(team.client(), runs)
