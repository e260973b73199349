"""The training loop: epochs of optimizer steps, validation, logging and checkpoints."""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from xp.checkpoint import Checkpointer
from xp.config import NonFinite, TrainerConfig
from xp.data import EpochLoader
from xp.optim import OptimWrapper
from xp.strategy.base import Prepared, Strategy, TrainingLength


class MetricSink(Protocol):
    """Where metrics go (the MLflow tracker); must return at once."""

    written_through_step: int
    """Every point up to this step is stored; later ones may still be in a buffer."""

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


class TrainingStopped(Exception):
    """A stop signal ended training early, after a checkpoint of the last step."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum = signum
        self.step = step


class NonFiniteLossError(ValueError):
    """The training loss became NaN or inf."""


class LogWindow:
    """The training loss and samples since the last log step (saved for exact resumes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.batches = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum += loss.detach()
        self.batches += 1
        self.samples += samples

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.detach().cpu().clone(), "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        self.loss_sum = state["loss_sum"].to(self.device)
        self.batches = int(state["batches"])


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
        self.progress = Progress()
        self._window = LogWindow(strategy.root_device)
        self.async_checkpoints = settings.async_checkpoint and strategy.use_async_checkpoints(
            on_done=lambda _: checkpointer.prune()
        )
        self._skipped = 0
        self._unconfirmed: list[tuple[int, dict[str, Any]]] = []
        self._prune_at = 512
        self._stop_signal: int | None = None
        self._agreed_signal = 0
        self._lr_keys = (
            {"train/lr": self.optim}
            if isinstance(self.optim, OptimWrapper)
            else {f"train/lr/{name}": w for name, w in self.optim.items()}
        )

    # ------------------------------------------------------------------ the loop

    def fit(self, progress: Progress | None = None) -> dict[str, float]:
        """Train to ``length.total_steps``; returns the last validation metrics.

        Raises:
            TrainingStopped: a stop signal arrived; a checkpoint of the last step was saved.
            NonFiniteLossError: the loss became NaN or inf (``trainer.nonfinite=stop``).
        """
        p = progress or self.progress
        self.progress = p
        s = self.settings
        total = self.length.total_steps
        model, optim, loader = self.model, self.optim, self.train_loader
        bar_enabled = sys.stderr.isatty() if s.progress_bar is None else s.progress_bar
        bar = ProgressBar(
            total, enabled=bar_enabled and self.strategy.is_main_process, initial=p.step
        )
        window = self._window
        skip_nonfinite = s.nonfinite is NonFinite.skip
        validated_at = checkpointed_at = p.step if p.step else -1

        while p.step < total:
            loader.set_epoch(p.epoch)
            optim.initialize_count_status(inner_count=p.batch_in_epoch, max_counts=len(loader))
            model.train()
            for batch in loader.iter_from(p.batch_in_epoch):
                inputs, targets = self.strategy.to_device(batch)
                with optim.optim_context():
                    loss = F.cross_entropy(model(inputs), targets)
                if skip_nonfinite and not torch.isfinite(loss):
                    optim.skip_micro_batch()
                    self._skipped += 1
                else:
                    optim.update_params(loss)
                    window.add(loss, targets.shape[0])
                p.batch_in_epoch += 1
                if not optim.should_update():
                    continue
                p.step += 1
                for schedule in self.schedules:
                    schedule.step_iter()
                if p.step % s.log_interval_steps == 0:
                    self._log_train(p, bar)
                bar.update(p.step)
                if s.checkpoint_interval_steps and p.step % s.checkpoint_interval_steps == 0:
                    self.save_checkpoint(p)
                    checkpointed_at = p.step
                if self._stop_requested(p):
                    self._stop(p, checkpointed_at, bar)
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
                if self._stop_requested(p, collective=True):
                    self._stop(p, checkpointed_at, bar)
        bar.close()
        if validated_at != p.step and s.val_interval_epochs:
            self.validate(p)
        if checkpointed_at != p.step and (
            s.checkpoint_interval_epochs or s.checkpoint_interval_steps
        ):
            self.save_checkpoint(p)
        self.strategy.wait_for_checkpoints()
        return self.metrics

    # ------------------------------------------------------------------ stopping

    def request_stop(self, signum: int) -> None:
        """Ask the loop to save and stop after the current optimizer step (signal-safe)."""
        self._stop_signal = signum

    def _stop_requested(self, p: Progress, *, collective: bool = False) -> bool:
        """Whether to stop now; every rank decides alike.

        One process checks its flag after every step. Several agree at points where they
        synchronize anyway (each log step, each epoch end), so no step pays a collective.
        """
        if self.strategy.world_size == 1:
            return self._stop_signal is not None
        if not collective and p.step % self.settings.log_interval_steps != 0:
            return False
        if collective:
            flag = torch.tensor(float(self._stop_signal or 0), device=self.strategy.root_device)
            self._agreed_signal = int(self.strategy.all_reduce(flag, op="sum").item() > 0)
        return bool(self._agreed_signal)

    def _stop(self, p: Progress, checkpointed_at: int, bar: ProgressBar) -> None:
        bar.close()
        if checkpointed_at != p.step:
            self.save_checkpoint(p)
        self.strategy.wait_for_checkpoints()
        signum = self._stop_signal or signal.SIGTERM
        self.strategy.logger.warning(
            "Stopped by %s at step %d; resume continues from %s.",
            signal.Signals(signum).name,
            p.step,
            self.last_checkpoint,
        )
        raise TrainingStopped(signum, p.step)

    # ------------------------------------------------------------------ pieces

    def _log_train(self, p: Progress, bar: ProgressBar) -> None:
        window = self._window
        now = time.perf_counter()
        loss = window.loss_sum / max(1, window.batches)
        samples_per_s = window.samples / max(1e-9, now - window.started)
        loss = loss.detach().float()
        world_size = self.strategy.world_size
        if world_size == 1:
            # Nothing to reduce: skipping the stack, all-reduce and unpacking saves five tensor
            # ops per log step (~10 us on a CPU, measured in benchmarks/); same values.
            self._agreed_signal = 0
            mean_loss, samples = loss, loss.new_tensor(samples_per_s)
        else:
            stop = float(self._stop_signal or 0)
            packed = torch.stack([loss, loss.new_tensor(samples_per_s), loss.new_tensor(stop)])
            reduced = self.strategy.all_reduce(packed, op="sum")
            self._agreed_signal = int(reduced[2].item() > 0)
            mean_loss, samples = reduced[0] / world_size, reduced[1]
        # Reading the 0-dim loss once (the sync bool(tensor) does too) beats torch.isfinite
        # by ~4 us per log step.
        if self.settings.nonfinite is NonFinite.stop and not math.isfinite(mean_loss.item()):
            raise NonFiniteLossError(
                f"The training loss became {mean_loss.item()} between steps "
                f"{p.step - self.settings.log_interval_steps} and {p.step}; lower optim.lr, "
                "clip gradients (optim.clip_grad.max_norm), or set trainer.nonfinite=skip to "
                "drop such batches."
            )
        metrics: dict[str, Any] = {
            "train/loss": mean_loss,
            "train/samples_per_s": samples,
            "train/epoch": p.epoch,
        }
        for key, wrapper in self._lr_keys.items():
            metrics[key] = wrapper.get_lr()[0]
        if self._skipped:
            metrics["train/skipped_batches"] = self._skipped
        self._log(metrics, p.step)
        if bar.enabled:
            lr = metrics[next(iter(self._lr_keys))]
            bar.postfix = f"epoch {p.epoch} loss {float(mean_loss):.4f} lr {lr:.3g}"
        window.reset()

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
        self._log(result, p.step)
        self.strategy.logger.info(
            "epoch %d step %d: val/loss %.4f val/acc %.4f",
            p.epoch,
            p.step,
            result["val/loss"],
            result["val/acc"],
        )
        model.train()
        return result

    def _log(self, metrics: dict[str, Any], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)
            self._unconfirmed.append((step, metrics))
            if len(self._unconfirmed) > self._prune_at:  # checkpoints are rare or off
                stored = self.tracker.written_through_step
                self._unconfirmed = [(s, m) for s, m in self._unconfirmed if s > stored]
                # Until the tracker's next flush nothing more is stored: pruning again only
                # 512 points later keeps a log step O(1) (scanning thousands of points every
                # step cost ~100 us when logging every step; benchmarks/, logging case).
                self._prune_at = len(self._unconfirmed) + 512

    def _metrics_not_yet_stored(self) -> list[tuple[int, dict[str, float]]]:
        """Logged points the store may not hold yet: a checkpoint keeps them, so a run killed
        before its tracker flushed still gets a complete history when it resumes."""
        if self.tracker is None:
            return []
        stored = self.tracker.written_through_step
        self._unconfirmed = [(s, m) for s, m in self._unconfirmed if s > stored]
        return [(s, {k: float(v) for k, v in m.items()}) for s, m in self._unconfirmed]

    def replay_unstored_metrics(self, checkpoint: Mapping[str, Any]) -> None:
        """Log again what the checkpoint kept; the tracker skips points already stored."""
        if self.tracker is None:
            return
        for step, metrics in checkpoint.get("unstored_metrics", []):
            self.tracker.log_metrics(metrics, int(step))

    def load_state(self, checkpoint: Mapping[str, Any]) -> Progress:
        """Continue from a checkpoint the strategy resumed: progress, metrics, log window."""
        self.progress = Progress.from_state_dict(checkpoint["progress"])
        self.metrics = {k: float(v) for k, v in checkpoint.get("metrics", {}).items()}
        if "log_window" in checkpoint:
            self._window.load_state_dict(checkpoint["log_window"])
        return self.progress

    def save_checkpoint(self, p: Progress) -> Path:
        """Save a checkpoint of the current state and prune the old ones."""
        path = self.checkpointer.path_for(p.step)
        extra = {
            "progress": p.state_dict(),
            "log_window": self._window.state_dict(),
            "metrics": dict(self.metrics),
            "unstored_metrics": self._metrics_not_yet_stored(),
            **self.checkpoint_extra,
        }
        self.strategy.save_checkpoint(path, extra=extra)
        if self.strategy.is_main_process and not self.async_checkpoints:
            self.checkpointer.prune()
        self.last_checkpoint = path
        self.strategy.logger.info("Saved checkpoint %s.", path)
        return path
