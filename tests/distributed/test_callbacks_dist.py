"""Callbacks on 2 gloo ranks: EarlyStopping and EMA under DDP and FSDP, resumed bit-exact."""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.utils.data import TensorDataset

from xp.callback import EMA, Callback, EarlyStopping
from xp.checkpoint import Checkpointer, load_file
from xp.config import AdamWConfig, CheckpointConfig, RandomnessConfig, TrainerConfig
from xp.data import EpochLoader
from xp.export import export_model_state
from xp.metric import Accuracy
from xp.model import MLP
from xp.optim import OptimSpec
from xp.strategy import DDPStrategy, FSDPStrategy
from xp.strategy.base import Strategy
from xp.strategy.fsdp import EXTRA_FILE, read_sharded_entries
from xp.task import SupervisedTask
from xp.trainer import Trainer, TrainingStopped, training_length

pytestmark = pytest.mark.slow

SETTINGS = TrainerConfig(max_epochs=12, log_interval_steps=4)
"""8 steps an epoch (256 samples, 16 per rank and step); EarlyStopping ends it sooner."""


class StopsAt(Callback):
    """A stop signal that reaches one rank only, at one step (the others learn it later)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, trainer: Trainer, step: int, values: Any) -> None:
        if step == self.step:
            trainer.request_stop(signal.SIGTERM)


class Asks(Callback):
    """Asks the run to finish on this rank only."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, trainer: Trainer, step: int, values: Any) -> None:
        if step == self.step:
            trainer.request_finish(f"rank {trainer.strategy.rank} had enough")


def callbacks(**extra: Callback) -> dict[str, Callback]:
    return {
        "early_stopping": EarlyStopping(patience=2, min_delta=0.02),
        "ema": EMA(decay=0.9, every_n_steps=2),
        **extra,
    }


def make_trainer(
    strategy: Strategy,
    rank: int,
    world_size: int,
    run_dir: Path,
    cbs: dict[str, Callback],
    settings: TrainerConfig = SETTINGS,
) -> Trainer:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 8, generator=g)
    y = x[:, :3].argmax(dim=1)
    common = {"batch_size": 16, "seed": 0, "rank": rank, "world_size": world_size}
    train = EpochLoader(TensorDataset(x[:256], y[:256]), shuffle=True, **common)
    val = EpochLoader(TensorDataset(x[256:], y[256:]), shuffle=False, pad=False, **common)
    length = training_length(settings, batches_per_epoch=len(train))
    prepared = strategy.prepare(
        lambda: MLP(8, [16, 16], 3, dropout=0.0),
        optim=OptimSpec(partial(torch.optim.AdamW, lr=3e-2), AdamWConfig(lr=3e-2)),
    )
    return Trainer(
        strategy,
        prepared,
        train_loader=train,
        val_loader=val,
        settings=settings,
        length=length,
        checkpointer=Checkpointer(
            run_dir / "checkpoints", keep=0, sharded=strategy.sharded_checkpoints
        ),
        task=SupervisedTask(metrics={"acc": Accuracy()}),
        checkpoint=CheckpointConfig(interval_steps=5),
        callbacks=cbs,
    )


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for _, t in sorted(tensors.items())])


