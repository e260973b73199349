"""The run directory's lock: held while a process trains there, free once it is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xp.rundir import LOCK_FILE, RunDirLock, RunInUse

HOLD = """
import sys, time
from pathlib import Path
from xp.rundir import RunDirLock
RunDirLock(Path(sys.argv[1])).acquire()
if sys.argv[2] == "fork":  # a DataLoader worker, say, forked while the lock is held
    import os
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
print("held", flush=True)
time.sleep(60)
"""


def hold(run_dir: Path, mode: str = "") -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), mode or "-"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_live_holder_is_named_and_keeps_others_out(tmp_path: Path) -> None:
    proc = hold(tmp_path)
    try:
        assert RunDirLock(tmp_path).holder() == f"pid {proc.pid} on {os.uname().nodename}"
        assert not RunDirLock(tmp_path).dead()
        with pytest.raises(RunInUse, match=f"still training \\(pid {proc.pid} on .*kill -TERM"):
            RunDirLock(tmp_path).acquire()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_the_lock_dies_with_its_process_not_with_its_forked_children(tmp_path: Path) -> None:
    # kill -9 leaves the MLflow run RUNNING; the lock is how a resume tells it is dead.
    proc = hold(tmp_path, "fork")
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the child it forked lives on
        proc.wait()
        deadline = time.monotonic() + 10
        while RunDirLock(tmp_path).holder() is not None:
            assert time.monotonic() < deadline, "the lock outlived its process"
            time.sleep(0.05)
        assert RunDirLock(tmp_path).dead()
        lock = RunDirLock(tmp_path)
        lock.acquire()
        assert (tmp_path / LOCK_FILE).read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"
        lock.release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_lock_released_at_the_end_leaves_no_file_that_reads_like_a_live_run(
    tmp_path: Path,
) -> None:
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert (tmp_path / LOCK_FILE).is_file()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert RunDirLock(tmp_path).holder() is None
    assert RunDirLock(tmp_path).dead()  # the run's process ended: nothing trains here
    assert not RunDirLock(tmp_path / "gone").dead()  # no run directory: nothing to resume
