"""Callbacks: code that runs at named points of a run, without editing the loop.

A callback subclasses :class:`Callback` and overrides the events it needs; each event
gets the :class:`~xp.trainer.Trainer`, through which it reads the run (``trainer.module``,
``trainer.progress``, ``trainer.strategy``), logs metrics (:meth:`Trainer.log_metrics`)
and asks the run to end (:meth:`Trainer.request_finish`). Config gives a run its
callbacks as a dict of named ``_target_`` nodes (lightning-hydra-template's
convention), so ``+callbacks=early_stopping``, ``callbacks.early_stopping.patience=5``
and ``~callbacks.ema`` work on the command line; :func:`build_callbacks` builds them.

The events, in the order a run meets them:

==========================  =================================================================
``setup``                   the trainer is built (before a resume restores any state)
``on_fit_start``            training starts, after ``resume=`` restored the state
``on_train_step_end``       after each optimizer step, with the values the step returned
``on_train_log``            after each log step, with the metrics logged (reduced over ranks)
``on_evaluate_start/_end``  around each evaluation (validation, ``test=``): e.g. swap weights
``on_validation_end``       after validation, with its metrics (reduced over ranks)
``on_checkpoint_saved``     a checkpoint was saved (on every rank)
``on_fit_end``              training ended: FINISHED, FAILED or KILLED
==========================  =================================================================

Why this shape. The four anchors differ in how an event reaches a callback: Lightning's
``Callback`` and mmengine's ``Hook`` have one method per event; Composer's ``Callback``
gets every event through one ``run_event(event, state, logger)``; Hugging Face's
``TrainerCallback`` has one method per event and asks for a stop by setting
``control.should_training_stop``. xp takes one method per event (Lightning, mmengine):
the events are named and typed where a reader looks for them, and which events a
callback uses is known from the methods its class overrides, checked once when the
trainer is built, so a callback that leaves ``on_train_step_end`` alone costs a step
nothing (Composer's single entry point calls every callback on every event). State
follows Lightning: ``state_dict``/``load_state_dict``, saved in every checkpoint under
``callbacks.<name>``, restored by ``resume=``, so a resumed run stays bit-exact. A stop
is a request with a reason (HF's flag, Lightning's ``trainer.should_stop``) that the
ranks agree on where they synchronize anyway (a log step, an epoch's end); the run then
validates, saves and ends FINISHED, tagged ``xp.stopped_early``. There are no priorities
(mmengine's): callbacks run in the order of the config's dict. Built in, as Lightning and
mmengine have them: :class:`EarlyStopping` and :class:`EMA`; xp's progress display is a
callback too (:class:`ProgressBar` on a terminal, :class:`ProgressLog` elsewhere), which
took it out of the loop's signatures. The best
checkpoint (``checkpoint.monitor``) stays in the trainer: it decides when a checkpoint is
saved and is read back from every checkpoint's ``best`` entry by ``resume=`` and ``test=``,
so as a callback it would move that code and its checkpoint format, not remove any.

A callback runs on every rank. What it keeps in ``state_dict`` is saved from rank 0, so it
must be the same on every rank, except tensors sharded as DTensors (an EMA under FSDP),
which are saved and loaded sharded. A callback that raises stops the run with an error
naming it and the event (:class:`CallbackError`).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from xp.config import Mode
from xp.errors import innermost_message
from xp.log import draw_live_line, end_live_line

if TYPE_CHECKING:
    from omegaconf import DictConfig

Trainer = Any
"""The :class:`xp.trainer.Trainer` whose events a callback gets: ``trainer.module`` (the
model unwrapped), ``trainer.model``, ``trainer.strategy``, ``trainer.progress`` (epoch,
step), ``trainer.settings``, ``trainer.log_metrics(...)``, ``trainer.request_finish(why)``.
Typed loosely here, because the trainer imports this module."""

EVENTS = (
    "setup",
    "on_fit_start",
    "on_train_step_end",
    "on_train_log",
    "on_evaluate_start",
    "on_evaluate_end",
    "on_validation_end",
    "on_checkpoint_saved",
    "on_fit_end",
)
"""Every event, in the order a run meets them."""


class Callback:
    """Base of every callback: each event does nothing until a subclass overrides it."""

    def setup(self, trainer: Trainer) -> None:
        """The trainer is built; no state is restored yet (``resume=`` restores it after)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Training starts: ``resume=`` restored every state, ``trainer.progress`` included."""

    def on_train_step_end(self, trainer: Trainer, step: int, values: Mapping[str, Tensor]) -> None:
        """After optimizer step ``step`` (counted from 1).

        Args:
            values: What the step returned on this rank (``loss`` at least), as tensors on
                the device; with gradient accumulation, the mean over the step's
                micro-batches (empty if ``trainer.nonfinite=skip`` dropped them all).
                Reading one (``float(values["loss"])``) waits for the device.
        """

    def on_train_log(self, trainer: Trainer, step: int, metrics: Mapping[str, Any]) -> None:
        """After a log step (every ``trainer.log_interval_steps``), with the metrics logged:
        ``train/<name>`` means over the steps since the last log and over the ranks,
        ``train/lr``, ``train/samples_per_s``, ``train/epoch`` (the epoch being trained,
        counted from 1 as the log counts)."""

    def on_evaluate_start(self, trainer: Trainer, split: str) -> None:
        """An evaluation starts: ``val`` (validation) or ``test`` (``test=``)."""

    def on_evaluate_end(self, trainer: Trainer, split: str) -> None:
        """The evaluation's forward passes are done (also when one raised)."""

    def on_validation_end(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        """After validation at step ``step``, with its metrics (``val/<name>``, the same on
        every rank); they are logged, and the best checkpoint not yet chosen."""

    def on_checkpoint_saved(self, trainer: Trainer, step: int, path: Path) -> None:
        """A checkpoint of step ``step`` was saved at ``path`` (it may still be written in
        the background with ``checkpoint.async_save``). State changed here is not in it."""

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        """Training ended: ``FINISHED`` (also after an early stop), ``FAILED`` (an error,
        which propagates after this) or ``KILLED`` (a stop signal, Ctrl-C)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback (tensors and plain values); {}: nothing."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (``resume=``)."""


class CallbackError(RuntimeError):
    """A callback raised: names the callback, its class and the event."""


class CallbackValueError(CallbackError, ValueError):
    """A callback refused a value it was given (a setting, a metric): a user error."""


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def overrides(callback: Callback, event: str) -> bool:
    """Whether ``callback``'s class defines ``event`` itself (not only :class:`Callback`)."""
    return getattr(type(callback), event, None) is not getattr(Callback, event)


class Callbacks:
    """A run's callbacks by key, and for each event those that override it.

    Args:
        callbacks: Key -> callback, in the order they run; a key names the callback in
            errors (``callbacks.early_stopping``). Keys under ``callbacks.`` are the
            configured callbacks, whose state the checkpoints keep by their name.
        logger: Where to say which states a resume restores or drops.
    """

    def __init__(self, callbacks: Mapping[str, Callback], logger: logging.Logger) -> None:
        for key, callback in callbacks.items():
            if not isinstance(callback, Callback):
                raise TypeError(
                    f"{key} is a {_qualname(callback)}, not an xp.callback.Callback; subclass "
                    "xp.callback.Callback and override the events it needs."
                )
        self.named = dict(callbacks)
        self.logger = logger
        self._listeners = {
            event: tuple(
                (key, getattr(callback, event))
                for key, callback in self.named.items()
                if overrides(callback, event)
            )
            for event in EVENTS
        }
        self._stateful = {
            key.removeprefix("callbacks."): callback
            for key, callback in self.named.items()
            if key.startswith("callbacks.") and overrides(callback, "state_dict")
        }

    def __len__(self) -> int:
        return len(self.named)

    def listens(self, event: str) -> bool:
        """Whether any callback overrides ``event``."""
        return bool(self._listeners[event])

    @property
    def stateful(self) -> bool:
        """Whether any configured callback keeps state in checkpoints."""
        return bool(self._stateful)

    def __call__(self, event: str, *args: Any) -> None:
        """Call ``event`` on every callback that overrides it, in order.

        Raises:
            CallbackError: A callback raised; it is named with the event (the cause is
                chained). A ``ValueError`` it raised becomes a :class:`CallbackValueError`.
        """
        for key, method in self._listeners[event]:
            try:
                method(*args)
            except Exception as e:
                raise _failed(key, self.named[key], event, e) from e

    def state_dict(self) -> dict[str, Any]:
        """Each configured callback's state, by name (callbacks that keep none left out)."""
        states = {}
        for name, callback in self._stateful.items():
            try:
                state = callback.state_dict()
            except Exception as e:
                raise _failed(f"callbacks.{name}", callback, "state_dict", e) from e
            if state:
                states[name] = state
        return states

    def load_state_dict(self, states: Mapping[str, Any]) -> None:
        """Give each callback its state from a checkpoint; say what starts fresh or is dropped."""
        for name, state in states.items():
            callback = self._stateful.get(name)
            if callback is None:
                self.logger.warning(
                    "The checkpoint holds state of callbacks.%s, which this run does not have; "
                    "it is dropped.",
                    name,
                )
                continue
            try:
                callback.load_state_dict(state)
            except Exception as e:
                raise _failed(f"callbacks.{name}", callback, "load_state_dict", e) from e
        fresh = sorted(set(self._stateful) - set(states))
        if fresh:
            self.logger.info(
                "The checkpoint holds no state of %s; starting fresh.",
                ", ".join(f"callbacks.{name}" for name in fresh),
            )


def _failed(key: str, callback: Callback, event: str, error: Exception) -> CallbackError:
    cls = CallbackValueError if isinstance(error, ValueError) else CallbackError
    return cls(f"{key} ({_qualname(callback)}) failed in {event}: {type(error).__name__}: {error}")


def build_callbacks(
    node: DictConfig | Mapping[str, Any] | None, key: str = "callbacks"
) -> dict[str, Callback]:
    """The callbacks of a composed ``callbacks`` node: name -> built callback, in order.

    Each entry is a ``_target_`` node (its arguments beside it); a null entry is skipped,
    so ``callbacks.ema=null`` turns one off like ``~callbacks.ema``.

    Raises:
        ValueError: An entry has no ``_target_``, its target does not import, or building
            it failed; the message names ``<key>.<name>``.
        TypeError: A target built something that is not a :class:`Callback`.
    """
    if node is None:
        return {}
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    built: dict[str, Callback] = {}
    for name, sub in node.items():
        where = f"{key}.{name!s}"
        if sub is None:
            continue
        if not isinstance(sub, DictConfig | Mapping) or "_target_" not in sub:
            raise ValueError(
                f"{where} has no _target_; name the callback's class, e.g. "
                f"{where}={{_target_: xp.callback.EarlyStopping, monitor: val/loss}}."
            )
        target = sub["_target_"]
        try:
            callback = instantiate(sub, _convert_="all")
        except InstantiationException as e:
            raise ValueError(
                f"{where}._target_={target!r} could not be built: {innermost_message(e)}. "
                "Check the dotted path, that its package is installed and importable from "
                "here, and its arguments."
            ) from e
        if not isinstance(callback, Callback):
            raise TypeError(
                f"{where}._target_={target!r} built a {_qualname(callback)}, not an "
                "xp.callback.Callback; subclass xp.callback.Callback."
            )
        built[str(name)] = callback
    return built


# --------------------------------------------------------------------------- built in


class EarlyStopping(Callback):
    """End the run when a validation metric stops improving (FINISHED, ``xp.stopped_early``).

    After each validation, the monitored value improves when it beats the best so far
    by more than ``min_delta``; after ``patience`` validations in a row without an
    improvement the run validates no more, saves, and ends FINISHED. Its last
    validation's metrics (those of the stop) are what the run returns to a sweep.

    Args:
        monitor: A metric validation logs (``val/loss``, ``val/acc``).
        mode: ``min`` (smaller is better) or ``max``.
        patience: Validations without improvement before the run stops (>= 1).
        min_delta: The least change that counts as an improvement (>= 0).
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: Mode | str = Mode.min,
        patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        if not str(monitor).startswith("val/"):
            raise ValueError(
                f"monitor={monitor!r} is not a validation metric; name one that validation "
                "logs, e.g. val/loss or val/acc."
            )
        if patience < 1:
            raise ValueError(f"patience={patience} must be >= 1 (validations without improvement).")
        if min_delta < 0:
            raise ValueError(f"min_delta={min_delta} must be >= 0.")
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise ValueError(f"mode={mode!r} must be min or max.") from None
        self.monitor = str(monitor)
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0
        """Validations since the last improvement."""

    def setup(self, trainer: Trainer) -> None:
        if trainer.val_loader is None or not trainer.settings.val_interval_epochs:
            raise ValueError(
                f"monitor={self.monitor!r} needs validation, but this run has no validation "
                "data or trainer.val_interval_epochs=0."
            )

    def on_validation_end(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        if self.monitor not in metrics:
            raise ValueError(
                f"monitor={self.monitor!r} is never logged: validation logs {sorted(metrics)}; "
                "set monitor to one of them."
            )
        value = float(metrics[self.monitor])
        if self._improves(value):
            self.best, self.best_step, self.wait = value, step, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            best = (
                "none finite" if self.best is None else f"{self.best:.6g} at step {self.best_step}"
            )
            trainer.request_finish(
                f"{self.monitor} did not improve by more than {self.min_delta:g} in "
                f"{self.wait} validation(s) (mode={self.mode.value}, patience={self.patience}; "
                f"best {best})"
            )

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode is Mode.min:
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        best = state.get("best")
        self.best = None if best is None else float(best)
        step = state.get("best_step")
        self.best_step = None if step is None else int(step)
        self.wait = int(state.get("wait", 0))


class EMA(Callback):
    """An exponential moving average of the model's parameters.

    Every ``every_n_steps`` optimizer steps, ``average = decay * average + (1 - decay) *
    parameter`` for every floating-point parameter (one fused ``torch._foreach_lerp_``).
    Buffers are not averaged: the model's own (BatchNorm statistics) go with it. The
    average starts as the weights training starts from, is saved in every checkpoint
    (``callbacks.<name>.average``), continues bit-exact on resume, and is what ``xp export
    ckpt=... ema=true`` writes. With ``validate_with_ema`` validation and ``test=``
    evaluate the average (so ``checkpoint.monitor`` and EarlyStopping judge it too).

    Every rank keeps the average of its own parameters: under DDP a full copy (the same
    on every rank), under FSDP the shards of its parameters (DTensors, saved and
    resharded by DCP like the model's), so the average costs each rank as much memory as
    its parameters.

    Args:
        decay: Weight of the old average, in [0, 1); 0.999 averages over about the last
            1,000 updates.
        every_n_steps: Update the average every this many optimizer steps.
        validate_with_ema: Validation and ``test=`` evaluate the average (the training
            weights are put back after).
    """

    def __init__(
        self, decay: float = 0.999, every_n_steps: int = 1, validate_with_ema: bool = True
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1) (e.g. 0.999).")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1.")
        self.decay = float(decay)
        self.every_n_steps = int(every_n_steps)
        self.validate_with_ema = bool(validate_with_ema)
        self.average: dict[str, Tensor] = {}
        """Parameter name -> its average (names as in the model's state dict)."""
        self.updates = 0
        """How many times the average was updated."""
        self._params: list[Tensor] = []
        self._slots: list[Tensor] = []
        """The average tensor of each entry of ``_params``."""
        self._sharded = False
        self._restored = False
        self._fitting = False
        self._backup: list[Tensor] | None = None
        self._trainer: Trainer | None = None

    def setup(self, trainer: Trainer) -> None:
        self._trainer = trainer
        module = trainer.module
        # FSDP: the sharded parameters (DTensors), not copies gathered for a forward.
        trainer.strategy.reshard(trainer.model)
        named = _parameters_by_name(module)
        if any(hasattr(p, "ds_id") for p in named.values()):
            raise ValueError(
                "strategy=deepspeed with zero_stage=3 partitions the parameters outside "
                "torch's view, so EMA cannot average them; use strategy.zero_stage=1 or 2, or "
                "strategy=fsdp (its average is sharded like the parameters)."
            )
        if not named:
            raise ValueError(
                f"{type(module).__qualname__} has no floating-point parameters to average."
            )
        copies: dict[int, Tensor] = {}
        self._params, self._slots = [], []
        self.average = {}
        for name, param in named.items():
            if id(param) not in copies:  # tied parameters share one average
                copies[id(param)] = param.detach().clone()
                self._params.append(param)
                self._slots.append(copies[id(param)])
            self.average[name] = copies[id(param)]
        self._sharded = any(_is_dtensor(p) for p in self._params)

    def on_fit_start(self, trainer: Trainer) -> None:
        self._fitting = True
        if not self._restored:
            # Training starts here (load_from= and init_weights are done): so does the average.
            trainer.strategy.reshard(trainer.model)
            with torch.no_grad():
                torch._foreach_copy_(self._local(self._slots), self._local(self._params))

    def on_train_step_end(self, trainer: Trainer, step: int, values: Mapping[str, Tensor]) -> None:
        if step % self.every_n_steps:
            return
        with torch.no_grad():
            torch._foreach_lerp_(
                self._local(self._slots), self._local(self._params), 1.0 - self.decay
            )
        self.updates += 1

    def on_evaluate_start(self, trainer: Trainer, split: str) -> None:
        if not self.validate_with_ema:
            return
        if split == "test" and not (self._fitting or self._restored):
            trainer.strategy.logger.warning(
                "EMA: no average was loaded from the tested checkpoint (did its run have no "
                "EMA callback?); test= evaluates the model's own weights."
            )
            return
        trainer.strategy.reshard(trainer.model)
        params = self._local(self._params)
        with torch.no_grad():
            self._backup = [p.clone() for p in params]
            torch._foreach_copy_(params, self._local(self._slots))

    def on_evaluate_end(self, trainer: Trainer, split: str) -> None:
        if self._backup is None:
            return
        # FSDP keeps the root's gathered (averaged) parameters after an evaluation's forward:
        # drop them, or training's next forward would use them.
        trainer.strategy.reshard(trainer.model)
        with torch.no_grad():
            torch._foreach_copy_(self._local(self._params), self._backup)
        self._backup = None

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        self._fitting = False

    def state_dict(self) -> dict[str, Any]:
        return {"average": dict(self.average), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("average", {})
        missing = sorted(set(self.average) - set(saved))
        unexpected = sorted(set(saved) - set(self.average))
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint's average does not fit this model (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); resume with the model it was trained with."
            )
        with torch.no_grad():
            for name, tensor in self.average.items():
                if saved[name] is not tensor:  # FSDP loads into these very tensors
                    tensor.copy_(saved[name])
        self.updates = int(state.get("updates", 0))
        self._restored = True

    def _local(self, tensors: list[Tensor]) -> list[Tensor]:
        """This rank's part of each tensor: its shard of a DTensor (FSDP), else itself."""
        if not self._sharded:
            return tensors
        # Looked up every time: FSDP may re-point a parameter's shard (its lazy init pads it).
        return [t._local_tensor if _is_dtensor(t) else t for t in tensors]  # type: ignore[attr-defined]


def _is_dtensor(tensor: Tensor) -> bool:
    return hasattr(tensor, "_local_tensor") and hasattr(tensor, "placements")


def _parameters_by_name(module: nn.Module) -> dict[str, Tensor]:
    """The floating-point parameters of ``module``, named as its state dict names them.

    The state dict's names hide wrappers that ``named_parameters`` shows (activation
    checkpointing's ``_checkpoint_wrapped_module``), so they match the checkpoint's model.
    """
    return {
        name: value
        for name, value in module.state_dict(keep_vars=True).items()
        if isinstance(value, nn.Parameter) and value.is_floating_point()
    }


def progress_display(
    progress_bar: bool | None, interval_s: float, stream: Any = None
) -> ProgressBar | ProgressLog | None:
    """How a run shows its progress on ``stream`` (stderr): the bar on a terminal (or where
    ``progress_bar`` is true), else a log line every ``interval_s`` seconds; None where
    ``progress_bar`` is false on a terminal, or ``interval_s`` is 0 without one.

    Built by the trainer on rank 0 only, so the other ranks pay nothing for it.
    """
    stream = stream or sys.stderr
    on_terminal = bool(stream.isatty())
    if progress_bar or (progress_bar is None and on_terminal):
        return ProgressBar(stream)
    if interval_s > 0 and not on_terminal:
        return ProgressLog(interval_s)
    return None


class ProgressBar(Callback):
    """xp's one-line bar over optimizer steps on a terminal (``trainer.progress_bar``).

    Redrawn in place below the log lines, which :mod:`xp.log` prints above it; epochs
    count from 1, as the log counts them.
    """

    setting = "trainer.progress_bar"
    """The setting that shows it, which names it in errors."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.total = 0
        self.step = 0
        self.postfix = ""
        """What the bar shows after its rate: the epoch and the last logged metrics."""
        self._started = 0.0
        self._start_step = 0
        self._drawn = 0.0
        self._open = False

    def on_fit_start(self, trainer: Trainer) -> None:
        self.total = trainer.length.total_steps
        self.step = self._start_step = trainer.progress.step
        self._started = time.perf_counter()
        self._drawn = 0.0
        self._open = True

    def on_train_step_end(self, trainer: Trainer, step: int, values: Mapping[str, Tensor]) -> None:
        self.step = step
        now = time.perf_counter()
        if now - self._drawn > 0.1 or step == self.total:
            self._drawn = now
            self._draw(now)

    def on_train_log(self, trainer: Trainer, step: int, metrics: Mapping[str, Any]) -> None:
        # 1-based, as the log counts epochs (Progress.epoch, saved, counts from 0).
        self.postfix = f"epoch {trainer.progress.epoch + 1} {_shown(metrics)}"

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        self.close()

    def close(self) -> None:
        """End the bar's line (it stays on the terminal); a no-op once closed."""
        if self._open:
            self._open = False
            self._draw(time.perf_counter())
            end_live_line()

    def _draw(self, now: float) -> None:
        done = self.step / max(1, self.total)
        rate = (self.step - self._start_step) / max(1e-9, now - self._started)
        bar = "#" * int(done * 30)
        draw_live_line(
            f"[{bar:<30}] {self.step}/{self.total} {rate:6.1f} step/s {self.postfix}",
            self.stream,
        )


class ProgressLog(Callback):
    """xp's progress where stderr is not a terminal (a log file, CI, Slurm, ``nohup``):
    a plain line in the run's log every ``every_s`` seconds (``trainer.progress_interval_s``),
    steady in time whatever the steps take, as Lightning and the Hugging Face Trainer print
    in logs, where a bar would be one endless line::

        step 120/400 (30%) epoch 7/20 loss 0.1234 lr 0.001 41.2 step/s ETA 0:00:07
        step 400/400 (100%) epoch 20/20 validation for 0:01:30

    A thread of its own writes the lines, so a slow step, a long validation or a checkpoint
    being saved still gets them; the metrics shown are the last logged ones
    (``trainer.log_interval_steps``), epochs count from 1 as the log counts them, step/s and
    the ETA are over the steps since the previous line. A step pays nothing for it.

    Args:
        every_s: Seconds between two lines (> 0).
    """

    setting = "trainer.progress_interval_s"
    """The setting that shows it, which names it in errors."""

    def __init__(self, every_s: float) -> None:
        if every_s <= 0:
            raise ValueError(f"every_s={every_s} must be > 0 (seconds between progress lines).")
        self.every_s = float(every_s)
        self._last = (0.0, 0)
        """(time, step) of the last line, or of the fit's start."""
        self._shown = ""
        """The last logged training metrics, as the line shows them."""
        self._evaluating: tuple[str, float] | None = None
        """(split, since when) while an evaluation runs."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self._last = (time.perf_counter(), trainer.progress.step)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._every_interval, args=(trainer,), name="xp-progress-log", daemon=True
        )
        self._thread.start()

    def on_train_log(self, trainer: Trainer, step: int, metrics: Mapping[str, Any]) -> None:
        self._shown = _shown(metrics)

    def on_evaluate_start(self, trainer: Trainer, split: str) -> None:
        self._evaluating = (split, time.perf_counter())

    def on_evaluate_end(self, trainer: Trainer, split: str) -> None:
        self._evaluating = None

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _every_interval(self, trainer: Trainer) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._write(trainer)
            except Exception:  # a progress line never stops a run
                trainer.strategy.logger.debug("progress line failed", exc_info=True)

    def _write(self, trainer: Trainer) -> None:
        now = time.perf_counter()
        step = trainer.progress.step
        then, then_step = self._last
        length = trainer.length
        total = length.total_steps
        per_epoch = max(1, length.epoch_length)
        head = (
            f"step {step}/{total} ({100 * step // max(1, total)}%) "
            f"epoch {max(1, math.ceil(step / per_epoch))}/{math.ceil(total / per_epoch)}"
        )
        evaluating = self._evaluating
        if evaluating is not None:
            split, since = evaluating
            what = "validation" if split == "val" else split
            trainer.strategy.logger.info("%s %s for %s", head, what, _duration(now - since))
            return
        rate = (step - then_step) / max(1e-9, now - then)
        trainer.strategy.logger.info(
            "%s %s%.1f step/s ETA %s",
            head,
            f"{self._shown} " if self._shown else "",
            rate,
            _duration((total - step) / rate) if rate > 0 else "?",
        )
        self._last = (now, step)


def _shown(metrics: Mapping[str, Any]) -> str:
    """The logged training metrics as the progress shows them: ``loss 0.1234 lr 0.001``."""
    lr = next((v for k, v in metrics.items() if k.startswith("train/lr")), None)
    shown = " ".join(
        f"{k.removeprefix('train/')} {float(v):.4f}"
        for k, v in metrics.items()
        if k.startswith("train/") and not k.startswith("train/lr") and k not in _NOT_SHOWN
    )
    return shown + (f" lr {lr:.3g}" if lr is not None else "")


def _duration(seconds: float) -> str:
    """``H:MM:SS``."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


_NOT_SHOWN = frozenset({"train/samples_per_s", "train/epoch", "train/skipped_batches"})
"""What the bar leaves out of the logged metrics (it shows the epoch and lr its own way)."""
