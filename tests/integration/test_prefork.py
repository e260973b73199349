"""``python -m xp`` trains in a child forked before Hydra composes (xp/prefork.py).

The process a user starts must still behave as the run: signals sent to it stop the
training with a checkpoint, a terminal's Ctrl-C stops it once, ``kill -9`` leaves no
orphan training on, and its exit status is the training's.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.procs import parent, wait_gone

pytestmark = pytest.mark.slow  # each test runs python -m xp

ENDLESS = ["trainer.max_epochs=100000", "tracking=off", "checkpoint.interval_epochs=1"]


def _start(
    workdir: Path, *args: str, env: dict[str, str] | None = None, **popen: object
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "xp", *ENDLESS, *args],
        cwd=workdir,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **popen,  # type: ignore[call-overload]
    )


def _training_pid(workdir: Path, timeout: float = 120, run_glob: str = "outputs/default/*") -> int:
    """The training process's pid, from the run's lock, once the run has validated."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = list(workdir.glob(f"{run_glob}/*.log"))
        if logs and "val/acc" in logs[0].read_text():
            (lock,) = workdir.glob(f"{run_glob}/.xp-run.lock")
            # "pid <command> on <host>, training in pid <child>", or "pid <pid> on <host>"
            return int(re.findall(r"pid (\d+)", lock.read_text())[-1])
        time.sleep(0.1)
    pytest.fail("the run never validated")


def _saved_where_it_stopped(log: str) -> bool:
    """Whether the stop message names a checkpoint of the step it stopped at, and it is there."""
    match = re.search(r"Stopped by \S+ at step (\d+); resume continues from (\S+\.pt)", log)
    return bool(match) and Path(match[2]).is_file() and f"step_{int(match[1]):08d}" in match[2]


def test_kill_9_of_the_command_ends_its_training(workdir: Path) -> None:
    proc = _start(workdir)
    try:
        child = _training_pid(workdir)
        assert child != proc.pid  # the training runs in the forked child...
        (lock,) = (workdir / "outputs" / "default").glob("*/.xp-run.lock")
        assert lock.read_text().startswith(f"pid {proc.pid} on ")  # named by the command
        assert parent(child) == proc.pid
        proc.kill()
        proc.wait(timeout=30)
        wait_gone(child, "the training process outlived the command killed with -9", 10)
    finally:
        proc.kill()


@pytest.mark.parametrize(
    ("send", "status", "reason"),
    [
        pytest.param(lambda p: p.send_signal(signal.SIGTERM), 143, "SIGTERM", id="sigterm"),
        pytest.param(lambda p: p.send_signal(signal.SIGUSR1), 138, "SIGUSR1", id="sigusr1"),
        # Sent to the process group, both processes get it; the parent passes it on as
        # SIGTERM, which must not count as a second Ctrl-C.
        pytest.param(
            lambda p: os.killpg(p.pid, signal.SIGINT), 130, "SIGINT", id="sigint-to-the-group"
        ),
    ],
)
def test_a_stop_signal_to_the_command_saves_and_stops(workdir: Path, send, status, reason) -> None:
    proc = _start(workdir, start_new_session=True)
    try:
        _training_pid(workdir)
        send(proc)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status, err[-2000:]
    assert f"Stopped by {reason} at step" in err
    assert _saved_where_it_stopped(err), err[-2000:]


def test_ctrl_c_at_a_terminal_saves_and_stops_once(workdir: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: python -m xp on a terminal of its own
        os.chdir(workdir)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "xp", *ENDLESS], env)
    output: list[bytes] = []

    def drain() -> None:  # a terminal nobody reads blocks the writer once its buffer fills
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the terminal closed: the command ended
                return
            if not chunk:
                return
            output.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        _training_pid(workdir)
        os.write(fd, b"\x03")  # Ctrl-C: the terminal signals its foreground process group
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        reader.join(timeout=10)
    finally:
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    text = b"".join(output).decode(errors="replace")
    assert done[0] == pid, "Ctrl-C did not stop the run"
    assert os.waitstatus_to_exitcode(done[1]) == 130, text[-2000:]
    assert "Stopped by SIGINT at step" in text
    assert "KeyboardInterrupt" not in text
    assert _saved_where_it_stopped(text.replace("\r\n", "\n")), text[-2000:]


def test_a_training_process_killed_on_its_own_is_reported(workdir: Path) -> None:
    proc = _start(workdir)
    try:
        child = _training_pid(workdir)
        os.kill(child, signal.SIGKILL)  # as the kernel's OOM killer would
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 137
    assert f"the training process (pid {child}) was killed by SIGKILL" in err
    assert "resume=auto" in err


def test_xp_fork_0_trains_in_the_command_itself(workdir: Path) -> None:
    proc = _start(workdir, env={"XP_FORK": "0"})
    try:
        assert _training_pid(workdir) == proc.pid
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]


def test_a_sweep_asked_for_by_hydra_mode_trains_every_job(xp, workdir: Path) -> None:
    # Not -m on the command line, so the command forks, then Hydra turns out to sweep:
    # the child is let go and every job trains in the sweeping process.
    result = xp("hydra.mode=MULTIRUN", "trainer.max_epochs=1", "optim.lr=0.01,0.02", "tracking=off")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((workdir / "outputs" / "default" / "multirun").glob("*/*/checkpoints"))) == 2
    assert result.stdout.count("FINISHED") == 2


@pytest.mark.parametrize(
    ("args", "forks"),
    [
        ([], True),
        (["optim=sgd", "tracking=off"], True),
        (["resume=auto"], False),  # finds the run (torch) before Hydra composes
        (["test=outputs/default/x"], False),
        (["--cfg", "job"], False),
        (["-m", "optim.lr=1e-3,3e-3"], False),
        (["strategy=ddp", "strategy.nproc_per_node=2"], False),  # the launcher
    ],
)
def test_which_commands_fork_their_training(
    args: list[str], forks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xp.__main__ import _forks_training

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "XP_FORK"):
        monkeypatch.delenv(name, raising=False)
    assert _forks_training(args) is forks
    monkeypatch.setenv("XP_FORK", "0")
    assert _forks_training(args) is False
    monkeypatch.delenv("XP_FORK")
    monkeypatch.setenv("RANK", "0")  # a torchrun worker
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _forks_training(args) is False


def test_a_repeated_sigterm_does_not_cut_the_stopped_runs_close(workdir: Path, store) -> None:
    # A SIGTERM to the process group reaches the training process twice (directly, and
    # passed on by the command), and schedulers repeat theirs; one that lands while the
    # stopped run closes its MLflow run must not cut that short: the run ends KILLED
    # with its checkpoint stored.
    proc = subprocess.Popen(
        [sys.executable, "-m", "xp", "trainer.max_epochs=100000", "experiment_name=twice"],
        cwd=workdir,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        child = _training_pid(workdir, run_glob="outputs/twice/*")
        os.kill(child, signal.SIGTERM)
        (log,) = (workdir / "outputs" / "twice").glob("*/*.log")
        deadline = time.monotonic() + 60
        while "Run KILLED" not in log.read_text():  # the run is closing now
            assert time.monotonic() < deadline, "the run never stopped"
            time.sleep(0.001)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    (run,) = store.search_runs([store.get_experiment_by_name("twice").experiment_id])
    assert run.info.status == "KILLED", err[-2000:]
    assert "checkpoints" in {a.path for a in store.list_artifacts(run.info.run_id)}
