"""The real CLI in a subprocess, against a real MLflow SQLite store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.procs import writer_pids

pytestmark = pytest.mark.slow


def run_dirs(workdir: Path, experiment: str = "default") -> list[Path]:
    root = workdir / "outputs" / experiment
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def only_run(store, experiment: str = "default"):
    exp = store.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = store.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_default_experiment_trains_and_is_tracked(xp, workdir: Path, store) -> None:
    result = xp("optim.lr=0.003")
    assert result.returncode == 0, result.stderr[-3000:]

    (log_dir,) = run_dirs(workdir)
    timestamp = log_dir.name
    assert (log_dir / ".hydra" / "config.yaml").exists()
    assert (log_dir / "config.yaml").exists()
    env = json.loads((log_dir / "env.json").read_text())
    assert env["system"]["torch"] == torch.__version__
    assert env["runtime"]["world_size"] == 1
    assert (log_dir / f"{timestamp}.log").read_text().count(": val/loss") == 20
    checkpoints = sorted((log_dir / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in checkpoints] == [
        "step_00000360.pt",
        "step_00000380.pt",
        "step_00000400.pt",
    ]
    saved = torch.load(checkpoints[-1], weights_only=True)
    assert saved["progress"] == {"epoch": 20, "step": 400, "batch_in_epoch": 0}
    assert "optim:" in saved["config"]

    run = only_run(store)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == timestamp
    assert run.data.params["optim.lr"] == "0.003"
    assert run.data.params["model.hidden_sizes"] == "[128, 128]"
    assert run.data.params["scheduler.warmup._target_"] == "torch.optim.lr_scheduler.LinearLR"
    assert run.data.tags["xp.run_dir"] == str(log_dir.resolve())
    assert run.data.tags["xp.overrides"] == "optim.lr=0.003"
    assert run.data.tags["xp.world_size"] == "1"
    assert run.data.tags["xp.seed"] == "0"
    assert "xp.git_commit" not in run.data.tags  # launched outside any git tree
    assert run.data.metrics["val/acc"] >= 0.95
    loss = store.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == list(range(10, 401, 10))
    assert loss[-1].value < loss[0].value / 4
    lr = store.get_metric_history(run.info.run_id, "train/lr")
    assert lr[0].value < 0.003 and max(m.value for m in lr) == pytest.approx(0.003, rel=0.05)
    assert store.get_metric_history(run.info.run_id, "train/samples_per_s")[-1].value > 0
    assert len(store.get_metric_history(run.info.run_id, "val/acc")) == 20

    artifacts = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "env.json", ".hydra", "checkpoints", f"{timestamp}.log"} <= artifacts
    uploaded = {a.path for a in store.list_artifacts(run.info.run_id, "checkpoints")}
    # Each with its checksum, so that resume= from MLflow verifies what it downloads.
    assert uploaded == {f"checkpoints/{p.name}{x}" for p in checkpoints for x in ("", ".sha256")}
    artifact_root = workdir / "outputs"
    assert any(artifact_root.rglob("env.json")), "artifacts must live under outputs/"
    assert not (workdir / "mlruns").exists()

    exported = xp("export", f"ckpt={log_dir}", "out=model.pt", timeout=60)
    assert exported.returncode == 0, exported.stderr
    from xp.model import MLP

    model = MLP(64, [128, 128], 10)
    model.load_state_dict(torch.load(workdir / "model.pt", weights_only=True), strict=True)
    assert torch.equal(model.head.weight, saved["model"]["head.weight"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.lr=abc", "optim.lr"),
        ("optim.lrr=1", "optim.lrr"),
        ("strategy=nope", "strategy/nope"),
    ],
)
def test_bad_override_fails_before_anything_is_written(xp, workdir: Path, store, override, named):
    result = xp(override, timeout=60)
    assert result.returncode != 0
    assert named in result.stderr
    if override == "strategy=nope":
        assert "single" in result.stderr  # the valid options are listed
    assert run_dirs(workdir) == []
    assert [e.name for e in store.search_experiments()] == ["Default"]


def test_invalid_setting_found_while_building_leaves_nothing(xp, workdir: Path, store) -> None:
    result = xp("optim.clip_grad.max_norm=1", "optim.clip_grad.max_value=1", timeout=120)
    assert result.returncode == 1
    assert "xp: error: optim.clip_grad sets both" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "outputs" / "default").exists()
    assert [e.name for e in store.search_experiments()] == ["Default"]


def test_unreachable_mlflow_server_fails_before_training(xp, workdir: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    result = xp(f"tracking.tracking_uri={uri}", "tracking.server_down_at_start=stop",
                "trainer.max_epochs=1", timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert f"xp: error: tracking_uri='{uri}': the MLflow server does not answer" in result.stderr
    assert "tracking.server_down_at_start=stop" in result.stderr
    assert "mlflow server --host 127.0.0.1" in result.stderr
    assert result.stderr.count("does not answer") == 1  # one line, not a log line beside it
    assert run_dirs(workdir) == []


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` read-only, as a user sees it: mode 0o555/0o444, and for root (whom modes do
    not stop) the immutable attribute."""
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    immutable = False
    try:
        if os.geteuid() == 0:
            done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
            if done.returncode != 0:
                pytest.skip(f"root, and chattr +i fails here: {done.stderr.decode().strip()}")
            immutable = True
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)


