"""What the launcher told this process: launcher kind, ranks, world size, its node.

torchrun, srun and Open MPI's mpirun each say where a process stands under names of their
own; :func:`dist_info` reads them, :func:`export_launcher_env` copies srun's and mpirun's
into the names torch's ``env://`` rendezvous reads, and :func:`default_threads` divides the
cores of this node among the processes the launcher put on it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from enum import Enum


class Launcher(str, Enum):
    """How the processes of a run were started (mmengine's launcher names).

    Here, not in :mod:`xp.config`, so telling the rank needs no Hydra import.
    """

    none = "none"
    pytorch = "pytorch"
    slurm = "slurm"
    mpi = "mpi"


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the processes of a run."""

    launcher: Launcher
    rank: int = 0
    """Global rank: 0 to world_size - 1 over every node."""
    local_rank: int = 0
    """Rank among the processes of this node (selects the GPU)."""
    world_size: int = 1
    local_world_size: int = 1
    """Processes the launcher started on this node."""
    node_rank: int = 0
    """Which node of the run this is (torchrun's GROUP_RANK, Slurm's SLURM_NODEID)."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


RANKS_FROM_ENV = "XP_RANKS_FROM"
"""Set by :func:`export_launcher_env` to the launcher whose ranks it copied into RANK and
WORLD_SIZE, so the launcher is still told apart from torchrun after the copy."""


def infer_launcher(environ: os._Environ[str] | dict[str, str] | None = None) -> Launcher:
    """Tell the launcher from its environment variables, as mmengine does.

    torchrun (and torch's elastic agent) set WORLD_SIZE and RANK; srun sets SLURM_PROCID
    and SLURM_NTASKS in each task of a step; Open MPI's mpirun sets
    OMPI_COMM_WORLD_LOCAL_RANK. An sbatch script outside ``srun`` (the batch step) sees
    SLURM_PROCID=0 and the job's SLURM_NTASKS too, but nothing started other tasks: it is
    one process, not rank 0 of a launch whose other ranks never come.
    """
    env = os.environ if environ is None else environ
    copied = env.get(RANKS_FROM_ENV)
    if copied in (Launcher.slurm.value, Launcher.mpi.value) and "RANK" in env:
        return Launcher(copied)
    if "WORLD_SIZE" in env and "RANK" in env:
        return Launcher.pytorch
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and not in_slurm_batch_script(env):
        return Launcher.slurm
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
        return Launcher.mpi
    return Launcher.none


def in_slurm_batch_script(environ: os._Environ[str] | dict[str, str] | None = None) -> bool:
    """Whether this process runs in an sbatch script itself, not in a task srun started."""
    env = os.environ if environ is None else environ
    return (
        env.get("ENVIRONMENT") == "BATCH"
        and "SLURM_STEP_ID" not in env
        and "SLURM_STEPID" not in env
    )


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's tasks-per-node list, one entry per node: ``2(x3),1`` is ``[2, 2, 2, 1]``.

    Raises:
        ValueError: ``spec`` is not in that form.
    """
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"{spec!r} is not a Slurm tasks-per-node list such as 2(x3),1")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _slurm_local_world(env: os._Environ[str] | dict[str, str], node: int) -> int:
    """The tasks of this step on this node: the step's list first (srun -n 1 in a job of
    two tasks runs one), then the job's; SLURM_NTASKS_PER_NODE (only set by
    --ntasks-per-node) last."""
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        spec = env.get(key, "")
        try:
            counts = tasks_per_node(spec) if spec else []
        except ValueError:
            continue
        if counts:
            return counts[node] if node < len(counts) else counts[-1]
    return 1


def _int(env: os._Environ[str] | dict[str, str], key: str) -> int | None:
    value = env.get(key, "").strip()
    return int(value) if value.isdigit() else None


def dist_info(
    launcher: Launcher, environ: os._Environ[str] | dict[str, str] | None = None
) -> DistInfo:
    """Read ranks, world size and node for ``launcher`` from the environment."""
    env = os.environ if environ is None else environ
    if launcher is Launcher.none:
        return DistInfo(launcher)
    keys = {
        Launcher.pytorch: ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
        Launcher.slurm: ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
        Launcher.mpi: (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_SIZE",
        ),
    }[launcher]
    missing = [k for k in keys if k not in env]
    if missing:
        raise ValueError(
            f"strategy.launcher={launcher.value} needs the environment variables {missing}, "
            "which are not set; start the run with its launcher (torchrun, srun, mpirun) or use "
            "strategy.launcher=none."
        )
    rank, local_rank = int(env[keys[0]]), int(env[keys[1]])
    world = int(env[keys[2]])
    if launcher is Launcher.slurm:
        world = _int(env, "SLURM_STEP_NUM_TASKS") or world
        node = _int(env, "SLURM_NODEID")
        local_world = _slurm_local_world(env, node or 0)
    elif launcher is Launcher.pytorch:
        node = _int(env, "GROUP_RANK")
        local_world = _int(env, "LOCAL_WORLD_SIZE") or 1
    else:
        node = _int(env, "OMPI_COMM_WORLD_NODE_RANK")
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or 1
    return DistInfo(
        launcher,
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=rank // max(1, local_world) if node is None else node,
    )


def default_threads(
    info: DistInfo, environ: os._Environ[str] | dict[str, str] | None = None
) -> int:
    """torch threads for one process when ``strategy.threads_per_process`` is null.

    OMP_NUM_THREADS when set (torchrun sets 1 for several workers); else the cores this
    process may run on, divided among the processes the launcher put on this node. In a
    Slurm job those are the CPUs the job holds on this node (SLURM_CPUS_ON_NODE), not the
    whole machine's: two 1-CPU jobs on one node must not run two threads each. A task
    that Slurm bound to cores of its own (its affinity narrower than the job's CPUs) has
    its share already.
    """
    env = os.environ if environ is None else environ
    omp = _int(env, "OMP_NUM_THREADS")
    if omp is not None:
        return max(1, omp)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    job_cpus = _int(env, "SLURM_CPUS_ON_NODE")
    if job_cpus:
        if cores < job_cpus:
            return cores
        cores = job_cpus
    return max(1, cores // max(1, info.local_world_size))


def export_launcher_env(launcher: Launcher, master_port: int | None) -> None:
    """Give torch's env:// rendezvous the variables that srun or mpirun set under other names."""
    env = os.environ
    if launcher not in (Launcher.slurm, Launcher.mpi):
        return
    info = dist_info(launcher)
    env.setdefault("RANK", str(info.rank))
    env.setdefault("WORLD_SIZE", str(info.world_size))
    env.setdefault("LOCAL_RANK", str(info.local_rank))
    env.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    env[RANKS_FROM_ENV] = launcher.value
    if launcher is Launcher.slurm:
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = first_slurm_host(
                env.get("SLURM_STEP_NODELIST") or env["SLURM_NODELIST"]
            )
        # Every task of the job derives the same port from the job id (mmengine does too).
        env.setdefault("MASTER_PORT", str(master_port or 20000 + int(env["SLURM_JOB_ID"]) % 10000))
    else:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(master_port or 29500))


def first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # "node[01-04],gpu7" -> "node01": good enough where scontrol is missing.
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        return head


def free_port() -> int:
    """A TCP port nobody listens on right now, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_error(port: int | None) -> str | None:
    """Why ``strategy.master_port`` cannot be used, or None (null: a free port is picked)."""
    if port is None:
        return None
    if not 1 <= port <= 65535:
        return (
            f"strategy.master_port={port} is not a TCP port (1 to 65535); pick one in that "
            "range, or null for a free one."
        )
    return None


def port_in_use(port: int) -> bool:
    """Whether something already listens on ``port`` on this machine."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False
