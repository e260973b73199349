"""What the tests read of other processes from /proc (Linux)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Running, not a zombie: a reparented child waits for an init that may never reap it."""
    try:
        state = _stat(pid)[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def parent(pid: int) -> int:
    return int(_stat(pid)[1])


def wait_gone(pid: int, message: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if parent(int(entry.name)) == pid and alive(int(entry.name)):
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def writer_pids(root: int, *, descendants: bool = False) -> list[int]:
    """xp's MLflow writer processes among the children of ``root`` (or all its descendants)."""
    found, todo = [], [root]
    while todo:
        for pid in children(todo.pop()):
            if descendants:
                todo.append(pid)
            try:
                if b"xp._tracking_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue  # it ended meanwhile
    return found


REPO = Path(__file__).resolve().parents[1]


def with_repo_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the repository on PYTHONPATH, for the tests' own models (``tests.*``)."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))}
