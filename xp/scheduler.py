"""LR schedules with mmengine's phase semantics, built from torch's LR schedulers.

A schedule is a sequence of :class:`Phase` objects, each one torch scheduler active over
a window ``[begin, end)`` of epochs or optimizer steps. :class:`LRSchedule` turns the
windows into the calls torch expects:

- A phase's torch scheduler is built when its window opens (``last_epoch`` 0 at
  ``begin``) and stepped once per epoch or step inside the window, so its own
  ``last_epoch`` counts from ``begin``.
- A phase whose window length is a torch argument (``ConstantLR``, ``LinearLR``,
  ``PolynomialLR``, ``CosineAnnealingLR``) takes one more step at ``end``, the one at
  which torch reaches its final value (``ConstantLR`` restores the lr, a warmup reaches
  the full lr, a cosine reaches ``eta_min``). The others (``StepLR``, ``MultiStepLR``,
  ``ExponentialLR``, ``OneCycleLR``) are not stepped at ``end``. After that the lr holds.
- A phase that opens while no other phase is active first resets every param group's
  lr to its base lr (torch's ``SequentialLR``); overlapping phases multiply (torch's
  ``ChainedScheduler``), which is exact for the chainable classes above except
  ``OneCycleLR``, which sets the lr outright.
- At an epoch boundary the caller steps step-based phases (``step_iter``) before
  epoch-based ones (``step_epoch``).

A run resumed with another training length (an extended run) first gets back the schedule
it saved (:meth:`LRSchedule.load_state_dict`), then :meth:`LRSchedule.extend` fits the
phases without an ``end`` (those that run to the end of training) to the new length, by
the run's :class:`~xp.config.ScheduleExtension`: ``restart`` (a warm restart, as SGDR:
they start again over the added steps), ``stretch`` (the schedule the new length would
have had from the start) or ``hold`` (they end where they ended; the lr holds). The
windows of those phases are kept as *cycles*, ``[start, stop)`` in optimizer steps,
saved with the schedule, so a resumed extension continues exactly.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    ExponentialLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    PolynomialLR,
    StepLR,
)

from xp.config import ScheduleExtension

__all__ = ["LRSchedule", "Phase"]


@dataclass(frozen=True)
class Phase:
    """One torch LR scheduler active over the window [begin, end)."""

    factory: Callable[..., LRScheduler]
    """``functools.partial(torch scheduler class, **user kwargs)``."""
    begin: int = 0
    """First epoch (or step, when not by_epoch) of the window."""
    end: int | None = None
    """End of the window, exclusive; None: the end of training, in this phase's unit."""
    by_epoch: bool = True
    """Stepped at the end of each epoch, or after each optimizer step."""
    convert_to_iter_based: bool = False
    """Turn an epoch-based phase into a step-based one of the same shape."""
    name: str = "scheduler"
    """Config key for error messages, e.g. ``scheduler.cosine``."""


def _scale_kwarg(key: str) -> Callable[[dict[str, Any], int], None]:
    def convert(kwargs: dict[str, Any], epoch_length: int) -> None:
        if key in kwargs:
            kwargs[key] = kwargs[key] * epoch_length

    return convert


def _scale_milestones(kwargs: dict[str, Any], epoch_length: int) -> None:
    if "milestones" in kwargs:
        kwargs["milestones"] = [m * epoch_length for m in kwargs["milestones"]]


def _root_gamma(kwargs: dict[str, Any], epoch_length: int) -> None:
    # epoch_length steps of gamma ** (1 / epoch_length) decay as much as one epoch of gamma.
    if "gamma" in kwargs:
        kwargs["gamma"] = kwargs["gamma"] ** (1.0 / epoch_length)


def _no_epoch_kwargs(kwargs: dict[str, Any], epoch_length: int) -> None:
    """Only the window (begin, end) is in epochs; it is converted by the caller."""


@dataclass(frozen=True)
class _Spec:
    """What LRSchedule needs to know about one torch scheduler class."""

    convert: Callable[[dict[str, Any], int], None]
    """Rescales the epoch-valued kwargs in place for convert_to_iter_based."""
    window_kwarg: str | None = None
    """The argument that is the window length (end - begin)."""
    closes: bool = False
    """Takes one more step at ``end``: torch's final value sits at last_epoch == length."""
    replaced: tuple[str, ...] = ()
    """Further arguments the window replaces."""