def test_a_store_that_cannot_be_written_fails_before_training(xp, workdir: Path, store) -> None:
    # MLflow would fail only when it creates the run, in the writer, after the steps.
    assert xp("trainer.max_epochs=1").returncode == 0
    database = workdir / "outputs" / "mlflow.db"
    elsewhere = workdir / "stores"
    elsewhere.mkdir()
    cases = [
        (database, [], f"{database} is read-only (chmod u+w {database})"),
        (elsewhere, [f"tracking.tracking_uri=sqlite:///{elsewhere}/mlflow.db"],
         f"its folder {elsewhere} is read-only, and SQLite writes its journal there"),
        (None, [f"tracking.tracking_uri=sqlite:///{workdir}/missing/mlflow.db"],
         f"its folder {workdir}/missing does not exist (mkdir -p {workdir}/missing)"),
    ]  # fmt: skip
    for path, args, reason in cases:
        with read_only(path) if path else contextlib.nullcontext():
            result = xp("trainer.max_epochs=1", *args)
        assert result.returncode == 1, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("xp: error: The MLflow store "), errors
        assert reason in errors[0] and "tracking=off" in errors[0], errors[0]
        assert "Traceback" not in result.stderr and "Epoch" not in result.stderr
        assert " step 20:" not in result.stderr  # nothing trained
    assert len(run_dirs(workdir)) == 1  # the first run's; none left by the refused ones
    assert only_run(store).info.status == "FINISHED"
    assert not (workdir / "missing").exists() and list(elsewhere.iterdir()) == []


def test_failure_during_training_marks_the_run_failed(xp, workdir: Path, store) -> None:
    result = xp("model.in_features=65", "trainer.max_epochs=1")
    assert result.returncode != 0
    run = only_run(store)
    assert run.info.status == "FAILED"
    assert "mat1 and mat2" in run.data.tags["xp.error"]
    assert len(run_dirs(workdir)) == 1  # the run's log stays for inspection
    _has_its_start_files_and_env_tags(store, run)


def _has_its_start_files_and_env_tags(store, run) -> None:
    """Every run, FAILED or KILLED too, has its environment, config and .hydra in MLflow,
    and the facts people filter runs by as tags."""
    artifacts = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "env.json", "run.json", ".hydra"} <= artifacts, artifacts
    tags = run.data.tags
    assert tags["xp.torch"] == torch.__version__
    assert tags["xp.device"] == "cpu" and tags["xp.world_size"] == "1"
    assert tags["xp.hostname"] == socket.gethostname()


