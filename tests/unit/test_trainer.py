"""The training loop: a run stopped at its last step does, when resumed, what it still owed."""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import TensorDataset

from xp.checkpoint import Checkpointer, load_file
from xp.config import AdamWConfig, CheckpointConfig, RandomnessConfig, TrainerConfig
from xp.data import EpochLoader
from xp.metric import Accuracy
from xp.model import MLP
from xp.optim import OptimSpec
from xp.scheduler import Phase
from xp.strategy import SingleDeviceStrategy
from xp.task import SupervisedTask
from xp.trainer import Trainer, TrainingStopped, training_length


class Killed(Exception):
    """Stands for kill -9: the process is gone; only the checkpoints it saved remain."""


class Interrupting(SupervisedTask):
    """The supervised task, with a SIGTERM during one step or a kill in one validation."""

    def __init__(self, *, sigterm_in_step: int = 0, kill_in_validation_after: int = 0) -> None:
        super().__init__(metrics={"acc": Accuracy()})
        self.sigterm_in_step = sigterm_in_step
        self.kill_in_validation_after = kill_in_validation_after
        self.trainer: Trainer | None = None
        self.steps = 0

    def train_step(self, *args: Any) -> Any:
        self.steps += 1
        if self.steps == self.sigterm_in_step:
            assert self.trainer is not None
            self.trainer.request_stop(signal.SIGTERM)  # what the run's signal handler does
        return super().train_step(*args)

    def evaluate(self, *args: Any) -> dict[str, float]:
        if self.steps and self.steps == self.kill_in_validation_after:
            raise Killed
        return super().evaluate(*args)


def build(run_dir: Path, task: Interrupting, settings: TrainerConfig) -> Trainer:
    strategy = SingleDeviceStrategy(
        log_dir=run_dir,
        experiment_name="t",
        randomness=RandomnessConfig(seed=0),
        threads_per_process=1,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = x[:, :3].argmax(dim=1)
    train = EpochLoader(TensorDataset(x[:128], y[:128]), batch_size=16, shuffle=True, seed=0)
    val = EpochLoader(TensorDataset(x[128:], y[128:]), batch_size=32, shuffle=False, seed=0)
    length = training_length(settings, batches_per_epoch=len(train))  # 8 steps per epoch
    prepared = strategy.prepare(
        lambda: MLP(8, [16], 3, dropout=0.1),
        optim=OptimSpec(partial(torch.optim.AdamW, lr=1e-2), AdamWConfig(lr=1e-2)),
        schedules=[Phase(partial(CosineAnnealingLR), by_epoch=False, name="scheduler.cosine")],
        length=length,
    )
    trainer = Trainer(
        strategy,
        prepared,
        train_loader=train,
        val_loader=val,
        settings=settings,
        length=length,
        checkpointer=Checkpointer(strategy.checkpoint_dir, keep=0),
        task=task,
        checkpoint=CheckpointConfig(interval_steps=5, monitor="val/acc"),
    )
    task.trainer = trainer
    return trainer


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


@pytest.mark.parametrize(
    "interruption",
    ["sigterm_in_step", "kill_in_validation_after"],
    ids=["sigterm-in-the-last-step", "kill-in-the-validation-after-it"],
)
@pytest.mark.parametrize(
    ("settings", "last"),
    [
        (TrainerConfig(max_epochs=2, log_interval_steps=4), 16),
        # The step checkpoint at 15 precedes the final validation of a cut-short epoch.
        (TrainerConfig(max_epochs=None, max_steps=15, log_interval_steps=4), 15),
    ],
    ids=["full-epochs", "partial-last-epoch"],
)
def test_a_run_stopped_at_its_last_step_does_the_rest_when_resumed(
    tmp_path: Path, interruption: str, settings: TrainerConfig, last: int
) -> None:
    straight = build(tmp_path / "straight", Interrupting(), settings)
    expected = straight.fit()
    expected_best = straight.best
    straight.strategy.teardown()

    run_dir = tmp_path / "stopped"
    stopped = build(run_dir, Interrupting(**{interruption: last}), settings)
    with pytest.raises((TrainingStopped, Killed)):
        stopped.fit()
    stopped.strategy.teardown()
    assert stopped.progress.step == last

    resumed = build(run_dir, Interrupting(), settings)
    checkpoint = resumed.checkpointer.latest()
    assert checkpoint is not None
    resumed.load_state(resumed.strategy.resume(checkpoint))
    assert resumed.fit() == expected
    assert resumed.best is not None and expected_best is not None
    assert resumed.best["step"] == expected_best["step"] == last
    assert resumed.best["value"] == expected_best["value"]
    assert Path(resumed.best["path"]).name == Path(expected_best["path"]).name
    resumed.strategy.teardown()

    names = [p.name for p in straight.checkpointer.list()]
    assert [p.name for p in resumed.checkpointer.list()] == names
    assert straight.checkpointer.best_info() == resumed.checkpointer.best_info()
    # The last checkpoint holds the finished state (validation included), as the straight run's.
    assert_equal(last_checkpoint(resumed), last_checkpoint(straight))


def last_checkpoint(trainer: Trainer) -> dict[str, Any]:
    path = trainer.checkpointer.latest()
    assert path is not None
    state = load_file(path)
    state["best"]["path"] = Path(state["best"]["path"]).name  # the run directories differ
    return state


def test_the_progress_bar_counts_epochs_from_1_as_the_log_does(tmp_path: Path, capsys) -> None:
    settings = TrainerConfig(max_epochs=2, log_interval_steps=4, progress_bar=True)
    trainer = build(tmp_path, Interrupting(), settings)
    trainer.fit()
    trainer.strategy.teardown()
    err = capsys.readouterr().err
    last_bar = err.split("\r")[-1].splitlines()[0]
    assert last_bar.startswith("[" + "#" * 30 + "] 16/16 ")
    assert " epoch 2 loss " in last_bar  # the second of two epochs, which the log calls epoch 2
    assert "epoch 2 step 16: val/loss" in err
