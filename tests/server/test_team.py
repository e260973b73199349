"""xp against a team's tracking server: PostgreSQL, proxied artifacts, basic auth.

The runs are tiny (30 steps) and share one server (tests/server/conftest.py). The first
run here is also the uninterrupted reference that a run resumed on another machine must
match bit for bit.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.server.conftest import (
    PASSWORD,
    SECRET_ENV,
    USER,
    Server,
    rest_artifact,
    run_xp,
    start_xp,
    wait_for,
    xp_env,
)
from xp.config import TrackingConfig
from xp.tracking import MlflowTracker, TrackingError

pytestmark = pytest.mark.slow

RUN = (
    "trainer.max_steps=30",
    "trainer.log_interval_steps=1",
    "checkpoint.interval_steps=10",
    "tracking.flush_interval_s=0.2",
)
STEPS = 30


def only_run(server: Server, experiment: str):
    client = server.client()
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return run


def run_dir_of(root: Path, experiment: str) -> Path:
    (run_dir,) = (root / "outputs" / experiment).iterdir()
    return run_dir


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(last, weights_only=True)["model"]


def losses(server: Server, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in server.client().get_metric_history(run_id, "train/loss")]


@pytest.fixture(scope="module")
def reference(mlflow_server: Server, tmp_path_factory: pytest.TempPathFactory):
    """One run of RUN by a colleague whose MLFLOW_TRACKING_URI names the server."""
    if mlflow_server.server.process is None:
        mlflow_server.server.start()
    home = tmp_path_factory.mktemp("colleague")
    # The config takes the secrets from the environment, as a user's data or API key may:
    # they must still be recorded nowhere (assert_no_secrets).
    secrets = [f"+tags.{name.lower()}=${{oc.env:{name}}}" for name in SECRET_ENV]
    result = run_xp(home, *RUN, *secrets, "experiment_name=team", env=xp_env(mlflow_server))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return home, result, only_run(mlflow_server, "team")


def assert_no_secrets(server: Server, run_id: str, dirs: list[Path], texts: list[str],
                      tmp_path: Path) -> None:  # fmt: skip
    """Neither the password nor a secret of the environment is in the run's params, tags,
    metric names, artifacts, local files, or what the command printed."""
    run = server.client().get_run(run_id)
    record = tmp_path / f"record-{run_id}"
    server.client().download_artifacts(run_id, "", str(record))
    texts = [*texts, repr(run.data.params), repr(run.data.tags), repr(sorted(run.data.metrics))]
    files = [p for d in (record, *dirs) for p in d.rglob("*") if p.is_file()]
    assert any(p.name == "env.json" for p in files) and any(p.suffix == ".log" for p in files)
    for secret in (PASSWORD, *SECRET_ENV.values()):
        assert all(secret not in text for text in texts)
        for path in files:
            assert secret.encode() not in path.read_bytes(), path


def test_a_run_lands_in_the_server(team: Server, reference, tmp_path: Path) -> None:
    home, result, run = reference
    run_dir = run_dir_of(home, "team")
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] and run.data.params["trainer.max_steps"] == str(STEPS)
    assert run.data.tags["xp.run_dir"] == str(run_dir)
    assert [step for step, _ in losses(team, run.info.run_id)] == list(range(1, STEPS + 1))
    assert "val/acc" in run.data.metrics
    for name in SECRET_ENV:  # the config held them: recorded as ***, and nowhere in clear
        assert run.data.params[f"tags.{name.lower()}"] == "***"

    # Artifacts are the server's: proxied (mlflow-artifacts:/), kept in its destination,
    # and a colleague reads them through its REST API, not from anyone's disk.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    for name in ("config.yaml", "env.json", "run.json", ".hydra/config.yaml",
                 ".hydra/overrides.yaml", "checkpoints/step_00000030.pt"):  # fmt: skip
        assert rest_artifact(team, run.info.run_id, name) == (run_dir / name).read_bytes(), name
    log = rest_artifact(team, run.info.run_id, f"{run_dir.name}.log")  # uploaded before "Done"
    assert b" steps (" in log  # the run's opening line
    assert (run_dir / f"{run_dir.name}.log").read_bytes().startswith(log)
    kept = [p for p in team.artifacts.rglob("step_00000030.pt") if run.info.run_id in str(p)]
    assert len(kept) == 1
    assert not (home / "outputs" / "mlartifacts").exists() and not (home / "mlruns").exists()

    assert_no_secrets(team, run.info.run_id, [run_dir], [result.stdout, result.stderr], tmp_path)


def stop_after_first_checkpoint(home: Path, experiment: str, *args: str, env) -> str:
    """Start a run in ``home``, SIGTERM it once it saved a checkpoint; its run id.

    It saves every step (which changes nothing it computes): 30 steps of the tiny model
    take about 50 ms otherwise, less than the poll for the first checkpoint, and the run
    would finish before the signal."""
    args = (*(a for a in args if not a.startswith("checkpoint.interval_steps=")),
            "checkpoint.interval_steps=1")  # fmt: skip
    proc = start_xp(home, *args, f"experiment_name={experiment}", env=env)
    wait_for(
        lambda: (
            list((home / "outputs" / experiment).glob("*/checkpoints/step_*/COMPLETE"))
            or list((home / "outputs" / experiment).glob("*/checkpoints/step_*.pt"))
            or proc.poll() is not None
        ),
        "a checkpoint",
    )
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-3000:]
    return str(proc.pid)


def test_resume_on_another_machine(team: Server, reference, tmp_path: Path) -> None:
    """Started in A, stopped, A gone: B, a fresh clone with no outputs/, finishes the same
    MLflow run from the server's checkpoint and config, bit-exact."""
    env = xp_env(team)
    a, b = tmp_path / "A", tmp_path / "B"
    stop_after_first_checkpoint(a, "moving", *RUN, env=env)
    run = only_run(team, "moving")
    assert run.info.status == "KILLED"
    first_dir = run.data.tags["xp.run_dir"]
    shutil.rmtree(a)

    # The tracking URI on the command line this time, the credentials in it.
    b_env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    uri = team.uri.replace("http://", f"http://{USER}:{PASSWORD}@")
    result = run_xp(b, f"resume={run.info.run_id}", f"tracking.tracking_uri={uri}", env=b_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "not on this machine" in result.stderr
    assert not a.exists()
    run = only_run(team, "moving")  # the same run
    assert run.info.status == "FINISHED"
    here = run_dir_of(b, "moving")
    assert here.name == Path(first_dir).name  # outputs/<experiment>/<its timestamp>
    assert run.data.tags["xp.run_dir"] == str(here)
    history = run.data.tags["xp.run_dir_history"].splitlines()
    assert [entry.split(":", 1)[1] for entry in history] == [first_dir, str(here)]
    home, _, straight = reference
    expected = last_weights(run_dir_of(home, "team"))
    got = last_weights(here)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert losses(team, run.info.run_id) == losses(team, straight.info.run_id)
    # B's log continues A's (downloaded), so the run's uploaded log is whole.
    log = (here / f"{here.name}.log").read_text()
    assert log.count(" steps (") == 2, log
    assert_no_secrets(team, run.info.run_id, [here], [result.stdout, result.stderr], tmp_path)


def test_fsdp_resume_on_another_machine(team: Server, tmp_path: Path) -> None:
    """The same for a run on 2 ranks whose checkpoints are folders (FSDP's DCP)."""
    env = xp_env(team)
    fsdp = (*RUN, "strategy=fsdp", "strategy.nproc_per_node=2", "data.batch_size=32")
    a, b = tmp_path / "A", tmp_path / "B"
    stop_after_first_checkpoint(a, "sharded", *fsdp, env=env)
    run = only_run(team, "sharded")
    assert run.info.status == "KILLED"
    first_dir = run.data.tags["xp.run_dir"]
    shutil.rmtree(a)

    result = run_xp(b, f"resume={run.info.run_id}", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = only_run(team, "sharded")
    assert run.info.status == "FINISHED"
    here = run_dir_of(b, "sharded")
    assert run.data.tags["xp.run_dir"] == str(here)
    history = run.data.tags["xp.run_dir_history"].splitlines()
    assert [entry.split(":", 1)[1] for entry in history] == [first_dir, str(here)]
    assert run.data.tags["xp.world_size"] == "2"
    assert (here / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    # Bit-exact: every logged loss is the one an uninterrupted run of the same config logs.
    straight = run_xp(tmp_path / "C", *fsdp, "experiment_name=sharded_straight", env=env)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    expected = losses(team, only_run(team, "sharded_straight").info.run_id)
    assert losses(team, run.info.run_id) == expected
    assert [s for s, _ in expected] == list(range(1, STEPS + 1))


def test_load_from_and_test_on_another_machine(team: Server, reference, tmp_path: Path) -> None:
    """load_from=<run id> and test=<run id> of a run whose directory is on another machine."""
    env = xp_env(team)
    _, _, straight = reference
    gone = tmp_path / "gone"  # the run's recorded directory is absent here
    team.client().set_tag(straight.info.run_id, "xp.run_dir", str(gone / "team" / "x"))

    c = tmp_path / "C"
    result = run_xp(c, f"load_from={straight.info.run_id}", "trainer.max_steps=3",
                    "experiment_name=tuned", env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tuned = only_run(team, "tuned")
    assert tuned.info.status == "FINISHED"
    assert tuned.data.tags["xp.load_from"] == straight.info.run_id
    assert (c / "outputs" / "team" / "x" / "checkpoints" / "step_00000030.pt").is_file()
    assert team.client().get_run(straight.info.run_id).data.tags["xp.run_dir"].startswith(str(gone))

    d = tmp_path / "D"
    result = run_xp(d, f"test={straight.info.run_id}", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tested = team.client().get_run(straight.info.run_id)
    assert tested.info.status == "FINISHED"  # test= leaves it as it was
    assert "test/acc" in tested.data.metrics
    here = d / "outputs" / "team" / "x"
    assert (here / "test_metrics.json").is_file()
    assert tested.data.tags["xp.run_dir"] == str(here)
    assert tested.data.tags["xp.run_dir_history"].splitlines()[-1].endswith(f":{here}")


def test_a_sweep_of_eight_jobs_four_at_once(team: Server, tmp_path: Path) -> None:
    """One parent, 8 children, every metric point there, no error anywhere in the logs."""
    steps = 10
    home = tmp_path / "sweeper"
    lrs = ",".join(f"{0.001 * (i + 1):g}" for i in range(8))
    result = run_xp(home, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                    f"optim.lr={lrs}", f"trainer.max_steps={steps}",
                    "trainer.log_interval_steps=1", "checkpoint.interval_epochs=0",
                    "tracking.flush_interval_s=0.2", "experiment_name=swept",
                    env=xp_env(team))  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = team.client()
    runs = client.search_runs([client.get_experiment_by_name("swept").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 8
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.info.status for c in [*parents, *children]} == {"FINISHED"}
    for child in children:
        for key in ("train/loss", "train/lr"):
            points = client.get_metric_history(child.info.run_id, key)
            assert [m.step for m in points] == list(range(1, steps + 1)), (child.info.run_name, key)
    said = result.stdout + result.stderr
    logs = "".join(p.read_text() for p in (home / "outputs" / "swept").rglob("*.log"))
    assert logs.count(" steps (") == 8
    for text in (said, logs):
        assert " ERROR " not in text and "Traceback" not in text and "locked" not in text


def test_wrong_credentials_stop_before_training(
    team: Server, reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "xp-wrong-" + secrets.token_hex(6)
    env = xp_env(team, MLFLOW_TRACKING_PASSWORD=wrong)
    home = tmp_path / "intruder"
    result = run_xp(home, *RUN, "experiment_name=refused", env=env)
    said = result.stdout + result.stderr
    assert result.returncode == 1, said[-3000:]
    assert (
        f"xp: error: tracking_uri='{team.uri}': the MLflow server refuses user 'alice' (HTTP "
        "401), before anything trains. HINT: set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD"
    ) in said
    assert "Traceback" not in said and wrong not in said
    assert not list(home.rglob("step_*")) and not list(home.rglob("*.log"))  # nothing trained
    assert team.client().get_experiment_by_name("refused") is None

    # resume= asks the server first: the same answer.
    _, _, straight = reference
    result = run_xp(home, f"resume={straight.info.run_id}", env=env)
    assert result.returncode == 1
    assert "refuses these credentials (UNAUTHENTICATED)" in result.stderr, result.stderr[-3000:]

    # No credentials at all: the tracker says so as it starts, before a writer exists.
    for name, value in team.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    tracker = MlflowTracker(TrackingConfig(), tracking_uri=team.uri, experiment_name="refused",
                            run_name="r")  # fmt: skip
    with pytest.raises(TrackingError, match=r"refuses no credentials \(HTTP 401\)"):
        tracker.start()
