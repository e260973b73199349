"""A model with its own train_step under DDP: every rank's replica stays identical."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from xp.checkpoint import Checkpointer
from xp.config import AdamConfig, CheckpointConfig, RandomnessConfig, TrainerConfig
from xp.data import EpochLoader
from xp.examples.gan import GAN2D, gaussian_mixture
from xp.optim import OptimSpec
from xp.strategy import DDPStrategy
from xp.task import SupervisedTask, task_for_model
from xp.trainer import Trainer, training_length

pytestmark = pytest.mark.slow


def _train(rank: int, world_size: int, tmp: Path) -> None:
    strategy = DDPStrategy(log_dir=tmp, experiment_name="t", randomness=RandomnessConfig(seed=rank))
    data = gaussian_mixture(train_size=1024, val_size=256)
    common = {"batch_size": 64, "seed": 0, "rank": rank, "world_size": world_size}
    train = EpochLoader(data.train, shuffle=True, **common)
    val = EpochLoader(data.val, shuffle=False, pad=False, **common)
    assert isinstance(data.train, TensorDataset)
    optim = {
        name: OptimSpec(partial(torch.optim.Adam, lr=1e-3), AdamConfig(lr=1e-3, params=name))
        for name in ("generator", "discriminator")
    }
    settings = TrainerConfig(max_epochs=2, log_interval_steps=4)
    prepared = strategy.prepare(GAN2D, optim=optim)
    trainer = Trainer(
        strategy,
        prepared,
        train_loader=train,
        val_loader=val,
        settings=settings,
        length=training_length(settings, batches_per_epoch=len(train)),
        checkpointer=Checkpointer(tmp / "checkpoints"),
        task=task_for_model(strategy.unwrap(prepared.model), SupervisedTask()),
        checkpoint=CheckpointConfig(interval_epochs=0),
    )
    metrics = trainer.fit()
    assert set(metrics) == {"val/quality", "val/modes"}
    # Different seeds per rank gave different noise and batches; the replicas still agree,
    # because every optimizer step averaged the gradients over the ranks first.
    flat = torch.cat([p.detach().flatten() for p in prepared.model.parameters()])
    gathered = strategy.all_gather_object(flat)
    assert all(torch.equal(gathered[0], other) for other in gathered[1:])
    assert trainer.progress.step == 2 * len(train)
    strategy.teardown()


def test_gan_replicas_stay_identical_under_ddp(spawn, tmp_path: Path) -> None:
    spawn(_train, 2, tmp_path)


def _train_fsdp(rank: int, world_size: int, tmp: Path) -> None:
    from xp.strategy import FSDPStrategy

    strategy = FSDPStrategy(log_dir=tmp, experiment_name="t", randomness=RandomnessConfig(seed=0))
    data = gaussian_mixture(train_size=512, val_size=128)
    common = {"batch_size": 64, "seed": 0, "rank": rank, "world_size": world_size}
    optim = {
        name: OptimSpec(partial(torch.optim.Adam, lr=1e-3), AdamConfig(lr=1e-3, params=name))
        for name in ("generator", "discriminator")
    }
    settings = TrainerConfig(max_epochs=2, log_interval_steps=2)
    prepared = strategy.prepare(GAN2D, optim=optim)
    train = EpochLoader(data.train, shuffle=True, **common)
    trainer = Trainer(
        strategy,
        prepared,
        train_loader=train,
        val_loader=EpochLoader(data.val, shuffle=False, pad=False, **common),
        settings=settings,
        length=training_length(settings, batches_per_epoch=len(train)),
        checkpointer=Checkpointer(tmp / "checkpoints", sharded=True),
        task=task_for_model(strategy.unwrap(prepared.model), SupervisedTask()),
    )
    metrics = trainer.fit()
    assert set(metrics) == {"val/quality", "val/modes"}
    # The parts are sharded over the ranks; the sharded checkpoint of the last step is whole.
    assert (tmp / "checkpoints" / f"step_{2 * len(train):08d}" / "COMPLETE").exists()
    strategy.teardown()


def test_gan_trains_under_fsdp_with_its_parts_sharded(spawn, tmp_path: Path) -> None:
    spawn(_train_fsdp, 2, tmp_path)
