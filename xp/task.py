"""What one training step and one evaluation do with a batch.

Two ways, chosen by the model:

- A model with no step code gets the supervised step: the batch is ``(inputs,
  targets)`` or a dict holding ``task.input_key`` and ``task.target_key``; the loss of
  ``task.loss`` compares ``model(inputs)`` with the targets; ``task.metrics`` are
  updated at validation and test.
- A model that defines ``train_step(batch, optim_wrapper) -> dict`` (as mmengine's
  models do) steps its optimizer wrapper(s) itself, e.g. a GAN's generator and
  discriminator in turn; what it returns is logged as ``train/<key>``. Its
  ``val_step(batch) -> dict`` gives the validation values, averaged over samples and
  ranks (scalars weighted by the batch size, 1-D tensors counted per sample).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xp.config import Loss
from xp.metric import Mean, Metric
from xp.optim import OptimWrapper, OptimWrapperDict

StepValues = dict[str, Tensor]
"""What a training step logs: name -> a scalar tensor (``loss`` at least)."""

_LOSSES: dict[Loss, Callable[..., Tensor]] = {
    Loss.cross_entropy: F.cross_entropy,
    Loss.mse: F.mse_loss,
    Loss.l1: F.l1_loss,
    Loss.bce_with_logits: F.binary_cross_entropy_with_logits,
}


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, Mapping):
        values: Sequence[Any] = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return 1
    for value in values:
        size = batch_size_of(value) if isinstance(value, (Tensor, Mapping, list, tuple)) else 0
        if size:
            return size
    return 0


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)} items"
    return f"a {type(batch).__name__}"


class SupervisedTask:
    """``loss(model(inputs), targets)``; metrics over the same pair at evaluation.

    Args:
        loss: Which loss.
        ignore_index: Targets left out of cross-entropy.
        input_key: The inputs in a dict batch.
        target_key: The targets in a dict batch.
        metrics: Name -> metric (``update/compute/reset``).
    """

    custom_step = False

    def __init__(
        self,
        loss: Loss = Loss.cross_entropy,
        *,
        ignore_index: int = -100,
        input_key: str = "inputs",
        target_key: str = "targets",
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        self.loss_kind = Loss(loss)
        self._loss = _LOSSES[self.loss_kind]
        self._plain_ce = self.loss_kind is Loss.cross_entropy
        self.ignore_index = ignore_index
        self.input_key = input_key
        self.target_key = target_key
        self.metrics = dict(metrics or {})
        for name, metric in self.metrics.items():
            missing = [
                m for m in ("update", "compute", "reset") if not callable(getattr(metric, m, None))
            ]
            if missing:
                raise TypeError(
                    f"task.metrics.{name} is a {_qualname(metric)}, which has no "
                    f"{', '.join(missing)}; a metric needs update(outputs, targets), compute() "
                    "and reset() (e.g. xp.metric.Accuracy or a torchmetrics metric)."
                )

    def split(self, batch: Any) -> tuple[Any, Tensor]:
        """``(inputs, targets)`` of a batch.

        Raises:
            ValueError: The batch has neither layout.
        """
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        if isinstance(batch, Mapping) and self.input_key in batch and self.target_key in batch:
            return batch[self.input_key], batch[self.target_key]
        raise ValueError(
            f"The data gave {_describe(batch)}, but the supervised step expects (inputs, "
            f"targets) or a dict with the keys {self.input_key!r} and {self.target_key!r} "
            "(set task.input_key / task.target_key); or define train_step(batch, "
            "optim_wrapper) and val_step(batch) on the model to handle other layouts."
        )

    def loss(self, outputs: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """The configured loss; sequence logits ``(N, T, C)`` are flattened for cross-entropy."""
        if self.loss_kind is Loss.cross_entropy:
            if outputs.dim() > 2 and targets.dim() == outputs.dim() - 1:
                outputs, targets = outputs.flatten(0, -2), targets.flatten()
            return F.cross_entropy(
                outputs.float() if outputs.dtype != torch.float32 else outputs,
                targets,
                ignore_index=self.ignore_index,
                reduction=reduction,
            )
        if outputs.shape != targets.shape and outputs.numel() == targets.numel():
            outputs = outputs.reshape(targets.shape)  # (N, 1) regression outputs vs (N,) targets
        return self._loss(outputs, targets.to(outputs.dtype), reduction=reduction)

    def _counted(self, targets: Tensor) -> int | Tensor:
        """Elements the summed loss covers (non-ignored targets for cross-entropy)."""
        if self.loss_kind is Loss.cross_entropy:
            return (targets != self.ignore_index).sum()
        return targets.numel()

    def train_step(
        self,
        model: nn.Module,
        module: nn.Module,
        batch: Any,
        optim: OptimWrapper | OptimWrapperDict,
        skip_nonfinite: bool,
    ) -> tuple[StepValues | None, int]:
        """Forward, loss and ``update_params``; returns ``({"loss": loss}, samples)``.

        With ``skip_nonfinite`` a NaN/inf loss is dropped (no backward) and None returned.
        """
        if type(batch) is tuple and len(batch) == 2:  # the common layout, checked fast
            inputs, targets = batch
        else:
            inputs, targets = self.split(batch)
        with optim.optim_context():
            outputs = model(inputs)
            if self._plain_ce and outputs.dim() == 2 and outputs.dtype is torch.float32:
                loss = F.cross_entropy(outputs, targets, ignore_index=self.ignore_index)
            else:
                loss = self.loss(outputs, targets)
        if skip_nonfinite and not torch.isfinite(loss):
            optim.skip_micro_batch()
            return None, 0
        optim.update_params(loss)
        return {"loss": loss}, targets.shape[0]

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, module: nn.Module, batches: Any, strategy: Any
    ) -> dict[str, float]:
        """Loss and metrics over every batch and rank."""
        for metric in self.metrics.values():
            metric.reset()
        loss = Mean()
        for batch in batches:
            inputs, targets = self.split(strategy.to_device(batch))
            outputs = model(inputs)
            n = self._counted(targets)
            if int(n) == 0:
                continue  # this rank ran the forward (FSDP needs every rank) on no sample
            # Summed loss over counted elements: the exact per-element mean at the end.
            loss.add_total("loss", self.loss(outputs, targets, reduction="sum"), n)
            for metric in self.metrics.values():
                metric.update(outputs, targets)
        return self._results(loss, strategy)

    def _results(self, loss: Mean, strategy: Any) -> dict[str, float]:
        results = loss.compute(["loss"], lambda t: strategy.all_reduce(t, op="sum"))
        for name, metric in self.metrics.items():
            if isinstance(metric, Metric):
                metric.sync(lambda t: strategy.all_reduce(t, op="sum"))
            results.update(_flatten(name, metric.compute()))
        return results


class ModelStepTask:
    """Calls the model's own ``train_step`` and ``val_step``.

    Args:
        fallback: The supervised task, for validation when the model has no ``val_step``.
    """

    custom_step = True

    def __init__(self, fallback: SupervisedTask) -> None:
        self.fallback = fallback
        self._checked = False

    def train_step(
        self,
        model: nn.Module,
        module: nn.Module,
        batch: Any,
        optim: OptimWrapper | OptimWrapperDict,
        skip_nonfinite: bool,
    ) -> tuple[StepValues | None, int]:
        result = module.train_step(batch, optim)  # type: ignore[operator]
        if not self._checked:
            _check_step_result(module, "train_step", result, needs_loss=True)
            self._checked = True
        return dict(result), batch_size_of(batch)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, module: nn.Module, batches: Any, strategy: Any
    ) -> dict[str, float]:
        val_step = getattr(module, "val_step", None)
        if not callable(val_step):
            return self.fallback.evaluate(model, module, batches, strategy)
        means = Mean()
        checked = False
        names: set[str] = set()
        for batch in batches:
            batch = strategy.to_device(batch)
            result = val_step(batch)
            if not checked:
                _check_step_result(module, "val_step", result, needs_loss=False)
                checked = True
            n = batch_size_of(batch)
            for name, value in result.items():
                means.add(str(name), value, n)
                names.add(str(name))
        agreed = strategy.broadcast_object(sorted(names))
        return means.compute(agreed, lambda t: strategy.all_reduce(t, op="sum"))


def _check_step_result(module: nn.Module, method: str, result: Any, *, needs_loss: bool) -> None:
    where = f"{_qualname(module)}.{method}"
    if not isinstance(result, Mapping) or not result:
        raise TypeError(
            f"{where} returned {_describe(result) if result is not None else 'None'}; xp expected "
            "a non-empty dict of name -> scalar, e.g. {'loss': loss} (logged as "
            f"{'train' if needs_loss else 'val'}/<name>)."
        )
    bad = [
        str(k)
        for k, v in result.items()
        if not (isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.dim() <= 1))
    ]
    if bad:
        raise TypeError(
            f"{where} returned non-numeric values for {bad}; xp expected scalars (a float or a "
            "0-dim tensor) or, in val_step, 1-D tensors of one value per sample."
        )
    if needs_loss and not any("loss" in str(k) for k in result):
        raise ValueError(
            f"{where} returned {sorted(map(str, result))} but no loss; xp expected at least one "
            "key containing 'loss' (e.g. {'loss': loss} or {'loss_g': ..., 'loss_d': ...}), "
            "which it checks for NaN and logs as train/<key>."
        )
    if needs_loss:
        bad_dims = [str(k) for k, v in result.items() if isinstance(v, Tensor) and v.dim() != 0]
        if bad_dims:
            raise ValueError(
                f"{where} returned non-scalar tensors for {bad_dims}; return 0-dim tensors."
            )


def _flatten(name: str, value: Any) -> dict[str, float]:
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, sub in value.items():
            out.update(_flatten(f"{name}/{key}", sub))
        return out
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Metric {name} computed a tensor of shape {tuple(value.shape)}; a metric must "
                "compute a scalar (or a dict of scalars)."
            )
        value = value.item()
    return {name: float(value)}


def task_for_model(module: nn.Module, supervised: SupervisedTask) -> SupervisedTask | ModelStepTask:
    """The model's own steps when it defines ``train_step``, else the supervised one."""
    if callable(getattr(module, "train_step", None)):
        return ModelStepTask(supervised)
    return supervised
