"""Metrics aggregate exactly over uneven batches; the step checks what user code returns."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from xp.config import Loss
from xp.data import EpochLoader
from xp.metric import Accuracy, ExactMatch, Mean, MeanAbsoluteError, MeanSquaredError
from xp.strategy import SingleDeviceStrategy
from xp.task import ModelStepTask, SupervisedTask, task_for_model


def _logits_for(predictions: torch.Tensor, classes: int = 3) -> torch.Tensor:
    return nn.functional.one_hot(predictions, classes).float() * 5.0


def test_accuracy_is_total_correct_over_total_seen_not_a_mean_of_batch_means() -> None:
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    predictions = torch.tensor([0, 1, 2, 0, 2, 0, 1])  # 4 of 7 right
    metric = Accuracy()
    # Uneven batches: 1/1 right, then 3/6 right. Mean of batch means would be 0.75.
    metric.update(_logits_for(predictions[:1]), targets[:1])
    metric.update(_logits_for(predictions[1:]), targets[1:])
    assert metric.compute() == pytest.approx(4 / 7)
    metric.reset()
    assert torch.isnan(torch.tensor(metric.compute()))


def test_accuracy_and_exact_match_skip_ignored_positions() -> None:
    targets = torch.tensor([[-100, 1, 2], [-100, 0, 0], [-100, 2, 1]])
    predictions = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 1]])
    accuracy, exact = Accuracy(), ExactMatch()
    accuracy.update(_logits_for(predictions), targets)
    exact.update(_logits_for(predictions), targets)
    assert accuracy.compute() == pytest.approx(5 / 6)
    assert exact.compute() == pytest.approx(2 / 3)


def test_regression_metrics_average_over_elements() -> None:
    mse, mae = MeanSquaredError(), MeanAbsoluteError()
    for outputs, targets in [
        (torch.tensor([[1.0], [2.0]]), torch.tensor([0.0, 0.0])),
        (torch.tensor([[3.0]]), torch.tensor([1.0])),
    ]:
        mse.update(outputs, targets)
        mae.update(outputs, targets)
    assert mse.compute() == pytest.approx((1 + 4 + 4) / 3)
    assert mae.compute() == pytest.approx((1 + 2 + 2) / 3)


def test_mean_weights_scalars_by_batch_size_and_counts_vectors_per_sample() -> None:
    mean = Mean()
    mean.add("loss", torch.tensor(1.0), 1)
    mean.add("loss", torch.tensor(4.0), 3)
    mean.add("loss", torch.tensor(float("nan")), 0)  # an empty batch adds nothing
    mean.add("hit", torch.tensor([1.0, 0.0, 0.0]), 3)
    mean.add("hit", torch.tensor([1.0]), 1)
    assert mean.compute(["hit", "loss"]) == pytest.approx({"loss": 13 / 4, "hit": 0.5})


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _strategy(tmp_path) -> SingleDeviceStrategy:
    return SingleDeviceStrategy(log_dir=tmp_path, experiment_name="t")


def test_supervised_evaluation_is_exact_over_uneven_batches(tmp_path) -> None:
    strategy = _strategy(tmp_path)
    torch.manual_seed(0)
    x, y = torch.randn(11, 2), torch.randint(3, (11,))
    model = _Linear()
    loader = EpochLoader(TensorDataset(x, y), batch_size=4, shuffle=False, seed=0, pad=False)
    task = SupervisedTask(Loss.cross_entropy, metrics={"acc": Accuracy()})
    result = task.evaluate(model, model, loader, strategy)
    with torch.no_grad():
        logits = model(x)
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item())
    assert result["acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    strategy.teardown()


def test_dict_batches_use_the_configured_keys(tmp_path) -> None:
    task = SupervisedTask(input_key="features", target_key="label")
    inputs, targets = task.split({"features": torch.ones(2, 2), "label": torch.zeros(2)})
    assert inputs.shape == (2, 2) and targets.shape == (2,)


@pytest.mark.parametrize(
    "batch",
    [
        (torch.ones(2), torch.ones(2), torch.ones(2)),
        {"x": torch.ones(2), "y": torch.ones(2)},
        torch.ones(2),
    ],
)
def test_an_unexpected_batch_layout_names_the_layout_and_the_fix(batch) -> None:
    task = SupervisedTask()
    with pytest.raises(
        ValueError, match=r"expects \(inputs, targets\).*task.input_key.*train_step"
    ):
        task.split(batch)


class _NoLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def train_step(self, batch, optim_wrapper):
        return {"score": self.layer(batch[0]).mean()}


class _ReturnsTensor(_NoLoss):
    def train_step(self, batch, optim_wrapper):
        return self.layer(batch[0]).mean()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_NoLoss(), r"_NoLoss\.train_step returned \['score'\] but no loss"),
        (
            _ReturnsTensor(),
            r"_ReturnsTensor\.train_step returned a tensor.*expected a non-empty dict",
        ),
    ],
)
def test_train_step_that_returns_no_loss_is_named(model, message) -> None:
    task = task_for_model(model, SupervisedTask())
    assert isinstance(task, ModelStepTask)
    with pytest.raises((ValueError, TypeError), match=message):
        task.train_step(model, model, (torch.ones(2, 2),), None, False)  # type: ignore[arg-type]


def test_a_metric_without_the_interface_is_refused() -> None:
    with pytest.raises(TypeError, match=r"task.metrics.acc is a .*object.*update.*compute.*reset"):
        SupervisedTask(metrics={"acc": object()})


class _CountingMetric:
    """Duck-typed like a torchmetrics metric: update / compute / reset, nothing of xp's."""

    def __init__(self) -> None:
        self.reset()

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.seen += targets.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        return {"seen": torch.tensor(float(self.seen))}

    def reset(self) -> None:
        self.seen = 0


def test_any_object_with_the_metric_interface_is_a_metric(tmp_path) -> None:
    strategy = _strategy(tmp_path)
    x, y = torch.randn(10, 2), torch.randint(3, (10,))
    model = _Linear()
    loader = EpochLoader(TensorDataset(x, y), batch_size=3, shuffle=False, seed=0, pad=False)
    task = SupervisedTask(metrics={"count": _CountingMetric()})
    assert task.evaluate(model, model, loader, strategy)["count/seen"] == 10
    # Evaluating again starts from zero.
    assert task.evaluate(model, model, loader, strategy)["count/seen"] == 10
    strategy.teardown()
