"""Datasets and the loader that batches them in an order fixed by (seed, epoch).

The order of an epoch depends only on (seed, epoch), never on global RNG state, so a
resumed run can start in the middle of an epoch by skipping indices, without replaying
data. In-memory ``TensorDataset``s are batched by index slicing, without per-sample
``__getitem__`` and collation; everything else goes through a ``DataLoader`` fed the
same index batches, so both paths yield identical batches.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import math
import random
import signal
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import util as _mp_util  # noqa: F401  (registers its exit hook before ours)
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, get_worker_info

from xp.randomness import WORKER_IGNORED_SIGNALS, derive_seed, seed_worker

# Loaders whose iteration started worker processes. Stopped by an exception in the middle
# of an epoch (a signal, a failing batch), an iteration keeps its workers, and since they
# ignore SIGTERM, multiprocessing's exit hook would wait on them forever: xp's own hook,
# registered after it and so run before it, shuts them down.
_WITH_WORKERS: weakref.WeakSet[EpochLoader] = weakref.WeakSet()


@atexit.register
def _close_loaders() -> None:
    for loader in list(_WITH_WORKERS):
        loader.close()


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold back stop signals while workers fork.

    A forked worker inherits the held signals and lets them go only after ignoring them
    (``seed_worker``); a stop signal sent to the whole process group in between would
    otherwise kill it, and the run would fail instead of saving and stopping. This process
    takes its held signals as soon as the workers are started.
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@dataclass(frozen=True)
class Datasets:
    """What a data factory (the ``data._target_``) returns."""

    train: Dataset
    val: Dataset | None = None
    test: Dataset | None = None


def digits(
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    as_images: bool = False,
) -> Datasets:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), scaled to [0, 1].

    Args:
        val_fraction: Share of the images held out for validation, stratified by class.
        test_fraction: Share held out for testing (``test=<run>``), stratified; 0: none.
        split_seed: Seed of the split, fixed so every run validates on the same images.
        as_images: Samples of shape 1x8x8 (for a CNN) instead of 64 features.
    """
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"data.{key}={value} must lie in [0, 1).")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} leave "
            "nothing to train on; keep their sum below 1."
        )
    features, labels = _load_digits()
    x = torch.from_numpy(features).float() / 16.0
    if as_images:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.from_numpy(labels).long()
    # Stratified: each class is split in the same proportions, in an order fixed by the seed.
    rng = np.random.default_rng(split_seed)
    parts: list[list[int]] = [[], [], []]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(len(members) * val_fraction)
        n_test = round(len(members) * test_fraction)
        parts[1] += members[:n_val].tolist()
        parts[2] += members[n_val : n_val + n_test].tolist()
        parts[0] += members[n_val + n_test :].tolist()
    train, val, test = (torch.tensor(sorted(part), dtype=torch.long) for part in parts)
    return Datasets(
        train=TensorDataset(x[train], y[train]),
        val=TensorDataset(x[val], y[val]) if len(val) else None,
        test=TensorDataset(x[test], y[test]) if len(test) else None,
    )


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits as (features, labels), read straight from scikit-learn's data file.

    Importing ``sklearn.datasets`` to read one small file costs about a second of start-up
    (benchmarks/, start-up case); the file is the same either way.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # a layout we do not know: its own loader

    bunch = load_digits()
    return bunch.data, bunch.target


class _IndexBatches:
    """The (epoch, index) batches of the current epoch, from a start position."""

    def __init__(self) -> None:
        self.batches: Sequence[torch.Tensor] = []
        self.start = 0
        self.epoch = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        return ([(epoch, i) for i in batch.tolist()] for batch in self.batches[self.start :])

    def __len__(self) -> int:
        return len(self.batches) - self.start


