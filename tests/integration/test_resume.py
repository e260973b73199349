"""Resume by run id, bit-exact continuation, surviving kills; the real CLI and store."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.procs import REPO, with_repo_path

pytestmark = pytest.mark.slow

# Long enough to stop in the middle; checkpoints often, so a kill loses little.
RUN = [
    "trainer.max_epochs=12",
    "checkpoint.interval_steps=7",
    "tracking.flush_interval_s=0.2",
]


def start(workdir: Path, *args: str) -> subprocess.Popen[str]:
    env = with_repo_path({**os.environ, "OMP_NUM_THREADS": "1"})
    return subprocess.Popen(
        [sys.executable, "-m", "xp", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_checkpoint(workdir: Path, experiment: str, proc: subprocess.Popen[str]) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = sorted((workdir / "outputs" / experiment).glob("*/checkpoints/step_*.pt"))
        if found:
            return found[0].parent.parent
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


def the_run(store, experiment: str):
    exp = store.get_experiment_by_name(experiment)
    (run,) = store.search_runs([exp.experiment_id])
    return run


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(last, weights_only=True)["model"]


def history(store, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in store.get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, _empty_mlflow_db: Path):
    """The same configs trained without interruption, once per config for the module's
    tests (in a directory and store of their own)."""
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("straight")
    (home / "outputs").mkdir()
    shutil.copyfile(_empty_mlflow_db, home / "outputs" / "mlflow.db")
    store = MlflowClient(f"sqlite:///{(home / 'outputs' / 'mlflow.db').as_posix()}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "_MLFLOW_", "XP_"))}
    cache: dict[tuple[str, ...], tuple[dict, list]] = {}

    def _get(*extra: str):
        if extra not in cache:
            name = f"straight{len(cache)}"
            flags = [a for a in extra if a.startswith("--")]  # Hydra's, before the overrides
            overrides = [a for a in extra if not a.startswith("--")]
            result = subprocess.run(
                [sys.executable, "-m", "xp", *flags, *RUN, *overrides, f"experiment_name={name}"],
                cwd=home,
                env=with_repo_path({**env, "OMP_NUM_THREADS": "1"}),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, result.stderr[-3000:]
            run = the_run(store, name)
            (run_dir,) = (home / "outputs" / name).iterdir()
            cache[extra] = (final_state(run_dir), history(store, run.info.run_id))
        return cache[extra]

    return _get


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("data.num_workers=2", "optim.accumulative_counts=3"),
        ("checkpoint.async_save=true",),
        ("strategy=ddp", "strategy.nproc_per_node=2", "data.batch_size=32"),
    ],
    ids=["plain", "workers+accumulation", "async-checkpoints", "ddp-2-ranks"],
)
def test_sigterm_then_resume_is_bit_exact(xp, workdir, store, straight, extra) -> None:
    proc = start(workdir, *RUN, *extra, "experiment_name=stopped")
    run_dir = wait_for_checkpoint(workdir, "stopped", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    run = the_run(store, "stopped")
    assert run.info.status == "KILLED"

    result = xp(f"resume={run.info.run_id}")
    assert result.returncode == 0, result.stderr[-3000:]
    run = the_run(store, "stopped")  # still one run
    assert run.info.status == "FINISHED"
    assert list((workdir / "outputs" / "stopped").iterdir()) == [run_dir]
    expected_state, expected_history = straight(*extra)
    assert_same(final_state(run_dir), expected_state)
    assert history(store, run.info.run_id) == expected_history  # continuous, no duplicates


# Steps that wait 10 ms (tests/server/sleepy.py): the run trains for 8 s or more however busy
# the cores are, so the kill finds it training, at little cost of CPU (the uninterrupted
# run too).
CONF_DIR = f"--config-dir={REPO / 'tests' / 'server' / 'conf'}"
SLEEPY = ["model=sleepy", "model.step_s=0.01", "trainer.max_epochs=40"]


def test_kill_9_at_a_random_moment_then_resume_is_bit_exact(xp, workdir, store, straight):
    proc = start(workdir, CONF_DIR, *RUN, *SLEEPY, "experiment_name=killed")
    run_dir = wait_for_checkpoint(workdir, "killed", proc)
    while store.get_experiment_by_name("killed") is None:  # the run is created in the background
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.5))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # The tracker's writer (a process of its own) still writes what it was handed, and may
    # create the run only now; the resume below waits for it to finish.
    deadline = time.monotonic() + 30
    while not store.search_runs([store.get_experiment_by_name("killed").experiment_id]):
        assert time.monotonic() < deadline, "the killed run never appeared in MLflow"
        time.sleep(0.1)
    run = the_run(store, "killed")
    assert run.info.status == "RUNNING"  # nobody could mark it

    result = xp(
        f"resume={run.info.run_id}",
        "target_allowlist=[tests.]",
        PYTHONPATH=with_repo_path(dict(os.environ))["PYTHONPATH"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = the_run(store, "killed")
    assert run.info.status == "FINISHED"
    expected_state, expected_history = straight(CONF_DIR, *SLEEPY)
    assert_same(final_state(run_dir), expected_state)
    assert history(store, run.info.run_id) == expected_history


def test_a_run_that_still_trains_is_not_resumed_twice(xp, workdir, store) -> None:
    # Two processes training into one directory would interleave checkpoints and metrics.
    log = workdir / "live.log"
    with log.open("w") as out:  # not a pipe: nobody reads it while the run trains on
        proc = subprocess.Popen(
            [sys.executable, "-m", "xp", *RUN, "trainer.max_epochs=100000", "experiment_name=live"],
            cwd=workdir,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run_dir = wait_for_checkpoint(workdir, "live", proc)
    deadline = time.monotonic() + 60
    while store.get_experiment_by_name("live") is None or not store.search_runs(
        [store.get_experiment_by_name("live").experiment_id]
    ):
        assert time.monotonic() < deadline, "the run never appeared in MLflow"
        time.sleep(0.1)
    run = the_run(store, "live")
    try:
        for spec in (run.info.run_id, str(run_dir), "auto"):
            refused = xp(f"resume={spec}", "experiment_name=live")
            assert refused.returncode == 1, refused.stderr[-3000:]
            assert "still training" in refused.stderr, refused.stderr[-3000:]
            assert f"pid {proc.pid}" in refused.stderr or run.info.run_id in refused.stderr
        assert proc.poll() is None  # the live run was not disturbed
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert the_run(store, "live").info.status == "KILLED"
    # Ends where it stopped (a length shorter than what it trained is refused).
    trained = int(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1].stem.split("_")[1])
    result = xp(f"resume={run.info.run_id}", f"trainer.max_steps={trained}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert the_run(store, "live").info.status == "FINISHED"


def test_a_directory_another_process_trains_in_is_not_trained_into(xp, workdir) -> None:
    # hydra.run.dir pointed at a live run: refused before anything is written there.
    run_dir = workdir / "outputs" / "taken" / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from xp.resume import RunDirLock; RunDirLock(Path(sys.argv[1])).acquire(); "
         "print('held', flush=True); time.sleep(120)", str(run_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        result = xp(f"hydra.run.dir={run_dir}", "trainer.max_epochs=1")
        assert result.returncode == 1
        assert f"is still training (pid {holder.pid} on" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("spec", ["run-id", "auto"])
def test_resume_passes_over_a_corrupt_newest_checkpoint(xp, workdir, store, straight, spec):
    # A disk that filled up, a copy cut short, a flipped bit: resume takes the newest
    # checkpoint that verifies, says which it skipped and why, and ends as if uninterrupted.
    proc = start(workdir, *RUN, "experiment_name=corrupt")
    run_dir = wait_for_checkpoint(workdir, "corrupt", proc)
    deadline = time.monotonic() + 120
    while len(list((run_dir / "checkpoints").glob("step_*.pt"))) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "no second checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    *_, kept, newest = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    data = newest.read_bytes()
    if spec == "auto":
        newest.write_bytes(data[: len(data) // 2])  # cut short
    else:
        middle = len(data) // 2
        newest.write_bytes(data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :])
    run = the_run(store, "corrupt")

    target = run.info.run_id if spec == "run-id" else "auto"
    result = xp(f"resume={target}", "experiment_name=corrupt")
    assert result.returncode == 0, result.stderr[-3000:]
    reason = "truncated" if spec == "auto" else "checksum mismatch"
    assert f"skipping checkpoint {newest.name}" in result.stderr and reason in result.stderr
    assert f"using {kept.name}, the newest checkpoint that verifies" in result.stderr
    run = the_run(store, "corrupt")
    assert run.info.status == "FINISHED"
    assert run.data.tags["xp.resumed_from"].endswith(kept.name)
    expected_state, expected_history = straight()
    assert_same(final_state(run_dir), expected_state)
    assert history(store, run.info.run_id) == expected_history


def test_resume_after_the_run_directory_is_gone(xp, workdir, store, straight) -> None:
    proc = start(workdir, *RUN, "experiment_name=moved")
    run_dir = wait_for_checkpoint(workdir, "moved", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    run = the_run(store, "moved")
    uploaded = [a.path for a in store.list_artifacts(run.info.run_id, "checkpoints")]
    newest = max(p for p in uploaded if p.endswith(".pt"))
    assert f"{newest}.sha256" in uploaded  # its checksum travels with it
    shutil.rmtree(run_dir)

    # A checkpoint that changed in the artifact store is caught as a local one is.
    artifact = Path(run.info.artifact_uri.removeprefix("file://")) / newest
    good = artifact.read_bytes()
    artifact.write_bytes(good[:-100] + bytes(b ^ 0xFF for b in good[-100:]))
    refused = xp(f"resume={run.info.run_id}")
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert f"skipping checkpoint {Path(newest).name}" in refused.stderr
    artifact.write_bytes(good)

    result = xp(f"resume={run.info.run_id}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert the_run(store, "moved").info.status == "FINISHED"
    assert_same(final_state(run_dir), straight()[0])


def test_extend_a_finished_run_and_record_the_override(xp, workdir, store) -> None:
    assert xp("trainer.max_epochs=2", "experiment_name=extend").returncode == 0
    run = the_run(store, "extend")
    result = xp(f"resume={run.info.run_id}", "trainer.max_epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    run = the_run(store, "extend")
    assert run.info.status == "FINISHED"
    assert run.data.tags["xp.resume_overrides"] == "trainer.max_epochs=3"
    # How the run started stays as it was recorded; the resume's own overrides are apart.
    assert run.data.tags["xp.overrides"] == "trainer.max_epochs=2 experiment_name=extend"
    assert run.data.params["trainer.max_epochs"] == "2"  # params are not rewritten
    steps = [s for s, _ in history(store, run.info.run_id)]
    assert steps == sorted(set(steps)) and steps[-1] == 3 * 20 // 10 * 10
    assert len(history(store, run.info.run_id, "val/acc")) == 3


def test_resume_with_one_process_of_a_run_of_two_trains_in_one(xp, workdir, store) -> None:
    two = ["strategy=ddp", "strategy.nproc_per_node=2", "trainer.max_epochs=1"]
    first = xp(*two, "experiment_name=fewer")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("finished; log_dir") == 2  # one line per rank
    run = the_run(store, "fewer")
    # strategy.nproc_per_node=1 equals the schema's default: applied all the same.
    result = xp(f"resume={run.info.run_id}", "trainer.max_epochs=2", "strategy.nproc_per_node=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("finished; log_dir") == 1, result.stdout
    assert "xp: rank 0/1 finished" in result.stdout
    run = the_run(store, "fewer")
    assert run.info.status == "FINISHED"
    assert "strategy.nproc_per_node=1" in run.data.tags["xp.resume_overrides"]


def test_extending_a_finished_run_restarts_its_schedule(xp, workdir, store) -> None:
    # The default warmup_cosine: a warmup to step 50, then a cosine that reaches lr 0 at the
    # end of training, here step 60.
    assert xp("trainer.max_epochs=3", "experiment_name=restart").returncode == 0
    run = the_run(store, "restart")
    assert history(store, run.info.run_id, "train/lr")[-1] == (60, 0.0)
    result = xp(f"resume={run.info.run_id}", "trainer.max_epochs=5", "trainer.log_interval_steps=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "Extension: steps 61-100 (the run had 60 steps; trainer.extend_schedule=restart): "
        "scheduler.cosine starts again at step 60 and runs to step 100; lr 0.003 at step 61, "
    ) in result.stderr
    lrs = history(store, run.info.run_id, "train/lr")
    added = [lr for step, lr in lrs if 60 < step < 100]
    assert len(added) == 7 and all(lr > 0 for lr in added), lrs
    assert added == sorted(added, reverse=True)  # a cosine again, from the top
    val_loss = dict(history(store, run.info.run_id, "val/loss"))
    assert val_loss[100] < val_loss[60]

    # Shorter than what it trained: refused, and the run is left as it was.
    (run_dir,) = (workdir / "outputs" / "restart").iterdir()
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    shorter = xp(f"resume={run.info.run_id}", "trainer.max_epochs=2")
    assert shorter.returncode == 1
    assert (
        "xp: error: resume: the run has already trained 100 optimizer steps (5 epochs of 20), "
        "but trainer.max_epochs=2, trainer.max_steps=null end it at step 40. Resume with at "
        "least trainer.max_epochs=5"
    ) in shorter.stderr
    assert "Traceback" not in shorter.stderr
    assert the_run(store, "restart").info.status == "FINISHED"
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before


def test_extension_policies_stretch_and_hold_from_the_command_line(xp, workdir, store) -> None:
    # warmup_cosine over 60 steps, then 40 more: `stretch` lays the cosine over 100 steps as
    # if the run had been that long (the lr jumps up at once and decays to the new end);
    # `hold` keeps it ended at lr 0, and the log says that every added step trains at 0.
    for policy in ("stretch", "hold"):
        name = f"extend_{policy}"
        assert xp("trainer.max_epochs=3", f"experiment_name={name}").returncode == 0
        run_id = the_run(store, name).info.run_id
        result = xp(
            f"resume={run_id}",
            "trainer.max_epochs=5",
            "trainer.log_interval_steps=5",
            f"trainer.extend_schedule={policy}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        line = "Extension: steps 61-100 (the run had 60 steps; "
        line += f"trainer.extend_schedule={policy}): "
        assert result.stderr.count(line) == 1, result.stderr
        added = [lr for step, lr in history(store, run_id, "train/lr") if 60 < step < 100]
        assert len(added) == 7
        if policy == "stretch":
            assert "trains at lr 0" not in result.stderr
            assert all(0 < lr < 0.003 for lr in added), added  # under the base lr: mid-cosine
            assert added == sorted(added, reverse=True)
        else:
            assert "WARNING xp: " + line in result.stderr
            assert "Every added step trains at lr 0: set trainer.extend_schedule=restart" in (
                result.stderr
            )
            assert added == [0.0] * 7
        assert the_run(store, name).info.status == "FINISHED"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_extending_a_distributed_run_restarts_its_schedule(
    xp, workdir, store, strategy: str
) -> None:
    two = [f"strategy={strategy}", "strategy.nproc_per_node=2", f"experiment_name={strategy}"]
    # 10 steps per epoch per rank: the warmup ends at step 50, the cosine at 60, at lr 0.
    first = xp(*two, "trainer.max_epochs=6")
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = the_run(store, strategy).info.run_id
    assert history(store, run_id, "train/lr")[-1] == (60, 0.0)
    result = xp(*two, f"resume={run_id}", "trainer.max_epochs=10", "trainer.log_interval_steps=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Extension: steps 61-100 (the run had 60 steps;") == 1  # rank 0
    added = [lr for step, lr in history(store, run_id, "train/lr") if 60 < step < 100]
    assert len(added) == 7 and all(lr > 0 for lr in added), added
    assert added == sorted(added, reverse=True)
    val_loss = dict(history(store, run_id, "val/loss"))
    assert val_loss[100] < val_loss[60]
    assert the_run(store, strategy).info.status == "FINISHED"


def test_resume_auto_and_load_from(xp, workdir, store) -> None:
    proc = start(workdir, *RUN, "experiment_name=auto")
    wait_for_checkpoint(workdir, "auto", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    result = xp("resume=auto", "experiment_name=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    finished = the_run(store, "auto")
    assert finished.info.status == "FINISHED"

    result = xp(f"load_from={finished.info.run_id}", "trainer.max_epochs=1", "experiment_name=tune")
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = the_run(store, "tune")
    assert tuned.info.run_id != finished.info.run_id
    assert tuned.data.tags["xp.load_from"] == finished.info.run_id
    assert tuned.data.metrics["val/acc"] >= 0.95  # starts from trained weights


def test_changing_the_model_on_resume_is_refused(xp, workdir, store) -> None:
    assert xp("trainer.max_epochs=1", "experiment_name=shape").returncode == 0
    run = the_run(store, "shape")
    result = xp(f"resume={run.info.run_id}", "model.hidden_sizes=[64]")
    assert result.returncode == 1
    assert "model.hidden_sizes: saved [128, 128], given [64]" in result.stderr
    assert the_run(store, "shape").info.status == "FINISHED"


def test_restored_config_builds_only_allowed_targets(xp, workdir, store) -> None:
    assert xp("trainer.max_epochs=1", "experiment_name=evil").returncode == 0
    (run_dir,) = (workdir / "outputs" / "evil").iterdir()
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("_target_: xp.model.MLP", "_target_: os.system"))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    result = xp(f"resume={run_dir}", "trainer.max_epochs=2")
    assert result.returncode == 1
    assert "model._target_='os.system'" in result.stderr
    assert "target_allowlist=[os.]" in result.stderr
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # the original run and its files untouched


def test_bad_resume_inputs_are_one_line_errors(xp, workdir, store) -> None:
    result = xp("resume=0123456789abcdef0123456789abcdef", timeout=120)
    assert result.returncode == 1
    assert "no such MLflow run" in result.stderr
    assert "Traceback" not in result.stderr

    assert xp("trainer.max_epochs=1", "experiment_name=one").returncode == 0
    run = the_run(store, "one")
    other = xp(f"resume={run.info.run_id}", "experiment_name=two", timeout=120)
    assert other.returncode == 1 and "is a run of experiment 'one', not 'two'" in other.stderr

    result = xp("trainer.max_epochs=1", "checkpoint.interval_epochs=0", "experiment_name=none")
    assert result.returncode == 0
    bare = the_run(store, "none")
    missing = xp(f"resume={bare.info.run_id}", timeout=120)
    assert missing.returncode == 1 and "has no complete checkpoint" in missing.stderr

    (run_dir,) = (workdir / "outputs" / "one").iterdir()
    last = sorted((run_dir / "checkpoints").glob("*.pt"))[-1]
    last.write_bytes(last.read_bytes()[:1000])
    corrupt = xp(f"resume={last}", timeout=120)
    assert corrupt.returncode == 1
    assert "corrupt or truncated" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr


def test_nan_loss_stops_the_run_with_a_clear_message(xp, workdir, store) -> None:
    result = xp("optim=sgd", "optim.lr=1e12", "trainer.max_epochs=2", "experiment_name=nan")
    assert result.returncode == 1
    assert "The training loss became nan" in result.stderr
    assert the_run(store, "nan").info.status == "FAILED"


def test_a_requeued_slurm_job_resumes_its_own_run(xp, workdir, store, monkeypatch) -> None:
    """Slurm reruns the same command after a requeue; the job finds and continues its run,
    a user's own model (their module, their --config-dir) included: the command composed
    that target itself, so the restored config's is trusted without target_allowlist."""
    (workdir / "mymodels.py").write_text(
        "from xp.model import MLP\n\n\nclass Net(MLP):\n    pass\n"
    )
    (workdir / "myconf" / "model").mkdir(parents=True)
    (workdir / "myconf" / "model" / "mine.yaml").write_text(
        "_target_: mymodels.Net\nin_features: 64\nhidden_sizes: [32]\nnum_classes: 10\n"
    )
    command = ["--config-dir=myconf", "model=mine", *RUN, "experiment_name=requeued"]
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # not a full srun environment: one process
    proc = start(workdir, *command)
    wait_for_checkpoint(workdir, "requeued", proc)
    os.killpg(proc.pid, signal.SIGUSR1)  # Slurm's preemption warning
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1
    run = the_run(store, "requeued")
    assert run.info.status == "KILLED"
    assert run.data.tags["xp.slurm_job_id"] == "4242"
    assert run.data.params["model._target_"] == "mymodels.Net"

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    result = xp(*command)  # the same command, no resume=
    assert result.returncode == 0, result.stderr[-3000:]
    run = the_run(store, "requeued")  # still one run
    assert run.info.status == "FINISHED"
    assert "xp.resumed_from" in run.data.tags
    # Another command's resume= of that run is still refused without the allowlist.
    refused = xp(f"resume={run.info.run_id}", "trainer.max_epochs=20")
    assert refused.returncode == 1
    assert "model._target_='mymodels.Net'" in refused.stderr
    assert "target_allowlist=[mymodels.]" in refused.stderr