def straight_stopped_resumed(
    make_strategy: Any, rank: int, world_size: int, tmp: Path, stop_at: int
) -> tuple[Trainer, Trainer, list[Strategy]]:
    """A straight run; a run SIGTERMed on rank 1 only; that run resumed. Both end early."""
    strategies = [make_strategy("straight")]
    straight = make_trainer(strategies[-1], rank, world_size, tmp / "straight", callbacks())
    expected = straight.fit()

    strategies.append(make_strategy("stopped"))
    extra = {"stop": StopsAt(stop_at)} if rank == 1 else {}
    stopped = make_trainer(strategies[-1], rank, world_size, tmp / "stopped", callbacks(**extra))
    with pytest.raises(TrainingStopped):
        stopped.fit()
    # Agreed at the next log step: every rank stopped at the same step.
    assert stopped.progress.step == -(-stop_at // 4) * 4

    strategies.append(make_strategy("resumed"))
    resumed = make_trainer(strategies[-1], rank, world_size, tmp / "stopped", callbacks())
    latest = resumed.checkpointer.latest()
    assert latest == stopped.checkpointer.path_for(stopped.progress.step)
    resumed.load_state(resumed.strategy.resume(latest))
    assert resumed.fit() == expected
    assert straight.stopped_early is not None and resumed.stopped_early == straight.stopped_early
    assert resumed.progress == straight.progress
    assert straight.progress.step < straight.length.total_steps
    return straight, resumed, strategies


def assert_equal(a: Any, b: Any, where: str = "checkpoint") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def comparable(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint without what names its run directory."""
    state = dict(state)
    state.pop("best", None)
    return state


# --------------------------------------------------------------------------- DDP


def _ddp(rank: int, world_size: int, tmp: Path) -> None:
    def make(name: str) -> DDPStrategy:
        return DDPStrategy(
            log_dir=tmp / name,
            experiment_name="t",
            randomness=RandomnessConfig(seed=0),
            threads_per_process=1,
            timeout_s=60,
        )

    straight, resumed, strategies = straight_stopped_resumed(make, rank, world_size, tmp, 11)
    # Every rank decided the same, and keeps the same average.
    decisions = straight.strategy.all_gather_object((straight.stopped_early, straight.progress))
    assert decisions[0] == decisions[1]
    ema = straight.callbacks.named["callbacks.ema"]
    assert isinstance(ema, EMA) and ema.updates == straight.progress.step // 2
    averages = straight.strategy.all_gather_object(flat(ema.average))
    assert torch.equal(averages[0], averages[1])
    if rank == 0:
        a = load_file(straight.checkpointer.latest())  # type: ignore[arg-type]
        b = load_file(resumed.checkpointer.latest())  # type: ignore[arg-type]
        assert_equal(comparable(a), comparable(b))
        assert torch.equal(flat(a["callbacks"]["ema"]["average"]), averages[0])

    # A finish asked on one rank ends both, at the next log step, with that rank's reason.
    strategies.append(make("asked"))
    asked = {"ask": Asks(5)} if rank == 1 else {}
    trainer = make_trainer(strategies[-1], rank, world_size, tmp / "asked", asked)
    trainer.fit()
    assert trainer.progress.step == 8
    assert trainer.stopped_early == "rank 1 had enough"
    for strategy in reversed(strategies):
        strategy.teardown()


def test_early_stopping_and_ema_under_ddp(spawn, tmp_path: Path) -> None:
    spawn(_ddp, 2, tmp_path)


# --------------------------------------------------------------------------- FSDP


def _fsdp(rank: int, world_size: int, tmp: Path) -> None:
    def make(name: str) -> FSDPStrategy:
        return FSDPStrategy(
            log_dir=tmp / name,
            experiment_name="t",
            randomness=RandomnessConfig(seed=0),
            shard_modules=["Linear"],
            threads_per_process=1,
            timeout_s=60,
        )

    straight, resumed, strategies = straight_stopped_resumed(make, rank, world_size, tmp, 21)
    ema = straight.callbacks.named["callbacks.ema"]
    assert isinstance(ema, EMA)
    # The average is sharded like the parameters: each rank holds its rows.
    params = dict(straight.module.named_parameters())
    for name, average in ema.average.items():
        assert isinstance(average, DTensor), name
        assert average.placements == params[name].placements, name
        assert average.to_local().shape == params[name].to_local().shape, name
    full = {k: v.full_tensor() for k, v in ema.average.items()}
    if rank == 0:
        torch.save(full, tmp / "ema_full.pt")

    # Validating the average leaves the training weights as a run without EMA has them.
    short = TrainerConfig(max_epochs=3, log_interval_steps=4)
    strategies.append(make("plain"))
    plain = make_trainer(strategies[-1], rank, world_size, tmp / "plain", {}, short)
    plain.fit()
    strategies.append(make("averaged"))
    averaged = make_trainer(
        strategies[-1], rank, world_size, tmp / "averaged", {"ema": EMA(0.5)}, short
    )
    assert averaged.fit() != plain.metrics
    options = StateDictOptions(full_state_dict=True)
    assert_equal(
        get_model_state_dict(averaged.model, options=options),
        get_model_state_dict(plain.model, options=options),
    )
    for strategy in reversed(strategies):
        strategy.teardown()


def test_early_stopping_and_ema_under_fsdp(spawn, tmp_path: Path) -> None:
    spawn(_fsdp, 2, tmp_path)
    # Here, without a process group: the two runs' last checkpoints are the same.
    straight = Checkpointer(tmp_path / "straight" / "checkpoints", sharded=True).latest()
    resumed = Checkpointer(tmp_path / "stopped" / "checkpoints", sharded=True).latest()
    assert straight is not None and resumed is not None and straight.name == resumed.name
    for path in (straight, resumed):
        assert "callbacks" not in load_file(path / EXTRA_FILE)  # in the shards, not rank 0's
    assert_equal(
        read_sharded_entries(resumed, ("model", "callbacks")),
        read_sharded_entries(straight, ("model", "callbacks")),
    )
    assert_equal(
        comparable(load_file(resumed / EXTRA_FILE)), comparable(load_file(straight / EXTRA_FILE))
    )
    # xp export ema=true writes the average, gathered from the shards.
    exported = export_model_state(straight, ema=True)
    full = torch.load(tmp_path / "ema_full.pt", weights_only=True)
    assert set(exported) == set(export_model_state(straight))
    for name, value in full.items():
        assert torch.equal(exported[name], value), name
