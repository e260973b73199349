"""Cases: checkpoint saves of a ~100M-parameter model with its AdamW state (1.26 GB).

``checkpoint_save``: xp's synchronous save path (``SingleDeviceStrategy.save_checkpoint``,
the file the training loop writes) vs a bare ``torch.save`` of the model and optimizer
state dicts, fsync'd, in the same folder; GB/s of each file.

``checkpoint_stall``: seconds the training thread is blocked by one save, the same
``save_checkpoint`` call through an :class:`AsyncCheckpointWriter` (until ``submit``
returns) vs written synchronously. The background write itself is not counted: it
competes with training for CPU and disk, which a stall cannot show.

``checkpoint_stall_fsdp``: the same stall for FSDP's sharded checkpoint folders, DCP's
``async_save`` (``checkpoint.async_save=true``) vs DCP's synchronous save, on one rank in
a process of its own (FSDP's process group stays out of this one).

The first two cases run in one interleaved loop (save, stall, save, stall...) on the first
call and are read from a cache by the second. Files go to a temporary folder on the disk
of the repository, deleted afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xp.checkpoint import AsyncCheckpointWriter, state_nbytes
from xp.config import AdamWConfig, Device
from xp.optim import OptimSpec, OptimWrapper
from xp.strategy.base import Strategy
from xp.strategy.single import SingleDeviceStrategy

REPO = Path(__file__).resolve().parent.parent
FULL = (25, 2048)
"""Layers and width of the measured model: 104.9M parameters, 1.26 GB with AdamW state."""
QUICK = (4, 256)
"""A 3 MB state: quick mode only checks that the code runs."""

_results: dict[tuple[int, bool], dict[str, dict[str, list[float]]]] = {}


class _Strategy(SingleDeviceStrategy):
    """Writes through ``writer`` when one is set: how a strategy would adopt async saves."""

    writer: AsyncCheckpointWriter | None = None

    def _write_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        if self.writer is None:
            super()._write_checkpoint(state, path)
            return
        if self.is_main_process:
            self.writer.submit(state, path)
        self.barrier()


def _bench_dir() -> Path:
    """A fresh folder on the repository's filesystem: the system temp dir if it is there."""
    tmp = Path(tempfile.gettempdir())
    parent = tmp if os.stat(tmp).st_dev == os.stat(REPO).st_dev else REPO
    return Path(tempfile.mkdtemp(prefix="xp-ckpt-bench-", dir=parent))


def _prepare(work: Path, quick: bool, strategy: Strategy | None = None) -> Strategy:
    """The model and AdamW, prepared by xp, after one step (so the optimizer has state)."""
    layers, width = QUICK if quick else FULL
    if strategy is None:
        strategy = _Strategy(log_dir=work / "run", experiment_name="bench", device=Device.cpu)
    prepared = strategy.prepare(
        lambda: nn.Sequential(*(nn.Linear(width, width) for _ in range(layers))),
        optim=OptimSpec(partial(torch.optim.AdamW, lr=1e-4), AdamWConfig(lr=1e-4)),
    )
    assert prepared.optim_wrapper is not None
    loss = prepared.model(torch.randn(8, width)).square().mean()
    prepared.optim_wrapper.update_params(loss)
    return strategy


