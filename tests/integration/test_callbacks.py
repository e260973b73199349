"""Callbacks and MLflow: a user's callback logs through the run's tracker, an early stop is
tagged, and the run ends FINISHED (the Trainer with a real tracker on a real SQLite store)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from torch.utils.data import TensorDataset

from xp.callback import Callback, EarlyStopping
from xp.checkpoint import Checkpointer
from xp.config import AdamWConfig, CheckpointConfig, RandomnessConfig, TrackingConfig, TrainerConfig
from xp.data import EpochLoader
from xp.metric import Accuracy
from xp.model import MLP
from xp.optim import OptimSpec
from xp.strategy import SingleDeviceStrategy
from xp.task import SupervisedTask
from xp.tracking import MlflowTracker, default_artifact_location
from xp.trainer import Trainer, training_length

pytestmark = pytest.mark.slow


class WeightNorm(Callback):
    """The README's example of a user callback, as it stands there."""

    def __init__(self, every: int = 100, limit: float = 1e4) -> None:
        self.every, self.limit, self.largest = every, limit, 0.0

    def on_train_step_end(self, trainer: Any, step: int, values: Any) -> None:
        if step % self.every == 0:
            norm = (
                torch.cat([p.detach().flatten() for p in trainer.module.parameters()]).norm().item()
            )
            self.largest = max(self.largest, norm)
            trainer.log_metrics({"train/weight_norm": norm})
            if norm > self.limit:
                trainer.request_finish(f"weight norm {norm:.3g} > {self.limit}")

    def state_dict(self) -> dict[str, Any]:
        return {"largest": self.largest}

    def load_state_dict(self, state: Any) -> None:
        self.largest = state["largest"]


def train(tmp_path: Path, uri: str, callbacks: dict[str, Callback]) -> tuple[Trainer, str]:
    strategy = SingleDeviceStrategy(
        log_dir=tmp_path / "run",
        experiment_name="cb",
        randomness=RandomnessConfig(seed=0),
        threads_per_process=1,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = x[:, :3].argmax(dim=1)
    train = EpochLoader(TensorDataset(x[:128], y[:128]), batch_size=16, shuffle=True, seed=0)
    val = EpochLoader(TensorDataset(x[128:], y[128:]), batch_size=32, shuffle=False, seed=0)
    settings = TrainerConfig(max_epochs=20, log_interval_steps=4)
    length = training_length(settings, batches_per_epoch=len(train))
    prepared = strategy.prepare(
        lambda: MLP(8, [16], 3, dropout=0.0),
        optim=OptimSpec(partial(torch.optim.AdamW, lr=3e-2), AdamWConfig(lr=3e-2)),
    )
    tracker = MlflowTracker(
        TrackingConfig(flush_interval_s=0.05),
        tracking_uri=uri,
        experiment_name="cb",
        run_name="run",
        artifact_location=default_artifact_location(uri, "cb"),
        logger=logging.getLogger("tests.callbacks"),
    )
    trainer = Trainer(
        strategy,
        prepared,
        train_loader=train,
        val_loader=val,
        settings=settings,
        length=length,
        checkpointer=Checkpointer(strategy.checkpoint_dir),
        task=SupervisedTask(metrics={"acc": Accuracy()}),
        checkpoint=CheckpointConfig(interval_epochs=1),
        tracker=tracker,
        callbacks=callbacks,
    )
    tracker.start()
    try:
        trainer.fit()
        tracker.close("FINISHED")
    finally:
        strategy.teardown()
    return trainer, tracker.run_id


def test_a_user_callback_logs_and_early_stopping_is_tagged_in_mlflow(
    tmp_path: Path, mlflow_uri: str
) -> None:
    norm = WeightNorm(every=4)
    stopping = EarlyStopping(monitor="val/acc", mode="max", patience=2)
    trainer, run_id = train(tmp_path, mlflow_uri, {"weight_norm": norm, "early_stopping": stopping})
    assert trainer.stopped_early is not None
    assert trainer.progress.step < trainer.length.total_steps

    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["xp.stopped_early"] == trainer.stopped_early
    assert trainer.stopped_early.startswith("val/acc did not improve by more than 0 in 2")
    history = client.get_metric_history(run_id, "train/weight_norm")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(
        range(4, trainer.progress.step + 1, 4)
    )
    assert max(m.value for m in history) == norm.largest
    # The objective a sweep gets is what the deciding validation measured.
    acc = client.get_metric_history(run_id, "val/acc")
    assert max(acc, key=lambda m: m.step).value == trainer.metrics["val/acc"]
