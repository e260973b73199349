"""The training loop: epochs of optimizer steps, validation, logging and checkpoints.

Callbacks (:mod:`xp.callback`) run at the loop's named points; the loop calls only those
that override an event, so a run without per-step callbacks pays nothing per step.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from xp.callback import Callback, Callbacks, progress_display
from xp.checkpoint import Checkpointer
from xp.config import CheckpointConfig, Mode, NonFinite, TrainerConfig
from xp.data import EpochLoader
from xp.optim import OptimWrapper
from xp.strategy.base import Prepared, Strategy, TrainingLength
from xp.task import ModelStepTask, SupervisedTask


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
    """What the steps since the last log step returned, summed (saved for exact resumes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, values: Mapping[str, Any], samples: int) -> None:
        sums = self.sums
        for key, value in values.items():
            total = sums.get(key)
            if isinstance(value, torch.Tensor):
                value = value.detach()
            if total is None:
                sums[key] = torch.zeros((), device=self.device) + value
            else:
                total += value
        self.batches += 1
        self.samples += samples

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": {k: v.detach().cpu().clone() for k, v in self.sums.items()},
            "batches": self.batches,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        sums = state["sums"] if "sums" in state else {"loss": state["loss_sum"]}
        self.sums = {k: v.to(self.device) for k, v in sums.items()}
        self.batches = int(state["batches"])