class _SeededSamples(Dataset):
    """In a worker, seeds python, numpy and torch from (seed, rank, epoch, index) per sample.

    Random augmentation in a worker then depends only on which sample it is, never on
    which worker took it or how many samples that worker saw before: the same batches
    with any ``num_workers``, and after a resume in the middle of an epoch.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.rank = rank

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if get_worker_info() is not None:
            sample_seed = derive_seed(self.seed, self.rank, epoch, index)
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.manual_seed(sample_seed)
        return self.dataset[index]


class EpochLoader:
    """Batches of one rank's share of a dataset, one epoch at a time.

    Args:
        dataset: Any map-style dataset.
        batch_size: Samples per batch on this rank.
        shuffle: Shuffle each epoch, in an order given by (seed, epoch).
        seed: The run's seed.
        rank: This process's rank.
        world_size: Number of processes sharing the data.
        drop_last: Drop the last incomplete batch.
        pad: Pad the index list so every rank gets the same number of samples (training,
            as DistributedSampler does); evaluation sets it False so nothing counts twice.
        num_workers, pin_memory, persistent_workers: As for ``DataLoader``.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        pad: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0.")
        self.dataset = dataset
        self.size = len(dataset)  # type: ignore[arg-type]
        if self.size == 0:
            raise ValueError("The dataset is empty; check the data config.")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.pad = pad
        self.epoch = 0
        self._index_batches = _IndexBatches()
        self._tensors: tuple[torch.Tensor, ...] | None = None
        self._loader: DataLoader | None = None
        self._live: Iterator[Any] | None = None
        if isinstance(dataset, TensorDataset) and num_workers == 0:
            self._tensors = dataset.tensors
        else:
            self._generator = torch.Generator()
            self._loader = DataLoader(
                _SeededSamples(dataset, seed, rank),
                batch_sampler=self._index_batches,
                num_workers=num_workers,
                pin_memory=pin_memory,
                persistent_workers=persistent_workers and num_workers > 0,
                worker_init_fn=seed_worker if num_workers > 0 else None,
                generator=self._generator,
            )
        self.set_epoch(0)

    @property
    def samples_per_rank(self) -> int:
        if self.pad:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        # Unpadded, rank 0 has the largest share, and every rank yields as many batches as it
        # does: a strategy whose forward communicates (FSDP, ZeRO-3) hangs otherwise.
        n = self.samples_per_rank if self.pad else math.ceil(self.size / self.world_size)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Fix the order of ``epoch`` (and the worker seeds derived from it)."""
        self.epoch = epoch
        # The order stays a tensor: a round trip through a list of ints cost ~80 us an epoch
        # (a few us a step on a small dataset; benchmarks/, step cases).
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        if self.pad and self.world_size > 1:
            total = self.samples_per_rank * self.world_size
            order = torch.cat([order, order[: total - len(order)]])
        mine = order[self.rank :: self.world_size].contiguous()
        batches = list(mine.split(self.batch_size)[: len(self)])
        if len(batches) < len(self):
            # One sample short of rank 0, this rank is one batch short: halve its last batch
            # (an empty batch when it has no sample at all).
            batches = [*batches[:-1], *batches[-1].tensor_split(2)] if batches else [mine]
        self._index_batches.batches = batches
        self._index_batches.epoch = epoch
        if self._loader is not None:
            self._generator.manual_seed(derive_seed(self.seed, self.rank, epoch))

    def iter_from(self, start_batch: int = 0) -> Iterator[Any]:
        """Iterate this epoch's batches, beginning at batch ``start_batch``."""
        self._index_batches.start = start_batch
        if self._loader is not None:
            with _stop_signals_held():
                self._live = iter(self._loader)
            if self._loader.num_workers:
                _WITH_WORKERS.add(self)
            return self._live
        return self._slice_batches(start_batch)

    def close(self) -> None:
        """Shut down the worker processes of the current iteration, if any, now.

        Workers ignore stop signals, so one that does not leave when asked is killed.
        """
        live, self._live = self._live, None
        shutdown = getattr(live, "_shutdown_workers", None)
        if shutdown is None:
            return
        shutdown()
        for worker in getattr(live, "_workers", ()):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)

    def __iter__(self) -> Iterator[Any]:
        return self.iter_from(0)

    def _slice_batches(self, start_batch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        assert self._tensors is not None
        tensors = self._tensors
        if len(tensors) == 2:  # (inputs, targets): no generator per batch
            x, y = tensors
            for index in self._index_batches.batches[start_batch:]:
                yield x[index], y[index]
            return
        for index in self._index_batches.batches[start_batch:]:
            yield tuple(t[index] for t in tensors)
