"""xp on a real Slurm cluster, as its users run it: srun and sbatch, preemption, requeue,
time limits, sweeps through submitit, and the mistakes a user can make there.

Every job trains the same short DDP run on 2 tasks; ``reference`` trains it once without
interruption, and the interrupted jobs must end with its weights (bit-exact on CPU) and
its ``train/loss`` history, every logged step exactly once, in the same MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from tests.procs import with_repo_path
from tests.server.conftest import CONF as SLEEPY_CONF
from tests.slurm.conftest import FINAL_STATES, Cluster, xp_command

pytestmark = pytest.mark.slow

# 79 steps an epoch (batch 8 a rank): a stop lands in the middle of one.
RUN = (
    "strategy=ddp",
    "data.batch_size=8",
    "trainer.max_epochs=100",
    "trainer.max_steps=900",
    "checkpoint.interval_steps=25",
    "tracking.flush_interval_s=0.2",
)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(last, weights_only=True)["model"]


def history(store: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in store.get_metric_history(run_id, "train/loss"))


def status(store: MlflowClient, experiment: str) -> str | None:
    """The status of the experiment's one run; None before the run's writer created it."""
    if store.get_experiment_by_name(experiment) is None:
        return None
    return only_run(store, experiment).info.status


def only_run(store: MlflowClient, experiment: str) -> Any:
    runs = store.search_runs([store.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


@pytest.fixture(scope="module")
def reference(
    slurm: dict[str, str], tmp_path_factory: pytest.TempPathFactory, _empty_mlflow_db: Path
) -> dict[str, Any]:
    """``srun -n 2 python -m xp strategy=ddp ...``, run once, without interruption."""
    here = tmp_path_factory.mktemp("srun")
    (here / "outputs").mkdir()
    shutil.copyfile(_empty_mlflow_db, here / "outputs" / "mlflow.db")
    env = {**os.environ, **slurm}
    env.pop("OMP_NUM_THREADS", None)
    started = time.monotonic()
    result = subprocess.run(
        ["srun", "-n", "2", *xp_command(*RUN, "experiment_name=srun").split()],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    store = MlflowClient(f"sqlite:///{here / 'outputs' / 'mlflow.db'}")
    run = only_run(store, "srun") if result.returncode == 0 else None
    return {
        "result": result,
        "seconds": time.monotonic() - started,
        "run": run,
        "run_dirs": list((here / "outputs" / "srun").iterdir()),
        "history": history(store, run.info.run_id) if run else [],
    }


def test_srun_two_tasks_is_one_run(reference: dict[str, Any]) -> None:
    """Item 1: srun -n 2 python -m xp strategy=ddp is one run directory and one MLflow run."""
    result = reference["result"]
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = reference["run_dirs"]
    run = reference["run"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["xp.world_size"] == "2"
    assert run.data.tags["xp.run_dir"] == str(run_dir)
    job = run.data.tags["xp.slurm_job_id"]
    runtime = json.loads((run_dir / "env.json").read_text())["runtime"]
    assert runtime["slurm_job_id"] == job
    assert runtime["launcher"] == "slurm"
    cores = len(os.sched_getaffinity(0))
    # Each task knows its place, and the two share the node's cores.
    assert [
        (r["rank"], r["local_rank"], r["node_rank"], r["threads"]) for r in runtime["ranks"]
    ] == [
        (0, 0, 0, max(1, cores // 2)),
        (1, 1, 0, max(1, cores // 2)),
    ]
    assert [step for step, _ in reference["history"]] == list(range(10, 901, 10))


def wait_for_checkpoint_after(run_dir: Path, step: int, cluster: Cluster, job: str) -> int:
    """The step of the first checkpoint saved after ``step`` (the job trains again)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        steps = [int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt")]
        later = [s for s in steps if s > step]
        if later:
            return min(later)
        state = cluster.job(job).state
        assert state not in ("COMPLETED", "FAILED", "CANCELLED"), cluster.output(job)[-4000:]
        time.sleep(0.1)
    pytest.fail(f"no checkpoint after step {step}:\n{cluster.output(job)[-4000:]}")


def stopped_at(cluster: Cluster, job: str, count: int, timeout: float = 120) -> int:
    """The step at which the ``count``-th stop of the job saved (its log line says)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Rank 0's lines (the others' start with "[rank N]").
        stops = re.findall(
            r"^\S+ \S+ WARNING xp: Stopped by \w+ at step (\d+)", cluster.output(job), re.M
        )
        if len(stops) >= count:
            return int(stops[count - 1])
        time.sleep(0.1)
    pytest.fail(f"the job did not stop a {count}. time:\n{cluster.output(job)[-4000:]}")


# The batch script forwards Slurm's warning (--signal=B:USR1@...) to srun, which passes it
# on to the tasks: a script users can copy (README, Distributed: Slurm).
FORWARDING_SCRIPT = """#!/bin/bash
#SBATCH --ntasks=2 --requeue --signal=B:USR1@60
trap 'kill -USR1 "$pid"' USR1
{command} &
pid=$!
wait "$pid"; status=$?
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done
exit "$status"
"""


def test_preempted_and_requeued_job_resumes_its_run_bit_exact(
    cluster: Cluster, store: MlflowClient, reference: dict[str, Any]
) -> None:
    """Items 1-3: an sbatch job with srun, given Slurm's warning (USR1 to the batch script,
    forwarded), then requeued from outside twice in a row in the middle of an epoch: one run
    directory, one MLflow run, KILLED at each stop, resumed from its checkpoint to FINISHED
    with the weights and the loss history of the uninterrupted run."""
    assert reference["result"].returncode == 0, reference["result"].stderr[-4000:]
    job = cluster.sbatch(
        FORWARDING_SCRIPT.format(command="srun " + xp_command(*RUN, "experiment_name=pre"))
    )
    runs = cluster.cwd / "outputs" / "pre"
    cluster.wait(job, lambda j: runs.is_dir() and any(runs.iterdir()), "its run directory")
    (run_dir,) = runs.iterdir()
    wait_for_checkpoint_after(run_dir, 0, cluster, job)
    stops = []
    timings = []  # seconds from the signal to: requeued, running again, training again
    for count, how in enumerate(
        (
            ["scancel", "--signal=USR1", "--batch", job],  # the warning, to the batch script
            ["scontrol", "requeue", job],  # preempted (requeued) from outside, twice
            ["scontrol", "requeue", job],
        ),
        start=1,
    ):
        signalled = time.monotonic()
        assert cluster.run(*how).returncode == 0
        stops.append(stopped_at(cluster, job, count))
        deadline = time.monotonic() + 20  # the stopped run's end is written before it exits
        while status(store, "pre") != "KILLED":
            assert time.monotonic() < deadline, "the stopped run did not end KILLED"
            time.sleep(0.1)
        cluster.wait(job, lambda j, n=count: j.restarts == n, f"requeued {count} times")
        requeued = time.monotonic() - signalled
        cluster.wait(job, lambda j: j.state == "RUNNING", "running again")
        running = time.monotonic() - signalled
        wait_for_checkpoint_after(run_dir, stops[-1], cluster, job)
        timings.append((requeued, running, time.monotonic() - signalled))
    final = cluster.wait_done(job)
    assert final.state == "COMPLETED", cluster.output(job)[-4000:]

    run = only_run(store, "pre")
    assert run.info.status == "FINISHED"
    assert list(runs.iterdir()) == [run_dir]
    assert run.data.tags["xp.slurm_job_id"] == job
    assert run.data.tags["xp.world_size"] == "2"  # srun's 2 tasks are the 2 ranks
    assert json.loads((run_dir / "env.json").read_text())["runtime"]["slurm_job_id"] == job
    expected = final_state(reference["run_dirs"][0])
    actual = final_state(run_dir)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), f"{key} differs"
    assert history(store, run.info.run_id) == reference["history"]
    per_epoch = int(re.findall(r"\((\d+) per epoch\)", cluster.output(job))[0])
    assert any(s % per_epoch for s in stops[1:]), stops  # requeued in the middle of an epoch
    for requeued, running, training in timings:
        print(
            f"signal to: requeued {requeued:.1f} s, running again {running:.1f} s, "
            f"training again {training:.1f} s"
        )


# A run longer than two of its job's time limits. Its steps wait 50 ms (model=sleepy, a
# step on an accelerator): the uninterrupted run beside it costs the cores little.
LIMITED = (
    f"--config-dir={SLEEPY_CONF}",
    "model=sleepy",
    "strategy=ddp",
    "data.batch_size=8",
    "data.num_workers=1",  # a loader worker, which gets Slurm's warning too
    "data.persistent_workers=true",
    "trainer.max_epochs=1000",
    "trainer.max_steps=2000",
    "checkpoint.interval_steps=250",
    "tracking.flush_interval_s=0.2",
)


def test_a_job_longer_than_its_time_limit_requeues_until_it_ends_as_the_uninterrupted_run(
    cluster: Cluster, store: MlflowClient, tmp_path: Path, _empty_mlflow_db: Path
) -> None:
    """Item 4: a 2-task job with --time=2 --signal=USR1@60 (Slurm sends the warning to
    every process of the step: both tasks, rank 0's MLflow writer, the loader workers) and
    a run longer than two limits saves, ends the run KILLED and requeues at each warning,
    as often as needed, and ends FINISHED with the uninterrupted run's weights and its
    complete loss history. No process dies of the signal."""
    env = with_repo_path({k: v for k, v in cluster.env.items() if not k.startswith("SLURM_")})
    ref_dir = tmp_path / "reference"
    (ref_dir / "outputs").mkdir(parents=True)
    shutil.copyfile(_empty_mlflow_db, ref_dir / "outputs" / "mlflow.db")
    # The same run on xp's own launcher, 2 ranks, beside the job and outside Slurm.
    uninterrupted = subprocess.Popen(
        [*xp_command(*LIMITED, "strategy.nproc_per_node=2", "experiment_name=ref").split()],
        cwd=ref_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job = cluster.sbatch(
            f"#!/bin/bash\nexport PYTHONPATH={env['PYTHONPATH']}\n"
            f"srun {xp_command(*LIMITED, 'experiment_name=limit')}\n",
            "--ntasks=2",
            "--time=2",
            "--signal=USR1@60",
            "--requeue",
        )
        # Between two parts of the job (requeued, not yet running) the run is KILLED, and
        # each part trains again within seconds of the warning.
        between: list[str] = []
        started = time.monotonic()
        while (now := cluster.job(job)).state not in FINAL_STATES:
            assert time.monotonic() - started < 900, cluster.output(job)[-4000:]
            if now.restarts and now.state == "PENDING":  # requeued, not yet started again
                between.append(status(store, "limit"))
            time.sleep(0.5)
        _, err = uninterrupted.communicate(timeout=300)
    finally:
        uninterrupted.kill()
    output = cluster.output(job)
    assert now.state == "COMPLETED", output[-4000:]
    assert uninterrupted.returncode == 0, err[-4000:]
    stops = re.findall(r"^\S+ \S+ WARNING xp: Stopped by SIGUSR1 at step (\d+)", output, re.M)
    assert now.restarts >= 2 and len(stops) == now.restarts, (now.restarts, stops)
    assert between and set(between) == {"KILLED"}, between
    assert "exited with signal" not in output  # no task, writer or loader worker died of it
    assert "DataLoader worker" not in output and "Traceback" not in output

    run = only_run(store, "limit")
    assert run.info.status == "FINISHED"
    (run_dir,) = (cluster.cwd / "outputs" / "limit").iterdir()
    reference = MlflowClient(f"sqlite:///{ref_dir / 'outputs' / 'mlflow.db'}")
    (ref_run_dir,) = (ref_dir / "outputs" / "ref").iterdir()
    expected, actual = final_state(ref_run_dir), final_state(run_dir)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), f"{key} differs"
    steps = history(store, run.info.run_id)
    assert [step for step, _ in steps] == list(range(10, 2001, 10))  # each step once
    assert steps == history(reference, only_run(reference, "ref").info.run_id)
    print(f"{now.restarts} time limits, stops at steps {stops}")


def test_a_requeued_job_whose_checkpoints_are_gone_fails_its_run_naming_it(
    cluster: Cluster, store: MlflowClient
) -> None:
    """Bad input: a job requeued (and held) after its checkpoints were deleted fails with
    one error naming the run, and the run ends FAILED with that reason, not KILLED or
    RUNNING forever."""
    command = xp_command(
        *RUN,
        "trainer.max_steps=100000000",
        "tracking.log_checkpoints=false",  # nothing to download in place of the deleted ones
        "experiment_name=lost",
    )
    job = cluster.sbatch(f"#!/bin/bash\nsrun {command}\n", "--ntasks=1", "--requeue")
    runs = cluster.cwd / "outputs" / "lost"
    cluster.wait(job, lambda j: any(runs.glob("*/checkpoints/step_*.pt")), "training")
    # Requeued and held, as an admin may: the run saves and ends KILLED, nothing starts
    # again until the release.
    assert cluster.run("scontrol", "requeuehold", job).returncode == 0
    deadline = time.monotonic() + 60
    while status(store, "lost") != "KILLED":
        assert time.monotonic() < deadline, cluster.output(job)[-4000:]
        time.sleep(0.2)
    cluster.wait(job, lambda j: j.state == "PENDING", "held")
    (run_dir,) = runs.iterdir()
    shutil.rmtree(run_dir / "checkpoints")
    assert cluster.run("scontrol", "release", job).returncode == 0

    final = cluster.wait_done(job)
    assert final.state == "FAILED" and final.restarts == 1
    run = only_run(store, "lost")
    assert run.info.status == "FAILED"
    assert run.info.run_id in run.data.tags["xp.error"]
    errors = [line for line in cluster.output(job).splitlines() if line.startswith("xp: error:")]
    assert errors and f"requeued to resume its MLflow run {run.info.run_id}" in errors[-1]
    assert "no complete checkpoint" in errors[-1]


def test_sweep_on_slurm_resumes_its_preempted_jobs(cluster: Cluster, store: MlflowClient) -> None:
    """Item 5: hydra/launcher=slurm runs each job on the cluster (submitit). One job warned
    before its time limit (submitit's USR2), the other preempted (``scontrol requeue``:
    Slurm's SIGTERM, then the job requeued by Slurm): each saves, is requeued and resumes
    its own child run to FINISHED; the parent lists both and ends FINISHED. No sacct errors
    are shown."""
    sweep = subprocess.Popen(
        xp_command(
            "-m",
            "hydra/launcher=slurm",
            "optim.lr=1e-3,3e-3",
            "data.batch_size=8",
            "trainer.max_epochs=100",
            "trainer.max_steps=3000",
            "checkpoint.interval_steps=50",
            "tracking.flush_interval_s=0.2",
            "experiment_name=sweep",
        ).split(),
        cwd=cluster.cwd,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        training: list[Any] = []
        while len(training) < 2:  # both jobs run at once (a core each)
            assert sweep.poll() is None, sweep.communicate()
            assert time.monotonic() < deadline, "the sweep's jobs did not both train"
            experiment = store.get_experiment_by_name("sweep")
            children = (
                []
                if experiment is None
                else [
                    r
                    for r in store.search_runs([experiment.experiment_id])
                    if "mlflow.parentRunId" in r.data.tags
                ]
            )
            training = [
                child
                for child in children
                if any(Path(child.data.tags["xp.run_dir"], "checkpoints").glob("step_*.pt"))
            ]
            time.sleep(0.2)
        warned, preempted = (child.data.tags["xp.slurm_job_id"] for child in training)
        assert cluster.run("scancel", "--signal=USR2", warned).returncode == 0
        assert cluster.run("scontrol", "requeue", preempted).returncode == 0
        out, err = sweep.communicate(timeout=300)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, err[-4000:]
    assert "Bypassing sacct error" not in err and "accounting storage is disabled" not in err
    runs = store.search_runs([store.get_experiment_by_name("sweep").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"]
    for child in children:  # each its own run, continued
        assert child.info.run_id in {r.info.run_id for r in training}
        assert "xp.resumed_from" in child.data.tags, child.data.tags
    assert cluster.job(warned).restarts == 1 and cluster.job(preempted).restarts == 1
    (summary,) = (cluster.cwd / "outputs" / "sweep" / "multirun").glob("*/summary.csv")
    assert summary.read_text().count("FINISHED") == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "use strategy=ddp"),
        (("strategy=ddp", "strategy.nproc_per_node=2"), "strategy.nproc_per_node=2 asks xp"),
    ],
    ids=["single", "nproc_per_node"],
)
def test_srun_refuses_what_cannot_work(
    cluster: Cluster, args: tuple[str, ...], expected: str
) -> None:
    """Bad input under srun: strategy=single for 2 tasks, strategy.nproc_per_node=2 in 2
    tasks (4 processes): one error naming the fix, before anything trains or is left."""
    result = cluster.run("srun", "-n", "2", *xp_command(*args).split(), timeout=240)
    assert result.returncode != 0
    errors = {line for line in result.stderr.splitlines() if line.startswith("xp: error:")}
    assert len(errors) == 1 and expected in errors.pop(), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (cluster.cwd / "outputs" / "default").exists()