def test_resume_names_the_incomplete_checkpoint_it_skips(tmp_path: Path, capsys) -> None:
    from xp.checkpoint import atomic_save
    from xp.resume import _latest_in

    folder = tmp_path / "run" / "checkpoints"
    atomic_save({"model": {}}, folder / "step_00000007.pt")
    (folder / "step_00000014").mkdir()  # a sharded save cut short: no COMPLETE marker
    assert _latest_in(tmp_path / "run") == folder / "step_00000007.pt"
    assert "skipping incomplete checkpoint(s) ['step_00000014']" in capsys.readouterr().err


# A digits MLP that signals its own training process at a given point, so a stop lands
# exactly where the test wants it: during the last step, or in the validation after it.
SIGNALLING_MODEL = """
import json
import os
import signal

from xp.model import MLP


class Signalling(MLP):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trained = 0

    def forward(self, x):
        if self.training:
            self.trained += 1
            if self.trained == int(os.environ.get("SIGTERM_IN_STEP", 0)):
                os.kill(os.getpid(), signal.SIGTERM)  # the step finishes, then the run stops
        elif self.trained and self.trained == int(os.environ.get("SIGKILL_AFTER_STEP", 0)):
            os.kill(os.getpid(), signal.SIGKILL)  # in the validation after that step
        return super().forward(x)
"""