def _seconds(fn: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def _bare_save(state: dict[str, Any], path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _gbps(path: Path, seconds: float) -> float:
    size = path.stat().st_size
    path.unlink()
    return size / seconds / 1e9


def _disk_gbps(folder: Path, quick: bool) -> float:
    """Sequential write speed of the disk, as ``dd ... conv=fdatasync`` reports it."""
    target = folder / "dd.bin"
    out = subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=64M", f"count={1 if quick else 16}",
         "conv=fdatasync"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    target.unlink()
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out.stderr)
    if m is None:
        raise RuntimeError(f"Could not parse dd's report: {out.stderr!r}")
    return int(m.group(1)) / float(m.group(2)) / 1e9


def _measure(rounds: int, quick: bool) -> dict[str, dict[str, list[float]]]:
    work = _bench_dir()
    try:
        strategy = _prepare(work, quick)
        assert isinstance(strategy, _Strategy)
        model = strategy.prepared.model
        optim_wrapper = strategy.prepared.optim_wrapper
        assert isinstance(optim_wrapper, OptimWrapper)
        optimizer = optim_wrapper.optimizer
        extra = {"progress": {"epoch": 0, "step": 1}}
        nbytes = state_nbytes({"model": model.state_dict(), "optim": optimizer.state_dict()})
        save: dict[str, list[float]] = {"xp": [], "baseline": [], "disk_gbps": []}
        stall: dict[str, list[float]] = {"xp": [], "baseline": [], "write_s": []}
        writer = AsyncCheckpointWriter()
        # The first submit allocates the host buffers; later ones reuse them (as in training).
        strategy.writer = writer
        stall["first_submit_s"] = [_seconds(strategy.save_checkpoint, work / "warm.pt")]
        writer.wait()
        (work / "warm.pt").unlink()
        strategy.writer = None
        for _ in range(rounds):  # interleaved, so drifts of the machine hit both cases alike
            path = work / "step_00000001.pt"
            seconds = _seconds(strategy.save_checkpoint, path, extra=extra)
            save["xp"].append(_gbps(path, seconds))
            state = {"model": model.state_dict(), "optim": optimizer.state_dict(), **extra}
            seconds = _seconds(_bare_save, state, path)
            save["baseline"].append(_gbps(path, seconds))
            save["disk_gbps"].append(_disk_gbps(work, quick))

            stall["baseline"].append(_seconds(strategy.save_checkpoint, path, extra=extra))
            path.unlink()
            strategy.writer = writer
            stall["xp"].append(_seconds(strategy.save_checkpoint, path, extra=extra))
            stall["write_s"].append(_seconds(writer.wait))
            strategy.writer = None
            path.unlink()
        writer.close()
        save["state_gb"] = stall["state_gb"] = [nbytes / 1e9]
        strategy.teardown()
        return {"save": save, "stall": stall}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cached(rounds: int, quick: bool) -> dict[str, dict[str, list[float]]]:
    if (rounds, quick) not in _results:
        _results[rounds, quick] = _measure(rounds, quick)
    return _results[rounds, quick]


def measure_save(rounds: int, quick: bool) -> dict[str, list[float]]:
    """GB/s of xp's ``save_checkpoint`` (``xp``) and of a bare ``torch.save`` (``baseline``)."""
    return _cached(rounds, quick)["save"]


def measure_stall(rounds: int, quick: bool) -> dict[str, list[float]]:
    """Seconds blocked by an async (``xp``) and a synchronous (``baseline``) save."""
    return _cached(rounds, quick)["stall"]


def save_note(results: dict[str, list[float]]) -> str:
    return (
        f"state {results['state_gb'][0]:.3g} GB; the disk's own sequential write "
        "(`dd if=/dev/zero bs=64M conv=fdatasync`, same folder): "
        f"{statistics.median(results['disk_gbps']):.3g} GB/s (median). Both saves fsync the "
        "file; xp also fsyncs the folder after its rename."
    )


def measure_fsdp_stall(rounds: int, quick: bool) -> dict[str, list[float]]:
    """Seconds blocked by an FSDP save with async_save (``xp``) and without (``baseline``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.checkpoint", "fsdp", str(rounds), str(int(quick))],
        cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=1200,
    )  # fmt: skip
    line = next(line for line in out.stdout.splitlines() if line.startswith("{"))
    results: dict[str, list[float]] = json.loads(line)
    return results


def _measure_fsdp(rounds: int, quick: bool) -> dict[str, list[float]]:
    """One FSDP rank: each round a synchronous save, then an async one (and its wait)."""
    from xp.strategy.fsdp import FSDPStrategy

    work = _bench_dir()
    strategy = FSDPStrategy(
        log_dir=work / "run", experiment_name="bench", device=Device.cpu, threads_per_process=1
    )
    try:
        _prepare(work, quick, strategy)
        extra = {"progress": {"epoch": 0, "step": 1}}
        stall: dict[str, list[float]] = {"xp": [], "baseline": [], "write_s": []}
        path = work / "step_00000001"
        # The first save also fills the stager's host copies; later ones reuse them.
        assert strategy.use_async_checkpoints()
        stall["first_submit_s"] = [_seconds(strategy.save_checkpoint, path, extra=extra)]
        strategy.wait_for_checkpoints()
        for _ in range(rounds):
            shutil.rmtree(path)
            kept, strategy._async_save = strategy._async_save, None  # synchronous this once
            stall["baseline"].append(_seconds(strategy.save_checkpoint, path, extra=extra))
            strategy._async_save = kept
            shutil.rmtree(path)
            stall["xp"].append(_seconds(strategy.save_checkpoint, path, extra=extra))
            stall["write_s"].append(_seconds(strategy.wait_for_checkpoints))
        return stall
    finally:
        strategy.teardown()
        shutil.rmtree(work, ignore_errors=True)


def fsdp_stall_note(results: dict[str, list[float]]) -> str:
    return (
        f"the first async save, which allocates DCP's host copies, blocked "
        f"{results['first_submit_s'][0]:.3g} s; each background write (DCP's thread, then "
        f"extra.pt and the marker) then took {statistics.median(results['write_s']):.3g} s "
        "(median) beside training."
    )


def stall_note(results: dict[str, list[float]]) -> str:
    return (
        f"the first async submit, which allocates the host buffers, blocked "
        f"{results['first_submit_s'][0]:.3g} s; each background write then took "
        f"{statistics.median(results['write_s']):.3g} s (median) beside training."
    )


if __name__ == "__main__":
    # python -m benchmarks.checkpoint fsdp ROUNDS QUICK: the FSDP case, in a process of its own.
    _, case, rounds, quick = sys.argv
    assert case == "fsdp", case
    print(json.dumps(_measure_fsdp(int(rounds), bool(int(quick)))))
