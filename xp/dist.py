"""What the launcher told this process: launcher kind, rank, world size."""

from __future__ import annotations

import os
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
