"""Metrics that aggregate exactly over batches and ranks.

A metric keeps running sums (correct predictions and samples seen, squared errors and
elements...) in one tensor; :meth:`Metric.sync` all-reduces that tensor once at the end
of an evaluation, and :meth:`Metric.compute` divides. Accuracy is then total correct over
total seen on every rank together, never a mean of per-batch or per-rank means.

Any object with ``update(outputs, targets)``, ``compute()`` and ``reset()`` works as a
metric in ``task.metrics`` too (a torchmetrics metric, say); such an object synchronizes
itself across ranks, as torchmetrics does in ``compute()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]
"""Sums a tensor over every rank and returns the result."""


class Metric:
    """Running sums, updated per batch, all-reduced once, divided at the end.

    Subclasses set :attr:`names` (what the sums are) and implement :meth:`update` and
    :meth:`compute`.
    """

    names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Add one batch."""
        raise NotImplementedError

    def compute(self) -> float:
        """The value over everything added since the last :meth:`reset`: by default the
        first sum over the second (a total over a count)."""
        return self._ratio()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.sums.device)

    def sync(self, all_reduce: AllReduce) -> None:
        """Replace the sums with their total over every rank."""
        self.sums = all_reduce(self.sums)

    def _add(self, *values: Tensor) -> None:
        device = values[0].device
        if self.sums.device != device:
            self.sums = self.sums.to(device)
        self.sums += torch.stack([v.detach().to(torch.float64) for v in values])

    def _ratio(self) -> float:
        total, count = self.sums.tolist()
        return total / count if count else float("nan")


def _kept(targets: Tensor, ignore_index: int | None) -> Tensor | None:
    return None if ignore_index is None else targets != ignore_index


def _predictions(outputs: Tensor, targets: Tensor) -> Tensor:
    """Class predictions: argmax over the last dim, or logits > 0 for binary outputs."""
    if outputs.shape == targets.shape and outputs.is_floating_point():
        return (outputs > 0).to(targets.dtype)
    if outputs.dim() != targets.dim() + 1:
        raise ValueError(
            f"Accuracy got outputs of shape {tuple(outputs.shape)} and targets of shape "
            f"{tuple(targets.shape)}; it expects logits (..., classes) and class indices (...), "
            "or binary logits of the targets' shape."
        )
    return outputs.argmax(dim=-1)


class _Classification(Metric):
    """A metric of class predictions that may leave out targets equal to ``ignore_index``."""

    def __init__(self, ignore_index: int | None = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index


class Accuracy(_Classification):
    """Share of correct class predictions over every counted target.

    Args:
        ignore_index: Targets equal to this are not counted (padding in sequences).
    """

    names = ("correct", "seen")

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        correct = _predictions(outputs, targets) == targets
        kept = _kept(targets, self.ignore_index)
        if kept is not None:
            correct = correct & kept
            seen = kept.sum()
        else:
            seen = torch.tensor(targets.numel(), device=targets.device)
        self._add(correct.sum(), seen)


class ExactMatch(_Classification):
    """Share of samples whose every counted position is predicted right (sequences).

    Args:
        ignore_index: Positions whose target equals this do not have to match.
    """

    names = ("matched", "samples")

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        correct = _predictions(outputs, targets) == targets
        kept = _kept(targets, self.ignore_index)
        if kept is not None:
            correct = correct | ~kept
        per_sample = correct.reshape(targets.shape[0], -1).all(dim=1)
        self._add(per_sample.sum(), torch.tensor(targets.shape[0], device=targets.device))


class _MeanError(Metric):
    """Mean of a per-element error between outputs and targets, over every element."""

    names = ("error", "elements")

    def _error(self, diff: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        diff = outputs.detach().float().reshape(targets.shape) - targets.float()
        self._add(self._error(diff).sum(), torch.tensor(diff.numel(), device=diff.device))


class MeanSquaredError(_MeanError):
    """Mean of the squared differences over every element."""

    def _error(self, diff: Tensor) -> Tensor:
        return diff.square()


class MeanAbsoluteError(_MeanError):
    """Mean of the absolute differences over every element."""

    def _error(self, diff: Tensor) -> Tensor:
        return diff.abs()


class Mean:
    """Sample-weighted means of named values, over batches and ranks.

    A value is a scalar (the mean over a batch of ``n`` samples: weighted by ``n``) or a
    1-D tensor of one value per sample. This is how xp averages what a model's
    ``val_step`` returns and the loss of the supervised step.
    """

    def __init__(self) -> None:
        self.totals: dict[str, list[Tensor]] = {}

    def add(self, name: str, value: Tensor | float, samples: int) -> None:
        """Add a batch's ``value`` of ``name``, over ``samples`` samples."""
        if isinstance(value, Tensor) and value.dim() > 0:
            self.add_total(name, value.detach().to(torch.float64).sum(), value.numel())
        elif samples:  # an empty batch (a rank short of samples) carries nothing, not NaN
            v = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
            self.add_total(name, v.to(torch.float64) * samples, samples)

    def add_total(self, name: str, total: Tensor, count: Tensor | int) -> None:
        """Add a sum of ``count`` values of ``name``."""
        total = total.detach().to(torch.float64)
        count_t = torch.as_tensor(count, dtype=torch.float64, device=total.device)
        pair = torch.stack([total, count_t])
        entry = self.totals.get(name)
        if entry is None:
            self.totals[name] = [pair]
        else:
            entry[0] = entry[0] + pair

    def compute(self, names: list[str], all_reduce: AllReduce | None = None) -> dict[str, float]:
        """The means of ``names`` (every rank must pass the same names in the same order)."""
        if not names:
            return {}
        device = next((e[0].device for e in self.totals.values()), torch.device("cpu"))
        zero = torch.zeros(2, dtype=torch.float64, device=device)
        packed = torch.stack([self.totals[n][0] if n in self.totals else zero for n in names])
        if all_reduce is not None:
            packed = all_reduce(packed)
        return {
            name: (total / count if count else float("nan"))
            for name, (total, count) in zip(names, packed.tolist(), strict=True)
        }
