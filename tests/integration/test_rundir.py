"""Launches that collide: one run directory each, never a shared or overwritten one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SHORT = ["trainer.max_steps=3", "trainer.val_interval_epochs=0", "checkpoint.keep=1"]
SAME_SECOND = "20260101_120000"


def _launch_together(workdir: Path, n: int, *args: str) -> list[subprocess.CompletedProcess]:
    """``n`` launches of ``python -m xp args`` at once, all in the same second (one
    timestamp, which is what launches in the same second compose)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XP_TIMESTAMP": SAME_SECOND}
    env.pop("XP_LAUNCH_DIR", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "xp", *args],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_eight_launches_in_the_same_second_get_eight_run_directories(workdir, store) -> None:
    """Eight ``python -m xp`` in one directory at once: a run directory each, and on the
    default SQLite store (one writer at a time) every point of every run, with no
    "database is locked" or any other complaint reaching the user."""
    steps = 60
    results = _launch_together(
        workdir,
        8,
        *SHORT,
        f"trainer.max_steps={steps}",
        "trainer.log_interval_steps=1",  # each run writes a point of each key every step
        "tracking.flush_interval_s=0.1",
        "experiment_name=race",
    )
    assert [r.returncode for r in results] == [0] * 8, [r.stderr[-2000:] for r in results]
    said = "\n".join(r.stdout + r.stderr for r in results)
    for word in ("locked", "Traceback", "ERROR", "did not take"):
        assert word not in said, said[-4000:]
    dirs = sorted((workdir / "outputs" / "race").iterdir())
    assert [d.name for d in dirs] == [SAME_SECOND] + [f"{SAME_SECOND}_{n}" for n in range(2, 9)]
    for d in dirs:  # each holds its own run: its log, named after its directory, and one checkpoint
        assert [p.name for p in d.glob("*.log")] == [f"{d.name}.log"]
        assert len(list((d / "checkpoints").glob("step_*.pt"))) == 1
    experiment = store.get_experiment_by_name("race")
    runs = store.search_runs([experiment.experiment_id])
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.tags["xp.run_dir"] for r in runs) == [str(d) for d in dirs]
    assert sorted(r.info.run_name for r in runs) == [d.name for d in dirs]
    for run in runs:
        for key in ("train/loss", "train/lr", "train/samples_per_s"):
            logged = [m.step for m in store.get_metric_history(run.info.run_id, key)]
            assert logged == list(range(1, steps + 1)), (run.info.run_name, key)


def test_distributed_launches_in_the_same_second_get_one_directory_each(workdir, store) -> None:
    args = [*SHORT, "strategy=ddp", "strategy.nproc_per_node=2"]
    results = _launch_together(workdir, 8, *args, "experiment_name=ddp_race")
    assert [r.returncode for r in results] == [0] * 8, [r.stderr[-2000:] for r in results]
    dirs = sorted((workdir / "outputs" / "ddp_race").iterdir())
    assert len(dirs) == 8
    finished = [line for r in results for line in r.stdout.splitlines() if "finished" in line]
    # Both ranks of a launch report the same directory, and no two launches share one.
    by_dir = Counter(line.split("log_dir ")[1].split(";")[0] for line in finished)
    assert sorted(by_dir) == [str(d) for d in dirs]
    assert set(by_dir.values()) == {2}
    # One MLflow run per launch, of its two ranks, recording its own directory.
    experiment = store.get_experiment_by_name("ddp_race")
    runs = store.search_runs([experiment.experiment_id])
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["xp.world_size"] for r in runs} == {"2"}
    assert sorted(r.data.tags["xp.run_dir"] for r in runs) == [str(d) for d in dirs]


def test_sweeps_launched_together_get_a_sweep_directory_each(workdir) -> None:
    results = _launch_together(
        workdir, 3, "-m", "optim.lr=0.001,0.002", *SHORT, "tracking=off", "experiment_name=sw"
    )
    assert [r.returncode for r in results] == [0] * 3, [r.stderr[-2000:] for r in results]
    sweeps = sorted((workdir / "outputs" / "sw" / "multirun").iterdir())
    assert [s.name for s in sweeps] == [SAME_SECOND, f"{SAME_SECOND}_2", f"{SAME_SECOND}_3"]
    for sweep in sweeps:
        jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
        assert [j.split("_")[0] for j in jobs] == ["0", "1"]
        assert "2 finished" in (sweep / "summary.md").read_text()


def test_a_reused_run_directory_is_refused_and_left_as_it_was(xp, workdir, store) -> None:
    first = xp(*SHORT, "hydra.run.dir=somewhere/custom")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = workdir / "somewhere" / "custom"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    second = xp(*SHORT, "optim.lr=0.1", "hydra.run.dir=somewhere/custom")
    assert second.returncode == 1
    assert second.stderr.count("xp: error:") == 1, second.stderr
    assert f"hydra.run.dir={run_dir} already holds another run's files" in second.stderr
    assert f"resume={run_dir}" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
    experiment = store.get_experiment_by_name("default")
    assert len(store.search_runs([experiment.experiment_id])) == 1


def test_a_named_directory_of_a_run_killed_before_its_first_checkpoint_says_what_to_do(
    xp, workdir
) -> None:
    run_dir = workdir / "somewhere" / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    endless = ["trainer.max_epochs=100000", "tracking=off", "checkpoint.interval_epochs=100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xp", *endless, f"hydra.run.dir={run_dir}"],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            if "epoch 1 step" in line:  # training: the lock is taken, no checkpoint yet
                break
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=60)
    assert not list((run_dir / "checkpoints").glob("step_*"))

    again = xp(*SHORT, f"hydra.run.dir={run_dir}")
    assert again.returncode == 1
    (error,) = [line for line in again.stderr.splitlines() if "xp: error:" in line]
    assert "stopped before its first checkpoint" in error and f"rm -r {run_dir}" in error
    subprocess.run(["rm", "-r", str(run_dir)], check=True)  # the fix it names
    assert xp(*SHORT, f"hydra.run.dir={run_dir}").returncode == 0


def test_an_experiment_name_cannot_place_the_run_outside_outputs(xp, workdir) -> None:
    result = xp(*SHORT, "experiment_name=../../escaped")
    assert result.returncode == 1
    assert "outside outputs/<experiment>/" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir.parent / "escaped").exists() and not (workdir / "escaped").exists()
    assert sorted(p.name for p in (workdir / "outputs").iterdir()) == ["mlflow.db"]