_SPECS: dict[type[LRScheduler], _Spec] = {
    ConstantLR: _Spec(_no_epoch_kwargs, "total_iters", closes=True),
    LinearLR: _Spec(_no_epoch_kwargs, "total_iters", closes=True),
    PolynomialLR: _Spec(_no_epoch_kwargs, "total_iters", closes=True),
    CosineAnnealingLR: _Spec(_no_epoch_kwargs, "T_max", closes=True),
    # OneCycleLR's last value is at total_steps - 1; a step at total_steps would overshoot it.
    OneCycleLR: _Spec(_no_epoch_kwargs, "total_steps", replaced=("epochs", "steps_per_epoch")),
    StepLR: _Spec(_scale_kwarg("step_size")),
    MultiStepLR: _Spec(_scale_milestones),
    ExponentialLR: _Spec(_root_gamma),
}

# Param group entries that torch schedulers write; saved so a resume restores them exactly.
_GROUP_KEYS = (
    "lr",
    "initial_lr",
    "max_lr",
    "min_lr",
    "momentum",
    "betas",
    "max_momentum",
    "base_momentum",
)


@dataclass
class _Window:
    """A phase resolved against the training length, with its torch scheduler once open."""

    phase: Phase
    cls: type[LRScheduler]
    kwargs: dict[str, Any]
    begin: int
    end: int
    by_epoch: bool
    spec: _Spec
    cycle: int = 0
    """Which cycle of a phase without ``end`` (0: the first, or a phase with an end)."""
    index: int = 0
    """The phase's place in the schedule."""
    scheduler: LRScheduler | None = None

    @property
    def name(self) -> str:
        return self.phase.name

    @property
    def key(self) -> tuple[int, int]:
        return (self.index, self.cycle)

    def unit(self, count: int) -> str:
        return f"{'epoch' if self.by_epoch else 'step'} {count}"


class _ScratchOptimizer(torch.optim.Optimizer):
    """A stand-in with the real optimizer's groups, to try-build schedulers up front."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        groups = [
            {
                **copy.deepcopy({k: v for k, v in g.items() if k != "params"}),
                "params": [torch.zeros(1)],
            }
            for g in optimizer.param_groups
        ]
        super().__init__(groups, dict(optimizer.defaults))


def _plain(value: Any) -> Any:
    """Python numbers instead of scalar tensors, so a state loads with weights_only=True."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _set(group: dict[str, Any], key: str, value: Any) -> None:
    # A tensor lr (capturable/fused optimizers) must keep its identity: fill it in place.
    current = group.get(key)
    if isinstance(current, torch.Tensor) and not isinstance(value, torch.Tensor):
        current.fill_(value)
    else:
        group[key] = value


def _class_and_kwargs(phase: Phase) -> tuple[type, dict[str, Any]]:
    factory = phase.factory
    if isinstance(factory, functools.partial):
        if factory.args:
            raise ValueError(
                f"{phase.name}: the scheduler factory has positional arguments "
                f"{factory.args!r}; pass them by keyword."
            )
        target, kwargs = factory.func, dict(factory.keywords)
    else:
        target, kwargs = factory, {}
    if not isinstance(target, type):
        raise ValueError(
            f"{phase.name}._target_={target!r} is not a class; point it at a torch.optim."
            "lr_scheduler class such as CosineAnnealingLR."
        )
    # str Enums from structured configs (anneal_strategy) would land in torch's state_dict,
    # which then no longer loads with weights_only=True.
    return target, {k: v.value if isinstance(v, Enum) else v for k, v in kwargs.items()}


