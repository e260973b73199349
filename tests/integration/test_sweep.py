"""Sweeps through the real CLI: Hydra multirun as an MLflow parent run with child runs.

Every job trains a few dozen steps; the 2x2 grid runs once for the module and later
tests read (and extend) what it left.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.extras import missing_system

pytestmark = pytest.mark.slow

FAST = ("trainer.max_steps=20", "tracking.flush_interval_s=0.2")
GRID = ("-m", "optim=adamw,sgd", "optim.lr=1e-3,3e-3", *FAST)
GRID_NAMES = {
    "optim=adamw,optim.lr=0.001",
    "optim=adamw,optim.lr=0.003",
    "optim=sgd,optim.lr=0.001",
    "optim=sgd,optim.lr=0.003",
}


def cli(workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "XP_TIMESTAMP")
    }
    clean.pop("XP_LAUNCH_DIR", None)
    clean.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(
        [sys.executable, "-m", "xp", *args],
        cwd=workdir,
        env={**clean, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def client(workdir: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{(workdir / 'outputs' / 'mlflow.db').as_posix()}")


def sweep_runs(store, experiment: str = "default"):
    """(parents, children) of the experiment, newest parent first."""
    exp = store.get_experiment_by_name(experiment)
    runs = store.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if r.data.tags.get("xp.sweep_role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def sweep_dirs(workdir: Path, experiment: str = "default") -> list[Path]:
    root = workdir / "outputs" / experiment / "multirun"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def summary_rows(store, parent_id: str, tmp: Path) -> list[dict[str, str]]:
    local = store.download_artifacts(parent_id, "summary.csv", str(tmp))
    with open(local, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, _empty_mlflow_db: Path):
    """The 2x2 grid, run once, with MLFLOW_RUN_ID pointing at a run made beforehand.

    As a user following the README does, a plain run comes first: its config is the
    grid's job ``optim=adamw,optim.lr=0.003`` (AdamW's default lr).
    """
    workdir = tmp_path_factory.mktemp("grid")
    (workdir / "outputs").mkdir()
    shutil.copyfile(_empty_mlflow_db, workdir / "outputs" / "mlflow.db")
    store = client(workdir)
    outsider = store.create_run(store.create_experiment("elsewhere")).info.run_id
    plain = cli(workdir, *FAST)
    assert plain.returncode == 0, plain.stderr[-3000:]
    result = cli(workdir, *GRID, MLFLOW_RUN_ID=outsider)
    return workdir, result, outsider


def test_grid_is_one_parent_with_four_nested_children(grid, tmp_path: Path) -> None:
    workdir, result, _ = grid
    assert result.returncode == 0, result.stderr[-3000:]
    # The plain run before it is not part of this sweep: every job trains.
    assert "xp: a new sweep: all 4 jobs run (runs outside this sweep are never reused)" in (
        result.stderr
    )
    assert "skipping" not in result.stderr
    store = client(workdir)
    (parent,), children = sweep_runs(store)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["xp.sweep_key"] == children[0].data.tags["xp.sweep_key"]
    assert parent.data.tags["xp.swept_keys"] == "optim,optim.lr"
    assert {c.info.run_name for c in children} == GRID_NAMES
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.metrics["val/acc"] > 0 for c in children)
    # The swept values, as params that MLflow's compare view plots first.
    assert {
        (c.data.params["_swept.optim"], c.data.params["_swept.optim.lr"]) for c in children
    } == {("adamw", "0.001"), ("adamw", "0.003"), ("sgd", "0.001"), ("sgd", "0.003")}
    assert len({c.data.tags["xp.config_hash"] for c in children}) == 4
    assert parent.data.params["optim"] == "adamw,sgd"
    assert parent.data.params["optim.lr"] == "1e-3,3e-3"
    (sweep_dir,) = sweep_dirs(workdir)
    assert parent.data.tags["xp.sweep_dir"] == str(sweep_dir.resolve())

    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1", "2", "3"]
    assert {c.data.tags["xp.run_dir"] for c in children} == {str(p.resolve()) for p in jobs}
    assert all((p / "metrics.json").is_file() for p in jobs)
    # A job's log is named by the sweep's timestamp (its folder's name), as its run is.
    assert all([f.name for f in p.glob("*.log")] == [f"{sweep_dir.name}.log"] for p in jobs)
    # Each child's MLflow times are its job's: it started before its first point was logged
    # and after the job before it ended (not all at the sweep's launch), and it ended after
    # its last point.
    by_start = sorted(children, key=lambda c: c.info.start_time)
    for before, child in zip([None, *by_start], by_start, strict=False):
        points = store.get_metric_history(child.info.run_id, "train/loss")
        assert child.info.start_time <= min(p.timestamp for p in points)
        assert child.info.end_time >= max(p.timestamp for p in points)
        if before is not None:
            assert child.info.start_time >= before.info.end_time - 1000

    rows = summary_rows(store, parent.info.run_id, tmp_path)
    assert len(rows) == 4
    accs = [float(r["val/acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    assert {r["overrides"] for r in rows} == GRID_NAMES
    assert {r["status"] for r in rows} == {"FINISHED"}
    best = max(children, key=lambda c: c.data.metrics["val/acc"])
    assert rows[0]["run_id"] == best.info.run_id
    assert parent.data.metrics["val/acc"] == pytest.approx(best.data.metrics["val/acc"])
    assert "summary.md" in {a.path for a in store.list_artifacts(parent.info.run_id)}
    # The terminal shows the same table, best first.
    assert "4 jobs (4 finished, 0 skipped, 0 failed), best first by val/acc (max)" in result.stdout
    printed = [line.split()[1] for line in result.stdout.splitlines() if "FINISHED" in line]
    assert printed == [r["overrides"] for r in rows]


def test_mlflow_run_id_in_the_environment_leaves_that_run_alone(grid) -> None:
    workdir, result, outsider = grid
    store = client(workdir)
    run = store.get_run(outsider)
    assert run.data.metrics == {} and run.data.params == {}
    assert "MLFLOW_RUN_ID is ignored" in result.stderr
    _, children = sweep_runs(store)
    assert outsider not in {c.data.tags["mlflow.parentRunId"] for c in children}
    assert outsider not in {c.info.run_id for c in children}


def test_compare_prints_differing_params_and_metrics(grid, tmp_path: Path) -> None:
    workdir, _, _ = grid
    store = client(workdir)
    (parent, *_), _ = sweep_runs(store)
    out = tmp_path / "runs.csv"
    result = cli(workdir, "compare", parent.info.run_id, "--csv", str(out), COLUMNS="200")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].split()
    # The objective first, then the swept values, the other metrics, what else differs.
    assert header[:5] == ["run", "status", "val/acc", "val/loss", "train/epoch"]
    assert {"_swept.optim", "_swept.optim.lr", "run_id"} <= set(header)
    assert "trainer.max_steps" not in header  # the same in every run
    assert "model.hidden_sizes" not in header
    assert max(map(len, lines)) <= 200
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows} == GRID_NAMES
    accs = [float(r["val/acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)  # the sweep's objective, best first
    # The file keeps every param, also those the same in every run.
    assert {r["trainer.max_steps"] for r in rows} == {"20"}
    assert all(r["optim._target_"].startswith("torch.optim.") for r in rows)

    by_loss = cli(workdir, "compare", "default", "--sort", "val/loss", COLUMNS="100")
    assert by_loss.returncode == 0, by_loss.stderr
    lines = by_loss.stdout.splitlines()
    assert max(map(len, lines)) <= 100  # fitted to the terminal
    assert lines[0].split()[:3] == ["run", "status", "val/loss"]
    assert "--all prints every column" in by_loss.stderr
    names = [line.split()[0] for line in lines[2:]]
    exp = store.get_experiment_by_name("default")
    runs = store.search_runs([exp.experiment_id])
    losses = {
        r.info.run_name: r.data.metrics["val/loss"]
        for r in runs
        if r.data.tags.get("xp.sweep_role") != "parent"
    }
    assert len(losses) == 5  # the grid's jobs and the plain run before it
    assert names == sorted(losses, key=losses.get)  # a loss sorts lowest first


def test_compare_bad_input_is_one_error_and_writes_nothing(grid, tmp_path: Path) -> None:
    workdir, _, _ = grid
    out = tmp_path / "x.csv"
    for spec in ("0123456789abcdef0123456789abcdef", "no-such-experiment"):
        result = cli(workdir, "compare", spec, "--csv", str(out))
        assert result.returncode == 1
        assert result.stderr.startswith("xp: error:"), result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists()
    result = cli(workdir, "compare", "default", "--sort", "val/nope")
    assert result.returncode == 1 and "--sort val/nope: no run has this metric" in result.stderr
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    result = cli(empty, "compare", "default")
    assert result.returncode == 1 and "no MLflow store" in result.stderr
    assert list(empty.iterdir()) == []


def test_rerunning_the_sweep_skips_finished_jobs(grid, tmp_path: Path) -> None:
    workdir, _, _ = grid
    store = client(workdir)
    (first,), before = sweep_runs(store)
    # A later run reused a job's directory: its metrics.json no longer says what MLflow has.
    overwritten = before[0]
    (Path(overwritten.data.tags["xp.run_dir"]) / "metrics.json").write_text(
        json.dumps({"val/acc": 0.0123, "val/loss": 99.0})
    )
    result = cli(workdir, *GRID)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"xp: this sweep ran before (parent {first.info.run_id}): 4 of 4 jobs FINISHED will be "
        "skipped, 0 KILLED will be resumed, 0 will run; sweep.fresh=true runs everything anew."
    ) in result.stderr
    assert result.stderr.count("xp: skipping job #") == 4
    parents, after = sweep_runs(store)
    assert len(parents) == 2 and len(after) == 4  # no job trained again
    rows = summary_rows(store, parents[0].info.run_id, tmp_path)
    assert {r["status"] for r in rows} == {"SKIPPED"}
    assert {r["run_id"] for r in rows} == {c.info.run_id for c in before}
    accs = [float(r["val/acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    # MLflow is the record of a run's metrics, not the directory's file.
    (row,) = [r for r in rows if r["run_id"] == overwritten.info.run_id]
    assert float(row["val/acc"]) == pytest.approx(overwritten.data.metrics["val/acc"], rel=1e-5)
    newest = sweep_dirs(workdir)[-1]
    assert not [p for p in newest.iterdir() if p.is_dir() and not p.name.startswith(".")]

    # Another sweep runs its job, although the grid FINISHED the same config
    # (target_allowlist is not part of it); its 400-character overrides name the job's
    # folder within the file-name limit.
    allow = "target_allowlist=[" + ",".join(f"my_package_{i:02d}." for i in range(27)) + "]"
    sub = ("-m", "optim=sgd", "optim.lr=1e-3", allow, *FAST)
    assert len(",".join(sub[1:])) > 400
    other = cli(workdir, *sub)
    assert other.returncode == 0, other.stderr[-3000:]
    assert "xp: a new sweep: all 1 job run" in other.stderr
    assert "skipping" not in other.stderr
    parents, children = sweep_runs(store)
    assert len(children) == 5
    child = children[0]
    assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert child.info.status == "FINISHED"
    job_dir = Path(child.data.tags["xp.run_dir"])
    assert job_dir.parent == sweep_dirs(workdir)[-1].resolve()
    assert job_dir.name.startswith("0_optim.lr=0.001,optim=sgd,target_allowlist=[my_package_00.")
    assert len(job_dir.name) <= 120
    assert allow in child.data.tags["xp.overrides"]  # the full overrides: in the run...
    assert allow in (job_dir / ".hydra" / "overrides.yaml").read_text()  # ...and in .hydra/
    # Nothing swept: the job is named by all its overrides.
    assert child.info.run_name.startswith("optim=sgd,optim.lr=0.001,target_allowlist=")

    # sweep.fresh=true trains the job again, as a new child run.
    fresh = cli(workdir, *sub, "sweep.fresh=true")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert (
        "xp: sweep.fresh=true: all 1 job run anew, although this sweep ran before (parent "
        f"{parents[0].info.run_id})."
    ) in fresh.stderr
    parents, children = sweep_runs(store)
    assert len(children) == 6
    assert children[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id


def test_a_failed_job_is_a_failed_child_and_the_sweep_carries_on(xp, workdir: Path, store) -> None:
    # lr=-1 fails before training (torch refuses it), lr=1e9 diverges while training.
    result = xp("-m", "optim=sgd", "optim.lr=0.01,-1,1e9", *FAST)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "xp: job #1 (optim.lr=-1) FAILED: Invalid learning rate: -1.0" in result.stderr
    (parent,), children = sweep_runs(store)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["xp.failed_jobs"] == "2"
    status = {c.info.run_name: c.info.status for c in children}
    assert status == {
        "optim.lr=0.01": "FINISHED",
        "optim.lr=-1": "FAILED",
        "optim.lr=1000000000.0": "FAILED",
    }
    errors = {c.info.run_name: c.data.tags.get("xp.error", "") for c in children}
    assert "Invalid learning rate" in errors["optim.lr=-1"]
    assert "nan" in errors["optim.lr=1000000000.0"]
    summary = (sweep_dirs(workdir)[0] / "summary.csv").read_text()
    rows = list(csv.DictReader(summary.splitlines()))
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED", "FAILED"]
    assert rows[0]["overrides"] == "optim.lr=0.01"
    assert "Invalid learning rate" in rows[1]["note"]


def test_optuna_three_trials(xp, workdir: Path, store, tmp_path: Path) -> None:
    result = xp("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    # Optuna's own lines, in a log (stderr is not a terminal here): no colour codes.
    assert "A new study created" in result.stderr and "\x1b[" not in result.stderr
    (parent,), children = sweep_runs(store)
    assert len(children) == 3
    assert parent.data.tags["xp.sweeper"] == "OptunaSweeper"
    assert parent.data.params["optim.lr"] == "tag(log, interval(1e-4, 1e-2))"
    for child in children:
        lr = float(child.data.params["optim.lr"])
        assert 1e-4 <= lr <= 1e-2
        assert child.data.params["scheduler.cosine._target_"]
        assert child.info.run_name.startswith("optim.lr=")
        assert "scheduler=" in child.info.run_name
    assert len({c.data.params["optim.lr"] for c in children}) == 3
    rows = summary_rows(store, parent.info.run_id, tmp_path)
    accs = [float(r["val/acc"]) for r in rows]
    assert len(rows) == 3 and accs == sorted(accs, reverse=True)
    results = (sweep_dirs(workdir)[0] / "optimization_results.yaml").read_text()
    assert f"best_value: {max(accs):.6g}"[:16] in results


def test_optuna_trials_of_two_workers_each_get_the_objective_they_logged(
    xp, workdir: Path, store, tmp_path: Path
) -> None:
    # Each trial is a run of xp's own launcher: its rank 0 hands the objective it computed
    # to the job's process, which gives it to Optuna. It is what MLflow holds for the run.
    two = ("strategy=ddp", "strategy.nproc_per_node=2")
    result = xp("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", *two, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    (parent,), children = sweep_runs(store)
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    logged = [c.data.metrics["val/acc"] for c in children]
    results = (sweep_dirs(workdir)[0] / "optimization_results.yaml").read_text()
    assert f"best_value: {max(logged)!r}" in results, (results, logged)
    rows = summary_rows(store, parent.info.run_id, tmp_path)
    shown = sorted(float(r["val/acc"]) for r in rows)  # the summary shows 6 digits
    assert shown == pytest.approx(sorted(logged), abs=1e-6)


def test_optuna_refuses_a_mismatched_direction_or_a_missing_objective(xp, workdir: Path) -> None:
    result = xp("-m", "hydra/sweeper=optuna", "trainer.objective=val/loss", *FAST)
    assert result.returncode == 1
    assert "set hydra.sweeper.direction=minimize" in result.stderr
    assert not sweep_dirs(workdir)

    result = xp(
        "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "trainer.objective=val/f1", *FAST
    )
    assert result.returncode == 1
    assert "xp: error: trainer.objective='val/f1' gave None, not a number" in result.stderr
    assert "The final metrics were: " in result.stderr and "val/acc, val/loss" in result.stderr
    assert result.stdout.count("FAILED") == 1  # stopped after the first trial


def test_bad_sweep_input_fails_before_anything_is_written(xp, workdir: Path, store) -> None:
    for args, message in [
        (("-m", "optim.lr="), "xp: error: optim.lr= has no value"),
        (("-m", "optim.lr=1e-3,"), "xp: error: optim.lr=1e-3, has an empty value in its list"),
        (("-m", "sweep.fresh=maybe", "optim.lr=1e-3,3e-3"), "full_key: sweep.fresh"),
    ]:
        result = xp(*args, *FAST)
        assert result.returncode == 1, result.stderr
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (workdir / "outputs" / "default").exists()
    assert store.get_experiment_by_name("default") is None


def test_a_missing_plugin_names_the_extra(xp, workdir: Path, tmp_path: Path) -> None:
    # A Python where the joblib and Optuna plugins cannot be imported, as before
    # `pip install 'xp[sweep]'`.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith(('hydra_plugins.hydra_joblib', 'hydra_plugins.hydra_opt')):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")]))}
    for choice in ("hydra/launcher=joblib", "hydra/sweeper=optuna"):
        result = xp("-m", choice, "optim.lr=1e-3,3e-3", **env)
        assert result.returncode == 1
        assert f"xp: error: {choice} needs a Hydra plugin that is not installed" in result.stderr
        assert "pip install 'xp[sweep]'" in result.stderr
    assert not (workdir / "outputs" / "default").exists()


def test_joblib_runs_jobs_side_by_side(xp, workdir: Path, store) -> None:
    result = xp(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=1e-3,3e-3", *FAST
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validated against ConfigStore schema" not in result.stderr
    (parent,), children = sweep_runs(store)
    assert {c.info.run_name for c in children} == {"optim.lr=0.001", "optim.lr=0.003"}
    assert parent.data.tags["xp.launcher"] == "JoblibLauncher"
    assert all(c.info.status == "FINISHED" for c in children)


def test_submitit_runs_each_job_as_its_own_process(xp, workdir: Path, store) -> None:
    """The submitit launcher (the local executor: the Slurm one's code path without Slurm)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'xp[slurm]'")
    result = xp(
        "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
        "optim.lr=1e-3,3e-3", *FAST,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (parent,), children = sweep_runs(store)
    assert {c.info.run_name for c in children} == {"optim.lr=0.001", "optim.lr=0.003"}
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    (sweep,) = sweep_dirs(workdir)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    rest = "tracking.flush_interval_s=0.2,trainer.max_steps=20"  # Hydra sorts them
    assert jobs == [f"0_optim.lr=0.001,{rest}", f"1_optim.lr=0.003,{rest}"]


def test_the_slurm_preset_requeues_and_warns_before_the_time_limit(xp, workdir: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'xp[slurm]'")
    result = xp("hydra/launcher=slurm", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SlurmLauncher" in result.stdout
    assert "requeue: true" in result.stdout
    assert "signal_delay_s: 120" in result.stdout


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_killed_job_resumes_when_the_sweep_runs_again(workdir: Path, store, stop) -> None:
    # SIGTERM: the job saves, its run is KILLED. kill -9: nobody can mark the run, it stays
    # RUNNING, and its free run-directory lock tells the next sweep that its process is gone.
    args = ["-m", "trainer.max_steps=20,400", "tracking.flush_interval_s=0.2"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "XP_TIMESTAMP")}
    process = subprocess.Popen(
        [sys.executable, "-m", "xp", *args],
        cwd=workdir,
        env={**env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    root = workdir / "outputs" / "default" / "multirun"
    deadline = time.monotonic() + 120
    while not list(root.glob("*/1_*/checkpoints/step_*")):
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "job #1 saved no checkpoint"
        time.sleep(0.05)
    process.send_signal(stop)
    output = process.communicate(timeout=120)[0]
    if stop == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
        # The tracker's writer, a process of its own, may still be creating the run.
        deadline = time.monotonic() + 60
        while "trainer.max_steps=400" not in {c.info.run_name for c in sweep_runs(store)[1]}:
            assert time.monotonic() < deadline, "the killed job's run never appeared in MLflow"
            time.sleep(0.2)
    else:
        assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    (parent,), children = sweep_runs(store)
    killed = {c.info.run_name: c for c in children}["trainer.max_steps=400"]
    expected = "KILLED" if stop == signal.SIGTERM else "RUNNING"
    assert parent.info.status == expected
    assert killed.info.status == expected

    again = subprocess.run(
        [sys.executable, "-m", "xp", *args],
        cwd=workdir,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    how = "KILLED" if stop == signal.SIGTERM else "stopped (KILLED, or RUNNING but dead)"
    assert (
        f"xp: this sweep ran before (parent {parent.info.run_id}): 1 of 2 jobs FINISHED will be "
        f"skipped, 1 {how} will be resumed, 0 will run;"
    ) in again.stderr
    assert "skipping job #0 (trainer.max_steps=20)" in again.stderr
    how = "KILLED run" if stop == signal.SIGTERM else "run left RUNNING by a process that is gone,"
    assert f"resumed {how} {killed.info.run_id}" in again.stderr
    resumed = store.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["xp.run_dir"] == killed.data.tags["xp.run_dir"]  # its own dir
    assert resumed.data.tags["mlflow.parentRunId"] == sweep_runs(store)[0][0].info.run_id
    steps = [m.step for m in store.get_metric_history(killed.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 400
    metrics = json.loads((Path(killed.data.tags["xp.run_dir"]) / "metrics.json").read_text())
    assert metrics["val/acc"] == pytest.approx(resumed.data.metrics["val/acc"])


# --------------------------------------------------------------------------- server and UI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(workdir: Path, tmp_path: Path):
    """``mlflow server`` on a free loopback port over the workdir's store."""
    port = _free_port()
    db = (workdir / "outputs" / "mlflow.db").as_posix()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                pytest.fail(
                    f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()}"
                )
            time.sleep(0.2)
    yield uri
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    log.close()


def _rest(uri: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{uri}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_sweep_against_a_server_through_rest_and_the_browser(
    xp, server: str, tmp_path: Path
) -> None:
    result = xp("-m", "optim=adamw,sgd", *FAST, MLFLOW_TRACKING_URI=server)
    assert result.returncode == 0, result.stderr[-3000:]
    with urllib.request.urlopen(
        f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=default", timeout=30
    ) as response:
        experiment = json.loads(response.read())["experiment"]
    runs = _rest(
        server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]}
    )["runs"]

    def tags(run: dict) -> dict[str, str]:
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    (parent,) = [r for r in runs if tags(r).get("xp.sweep_role") == "parent"]
    children = [r for r in runs if r is not parent]
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED"
    assert {c["info"]["run_name"] for c in children} == {"optim=adamw", "optim=sgd"}
    for child in children:
        assert tags(child)["mlflow.parentRunId"] == parent_id
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        assert params["optim._target_"].startswith("torch.optim.")
        metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        assert 0 < metrics["val/acc"] <= 1
    assert {p["key"]: p["value"] for p in parent["data"]["params"]}["optim"] == "adamw,sgd"

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        missing_system("no Chromium installed (Debian: apt-get install chromium); REST checked")
    # Sorted by a metric, the runs table lists children flat (by date they fold under
    # their parent): the view a user picks to compare a sweep's jobs.
    order = urllib.parse.quote("metrics.`val/acc`", safe="")
    page = f"{server}/#/experiments/{experiment['experiment_id']}/runs?orderByKey={order}"
    common = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=15000",
    ]  # fmt: skip
    dom = subprocess.run(
        [*common, "--dump-dom", page], capture_output=True, text=True, timeout=180
    ).stdout
    shot = tmp_path / "experiment.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1600,1000", page],
        capture_output=True,
        timeout=180,
    )
    assert parent["info"]["run_name"] in dom
    assert "optim=adamw" in dom and "optim=sgd" in dom, dom[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000

    # MLflow's compare view of the jobs opens on parallel coordinates over the first three
    # differing params in sort order, and the first metric: the swept values come first.
    ids = urllib.parse.quote(json.dumps([c["info"]["run_id"] for c in children]), safe="")
    exps = urllib.parse.quote(json.dumps([experiment["experiment_id"]]), safe="")
    compare = f"{server}/#/compare-runs?runs={ids}&experiments={exps}"
    dom = subprocess.run(
        [*common, "--window-size=1600,1400", "--dump-dom", compare],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    axes = re.findall(r'class="axis-title"[^>]*data-unformatted="([^"]*)"', dom)
    assert axes[:1] == ["_swept.optim"], axes or dom[-2000:]
