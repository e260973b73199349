"""The training loop: epochs of optimizer steps, validation, logging and checkpoints."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from xp.checkpoint import Checkpointer
from xp.config import TrainerConfig
from xp.data import EpochLoader
from xp.optim import OptimWrapper
from xp.strategy.base import Prepared, Strategy, TrainingLength


class MetricSink(Protocol):
    """Where metrics go (the MLflow tracker); must return at once."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None: ...


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint and restored on resume."""

    epoch: int = 0
    """The current epoch (0-based)."""
    step: int = 0
    """Optimizer steps taken."""
    batch_in_epoch: int = 0
    """Micro-batches of the current epoch already trained on."""

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, int]) -> Progress:
        return cls(**{k: int(state[k]) for k in ("epoch", "step", "batch_in_epoch")})


def training_length(
    settings: TrainerConfig, *, batches_per_epoch: int, accumulative_counts: int
) -> TrainingLength:
    """Optimizer steps per epoch and in total, from max_epochs and/or max_steps."""
    if settings.max_epochs is None and settings.max_steps is None:
        raise ValueError("trainer.max_epochs and trainer.max_steps are both null; set one of them.")
    for key in ("max_epochs", "max_steps"):
        value = getattr(settings, key)
        if value is not None and value < 1:
            raise ValueError(f"trainer.{key}={value} must be >= 1 (or null).")
    if batches_per_epoch < 1:
        raise ValueError(
            "The training data gives no batch per epoch; lower data.batch_size or turn off "
            "data.drop_last."
        )
    epoch_length = -(-batches_per_epoch // accumulative_counts)
    limits = [settings.max_steps] if settings.max_steps is not None else []
    if settings.max_epochs is not None:
        limits.append(settings.max_epochs * epoch_length)
    return TrainingLength(epoch_length=epoch_length, total_steps=min(limits))


class ProgressBar:
    """A one-line bar over optimizer steps on a terminal; silent elsewhere."""

    def __init__(self, total: int, *, enabled: bool, initial: int = 0) -> None:
        self.total = total
        self.enabled = enabled
        self.step = initial
        self._started = time.perf_counter()
        self._start_step = initial
        self._drawn = 0.0
        self.postfix = ""

    def update(self, step: int) -> None:
        self.step = step
        if self.enabled:
            now = time.perf_counter()
            if now - self._drawn > 0.1 or step == self.total:
                self._drawn = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        done = self.step / max(1, self.total)
        rate = (self.step - self._start_step) / max(1e-9, now - self._started)
        bar = "#" * int(done * 30)
        sys.stderr.write(
            f"\r[{bar:<30}] {self.step}/{self.total} {rate:6.1f} step/s {self.postfix}\x1b[K"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()


class Trainer:
    """Runs training for a prepared model.

    Args:
        strategy: The strategy that prepared the model (device, collectives, checkpoints).
        prepared: What ``strategy.prepare`` returned; needs an optimizer wrapper.
        train_loader: Training batches, ``(inputs, targets)``.
        val_loader: Validation batches, or None.
        settings: The trainer config.
        length: Steps per epoch and in total (from :func:`training_length`).
        checkpointer: Names and prunes this run's checkpoints.
        tracker: Receives metrics (rank 0 only; None elsewhere).
        checkpoint_extra: Saved in every checkpoint beside the states (e.g. the config).
    """

    def __init__(
        self,
        strategy: Strategy,
        prepared: Prepared,
        *,
        train_loader: EpochLoader,
        val_loader: EpochLoader | None,
        settings: TrainerConfig,
        length: TrainingLength,
        checkpointer: Checkpointer,
        tracker: MetricSink | None = None,
        checkpoint_extra: Mapping[str, Any] | None = None,
    ) -> None:
        if prepared.optim_wrapper is None:
            raise ValueError("Trainer needs an optimizer; prepare the model with optim=...")
        for key in (
            "val_interval_epochs",
            "checkpoint_interval_epochs",
            "checkpoint_interval_steps",
        ):
            if getattr(settings, key) < 0:
                raise ValueError(
                    f"trainer.{key}={getattr(settings, key)} must be >= 0 (0 turns it off)."
                )
        if settings.log_interval_steps < 1:
            raise ValueError(
                f"trainer.log_interval_steps={settings.log_interval_steps} must be >= 1."
            )
        self.strategy = strategy
        self.model = prepared.model
        self.optim = prepared.optim_wrapper
        self.schedules = list(prepared.schedules.values())
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.settings = settings
        self.length = length
        self.checkpointer = checkpointer
        self.tracker = tracker
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.metrics: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self._lr_keys = (
            {"train/lr": self.optim}
            if isinstance(self.optim, OptimWrapper)
            else {f"train/lr/{name}": w for name, w in self.optim.items()}
        )

    # ------------------------------------------------------------------ the loop

    def fit(self, progress: Progress | None = None) -> dict[str, float]:
        """Train to ``length.total_steps``; returns the last validation (and train) metrics."""
        p = progress or Progress()
        s = self.settings
        total = self.length.total_steps
        device = self.strategy.root_device
        model, optim, loader = self.model, self.optim, self.train_loader
        bar_enabled = sys.stderr.isatty() if s.progress_bar is None else s.progress_bar
        bar = ProgressBar(
            total, enabled=bar_enabled and self.strategy.is_main_process, initial=p.step
        )
        loss_sum = torch.zeros((), device=device)
        window_batches = window_samples = 0
        window_start = time.perf_counter()
        validated_at = checkpointed_at = -1

        while p.step < total:
            loader.set_epoch(p.epoch)
            optim.initialize_count_status(inner_count=p.batch_in_epoch, max_counts=len(loader))
            model.train()
            for batch in loader.iter_from(p.batch_in_epoch):
                inputs, targets = self.strategy.to_device(batch)
                with optim.optim_context():
                    loss = F.cross_entropy(model(inputs), targets)
                optim.update_params(loss)
                p.batch_in_epoch += 1
                loss_sum += loss.detach()
                window_batches += 1
                window_samples += targets.shape[0]
                if not optim.should_update():
                    continue
                p.step += 1
                for schedule in self.schedules:
                    schedule.step_iter()
                if p.step % s.log_interval_steps == 0:
                    now = time.perf_counter()
                    self._log_train(
                        p, loss_sum / window_batches, window_samples / (now - window_start), bar
                    )
                    loss_sum = torch.zeros((), device=device)
                    window_batches = window_samples = 0
                    window_start = time.perf_counter()
                bar.update(p.step)
                if s.checkpoint_interval_steps and p.step % s.checkpoint_interval_steps == 0:
                    self.save_checkpoint(p)
                    checkpointed_at = p.step
                if p.step >= total:
                    break
            if p.batch_in_epoch >= len(loader):
                for schedule in self.schedules:
                    schedule.step_epoch()
                p.epoch += 1
                p.batch_in_epoch = 0
                last = p.step >= total
                if s.val_interval_epochs and (p.epoch % s.val_interval_epochs == 0 or last):
                    self.validate(p)
                    validated_at = p.step
                every = s.checkpoint_interval_epochs
                if every and (p.epoch % every == 0 or last) and checkpointed_at != p.step:
                    self.save_checkpoint(p)
                    checkpointed_at = p.step
        bar.close()
        if validated_at != p.step and s.val_interval_epochs:
            self.validate(p)
        if checkpointed_at != p.step and (
            s.checkpoint_interval_epochs or s.checkpoint_interval_steps
        ):
            self.save_checkpoint(p)
        return self.metrics

    # ------------------------------------------------------------------ pieces

    def _log_train(
        self, p: Progress, loss: torch.Tensor, samples_per_s: float, bar: ProgressBar
    ) -> None:
        reduced = self.strategy.all_reduce(
            torch.stack([loss.float(), torch.tensor(samples_per_s, device=loss.device)]), op="sum"
        )
        metrics: dict[str, Any] = {
            "train/loss": reduced[0] / self.strategy.world_size,
            "train/samples_per_s": reduced[1],
            "train/epoch": p.epoch,
        }
        for key, wrapper in self._lr_keys.items():
            metrics[key] = wrapper.get_lr()[0]
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, p.step)
        if bar.enabled:
            lr = metrics[next(iter(self._lr_keys))]
            bar.postfix = f"epoch {p.epoch} loss {float(metrics['train/loss']):.4f} lr {lr:.3g}"

    @torch.no_grad()
    def validate(self, p: Progress) -> dict[str, float]:
        """Loss and accuracy over the whole validation set, summed over every rank."""
        if self.val_loader is None:
            return {}
        model = self.model
        model.eval()
        device = self.strategy.root_device
        totals = torch.zeros(3, device=device, dtype=torch.float64)
        for batch in self.val_loader:
            inputs, targets = self.strategy.to_device(batch)
            logits = model(inputs)
            totals[0] += F.cross_entropy(logits.float(), targets, reduction="sum")
            totals[1] += (logits.argmax(dim=-1) == targets).sum()
            totals[2] += targets.numel()
        totals = self.strategy.all_reduce(totals, op="sum")
        loss, correct, count = totals.tolist()
        result = {"val/loss": loss / count, "val/acc": correct / count}
        self.metrics.update(result)
        if self.tracker is not None:
            self.tracker.log_metrics(result, p.step)
        self.strategy.logger.info(
            "epoch %d step %d: val/loss %.4f val/acc %.4f",
            p.epoch,
            p.step,
            result["val/loss"],
            result["val/acc"],
        )
        model.train()
        return result

    def save_checkpoint(self, p: Progress) -> Path:
        """Save a checkpoint of the current state and prune the old ones."""
        path = self.checkpointer.path_for(p.step)
        extra = {"progress": p.state_dict(), "metrics": dict(self.metrics), **self.checkpoint_extra}
        self.strategy.save_checkpoint(path, extra=extra)
        if self.strategy.is_main_process:
            self.checkpointer.prune()
        self.last_checkpoint = path
        self.strategy.logger.info("Saved checkpoint %s.", path)
        return path
