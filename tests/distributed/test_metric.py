"""Validation metrics over 2 ranks and uneven batches equal the exact value on all the data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from xp.config import Loss, RandomnessConfig
from xp.data import EpochLoader
from xp.metric import Accuracy
from xp.strategy import DDPStrategy
from xp.task import ModelStepTask, SupervisedTask

pytestmark = pytest.mark.slow


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(37, 4, generator=g), torch.randint(3, (37,), generator=g)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


class _Scored(nn.Module):
    """A model whose val_step returns a per-sample score and a batch-mean score."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = _model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def train_step(self, batch, optim_wrapper):  # pragma: no cover - not trained here
        raise AssertionError

    def val_step(self, batch):
        x, y = batch
        right = (self(x).argmax(1) == y).float()
        return {"right": right, "right_mean": right.mean()}


def _evaluate(rank: int, world_size: int, tmp: Path) -> None:
    strategy = DDPStrategy(log_dir=tmp, experiment_name="t", randomness=RandomnessConfig(seed=0))
    x, y = _data()
    # 37 samples over 2 ranks in batches of 5: 19 and 18 samples, the last batches short.
    loader = EpochLoader(
        TensorDataset(x, y),
        batch_size=5,
        shuffle=False,
        seed=0,
        rank=rank,
        world_size=world_size,
        pad=False,
    )
    model = _model()
    task = SupervisedTask(Loss.cross_entropy, metrics={"acc": Accuracy()})
    result = task.evaluate(model, model, loader, strategy)
    with torch.no_grad():
        logits = model(x)
    exact_acc = (logits.argmax(1) == y).sum().item() / len(y)
    assert result["acc"] == pytest.approx(exact_acc, abs=1e-12), (result, exact_acc, rank)
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), abs=1e-6)

    scored = _Scored()
    values = ModelStepTask(task).evaluate(scored, scored, loader, strategy)
    assert values["right"] == pytest.approx(exact_acc, abs=1e-12)
    assert values["right_mean"] == pytest.approx(exact_acc, abs=1e-6)  # float32 batch means
    strategy.teardown()


def test_metrics_over_two_ranks_and_uneven_batches_are_exact(spawn, tmp_path: Path) -> None:
    spawn(_evaluate, 2, tmp_path)