def training_length(
    settings: TrainerConfig, *, batches_per_epoch: int, accumulative_counts: int = 1
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


def _yaml(value: int | None) -> str:
    return "null" if value is None else str(value)


class Trainer:
    """Runs training for a prepared model.

    Args:
        strategy: The strategy that prepared the model (device, collectives, checkpoints).
        prepared: What ``strategy.prepare`` returned; needs an optimizer wrapper.
        train_loader: Training batches.
        val_loader: Validation batches, or None.
        settings: The trainer config.
        length: Steps per epoch and in total (from :func:`training_length`).
        checkpointer: Names and prunes this run's checkpoints.
        task: What a step and an evaluation do (default: cross-entropy on ``(inputs,
            targets)``, no metrics but the loss); the model's own ``train_step`` wins.
        checkpoint: When to save, and which metric picks the best checkpoint.
        tracker: Receives metrics (rank 0 only; None elsewhere).
        checkpoint_extra: Saved in every checkpoint beside the states (e.g. the config).
        callbacks: Name -> callback (:mod:`xp.callback`), run in this order at the loop's
            events; their states are saved in every checkpoint (``callbacks.<name>``) and
            restored by ``strategy.resume``, so build the trainer before resuming.
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
        task: SupervisedTask | ModelStepTask | None = None,
        checkpoint: CheckpointConfig | None = None,
        tracker: MetricSink | None = None,
        checkpoint_extra: Mapping[str, Any] | None = None,
        callbacks: Mapping[str, Callback] | Sequence[Callback] | None = None,
    ) -> None:
        if prepared.optim_wrapper is None:
            raise ValueError("Trainer needs an optimizer; prepare the model with optim=...")
        checkpoint = checkpoint or CheckpointConfig()
        for key, value in (
            ("trainer.val_interval_epochs", settings.val_interval_epochs),
            ("checkpoint.interval_epochs", checkpoint.interval_epochs),
            ("checkpoint.interval_steps", checkpoint.interval_steps),
            ("checkpoint.keep", checkpoint.keep),
        ):
            if value < 0:
                raise ValueError(f"{key}={value} must be >= 0 (0 turns it off).")
        if settings.log_interval_steps < 1:
            raise ValueError(
                f"trainer.log_interval_steps={settings.log_interval_steps} must be >= 1."
            )
        if checkpoint.monitor is not None:
            if val_loader is None or not settings.val_interval_epochs:
                raise ValueError(
                    f"checkpoint.monitor={checkpoint.monitor!r} needs validation, but this run "
                    "has no validation data or trainer.val_interval_epochs=0."
                )
            if not checkpoint.monitor.startswith("val/"):
                raise ValueError(
                    f"checkpoint.monitor={checkpoint.monitor!r} is not a validation metric; "
                    "name one that validation logs, e.g. val/acc or val/loss."
                )
        self.strategy = strategy
        self.model = prepared.model
        self.module = strategy.unwrap(prepared.model)
        self.optim = prepared.optim_wrapper
        self.schedules = list(prepared.schedules.values())
        self._schedules_by_name = dict(prepared.schedules)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.settings = settings
        self.checkpoint = checkpoint
        self.length = length
        self.checkpointer = checkpointer
        self.task = task if task is not None else SupervisedTask()
        if self.task.custom_step and settings.nonfinite is NonFinite.skip:
            raise ValueError(
                f"trainer.nonfinite=skip needs xp to make the update, but "
                f"{type(self.module).__qualname__} steps its optimizers in its own train_step; "
                "use trainer.nonfinite=stop, or skip such batches inside train_step."
            )
        self.tracker = tracker
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.metrics: dict[str, float] = {}
        self.best: dict[str, Any] | None = None
        """The best checkpoint so far: step, value and path (with ``checkpoint.monitor``)."""
        self.last_checkpoint: Path | None = None
        self._state_saved = False
        """Whether the newest checkpoint holds the current state (nothing happened since)."""
        self._validated_at = -1
        """The step of the last validation (saved, so a resumed run knows whether it is due)."""
        self.progress = Progress()
        self._window = LogWindow(strategy.root_device)
        self.async_checkpoints = checkpoint.async_save and strategy.use_async_checkpoints(
            on_done=lambda _: checkpointer.prune()
        )
        self._skipped = 0
        self._unconfirmed: list[tuple[int, dict[str, Any]]] = []
        self._prune_at = 512
        self._stop_signal: int | None = None
        self._agreed_signal = 0
        self._finish_reason: str | None = None
        self._agreed_finish = 0
        self.stopped_early: str | None = None
        """Why a callback ended the run before its last step (None: it did not)."""
        self._lr_keys = (
            {"train/lr": self.optim}
            if isinstance(self.optim, OptimWrapper)
            else {f"train/lr/{name}": w for name, w in self.optim.items()}
        )
        self.callbacks = self._callbacks(callbacks)
        if self.callbacks.stateful:
            strategy.register_state("callbacks", self.callbacks)
        self.callbacks("setup", self)

    def _callbacks(self, given: Mapping[str, Callback] | Sequence[Callback] | None) -> Callbacks:
        """The configured callbacks (``callbacks.<name>``), after xp's progress bar."""
        if given is None:
            given = {}
        elif not isinstance(given, Mapping):
            given = {f"{type(c).__name__}_{i}": c for i, c in enumerate(given)}
        s = self.settings
        named: dict[str, Callback] = {}
        if self.strategy.is_main_process:
            progress = progress_display(s.progress_bar, s.progress_interval_s)
            if progress is not None:
                named[progress.setting] = progress
        named.update({f"callbacks.{name}": callback for name, callback in given.items()})
        return Callbacks(named, self.strategy.logger)

    # ------------------------------------------------------------------ the loop

    def fit(self, progress: Progress | None = None) -> dict[str, float]:
        """Train to ``length.total_steps``; returns the last validation metrics.

        A callback may end training sooner (:meth:`request_finish`): the run then
        validates, saves and returns as at its end, with :attr:`stopped_early` set.

        Raises:
            TrainingStopped: a stop signal arrived; a checkpoint of the last step was saved.
            NonFiniteLossError: the loss became NaN or inf (``trainer.nonfinite=stop``).
            CallbackError: a callback raised (it is named, with the event).
        """
        p = progress or self.progress
        self.progress = p
        status = "FAILED"
        try:
            self.callbacks("on_fit_start", self)
            self._train(p)
            status = "FINISHED"
        except (TrainingStopped, KeyboardInterrupt) as e:
            status = "KILLED"
            self._end_callbacks(status)
            if isinstance(e, TrainingStopped):
                self.strategy.logger.warning(
                    "Stopped by %s at step %d; resume continues from %s.",
                    signal.Signals(e.signum).name,
                    e.step,
                    self.last_checkpoint,
                )
            raise
        except BaseException:
            self._end_callbacks(status)
            raise
        self.callbacks("on_fit_end", self, status)
        return self.metrics

    def _end_callbacks(self, status: str) -> None:
        """``on_fit_end`` while an error propagates: an error of a callback there is logged,
        so that the run's own error is the one reported."""
        try:
            self.callbacks("on_fit_end", self, status)
        except Exception as e:
            self.strategy.logger.error("%s", e)

    def _train(self, p: Progress) -> None:
        s = self.settings
        c = self.checkpoint
        total = self.length.total_steps
        model, module, optim, loader = self.model, self.module, self.optim, self.train_loader
        step_fn = self.task.train_step
        # On the CPU a batch stays where it is: no call per step (a few us on a ~1 ms step).
        to_device = None if self.strategy.root_device.type == "cpu" else self.strategy.to_device
        custom = self.task.custom_step
        window = self._window
        skip_nonfinite = s.nonfinite is NonFinite.skip
        # Only callbacks that override on_train_step_end are called per step (none: no cost).
        step_end = self.callbacks.listens("on_train_step_end")
        step_values: list[Mapping[str, Any]] = []

        try:
            while True:
                if p.batch_in_epoch >= len(loader):
                    # Also an epoch whose last step a checkpoint caught before the epoch's end
                    # (a stop signal there): a resumed run does that end first.
                    self._end_epoch(p)
                if p.step >= total or self.stopped_early is not None:
                    break
                loader.set_epoch(p.epoch)
                optim.initialize_count_status(inner_count=p.batch_in_epoch, max_counts=len(loader))
                model.train()
                for batch in loader.iter_from(p.batch_in_epoch):
                    if to_device is not None:
                        batch = to_device(batch)
                    values, samples = step_fn(model, module, batch, optim, skip_nonfinite)
                    if values is None:
                        self._skipped += 1
                    else:
                        window.add(values, samples)
                        if step_end:
                            step_values.append(values)
                    p.batch_in_epoch += 1
                    if not custom and not optim.should_update():
                        continue
                    p.step += 1
                    self._state_saved = False
                    for schedule in self.schedules:
                        schedule.step_iter()
                    if step_end:
                        self._step_end(p.step, step_values)
                        step_values.clear()
                    if p.step % s.log_interval_steps == 0:
                        self._log_train(p)
                    # At an epoch's last step the checkpoint waits for the epoch's end (its
                    # validation), so that it holds the state after it.
                    if (
                        c.interval_steps
                        and p.step % c.interval_steps == 0
                        and p.batch_in_epoch < len(loader)
                    ):
                        self.save_checkpoint(p)
                    if self._stop_requested(p):
                        self._halt(p)  # a signal raises TrainingStopped; a finish returns
                        break
                    if p.step >= total:
                        break
        except BaseException:
            # Loader workers ignore stop signals (the run stops them); shut them down here, or
            # the interpreter's exit would wait on them forever.
            loader.close()
            raise
        if self._validated_at != p.step and s.val_interval_epochs:
            self.validate(p)
        if not self._state_saved and (c.interval_epochs or c.interval_steps):
            self.save_checkpoint(p)
        self.strategy.wait_for_checkpoints()

    def _step_end(self, step: int, step_values: list[Mapping[str, Any]]) -> None:
        """``on_train_step_end`` with the step's values (the mean over its micro-batches)."""
        values: dict[str, Any] = {}
        for micro in step_values:
            for k, v in micro.items():
                v = v.detach() if isinstance(v, torch.Tensor) else v
                values[k] = values[k] + v if k in values else v
        if len(step_values) > 1:
            values = {k: v / len(step_values) for k, v in values.items()}
        self.callbacks("on_train_step_end", self, step, values)

    def _end_epoch(self, p: Progress) -> None:
        """What follows an epoch's last step: epoch-based phases, validation, checkpoint."""
        s, c = self.settings, self.checkpoint
        for schedule in self.schedules:
            schedule.step_epoch()
        p.epoch += 1
        p.batch_in_epoch = 0
        self._state_saved = False
        last = p.step >= self.length.total_steps
        if s.val_interval_epochs and (p.epoch % s.val_interval_epochs == 0 or last):
            self.validate(p)
        # Before the checkpoint: one that ends the run says so (a stop signal saves its own).
        if self._stop_requested(p, collective=True):
            self._halt(p)
        every = c.interval_epochs
        due = (every and (p.epoch % every == 0 or last)) or (
            c.interval_steps and p.step % c.interval_steps == 0
        )
        if due and not self._state_saved:
            self.save_checkpoint(p)

    # ------------------------------------------------------------------ stopping

    def request_stop(self, signum: int) -> None:
        """Ask the loop to save and stop after the current optimizer step (signal-safe).

        The first signal is the one the run reports; more only repeat the request.
        """
        if self._stop_signal is None:
            self._stop_signal = signum

    def request_finish(self, reason: str) -> None:
        """End the run after the current step, FINISHED, because of ``reason`` (a callback's).

        The run then validates (unless it just did), saves a checkpoint and ends as at its
        last step; the MLflow run is tagged ``xp.stopped_early=<reason>``. Under several
        ranks a request on any rank ends every rank, at the next point where they
        synchronize (a log step or an epoch's end). The first reason given is the one kept.
        """
        if self._finish_reason is None:
            self._finish_reason = str(reason)

    def _stop_requested(self, p: Progress, *, collective: bool = False) -> bool:
        """Whether to stop (a signal) or finish (a callback) now; every rank decides alike.

        One process checks its flags after every step. Several agree at points where they
        synchronize anyway (each log step, each epoch end), so no step pays a collective.
        """
        if self.strategy.world_size == 1:
            return self._stop_signal is not None or self._finish_reason is not None
        if not collective and p.step % self.settings.log_interval_steps != 0:
            return False
        if collective:
            flags = torch.tensor(
                [float(self._stop_signal or 0), float(self._finish_reason is not None)],
                device=self.strategy.root_device,
            )
            agreed = self.strategy.all_reduce(flags, op="sum").tolist()
            self._agreed_signal = int(agreed[0] > 0)
            self._agreed_finish = int(agreed[1] > 0)
        return bool(self._agreed_signal or self._agreed_finish)

    def _halt(self, p: Progress) -> None:
        """Stop on a signal (raises :class:`TrainingStopped`), else finish early (returns)."""
        one = self.strategy.world_size == 1
        if (self._stop_signal is not None) if one else self._agreed_signal:
            self._stop(p)
        reason = self._finish_reason
        if not one:
            # Only the ranks that asked know why; this collective runs once in a run.
            reason = next((r for r in self.strategy.all_gather_object(reason) if r), None)
        if p.step >= self.length.total_steps or self.stopped_early is not None:
            return  # at its end anyway
        self.stopped_early = reason or "a callback asked the run to finish"
        self._state_saved = False  # the last checkpoint must record it, so resume= ends too
        total = self.length.total_steps
        self.strategy.logger.info(
            "Stopping early at step %d of %d: %s.", p.step, total, self.stopped_early
        )
        if self.strategy.is_main_process:
            set_tags = getattr(self.tracker, "set_tags", None)
            if set_tags is not None:
                set_tags({"xp.stopped_early": self.stopped_early})

    def _stop(self, p: Progress) -> None:
        if not self._state_saved:
            self.save_checkpoint(p)
        self.strategy.wait_for_checkpoints()
        raise TrainingStopped(self._stop_signal or signal.SIGTERM, p.step)

    # ------------------------------------------------------------------ pieces

    def _log_train(self, p: Progress) -> None:
        window = self._window
        now = time.perf_counter()
        batches = max(1, window.batches)
        names = list(window.sums)
        samples_per_s = window.samples / max(1e-9, now - window.started)
        world_size = self.strategy.world_size
        if world_size == 1:
            # Nothing to reduce: skipping the stack, all-reduce and unpacking saves five tensor
            # ops per log step (~10 us on a CPU, measured in benchmarks/); same values.
            self._agreed_signal = 0
            means = {k: (v / batches).float() for k, v in window.sums.items()}
            samples: Any = samples_per_s
        else:
            device = self.strategy.root_device
            # Every rank logs the same names: a step's values do not depend on the rank.
            # The stop and finish requests ride along, so agreeing on them costs nothing.
            packed = torch.stack(
                [
                    *(window.sums[k].float() / batches for k in names),
                    torch.tensor(samples_per_s, device=device),
                    torch.tensor(float(self._stop_signal or 0), device=device),
                    torch.tensor(float(self._finish_reason is not None), device=device),
                ]
            )
            reduced = self.strategy.all_reduce(packed, op="sum")
            flags = reduced[-2:].tolist()
            self._agreed_signal = int(flags[0] > 0)
            self._agreed_finish = int(flags[1] > 0)
            means = {k: reduced[i] / world_size for i, k in enumerate(names)}
            samples = reduced[-3]
        if self.settings.nonfinite is NonFinite.stop:
            for key, value in means.items():
                # Reading the 0-dim loss once (the sync bool(tensor) does too) beats
                # torch.isfinite by ~4 us per log step.
                if "loss" in key and not math.isfinite(value.item()):
                    raise NonFiniteLossError(
                        f"The training {key} became {value.item()} between steps "
                        f"{p.step - self.settings.log_interval_steps} and {p.step}; lower "
                        "optim.lr, clip gradients (optim.clip_grad.max_norm), or set "
                        "trainer.nonfinite=skip to drop such batches."
                    )
        metrics: dict[str, Any] = {f"train/{k}": v for k, v in means.items()}
        metrics["train/samples_per_s"] = samples
        metrics["train/epoch"] = p.epoch + 1  # the epoch being trained, from 1 as the log counts
        for key, wrapper in self._lr_keys.items():
            metrics[key] = wrapper.get_lr()[0]
        if self._skipped:
            metrics["train/skipped_batches"] = self._skipped
        self._log(metrics, p.step)
        window.reset()
        self.callbacks("on_train_log", self, p.step, metrics)

    def evaluate(self, loader: EpochLoader, prefix: str) -> dict[str, float]:
        """The task's loss and metrics over ``loader``, on every rank, as ``<prefix>/<name>``."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            self.callbacks("on_evaluate_start", self, prefix)
            try:
                values = self.task.evaluate(model, self.module, loader, self.strategy)
            finally:
                self.callbacks("on_evaluate_end", self, prefix)
        finally:
            model.train(was_training)
        return {f"{prefix}/{k}": v for k, v in values.items()}

    def validate(self, p: Progress) -> dict[str, float]:
        """The validation metrics, logged at step ``p.step``; a new best is checkpointed."""
        if self.val_loader is None:
            return {}
        result = self.evaluate(self.val_loader, "val")
        self.metrics.update(result)
        self._validated_at = p.step
        self._state_saved = False
        self._log(result, p.step)
        self.strategy.logger.info(
            "epoch %d step %d: %s",
            p.epoch,
            p.step,
            " ".join(f"{k} {v:.4f}" for k, v in result.items()),
        )
        # Before the best checkpoint: a checkpoint of this step holds what callbacks made of it.
        self.callbacks("on_validation_end", self, p.step, result)
        monitor = self.checkpoint.monitor
        if monitor is not None:
            if monitor not in result:
                raise ValueError(
                    f"checkpoint.monitor={monitor!r} is never logged: validation logs "
                    f"{sorted(result)}. Set checkpoint.monitor to one of them."
                )
            if self._improves(result[monitor]):
                self.best = {"step": p.step, "metric": monitor, "value": result[monitor]}
                self.save_checkpoint(p)
        return result

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.checkpoint.mode is Mode.max:
            return value > self.best["value"]
        return value < self.best["value"]

    def _mark_best(self, path: Path) -> None:
        assert self.best is not None
        self.best["path"] = str(path)
        if self.strategy.is_main_process:
            self.checkpointer.set_best(path, self.best)
            set_tags = getattr(self.tracker, "set_tags", None)
            if set_tags is not None:
                set_tags(
                    {
                        "xp.best_checkpoint": path.name,
                        "xp.best_step": str(self.best["step"]),
                        "xp.best_metric": self.best["metric"],
                        "xp.best_value": repr(self.best["value"]),
                    }
                )
        self.strategy.logger.info(
            "New best %s %.4f at step %d: %s",
            self.best["metric"],
            self.best["value"],
            self.best["step"],
            path.name,
        )

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log ``metrics`` (name -> number or 0-dim tensor) to the run's tracker at ``step``
        (default: the current step); rank 0 logs, other ranks' calls do nothing.

        For callbacks; checkpoints keep what the store has not confirmed, like xp's own.
        """
        self._log(dict(metrics), self.progress.step if step is None else int(step))

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
        """Continue from a checkpoint the strategy resumed: progress, metrics, log window.

        A run resumed with another length has its LR schedules fitted to it
        (``trainer.extend_schedule``), and the log says what they do over the new steps.

        Raises:
            ValueError: The run has already trained more steps than this length allows.
        """
        p = self.progress = Progress.from_state_dict(checkpoint["progress"])
        total = self.length.total_steps
        if p.step > total:
            s = self.settings
            epochs = math.ceil(p.step / self.length.epoch_length)
            limits = (
                f"trainer.max_epochs={_yaml(s.max_epochs)}, trainer.max_steps={_yaml(s.max_steps)}"
            )
            raise ValueError(
                f"resume: the run has already trained {p.step} optimizer steps ({epochs} epochs "
                f"of {self.length.epoch_length}), but {limits} end it at step {total}. Resume "
                f"with at least trainer.max_epochs={epochs} (or trainer.max_steps={p.step}), or "
                "start a new run from its weights with load_from=."
            )
        self.metrics = {k: float(v) for k, v in checkpoint.get("metrics", {}).items()}
        windows = checkpoint.get("log_window")
        if isinstance(windows, list):  # every rank's own sums, in rank order
            rank = self.strategy.rank
            windows = windows[rank] if rank < len(windows) else None
        if windows:
            self._window.load_state_dict(windows)
        best = checkpoint.get("best")
        if best and best.get("metric") == self.checkpoint.monitor:
            self.best = dict(best)
        self.stopped_early = checkpoint.get("stopped_early")
        # Checkpoints from before xp recorded it: validation is due at the end, if not before.
        self._validated_at = int(checkpoint.get("validated_at", -1))
        # The checkpoint resumed from holds this state: nothing to save until something changes.
        self._state_saved = True
        self.last_checkpoint = self.checkpointer.path_for(p.step)
        previous = checkpoint.get("total_steps")
        if previous is not None and int(previous) != total:
            self._extend_schedules(p, int(previous))
            if self.stopped_early is not None:
                self.strategy.logger.info(
                    "The run had stopped early at step %d (%s); resumed with a new length, it "
                    "trains on.",
                    p.step,
                    self.stopped_early,
                )
                self.stopped_early = None
        return p

    def _extend_schedules(self, p: Progress, previous: int) -> None:
        """Fit the LR schedules to a new training length and log what they do from here."""
        total = self.length.total_steps
        policy = self.settings.extend_schedule
        ahead = total - p.step
        if total > previous:
            what = f"Extension: steps {p.step + 1}-{total}"
        else:
            what = f"Shortened: the run ends at step {total}"
        what += f" (the run had {previous} steps; trainer.extend_schedule={policy.value})"
        parts = []
        lrs: list[float] = []
        for name, schedule in self._schedules_by_name.items():
            change = schedule.extend(policy) or "the schedule is unchanged"
            part = change if len(self._schedules_by_name) == 1 else f"optimizer {name}: {change}"
            if ahead:
                schedule_lrs = schedule.lrs_ahead(ahead)
                lrs += schedule_lrs
                first, last = schedule_lrs[0], schedule_lrs[-1]
                low, high = min(schedule_lrs), max(schedule_lrs)
                part += (
                    f"; lr {first:.3g} at step {p.step + 1}, {last:.3g} at step {total} "
                    f"(lowest {low:.3g}, highest {high:.3g})"
                )
            parts.append(part)
        if not parts:
            held = ", ".join(f"{w.get_lr()[0]:.3g}" for w in self._lr_keys.values())
            parts.append(f"no LR schedule: the lr holds at {held}")
        message = f"{what}: {' | '.join(parts)}."
        if lrs and not any(lrs):
            self.strategy.logger.warning(
                "%s Every added step trains at lr 0: set trainer.extend_schedule=restart (or "
                "stretch) to train them.",
                message,
            )
        else:
            self.strategy.logger.info("%s", message)

    def save_checkpoint(self, p: Progress) -> Path:
        """Save a checkpoint of the current state and prune the old ones."""
        path = self.checkpointer.path_for(p.step)
        new_best = self.best is not None and self.best["step"] == p.step
        if new_best:
            assert self.best is not None
            self.best["path"] = str(path)
        extra = {
            "progress": p.state_dict(),
            # Each rank sums its own batches since the last log step; a stop between log
            # steps (at an epoch's end) must give each rank its own back.
            "log_window": (
                self.strategy.all_gather_object(self._window.state_dict())
                if self.strategy.world_size > 1
                else self._window.state_dict()
            ),
            "metrics": dict(self.metrics),
            "unstored_metrics": self._metrics_not_yet_stored(),
            "best": dict(self.best) if self.best else {},
            "validated_at": self._validated_at,
            "total_steps": self.length.total_steps,
            **({"stopped_early": self.stopped_early} if self.stopped_early is not None else {}),
            **self.checkpoint_extra,
        }
        self.strategy.save_checkpoint(path, extra=extra)
        self._state_saved = True
        self.last_checkpoint = path
        if new_best:
            self._mark_best(path)
        if self.strategy.is_main_process and not self.async_checkpoints:
            self.checkpointer.prune()
        # The routine ones at DEBUG: the log says what matters (the last, a new best, a stop).
        routine = not new_best and p.step < self.length.total_steps and self._stop_signal is None
        routine = routine and self.stopped_early is None
        self.strategy.logger.log(
            logging.DEBUG if routine else logging.INFO, "Saved checkpoint %s", path
        )
        self.callbacks("on_checkpoint_saved", self, p.step, path)
        return path
