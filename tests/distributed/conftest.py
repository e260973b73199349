"""Run a function on N CPU processes joined by a real gloo process group."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
        }
    )
    fn(rank, world_size, *args)


@pytest.fixture
def spawn() -> Callable[..., None]:
    """``spawn(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` on each rank.

    The launcher variables are those torchrun sets, so strategies infer ``pytorch`` and
    join the group through env://; a failure on any rank fails the test with its traceback.
    ``fn`` must be a module-level function (it is pickled by reference).
    """

    def _spawn(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
        mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )

    return _spawn