def test_ctrl_c_marks_the_run_killed(workdir: Path, store) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xp", "trainer.max_epochs=100000", "tracking.flush_interval_s=0.2"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            logs = list((workdir / "outputs" / "default").glob("*/*.log"))
            if logs and "val/acc" in logs[0].read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never validated")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    run = only_run(store)
    assert run.info.status == "KILLED"
    _has_its_start_files_and_env_tags(store, run)


def test_git_commit_and_null_seed_are_recorded(xp, workdir: Path, store) -> None:
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    (workdir / "train.py").write_text("# the user's code\n")
    subprocess.run(["git", "add", "train.py"], cwd=workdir, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"],
        cwd=workdir, check=True,
    )  # fmt: skip
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=workdir, capture_output=True, text=True, check=True
    ).stdout.strip()
    result = xp("randomness=random", "trainer.max_epochs=1", "trainer.progress_bar=true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step/s" in result.stderr  # the progress bar, forced on without a terminal
    run = only_run(store)
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.params["randomness.seed"] == "None"
    seed = int(run.data.tags["xp.seed"])
    (log_dir,) = run_dirs(workdir)
    env = json.loads((log_dir / "env.json").read_text())
    assert env["runtime"]["randomness"]["seed_in_force"] == seed
    assert env["system"]["git_commit"] == commit
    # What runs are filtered by in the UI: the code's state, torch, the device.
    tags = run.data.tags
    assert (tags["xp.git_commit"], tags["xp.git_dirty"]) == (commit, "false")
    assert (tags["xp.torch"], tags["xp.device"]) == (torch.__version__, "cpu")
    assert "xp.cuda" not in tags  # a CPU build: no CUDA version to record

    # An uncommitted change to tracked code: the run says it does not match its commit.
    (workdir / "train.py").write_text("# the user's code, changed\n")
    result = xp("trainer.max_epochs=1", "experiment_name=dirty")
    assert result.returncode == 0, result.stderr[-2000:]
    tags = only_run(store, "dirty").data.tags
    assert (tags["xp.git_commit"], tags["xp.git_dirty"]) == (commit, "true")


def test_cfg_job_imports_neither_torch_nor_mlflow(workdir: Path) -> None:
    code = (
        "import sys\n"
        "from xp.__main__ import main\n"
        "main(['--cfg', 'job', 'optim=sgd'])\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "_target_: torch.optim.SGD" in result.stdout
    assert not (workdir / "outputs" / "default").exists()


def test_help_lists_groups_and_options(xp) -> None:
    result = xp("--help", timeout=60)
    assert result.returncode == 0
    for line in (
        "optim: adam, adamw, backbone_head, gan, sgd",
        "strategy: ddp, deepspeed, fsdp, single",
        "scheduler: constant",
        "experiment: addition_transformer, digits_cnn, gan_2d",
        "task: classification, regression, sequence",
        "python -m xp resume=<run id | auto | run dir>",
    ):
        assert line in result.stdout
    # The typed schemas the options build on are not options to pick.
    assert "schema" not in result.stdout.split("== Config ==")[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_runs_of_the_default_store(xp, workdir: Path) -> None:
    assert xp("trainer.max_epochs=1", "experiment_name=ui_check").returncode == 0
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xp", "ui", "--port", str(port)],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        import urllib.request

        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(
                        f"xp ui did not come up: {proc.stdout.read() if proc.stdout else ''}"
                    )
                time.sleep(0.5)
        from mlflow import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("ui_check")
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED"
        assert "val/acc" in run.data.metrics
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("args", "trains"),
    [
        ([], True),
        (["optim=sgd", "trainer.max_epochs=3"], True),
        (["resume=auto"], True),
        (["--cfg", "job"], False),
        (["--help"], False),
        (["-m", "optim.lr=1e-3,3e-3"], False),  # each job starts its own tracker
        (["tracking=off"], False),
        (["strategy=ddp", "strategy.nproc_per_node=2"], False),  # the launcher does not train
    ],
)
def test_the_early_mlflow_writer_starts_only_for_a_tracked_run_here(
    args: list[str], trains: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xp.__main__ import _trains_here

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert _trains_here(args) is trains
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert _trains_here(args) is False  # only rank 0 writes the run


def _written_points(store) -> int:
    experiment = store.get_experiment_by_name("default")
    runs = store.search_runs([experiment.experiment_id]) if experiment else []
    return len(store.get_metric_history(runs[0].info.run_id, "train/loss")) if runs else 0


def test_a_run_whose_mlflow_writer_dies_exits_non_zero_and_resume_completes_it(
    workdir: Path, store, xp
) -> None:
    args = ["trainer.max_epochs=25", "trainer.log_interval_steps=1", "tracking.close_timeout_s=5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xp", *args],
        cwd=workdir,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not _written_points(store):  # the writer created the run and wrote into it
        assert proc.poll() is None and time.monotonic() < deadline, "nothing reached MLflow"
        time.sleep(0.05)
    before = set(writer_pids(proc.pid, descendants=True))
    assert len(before) == 1
    os.kill(before.pop(), signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 3, err[-3000:]
    assert err.count("xp: error:") == 1 and "is incomplete" in err
    run = only_run(store)
    assert f"python -m xp resume={run.info.run_id}" in err
    assert run.info.status == "RUNNING"

    resumed = xp(f"resume={run.info.run_id}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = store.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in store.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, 501))  # every step once: 25 epochs of 20


@pytest.mark.parametrize(
    "command",
    [[], ["resume=0123456789abcdef0123456789abcdef"], ["-m", "optim.lr=0.001,0.002"]],
    ids=["run", "resume", "sweep"],
)
def test_a_tracking_uris_password_is_never_printed_or_written(
    xp, workdir: Path, command: list[str]
) -> None:
    uri = f"http://alice:s3cret-pw@127.0.0.1:{free_port()}"
    # No server answers: a run trains meanwhile (server_down_at_start=buffer), then gives up.
    settings = [f"tracking.tracking_uri={uri}", "tracking.close_timeout_s=3"]
    result = xp(*command, *settings, "trainer.max_epochs=1")
    assert result.returncode != 0
    assert "alice:***@127.0.0.1" in result.stderr  # the URI is named, without its password
    assert "s3cret-pw" not in result.stdout + result.stderr
    for path in (workdir / "outputs").rglob("*"):
        if path.is_file() and path.suffix != ".db":
            assert b"s3cret-pw" not in path.read_bytes(), path


BAD_INPUTS = {
    "a text file to resume=": (["resume=notes.txt"], "neither a run directory"),
    "a folder to resume=": (["resume=somewhere"], "neither a run directory"),
    "/etc/passwd to resume=": (["resume=/etc/passwd"], "neither a run directory"),
    "/etc/passwd to load_from=": (["load_from=/etc/passwd"], "not a checkpoint xp can load"),
    "/etc/passwd to export": (["export", "ckpt=/etc/passwd", "out=x.pt"], "/etc/passwd"),
    "a text file to load_from=": (["load_from=notes.txt"], "not a checkpoint xp can load"),
    "a folder to load_from=": (["load_from=somewhere"], "neither a run directory"),
    "a text file to export": (["export", "ckpt=notes.txt", "out=x.pt"], "notes.txt"),
    "a folder to export": (["export", "ckpt=somewhere", "out=x.pt"], "somewhere"),
    "an empty resume=": (["resume="], "resume= has no value"),
    "a port out of range": (["strategy=ddp", "strategy.master_port=99999"], "master_port=99999"),
    "a port out of range, self-launched": (
        ["strategy=ddp", "strategy.nproc_per_node=2", "strategy.master_port=99999"],
        "master_port=99999",
    ),
    "a 300-character experiment name": (["experiment_name=" + "x" * 300], "300 characters"),
    "a tracking URI no store takes": (["tracking.tracking_uri=bogus://x"], "scheme 'bogus'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_that_names_it_and_leaves_no_run_directory(
    xp, workdir: Path, case: str
) -> None:
    (workdir / "notes.txt").write_text("not a checkpoint\n")
    (workdir / "somewhere").mkdir()
    args, named = BAD_INPUTS[case]
    result = xp(*args) if args[0] == "export" else xp(*args, "trainer.max_epochs=1")
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("xp") and "error:" in line
    ]
    assert len(errors) == 1 and named in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and " ERROR " not in result.stderr
    assert sorted(p.name for p in (workdir / "outputs").iterdir()) == ["mlflow.db"]


def test_test_of_a_run_still_training_is_refused_and_export_takes_a_run_id(
    xp, workdir: Path, store
) -> None:
    from tests.unit.test_run_lock import hold

    first = xp("trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = run_dirs(workdir)
    run_id = only_run(store).info.run_id

    exported = xp("export", f"ckpt={run_id}", "out=model.pt")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "head.weight" in torch.load(workdir / "model.pt", weights_only=True)

    holder = hold(run_dir)  # as a process training there would
    try:
        for command in (f"test={run_id}", f"test={run_dir}"):
            result = xp(command)
            assert result.returncode == 1
            assert f"is still training (pid {holder.pid} on" in result.stderr
            assert "then test it" in result.stderr and "Traceback" not in result.stderr
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert only_run(store).info.status == "FINISHED"


def test_shell_completion_of_the_xp_command_and_verbose_logging(xp, workdir: Path) -> None:
    script = Path(sys.executable).with_name("xp")
    env = {**os.environ, "COMP_LINE": "xp optim=", "COMP_POINT": "9"}
    completion = subprocess.run(
        [str(script), "-sc", "query=bash"], cwd=workdir, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert completion.returncode == 0, completion.stderr[-2000:]
    assert {"optim=adamw", "optim=sgd", "optim=gan"} <= set(completion.stdout.split())

    verbose = xp("hydra.verbose=true", "trainer.max_epochs=1", "tracking=off")
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert "DEBUG xp: Built MLP (" in verbose.stderr
    quiet = xp("trainer.max_epochs=1", "tracking=off")
    assert " DEBUG " not in quiet.stderr


def test_a_default_run_prints_its_story_and_nothing_else(tmp_path: Path) -> None:
    """On a fresh machine (no store yet), `python -m xp` prints what the run does, once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XP_", "MLFLOW_"))}
    result = subprocess.run(
        [sys.executable, "-m", "xp"], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    kinds = [line.split(" xp: ", 1)[1].split(" ")[0] if " INFO xp: " in line else line
             for line in lines]  # fmt: skip
    assert kinds == ["Run", *["epoch"] * 20, "Saved", "Done:"], result.stderr
    assert result.stdout.count("\n") == 1 and "finished; log_dir" in result.stdout


def test_a_short_ddp_run_prints_its_story_once_and_leaves_no_live_lock(xp, workdir: Path) -> None:
    """Two ranks, two epochs, shorter than the default schedule's warmup: one story on
    rank 0's stderr (no FutureWarning of xp's own DDP wrapping, the schedule's notes once,
    not per rank or per epoch), `Saved checkpoint <path>` as a path a user can copy, each
    rank's finish line naming the MLflow run, and no `.xp-run.lock` left that reads like a
    live run."""
    result = xp("strategy=ddp", "strategy.nproc_per_node=2", "trainer.max_epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    kinds = [line.split(" xp: ", 1)[1].split(" ")[0] if " INFO xp: " in line else line
             for line in lines]  # fmt: skip
    assert kinds == ["Schedule:", "Schedule:", "Run", "epoch", "epoch", "Saved", "Done:"], lines
    assert "inside scheduler.warmup's window" in lines[0]  # said once, as what it does
    (run_dir,) = (workdir / "outputs" / "default").iterdir()
    saved = lines[5].split("Saved checkpoint ", 1)[1]
    assert saved == str(run_dir / "checkpoints" / "step_00000020.pt")  # no sentence dot
    finished = result.stdout.splitlines()
    assert len(finished) == 2 and all("MLflow run None" not in line for line in finished)
    assert not (run_dir / ".xp-run.lock").exists()
