"""Launcher inference, legacy arguments, threads per worker, the shared timestamp."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from xp.__main__ import _strip_legacy_local_rank
from xp.config import Launcher, RandomnessConfig
from xp.dist import dist_info, export_launcher_env, first_slurm_host, infer_launcher
from xp.rundir import receive_claim, share_claim
from xp.strategy import SingleDeviceStrategy

TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
SLURM = {
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS_PER_NODE": "2(x2)",
    "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_JOB_ID": "123456",
}
MPI = {
    "OMPI_COMM_WORLD_RANK": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_COMM_WORLD_SIZE": "3",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
}


@pytest.mark.parametrize(
    ("env", "launcher", "rank", "local_rank", "world", "local_world"),
    [
        ({}, Launcher.none, 0, 0, 1, 1),
        (TORCHRUN, Launcher.pytorch, 1, 1, 4, 2),
        (SLURM, Launcher.slurm, 3, 1, 4, 2),
        (MPI, Launcher.mpi, 2, 0, 3, 1),
    ],
)
def test_launcher_is_inferred_from_its_variables(
    env, launcher, rank, local_rank, world, local_world
):
    assert infer_launcher(env) is launcher
    info = dist_info(launcher, env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (
        rank,
        local_rank,
        world,
        local_world,
    )


def test_explicit_launcher_without_its_variables_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="strategy.launcher=slurm needs the environment"):
        dist_info(Launcher.slurm, {})


def test_slurm_and_mpi_variables_become_torch_rendezvous_variables(monkeypatch) -> None:
    # The code under test writes os.environ; give it a copy that the test throws away.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(SLURM)
    export_launcher_env(Launcher.slurm, None)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == (
        "3",
        "4",
        "1",
    )
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 10000)
    assert first_slurm_host("node[01-04],gpu7") == "node01"


def test_legacy_local_rank_argument_is_taken_out(monkeypatch) -> None:
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"})
    assert _strip_legacy_local_rank(["--local-rank=1", "optim=sgd"]) == ["optim=sgd"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert _strip_legacy_local_rank(["--local_rank", "3", "a=b"]) == ["a=b"]


def test_workers_divide_the_cores(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one rank of this launch, two per machine
    SingleDeviceStrategy(
        log_dir=tmp_path / "e" / "r", experiment_name="e", randomness=RandomnessConfig()
    )
    cores = len(os.sched_getaffinity(0))
    assert torch.get_num_threads() == max(1, cores // 2)


def test_one_process_shares_its_claim_with_nobody(monkeypatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    share_claim("20260101_000000")  # no store, no other rank: returns at once
    with pytest.raises(RuntimeError, match="ranks other than 0"):
        receive_claim()
