"""What the launcher told this process: launcher kind, rank, world size."""

from __future__ import annotations

import os
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
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def infer_launcher(environ: os._Environ[str] | dict[str, str] | None = None) -> Launcher:
    """Tell the launcher from its environment variables, as mmengine does.

    torchrun (and torch's elastic agent) set WORLD_SIZE; srun sets SLURM_NTASKS; Open MPI's
    mpirun sets OMPI_COMM_WORLD_LOCAL_RANK.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return Launcher.pytorch
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return Launcher.slurm
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
        return Launcher.mpi
    return Launcher.none


def dist_info(
    launcher: Launcher, environ: os._Environ[str] | dict[str, str] | None = None
) -> DistInfo:
    """Read rank and world size for ``launcher`` from the environment."""
    env = os.environ if environ is None else environ
    if launcher is Launcher.none:
        return DistInfo(launcher)
    keys = {
        Launcher.pytorch: ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"),
        Launcher.slurm: ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE"),
        Launcher.mpi: (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ),
    }[launcher]
    missing = [k for k in keys[:3] if k not in env]
    if missing:
        raise ValueError(
            f"strategy.launcher={launcher.value} needs the environment variables {missing}, "
            "which are not set; start the run with its launcher (torchrun, srun, mpirun) or use "
            "strategy.launcher=none."
        )
    # SLURM_NTASKS_PER_NODE may read "2(x3)" on heterogeneous allocations.
    local_world = env.get(keys[3], "").split("(")[0]
    return DistInfo(
        launcher,
        rank=int(env[keys[0]]),
        local_rank=int(env[keys[1]]),
        world_size=int(env[keys[2]]),
        local_world_size=int(local_world) if local_world.isdigit() else 1,
    )


def export_launcher_env(launcher: Launcher, master_port: int | None) -> None:
    """Give torch's env:// rendezvous the variables that srun or mpirun set under other names."""
    env = os.environ
    if launcher is Launcher.slurm:
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = first_slurm_host(env["SLURM_NODELIST"])
        # Every task of the job derives the same port from the job id (mmengine does too).
        env.setdefault("MASTER_PORT", str(master_port or 20000 + int(env["SLURM_JOB_ID"]) % 10000))
    elif launcher is Launcher.mpi:
        env.setdefault("RANK", env["OMPI_COMM_WORLD_RANK"])
        env.setdefault("WORLD_SIZE", env["OMPI_COMM_WORLD_SIZE"])
        env.setdefault("LOCAL_RANK", env["OMPI_COMM_WORLD_LOCAL_RANK"])
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