def _resolve(
    phase: Phase,
    *,
    epoch_length: int,
    total_steps: int,
    cycles: Sequence[tuple[int, int]],
    notes: list[tuple[int, str]],
) -> list[_Window]:
    """The phase's windows in its stepping unit.

    One window for a phase with an ``end``; for one without, a window per cycle (the
    first from the phase's own ``begin``, the later ones from the cycle's start). None
    when the phase opens after training ends. What the run's length does to the phase
    (cut short, skipped) and a milestone that never comes go to ``notes``, as (logging
    level, message).
    """
    name = phase.name
    cls, kwargs = _class_and_kwargs(phase)
    spec = next((_SPECS[c] for c in cls.__mro__ if c in _SPECS), None)
    if spec is None:
        supported = ", ".join(sorted(c.__name__ for c in _SPECS))
        what = " with convert_to_iter_based" if phase.convert_to_iter_based else ""
        raise ValueError(
            f"{name}._target_={cls.__module__}.{cls.__qualname__} is not supported{what}; "
            f"use one of torch.optim.lr_scheduler.{{{supported}}}."
        )
    if phase.convert_to_iter_based and not phase.by_epoch:
        raise ValueError(
            f"{name}.convert_to_iter_based=True needs {name}.by_epoch=True (it turns an "
            f"epoch-based phase into a step-based one); set {name}.convert_to_iter_based=False."
        )
    if cls is OneCycleLR and phase.by_epoch and not phase.convert_to_iter_based:
        raise ValueError(
            f"{name}.by_epoch=True, but OneCycleLR is stepped after every optimizer step; set "
            f"{name}.by_epoch=False (or {name}.convert_to_iter_based=True for epoch windows)."
        )
    if "last_epoch" in kwargs:
        raise ValueError(
            f"{name}.last_epoch={kwargs['last_epoch']!r}: the schedule counts from the "
            f"window's begin itself; remove {name}.last_epoch."
        )
    for key in (spec.window_kwarg, *spec.replaced):
        if key is not None and key in kwargs:
            raise ValueError(
                f"{name}.{key}={kwargs[key]!r}: the length comes from the window "
                f"(end - begin); remove {name}.{key} and set {name}.end instead."
            )

    total_epochs = math.ceil(total_steps / epoch_length)
    unit, total = ("epochs", total_epochs) if phase.by_epoch else ("steps", total_steps)
    begin = phase.begin
    if begin < 0:
        raise ValueError(f"{name}.begin={begin} is negative; set {name}.begin >= 0.")
    if begin >= total and (phase.end is None or begin < phase.end):
        # A short smoke run (trainer.max_epochs=1) must not fail on the full run's schedule.
        notes.append(
            (logging.INFO, f"{name} begins at {begin} {unit}, after training ends ({total} "
             f"{unit}): it is skipped.")
        )  # fmt: skip
        return []
    by_epoch = phase.by_epoch and not phase.convert_to_iter_based
    # (cycle, begin, end) in the unit the window is stepped in.
    spans: list[tuple[int, int, int]]
    if phase.end is not None:
        end = phase.end
        if end > total:
            notes.append(
                (logging.INFO, f"training ends ({total} {unit}) inside {name}'s window "
                 f"[{begin}, {end}): the phase keeps its shape and does not finish.")
            )  # fmt: skip
        if begin >= end:
            raise ValueError(
                f"{name}.begin={begin} is not before {name}.end={end} ({unit}); the window "
                f"[begin, end) must hold at least one; set {name}.begin < {end}."
            )
        scale = epoch_length if phase.convert_to_iter_based else 1
        spans = [(0, begin * scale, end * scale)]
    else:
        if phase.convert_to_iter_based:
            begin *= epoch_length

        def unit_of(steps: int) -> int:
            # A cycle ends (and the next starts) at the end of the epoch its step falls in.
            return math.ceil(steps / epoch_length) if by_epoch else steps

        spans = []
        for cycle, (start, stop) in enumerate(cycles):
            first = begin if cycle == 0 else max(begin, unit_of(start))
            if first < unit_of(stop):
                spans.append((cycle, first, unit_of(stop)))
    if phase.convert_to_iter_based:
        spec.convert(kwargs, epoch_length)
    windows = []
    for cycle, first, last in spans:
        window_kwargs = dict(kwargs)
        if spec.window_kwarg is not None:
            window_kwargs[spec.window_kwarg] = last - first
        windows.append(_Window(phase, cls, window_kwargs, first, last, by_epoch, spec, cycle))
    if cls is MultiStepLR and spans:
        length = spans[0][2] - spans[0][1]
        late = [m for m in kwargs.get("milestones", ()) if m >= length]
        if late:
            notes.append(
                (logging.WARNING, f"{name}.milestones: {late} (counted from begin) fall at or "
                 f"after the window's end ({length} {'epochs' if by_epoch else 'steps'} after "
                 "begin) and are ignored.")
            )  # fmt: skip
    return windows


def _names(keys: Sequence[tuple[str, int]]) -> list[str]:
    return [name if cycle == 0 else f"{name} (cycle {cycle + 1})" for name, cycle in keys]


def _span(window: _Window) -> tuple[int, int]:
    return (window.begin, window.end)


