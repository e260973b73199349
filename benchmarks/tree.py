"""A command's peak resident memory, over its whole process tree.

:func:`run_tree` starts a command and, every few tens of milliseconds until it exits,
reads ``/proc/<pid>/status`` of the process and of every descendant (``python -m xp``'s
composing parent, its forked training process and the MLflow writer; a launcher's
workers): each process's resident set now (``VmRSS``) and its peak so far (``VmHWM``,
kept by the kernel, so no peak between two samples is missed). Reported: the sum of the
processes' own peaks (what the machine had to hold if they peaked together: an upper
bound) and the peak of the sampled sum. A page two processes share (a fork's) counts in
both, as ``ps`` and ``top`` count it.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MIB = 2**20
_SAMPLE_S = 0.05


@dataclass
class TreeRun:
    """What :func:`run_tree` saw."""

    start: float
    """``time.time()`` just before the launch."""
    exit_s: float
    """Seconds from the launch to the command's exit (its output pipes closed)."""
    returncode: int
    stdout: str
    stderr: str
    peak_sum_mib: float
    """The sum of each process's own peak resident set (``VmHWM``)."""
    peak_of_sum_mib: float
    """The peak of the sampled sum of the resident sets (``VmRSS``)."""
    peaks: dict[str, float] = field(default_factory=dict)
    """Each process's peak, by its module (``python -m <module>``) and pid."""


def _status(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) in MiB, or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line[:5]] = int(line.split()[1]) * 1024 / MIB
    if len(values) < 2:
        return None  # a zombie: its memory is gone
    return values["VmRSS"], values["VmHWM"]


def _name(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return f"?[{proc.pid}]"
    module = cmd[cmd.index("-m") + 1] if "-m" in cmd[:-1] else Path(cmd[0]).name if cmd else "?"
    return f"{module}[{proc.pid}]"


def run_tree(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 900.0) -> TreeRun:
    """Run ``args`` to its end, watching its process tree's memory meanwhile."""
    start = time.time()
    began = time.perf_counter()
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    root = psutil.Process(proc.pid)
    by_pid: dict[int, float] = {}
    names: dict[int, str] = {}
    peak_of_sum = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_of_sum
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0.0
            for p in tree:
                status = _status(p.pid)
                if status is None:
                    continue
                rss, hwm = status
                total += rss
                by_pid[p.pid] = max(by_pid.get(p.pid, 0.0), hwm)
                # Read again until it holds: a process started by fork and exec has its
                # parent's command line until the exec.
                if names.get(p.pid, "").split("[")[0] in ("", "xp", "?"):
                    names[p.pid] = _name(p)
            peak_of_sum = max(peak_of_sum, total)
            done.wait(_SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        done.set()
        sampler.join()
    return TreeRun(
        start=start,
        exit_s=time.perf_counter() - began,
        returncode=proc.returncode,
        stdout=stdout,
        stderr=stderr,
        peak_sum_mib=sum(by_pid.values()),
        peak_of_sum_mib=peak_of_sum,
        peaks={names[pid]: peak for pid, peak in by_pid.items()},
    )