def test_a_run_stopped_at_its_last_step_still_validates_when_resumed(xp, workdir, store) -> None:
    """SIGTERM during the last step, or kill -9 in the validation after it (the newest
    checkpoint then precedes that validation): the resumed run ends as the uninterrupted one."""
    (workdir / "mypkg").mkdir()
    (workdir / "mypkg" / "__init__.py").write_text("")
    (workdir / "mypkg" / "nets.py").write_text(SIGNALLING_MODEL)
    config = [
        "model._target_=mypkg.nets.Signalling",
        "target_allowlist=[mypkg.]",
        "trainer.max_epochs=2",  # 40 steps
        "checkpoint.interval_steps=10",
        "checkpoint.monitor=val/acc",
        "tracking.flush_interval_s=0.2",
    ]

    def finished(name: str, output: str):
        run = the_run(store, name)
        assert run.info.status == "FINISHED"
        (run_dir,) = (workdir / "outputs" / name).iterdir()
        best = run.data.tags["xp.best_checkpoint"]
        weights = torch.load(run_dir / "checkpoints" / best, weights_only=True)["model"]
        return {
            "metrics.json": json.loads((run_dir / "metrics.json").read_text()),
            "mlflow": {k: v for k, v in run.data.metrics.items() if k.startswith("val/")},
            "val/acc steps": [step for step, _ in history(store, run.info.run_id, "val/acc")],
            "best": {k: run.data.tags[k] for k in ("xp.best_checkpoint", "xp.best_value")},
            "done": [line.split("Done: ")[1] for line in output.splitlines() if "Done: " in line],
        }, weights

    straight = xp(*config, "experiment_name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected, expected_best = finished("straight", straight.stderr)
    assert expected["val/acc steps"] == [20, 40]
    assert expected["best"]["xp.best_checkpoint"] == "step_00000040.pt"

    for name, signal_env, status in (
        ("sigterm", {"SIGTERM_IN_STEP": "40"}, "KILLED"),
        ("kill9", {"SIGKILL_AFTER_STEP": "40"}, "RUNNING"),
    ):
        stopped = xp(*config, f"experiment_name={name}", **signal_env)
        assert stopped.returncode != 0, stopped.stderr[-3000:]
        deadline = time.monotonic() + 30
        while the_run(store, name).info.status != status:  # its writer may still write
            assert time.monotonic() < deadline, the_run(store, name).info.status
            time.sleep(0.1)
        resumed = xp(f"resume={the_run(store, name).info.run_id}", "target_allowlist=[mypkg.]")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        actual, actual_best = finished(name, resumed.stderr)
        assert actual == expected, name
        assert_same(actual_best, expected_best)