def _build(window: _Window, optimizer: torch.optim.Optimizer) -> LRScheduler:
    kwargs = dict(window.kwargs)
    if window.cls is OneCycleLR and kwargs.get("max_lr") is None:
        kwargs["max_lr"] = [float(g["lr"]) for g in optimizer.param_groups]
    try:
        return window.cls(optimizer, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(
            f"{window.name}: torch.optim.lr_scheduler.{window.cls.__name__}({kwargs}) "
            f"failed: {e}. Fix the arguments under {window.name}."
        ) from e


def _try_build(window: _Window, scratch: torch.optim.Optimizer) -> None:
    """Surfaces torch's argument checks at build time instead of when the window opens."""
    scheduler = _build(window, scratch)
    with warnings.catch_warnings():
        # The scratch optimizer never steps, which torch would warn about.
        warnings.simplefilter("ignore")
        try:
            scheduler.step()
        except (ValueError, ZeroDivisionError) as e:
            raise ValueError(
                f"{window.name}: torch.optim.lr_scheduler.{window.cls.__name__}"
                f"({window.kwargs}) failed on its first step: {e!r}. Fix the arguments "
                f"under {window.name}."
            ) from e


class LRSchedule:
    """The LR schedule of one optimizer: phases stepped per epoch or per optimizer step.

    Args:
        optimizer: The optimizer whose param groups' lr the phases set. Its current
            ``initial_lr`` (else ``lr``) is each group's base lr.
        phases: The phases, in config order (which is the order overlapping ones apply).
        epoch_length: Optimizer steps per epoch.
        total_steps: Optimizer steps of the whole training; the last epoch may be partial.

    Raises:
        ValueError: A phase is misconfigured; the message names its key.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        phases: Sequence[Phase],
        *,
        epoch_length: int,
        total_steps: int,
    ) -> None:
        if epoch_length < 1 or total_steps < 1:
            raise ValueError(
                f"LRSchedule(epoch_length={epoch_length}, total_steps={total_steps}): both "
                "must be >= 1; train for at least one optimizer step."
            )
        self.optimizer = optimizer
        self._phases = tuple(phases)
        self._epoch_length = epoch_length
        self._target_steps = total_steps
        """This run's length, which :meth:`extend` fits a restored schedule to."""
        self._total_steps = total_steps
        """The length the windows are built for (a restored schedule's until extended)."""
        self._cycles = [(0, total_steps)]
        """The windows of the phases without ``end``, in optimizer steps."""
        for group in optimizer.param_groups:
            lr = group["lr"]
            group.setdefault("initial_lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)
        # Kept apart from group["initial_lr"], which OneCycleLR overwrites with max_lr / div_factor.
        self._base_lrs = [float(g["initial_lr"]) for g in optimizer.param_groups]
        self._windows = self._resolve(total_steps, self._cycles)
        scratch = _ScratchOptimizer(optimizer)
        for window in self._windows:
            _try_build(window, scratch)
        self._steps = 0
        self._epochs = 0
        for window in self._windows:
            if window.begin == 0:
                self._open(window)

    @property
    def last_lr(self) -> list[float]:
        """The current lr of every param group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def step_iter(self) -> None:
        """Advances the step-based phases; call after every optimizer step."""
        self._steps += 1
        self._advance(by_epoch=False)

    def step_epoch(self) -> None:
        """Advances the epoch-based phases; call at the end of every epoch."""
        self._epochs += 1
        self._advance(by_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        """Counters, base lrs, length and cycles, the lr-related param group entries and each
        open phase's state.

        Plain containers and numbers only: it loads with ``torch.load(weights_only=True)``.
        """
        return {
            "steps": self._steps,
            "epochs": self._epochs,
            "base_lrs": list(self._base_lrs),
            "total_steps": self._total_steps,
            "cycles": [list(cycle) for cycle in self._cycles],
            "param_groups": [
                {k: _plain(g[k]) for k in _GROUP_KEYS if k in g}
                for g in self.optimizer.param_groups
            ],
            "phases": [
                {
                    "name": w.name,
                    "cycle": w.cycle,
                    "scheduler": None
                    if w.scheduler is None
                    else copy.deepcopy(w.scheduler.state_dict()),
                }
                for w in self._windows
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned, so the lr sequence continues exactly.

        The schedule comes back as it was saved, for the training length it was saved
        with; when this run is longer or shorter, :meth:`extend` then fits it to this
        run's length. Call it on a schedule built with the same phases, before or after
        loading the optimizer's own state.

        Raises:
            ValueError: The checkpoint's phases or windows differ from this schedule's.
        """
        if "total_steps" in state:
            total = int(state["total_steps"])
            cycles = [(int(start), int(stop)) for start, stop in state["cycles"]]
            with warnings.catch_warnings():
                # This run's own schedule warned when it was built.
                warnings.simplefilter("ignore")
                windows = self._resolve(total, cycles)
        else:  # saved before schedules recorded their length: taken to be this run's
            total, cycles, windows = self._total_steps, self._cycles, self._windows
        saved_keys = [(p["name"], int(p.get("cycle", 0))) for p in state["phases"]]
        keys = [(w.name, w.cycle) for w in windows]
        if saved_keys != keys:
            raise ValueError(
                f"The checkpoint's LR schedule has phases {_names(saved_keys)}, this run's "
                f"scheduler has {_names(keys)}; resume with the scheduler config the run was "
                "started with."
            )
        groups = self.optimizer.param_groups
        if len(state["param_groups"]) != len(groups):
            raise ValueError(
                f"The checkpoint's LR schedule covers {len(state['param_groups'])} param "
                f"groups, the optimizer has {len(groups)}; resume with the same optim config."
            )
        for window, saved in zip(windows, state["phases"], strict=True):
            if saved["scheduler"] is not None:
                self._check_window(window, saved["scheduler"])
        self._windows, self._total_steps, self._cycles = windows, total, cycles
        self._steps = int(state["steps"])
        self._epochs = int(state["epochs"])
        self._base_lrs = [float(lr) for lr in state["base_lrs"]]
        for window, saved in zip(self._windows, state["phases"], strict=True):
            window.scheduler = None
            if saved["scheduler"] is None:
                continue
            # Building mutates the param groups; they are restored below.
            scheduler = _build(window, self.optimizer)
            scheduler.load_state_dict(copy.deepcopy(saved["scheduler"]))
            window.scheduler = scheduler
        for group, values in zip(groups, state["param_groups"], strict=True):
            for key, value in values.items():
                _set(group, key, value)

    def extend(self, policy: ScheduleExtension) -> str | None:
        """Fit a restored schedule to this run's training length; say what changed.

        The phases without ``end`` ran to the end of the saved run. On a longer run they
        start again over the added steps (``restart``), take the windows they would have
        had on this length from the start, the lr following them from here (``stretch``),
        or keep their windows, the lr holding after them (``hold``). A shorter run keeps
        the saved schedule and ends inside it, except with ``stretch``. Phases with an
        ``end`` keep their windows; one that began after the saved run's end opens when
        its window begins.

        Returns:
            What the schedule does from here on, or None when the length is unchanged.
        """
        old, new = self._total_steps, self._target_steps
        if old == new:
            return None
        cycles = list(self._cycles)
        if policy is ScheduleExtension.stretch:
            cycles = [c for c in cycles if c[0] < new]
            cycles[-1] = (cycles[-1][0], new)
        elif policy is ScheduleExtension.restart and new > old:
            cycles.append((old, new))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the schedule of this length warned when built
            windows = self._resolve(new, cycles)
        before = {w.key: w for w in self._windows}
        added = [w for w in windows if w.key not in before]
        scratch = _ScratchOptimizer(self.optimizer)
        for window in added:
            _try_build(window, scratch)
        moved = [w for w in windows if w.key in before and (w.begin, w.end) != _span(before[w.key])]
        self._windows, self._total_steps, self._cycles = windows, new, cycles
        if moved:
            # A window that changed length cannot keep its scheduler's state: replay.
            self.fast_forward(steps=self._steps, epochs=self._epochs)
        else:
            for window in windows:
                if window.key in before:
                    window.scheduler = before[window.key].scheduler
            # Opened as the loop would have opened them here: step-based ones first.
            for by_epoch in (False, True):
                for window in added:
                    due = window.by_epoch == by_epoch and self._position(window) == window.begin
                    if due and window.scheduler is None:
                        self._open(window)
        return self._describe_extension(policy, old, new, added, moved, before)

    def lrs_ahead(self, steps: int) -> list[float]:
        """The lr (of the first param group) at each of the next ``steps`` optimizer steps.

        Computed on a copy of the schedule; this one and its optimizer are left as they are.
        """
        scratch = _ScratchOptimizer(self.optimizer)
        lrs = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no optimizer steps, and the phases warned already
            twin = LRSchedule(
                scratch,
                self._phases,
                epoch_length=self._epoch_length,
                total_steps=self._total_steps,
            )
            twin.load_state_dict(self.state_dict())
            for _ in range(steps):
                lrs.append(float(scratch.param_groups[0]["lr"]))
                twin.step_iter()
                if twin._steps % self._epoch_length == 0:
                    twin.step_epoch()
        return lrs

    def fast_forward(self, *, steps: int, epochs: int) -> None:
        """Replay the schedule from its start to ``steps`` optimizer steps and ``epochs`` epochs.

        For a run resumed with a schedule that no longer fits the saved one: the lr
        continues on this schedule as if it had been followed from the start.
        """
        for group, base_lr in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            _set(group, "lr", base_lr)
            _set(group, "initial_lr", base_lr)
        for window in self._windows:
            window.scheduler = None
        self._steps = self._epochs = 0
        for window in self._windows:
            if window.begin == 0:
                self._open(window)
        with warnings.catch_warnings():
            # No optimizer steps happen during a replay, which torch would warn about.
            warnings.simplefilter("ignore")
            for step in range(1, steps + 1):
                self.step_iter()
                if step % self._epoch_length == 0 and self._epochs < epochs:
                    self.step_epoch()
            while self._epochs < epochs:
                self.step_epoch()

    def _resolve(self, total_steps: int, cycles: Sequence[tuple[int, int]]) -> list[_Window]:
        windows = []
        self.notes: list[tuple[int, str]] = []
        """What this length does to the phases (logging level, message), for the run's log."""
        for index, phase in enumerate(self._phases):
            for window in _resolve(
                phase,
                epoch_length=self._epoch_length,
                total_steps=total_steps,
                cycles=cycles,
                notes=self.notes,
            ):
                window.index = index
                windows.append(window)
        return windows

    def _describe_extension(
        self,
        policy: ScheduleExtension,
        old: int,
        new: int,
        added: list[_Window],
        moved: list[_Window],
        before: dict[tuple[int, int], _Window],
    ) -> str:
        if new < old and policy is not ScheduleExtension.stretch:
            return (
                f"the schedule keeps the shape it had for {old} steps and is cut at step {new} "
                "(trainer.extend_schedule=stretch would fit it to the new end)"
            )
        parts = []
        for window in moved:
            was = before[window.key]
            parts.append(
                f"{window.name} now ends at {window.unit(window.end)} (was {was.unit(was.end)})"
            )
        for window in added:
            again = any(w.index == window.index and w.cycle < window.cycle for w in self._windows)
            verb = "starts again" if again else "opens"
            parts.append(
                f"{window.name} {verb} at {window.unit(window.begin)} and runs to "
                f"{window.unit(window.end)}"
            )
        if moved:
            parts.append(f"the lr follows the schedule of a {new}-step run from here")
        if not parts:
            ended = [w for w in self._windows if w.phase.end is None]
            last = max(ended, key=lambda w: w.end, default=None)
            parts.append(
                "the phases ended"
                if last is None
                else f"{last.name} ended at {last.unit(last.end)}"
            )
            parts.append("the lr holds where the schedule left it")
        return "; ".join(parts)

    def _check_window(self, window: _Window, saved: dict[str, Any]) -> None:
        key = window.spec.window_kwarg
        if key is not None and saved.get(key) != window.kwargs[key]:
            unit = "epochs" if window.by_epoch else "steps"
            raise ValueError(
                f"{window.name}: the checkpoint's window is {saved.get(key)} {unit} long, this "
                f"run's is {window.kwargs[key]} (end - begin); resume with the {window.name}.end "
                "and training length the run was started with."
            )

    def _position(self, window: _Window) -> int:
        return self._epochs if window.by_epoch else self._steps

    def _advance(self, *, by_epoch: bool) -> None:
        # Windows that end here finish first, so a window opening here sees them closed.
        for window in self._windows:
            if window.by_epoch != by_epoch or window.scheduler is None:
                continue
            position = self._position(window)
            if position < window.end or window.spec.closes:
                window.scheduler.step()
            if position >= window.end:
                window.scheduler = None
        for window in self._windows:
            if window.by_epoch == by_epoch and self._position(window) == window.begin:
                self._open(window)

    def _open(self, window: _Window) -> None:
        assert window.scheduler is None, f"{window.name} opened twice"
        if all(w.scheduler is None for w in self._windows):
            # torch's SequentialLR: a phase that follows others starts from the base lr.
            for group, base_lr in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
                _set(group, "lr", base_lr)
                _set(group, "initial_lr", base_lr)
        window.scheduler = _build(window, self.optimizer)
