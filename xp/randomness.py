"""Seeds, determinism, and the RNG state saved in checkpoints."""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import numpy as np
import torch

# cuBLAS needs this before CUDA starts for deterministic matmuls (see torch's reproducibility
# notes); the strategy sets up randomness before any model touches the device.
_CUBLAS_WORKSPACE = ":4096:8"


def draw_seed() -> int:
    """A fresh seed from the OS's entropy pool (fits every RNG we seed)."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and every CUDA device) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Make torch pick deterministic kernels (or let it choose freely again)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """The state of every global RNG, as tensors and plain containers (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    mt, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "algorithm": mt,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["algorithm"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derive_seed(*parts: int) -> int:
    """A seed mixed from several integers (seed, rank, epoch, worker id), stable across runs."""
    seq = np.random.SeedSequence([p % 2**32 for p in parts])
    return int(seq.generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


# The stop signals a DataLoader worker leaves to the run's main process.
WORKER_IGNORED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGUSR1})


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python and numpy; leave stop signals to the run.

    torch seeds each worker with the loader's base seed + worker id, and xp draws that base
    seed from a generator seeded by (seed, rank, epoch), so every worker's RNGs follow from
    (seed, rank, worker id, epoch).
    """
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
    # A stop signal meant for the run (Slurm signals every process of the job) must not kill
    # the workers mid-batch: the main process finishes its step, saves, and shuts them down.
    # The loader forks workers with these signals blocked (xp.data), so one that arrives
    # before this point waits, and is dropped once ignored.
    for signum in WORKER_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)
