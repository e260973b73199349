"""The epoch loader: order fixed by (seed, epoch), fast path identical to the DataLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from xp.data import EpochLoader, digits


class Wrapped(Dataset):
    """A map-style dataset that is not a TensorDataset (forces the DataLoader path)."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return self.base[i]


class Noisy(Dataset):
    """Each item draws from numpy's global RNG: shows how workers are seeded."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.tensor(np.random.rand())


def tensors(n: int = 50) -> TensorDataset:
    return TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))


def batches(loader: EpochLoader, epoch: int, start: int = 0) -> list[list[int]]:
    loader.set_epoch(epoch)
    return [b[1].tolist() for b in loader.iter_from(start)]


def test_fast_path_yields_what_the_dataloader_yields() -> None:
    kw = {"batch_size": 8, "shuffle": True, "seed": 3}
    fast, slow = EpochLoader(tensors(), **kw), EpochLoader(Wrapped(tensors()), **kw)
    assert fast._loader is None and slow._loader is not None
    for epoch in (0, 1):
        assert batches(fast, epoch) == batches(slow, epoch)
    assert len(fast) == 7


def test_order_depends_on_seed_and_epoch_only() -> None:
    loader = EpochLoader(tensors(), batch_size=8, shuffle=True, seed=3)
    first = batches(loader, 0)
    torch.rand(100)  # global RNG use must not matter
    assert batches(loader, 0) == first
    assert batches(loader, 1) != first
    assert sorted(sum(first, [])) == list(range(50))
    assert batches(EpochLoader(tensors(), batch_size=8, shuffle=True, seed=4), 0) != first


def test_iter_from_skips_without_replaying() -> None:
    loader = EpochLoader(Wrapped(tensors()), batch_size=8, shuffle=True, seed=3)
    assert batches(loader, 2, start=4) == batches(loader, 2)[4:]


def test_ranks_split_the_data() -> None:
    kw = {"batch_size": 4, "shuffle": True, "seed": 0, "world_size": 2}
    train = [EpochLoader(tensors(51), rank=r, **kw) for r in (0, 1)]
    seen = [sum(batches(t, 0), []) for t in train]
    assert len(seen[0]) == len(seen[1]) == 26  # padded like DistributedSampler
    assert set(seen[0]) | set(seen[1]) == set(range(51))
    val = [EpochLoader(tensors(51), rank=r, pad=False, **kw) for r in (0, 1)]
    shares = [sum(batches(v, 0), []) for v in val]
    assert sorted(shares[0] + shares[1]) == list(range(51))  # nothing counted twice


def test_drop_last() -> None:
    loader = EpochLoader(tensors(50), batch_size=8, shuffle=False, seed=0, drop_last=True)
    assert len(loader) == 6
    assert all(len(b) == 8 for b in batches(loader, 0))


@pytest.mark.slow
def test_workers_are_seeded_from_seed_rank_and_epoch() -> None:
    kw = {"batch_size": 2, "shuffle": False, "seed": 5, "num_workers": 2}
    a, b = EpochLoader(Noisy(), **kw), EpochLoader(Noisy(), **kw)
    draws = {}
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        draws[epoch] = torch.cat(list(a))
        assert torch.equal(draws[epoch], torch.cat(list(b)))
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.slow
def test_augmentation_in_workers_follows_the_sample_not_the_worker() -> None:
    """Random augmentation is the same with 0 or 2 workers and when starting mid-epoch."""
    kw = {"batch_size": 2, "shuffle": True, "seed": 5}
    two = EpochLoader(Noisy(), num_workers=2, **kw)
    two.set_epoch(3)
    straight = list(two)
    two.set_epoch(3)
    resumed = list(two.iter_from(2))
    assert all(torch.equal(a, b) for a, b in zip(straight[2:], resumed, strict=True))
    one = EpochLoader(Noisy(), num_workers=1, **kw)
    one.set_epoch(3)
    assert all(torch.equal(a, b) for a, b in zip(straight, list(one), strict=True))


def test_bad_loader_settings() -> None:
    with pytest.raises(ValueError, match="data.batch_size=0"):
        EpochLoader(tensors(), batch_size=0, shuffle=True, seed=0)


def test_digits_split() -> None:
    data = digits(val_fraction=0.2, test_fraction=0.1)
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert abs(len(data.val) - 0.2 * 1797) <= 10 and abs(len(data.test) - 0.1 * 1797) <= 10
    x, y = data.train[0]
    assert x.shape == (64,) and float(x.min()) >= 0 and float(x.max()) <= 1
    # Stratified: every class is in every split, in about the same share.
    for split in (data.train, data.val, data.test):
        counts = torch.bincount(split.tensors[1], minlength=10).float()
        assert counts.min() / counts.max() > 0.8
    # The split is the same every time (every run validates on the same images).
    again = digits(val_fraction=0.2, test_fraction=0.1)
    assert torch.equal(again.val.tensors[0], data.val.tensors[0])
    assert digits(as_images=True).train.tensors[0].shape[1:] == (1, 8, 8)
    assert digits(test_fraction=0).test is None
    with pytest.raises(ValueError, match="data.val_fraction=1.5"):
        digits(val_fraction=1.5)
    with pytest.raises(ValueError, match="leave nothing to train on"):
        digits(val_fraction=0.5, test_fraction=0.5)


def _stopped_before_seeding(worker_id: int) -> None:
    """A worker's init that a SIGTERM to the process group reaches before it ignores it."""
    import os
    import signal

    from xp.randomness import seed_worker

    os.kill(os.getpid(), signal.SIGTERM)
    seed_worker(worker_id)


def test_a_stop_signal_while_workers_start_leaves_them_running() -> None:
    # Slurm and `kill -TERM -<pgid>` signal every process of the job; a worker that got the
    # signal before ignoring it used to die, and the run failed instead of saving and stopping.
    loader = EpochLoader(Wrapped(tensors(16)), batch_size=4, shuffle=False, seed=0, num_workers=2)
    assert loader._loader is not None
    loader._loader.worker_init_fn = _stopped_before_seeding
    got = [b[1].tolist() for b in loader]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_a_process_left_in_mid_epoch_exits_without_waiting_on_its_workers(tmp_path) -> None:
    # Workers ignore SIGTERM, which is how multiprocessing's exit hook stops them: a process
    # that left an iteration unfinished (an exception mid-epoch) hung at exit forever.
    import subprocess
    import sys

    script = tmp_path / "left.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from xp.data import EpochLoader\n"
        "class Wrapped(torch.utils.data.Dataset):\n"
        "    def __init__(self, n): self.base = TensorDataset(torch.arange(n))\n"
        "    def __len__(self): return len(self.base)\n"
        "    def __getitem__(self, i): return self.base[i]\n"
        "loader = EpochLoader(Wrapped(64), batch_size=4, shuffle=True, seed=0, num_workers=2)\n"
        "left = loader.iter_from(0)\n"
        "next(left)\n"
        "print('one batch', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "one batch" in result.stdout
