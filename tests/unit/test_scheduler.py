"""LRSchedule against torch's own schedulers, hand-computed values and resumes."""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as lrs

from xp.config import AnnealStrategy, ScheduleExtension
from xp.scheduler import LRSchedule, Phase

RESTART = ScheduleExtension.restart

BASE_LRS = (0.1, 0.4)
EPOCH_LENGTH = 3
EPOCHS = 4
STEPS = EPOCH_LENGTH * EPOCHS


def make_optimizer() -> torch.optim.Optimizer:
    """Two param groups with different lrs, so per-group handling is exercised."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in BASE_LRS]
    return torch.optim.SGD(groups, lr=BASE_LRS[0], momentum=0.9)


def phase(cls: type, **kwargs: Any) -> Phase:
    """A Phase as xp.run builds it: the torch class with its kwargs, xp's settings apart."""
    own = {
        k: kwargs.pop(k)
        for k in ("begin", "end", "by_epoch", "convert_to_iter_based")
        if k in kwargs
    }
    return Phase(factory=partial(cls, **kwargs), name="scheduler.p", **own)


def run(
    schedule: LRSchedule,
    optimizer: torch.optim.Optimizer,
    steps: range,
    epoch_length: int = EPOCH_LENGTH,
) -> list[list[float]]:
    """The lrs each optimizer step in ``steps`` uses, stepping the schedule like the loop."""
    used = []
    for step in steps:
        used.append(schedule.last_lr)
        optimizer.step()
        schedule.step_iter()
        if (step + 1) % epoch_length == 0:
            schedule.step_epoch()
    return used


def run_torch(
    optimizer: torch.optim.Optimizer,
    scheduler: lrs.LRScheduler,
    *,
    by_epoch: bool,
    total_steps: int = STEPS,
) -> list[list[float]]:
    """The same for a torch scheduler stepped directly."""
    used = []
    for step in range(total_steps):
        used.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        if not by_epoch or (step + 1) % EPOCH_LENGTH == 0:
            scheduler.step()
    return used


def schedule_lrs(*phases: Phase, total_steps: int = STEPS) -> list[list[float]]:
    optimizer = make_optimizer()
    schedule = LRSchedule(optimizer, phases, epoch_length=EPOCH_LENGTH, total_steps=total_steps)
    return run(schedule, optimizer, range(total_steps))


def assert_lrs(actual: list[list[float]], expected: list[list[float]]) -> None:
    """Every step's lr of every group agrees (pytest.approx does not nest)."""
    assert len(actual) == len(expected)
    assert [x for row in actual for x in row] == pytest.approx(
        [x for row in expected for x in row], rel=1e-9, abs=1e-15
    )


def per_step(lrs_of_base: list[float]) -> list[list[float]]:
    """Hand-computed factors of the base lr -> expected lrs of both groups."""
    return [[base * f for base in BASE_LRS] for f in lrs_of_base]


# (our phase, the torch scheduler with equivalent arguments, is that one stepped per epoch)
SINGLE_PHASES = {
    "constant_epoch": (
        phase(lrs.ConstantLR, factor=0.5, end=2),
        partial(lrs.ConstantLR, factor=0.5, total_iters=2),
        True,
    ),
    "constant_step": (
        phase(lrs.ConstantLR, factor=0.5, end=5, by_epoch=False),
        partial(lrs.ConstantLR, factor=0.5, total_iters=5),
        False,
    ),
    "step_epoch": (
        phase(lrs.StepLR, step_size=1, gamma=0.5),
        partial(lrs.StepLR, step_size=1, gamma=0.5),
        True,
    ),
    "step_step": (
        phase(lrs.StepLR, step_size=4, gamma=0.5, by_epoch=False),
        partial(lrs.StepLR, step_size=4, gamma=0.5),
        False,
    ),
    "multistep_epoch": (
        phase(lrs.MultiStepLR, milestones=[1, 3], gamma=0.1),
        partial(lrs.MultiStepLR, milestones=[1, 3], gamma=0.1),
        True,
    ),
    "multistep_step": (
        phase(lrs.MultiStepLR, milestones=[4, 9], gamma=0.1, by_epoch=False),
        partial(lrs.MultiStepLR, milestones=[4, 9], gamma=0.1),
        False,
    ),
    "cosine_epoch": (
        phase(lrs.CosineAnnealingLR, eta_min=0.01),
        partial(lrs.CosineAnnealingLR, T_max=EPOCHS, eta_min=0.01),
        True,
    ),
    "cosine_step": (
        phase(lrs.CosineAnnealingLR, eta_min=0.01, by_epoch=False),
        partial(lrs.CosineAnnealingLR, T_max=STEPS, eta_min=0.01),
        False,
    ),
    "linear_epoch": (
        phase(lrs.LinearLR, start_factor=0.25, end=3),
        partial(lrs.LinearLR, start_factor=0.25, total_iters=3),
        True,
    ),
    "linear_step": (
        phase(lrs.LinearLR, start_factor=0.25, end_factor=0.5, end=7, by_epoch=False),
        partial(lrs.LinearLR, start_factor=0.25, end_factor=0.5, total_iters=7),
        False,
    ),
    "exponential_epoch": (
        phase(lrs.ExponentialLR, gamma=0.7),
        partial(lrs.ExponentialLR, gamma=0.7),
        True,
    ),
    "polynomial_step": (
        phase(lrs.PolynomialLR, power=2.0, end=8, by_epoch=False),
        partial(lrs.PolynomialLR, power=2.0, total_iters=8),
        False,
    ),
    "onecycle_step": (
        phase(lrs.OneCycleLR, max_lr=None, by_epoch=False),
        partial(lrs.OneCycleLR, max_lr=list(BASE_LRS), total_steps=STEPS),
        False,
    ),
    "onecycle_explicit_max_lr": (
        phase(lrs.OneCycleLR, max_lr=1.0, pct_start=0.5, anneal_strategy="linear", by_epoch=False),
        partial(
            lrs.OneCycleLR, max_lr=1.0, pct_start=0.5, anneal_strategy="linear", total_steps=STEPS
        ),
        False,
    ),
}


@pytest.mark.parametrize("case", SINGLE_PHASES)
def test_single_phase_matches_torch(case: str) -> None:
    ours, theirs, by_epoch = SINGLE_PHASES[case]
    optimizer = make_optimizer()
    expected = run_torch(optimizer, theirs(optimizer), by_epoch=by_epoch)
    assert_lrs(schedule_lrs(ours), expected)


def test_constant_window_shorter_than_training_restores_the_lr() -> None:
    used = schedule_lrs(phase(lrs.ConstantLR, factor=0.5, end=2))
    assert used == per_step([0.5] * 6 + [1.0] * 6)


def test_warmup_then_cosine_matches_sequential_lr() -> None:
    total = 20
    warmup = phase(lrs.LinearLR, start_factor=0.01, end=5, by_epoch=False)
    cosine = phase(lrs.CosineAnnealingLR, eta_min=0.0, begin=5, by_epoch=False)
    used = schedule_lrs(warmup, cosine, total_steps=total)

    optimizer = make_optimizer()
    sequential = lrs.SequentialLR(
        optimizer,
        [
            lrs.LinearLR(optimizer, start_factor=0.01, total_iters=5),
            lrs.CosineAnnealingLR(optimizer, T_max=total - 5),
        ],
        milestones=[5],
    )
    assert_lrs(used, run_torch(optimizer, sequential, by_epoch=False, total_steps=total))

    base = BASE_LRS[0]
    assert used[0][0] == pytest.approx(base * 0.01)
    assert used[4][0] == pytest.approx(base * (0.01 + 0.99 * 4 / 5))
    assert used[5][0] == pytest.approx(base)  # the cosine restarts from the base lr
    for k in (1, 7, 14):
        assert used[5 + k][0] == pytest.approx(base * (1 + math.cos(math.pi * k / 15)) / 2)


def test_converted_cosine_is_a_step_cosine_over_all_steps() -> None:
    converted = schedule_lrs(phase(lrs.CosineAnnealingLR, eta_min=0.01, convert_to_iter_based=True))
    stepwise = schedule_lrs(phase(lrs.CosineAnnealingLR, eta_min=0.01, by_epoch=False))
    assert_lrs(converted, stepwise)
    for step in (0, 1, 5, 11):
        cos = (1 + math.cos(math.pi * step / STEPS)) / 2
        assert converted[step] == pytest.approx([0.01 + (b - 0.01) * cos for b in BASE_LRS])


def test_converted_step_lr_decays_at_step_size_times_epoch_length() -> None:
    used = schedule_lrs(phase(lrs.StepLR, step_size=2, gamma=0.1, convert_to_iter_based=True))
    assert_lrs(used, per_step([1.0] * 6 + [0.1] * 6))


def test_converted_exponential_matches_epochs_at_epoch_boundaries() -> None:
    used = schedule_lrs(phase(lrs.ExponentialLR, gamma=0.5, convert_to_iter_based=True))
    for epoch in range(EPOCHS):
        assert used[epoch * EPOCH_LENGTH] == pytest.approx(per_step([0.5**epoch])[0])
    assert used[1][0] == pytest.approx(BASE_LRS[0] * 0.5 ** (1 / EPOCH_LENGTH))


def test_converted_window_converts_begin_and_end() -> None:
    used = schedule_lrs(
        phase(lrs.LinearLR, start_factor=0.5, begin=1, end=3, convert_to_iter_based=True)
    )
    # Steps 3..8 warm up linearly over 6 steps; before and after, the base lr.
    expected = [1.0] * 3 + [0.5 + 0.5 * k / 6 for k in range(6)] + [1.0] * 3
    assert_lrs(used, per_step(expected))


def test_overlapping_phases_match_chained_scheduler() -> None:
    warmup = phase(lrs.LinearLR, start_factor=0.25, end=4, by_epoch=False)
    decay = phase(lrs.MultiStepLR, milestones=[6], gamma=0.1, by_epoch=False)
    used = schedule_lrs(warmup, decay)

    optimizer = make_optimizer()
    chained = lrs.ChainedScheduler(
        [
            lrs.LinearLR(optimizer, start_factor=0.25, total_iters=4),
            lrs.MultiStepLR(optimizer, milestones=[6], gamma=0.1),
        ]
    )
    assert_lrs(used, run_torch(optimizer, chained, by_epoch=False))


def test_step_warmup_composes_with_epoch_decay() -> None:
    warmup = phase(lrs.LinearLR, start_factor=0.25, end=4, by_epoch=False)
    decay = phase(lrs.MultiStepLR, milestones=[2], gamma=0.1)
    used = schedule_lrs(warmup, decay)
    expected = [(0.25 + 0.75 * min(s, 4) / 4) * (0.1 if s >= 6 else 1.0) for s in range(STEPS)]
    assert_lrs(used, per_step(expected))


def test_missing_end_is_the_end_of_training_with_a_partial_last_epoch() -> None:
    # 10 steps of 3: 4 epochs, the last one partial.
    used = schedule_lrs(phase(lrs.CosineAnnealingLR), total_steps=10)
    for step in range(10):
        epoch = step // EPOCH_LENGTH
        assert used[step][0] == pytest.approx(BASE_LRS[0] * (1 + math.cos(math.pi * epoch / 4)) / 2)

    used = schedule_lrs(phase(lrs.CosineAnnealingLR, convert_to_iter_based=True), total_steps=10)
    assert used[9][0] == pytest.approx(BASE_LRS[0] * (1 + math.cos(math.pi * 9 / 10)) / 2)


def test_lr_holds_after_the_window() -> None:
    step = schedule_lrs(phase(lrs.StepLR, step_size=1, gamma=0.5, end=2))
    assert_lrs(step, per_step([1.0] * 3 + [0.5] * 9))

    cosine = schedule_lrs(phase(lrs.CosineAnnealingLR, eta_min=0.01, end=2))
    assert_lrs(cosine[6:], [[0.01, 0.01]] * 6)


def test_phase_does_not_touch_the_lr_before_its_window() -> None:
    used = schedule_lrs(phase(lrs.LinearLR, start_factor=0.5, begin=2, end=3))
    assert_lrs(used, per_step([1.0] * 6 + [0.5] * 3 + [1.0] * 3))


def test_gap_between_phases_holds_then_next_phase_restarts_from_base() -> None:
    first = phase(lrs.OneCycleLR, max_lr=None, end=5, by_epoch=False)
    second = phase(lrs.ConstantLR, factor=0.5, begin=7, end=9, by_epoch=False)
    used = schedule_lrs(first, second)
    assert used[5] == used[6] == used[4]
    assert_lrs(used[7:], per_step([0.5, 0.5, 1.0, 1.0, 1.0]))


# ----------------------------------------------------------------------------- resume


def warmup_cosine() -> list[Phase]:
    return [
        phase(lrs.LinearLR, start_factor=0.01, end=5, by_epoch=False),
        phase(lrs.CosineAnnealingLR, eta_min=0.001, begin=5, by_epoch=False),
        phase(lrs.MultiStepLR, milestones=[2], gamma=0.5),
    ]


def onecycle_then_cosine() -> list[Phase]:
    return [
        phase(
            lrs.OneCycleLR, max_lr=None, anneal_strategy=AnnealStrategy.cos, end=5, by_epoch=False
        ),
        phase(lrs.CosineAnnealingLR, begin=2, convert_to_iter_based=True),
    ]


def through_bytes(state: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("phases", [warmup_cosine, onecycle_then_cosine])
@pytest.mark.parametrize("stop", [0, 3, 5, 6, 8, 11])
@pytest.mark.parametrize("optimizer_first", [False, True])
def test_resume_continues_the_exact_lr_sequence(phases, stop: int, optimizer_first: bool) -> None:
    def build(optimizer: torch.optim.Optimizer) -> LRSchedule:
        return LRSchedule(optimizer, phases(), epoch_length=EPOCH_LENGTH, total_steps=STEPS)

    reference_optimizer = make_optimizer()
    reference = run(build(reference_optimizer), reference_optimizer, range(STEPS))

    optimizer = make_optimizer()
    schedule = build(optimizer)
    before = run(schedule, optimizer, range(stop))
    saved = through_bytes({"optim": optimizer.state_dict(), "schedule": schedule.state_dict()})

    optimizer = make_optimizer()
    if optimizer_first:
        optimizer.load_state_dict(saved["optim"])
        schedule = build(optimizer)
    else:
        schedule = build(optimizer)
        optimizer.load_state_dict(saved["optim"])
    schedule.load_state_dict(saved["schedule"])
    after = run(schedule, optimizer, range(stop, STEPS))
    assert before + after == reference
    assert [g["momentum"] for g in optimizer.param_groups] == [
        g["momentum"] for g in reference_optimizer.param_groups
    ]


def test_resume_with_other_phases_or_windows_is_refused() -> None:
    optimizer = make_optimizer()
    schedule = LRSchedule(optimizer, warmup_cosine(), epoch_length=EPOCH_LENGTH, total_steps=STEPS)
    run(schedule, optimizer, range(7))
    state = schedule.state_dict()

    fewer = LRSchedule(make_optimizer(), warmup_cosine()[:2], epoch_length=3, total_steps=STEPS)
    with pytest.raises(ValueError, match="resume with the scheduler config"):
        fewer.load_state_dict(state)

    # A longer run is no longer refused (see the extension tests below); a phase whose own
    # window moved still is.
    moved = warmup_cosine()
    moved[1] = phase(lrs.CosineAnnealingLR, eta_min=0.001, begin=4, by_epoch=False)
    other = LRSchedule(make_optimizer(), moved, epoch_length=3, total_steps=STEPS)
    with pytest.raises(ValueError, match=r"scheduler\.p: the checkpoint's window is 7 steps"):
        other.load_state_dict(state)


def test_a_checkpoint_from_before_schedules_saved_their_length_still_resumes() -> None:
    optimizer = make_optimizer()
    schedule = LRSchedule(optimizer, warmup_cosine(), epoch_length=EPOCH_LENGTH, total_steps=STEPS)
    reference = run(schedule, optimizer, range(STEPS))
    optimizer = make_optimizer()
    schedule = LRSchedule(optimizer, warmup_cosine(), epoch_length=EPOCH_LENGTH, total_steps=STEPS)
    run(schedule, optimizer, range(7))
    old = schedule.state_dict()
    del old["total_steps"], old["cycles"]
    for entry in old["phases"]:
        del entry["cycle"]
    resumed = LRSchedule(optimizer, warmup_cosine(), epoch_length=EPOCH_LENGTH, total_steps=STEPS)
    resumed.load_state_dict(through_bytes(old))
    assert resumed.extend(ScheduleExtension.restart) is None
    assert run(resumed, optimizer, range(7, STEPS)) == reference[7:]


# ----------------------------------------------------------------------------- extension
# trainer.max_epochs=5, then resume=<run> trainer.max_epochs=8: the phases without an end
# ran to the end of the first run; trainer.extend_schedule says what they do after it.


def default_schedule() -> list[Phase]:
    """conf/scheduler/warmup_cosine.yaml: a warmup of 5 steps, then a cosine to the end."""
    return [
        phase(lrs.LinearLR, start_factor=0.01, end=5, by_epoch=False),
        phase(lrs.CosineAnnealingLR, begin=5, by_epoch=False),
    ]


def stopped_at(
    phases: Callable[[], list[Phase]], step: int, total: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The optimizer's and the schedule's saved states of a run of ``total`` steps at ``step``."""
    optimizer = make_optimizer()
    schedule = LRSchedule(optimizer, phases(), epoch_length=EPOCH_LENGTH, total_steps=total)
    run(schedule, optimizer, range(step))
    return through_bytes((optimizer.state_dict(), schedule.state_dict()))


def resumed(
    phases: Callable[[], list[Phase]],
    saved: tuple[dict[str, Any], dict[str, Any]],
    total: int,
    policy: ScheduleExtension,
) -> tuple[LRSchedule, torch.optim.Optimizer, str | None]:
    """The saved run resumed with ``total`` steps, as the trainer does it."""
    optimizer = make_optimizer()
    schedule = LRSchedule(optimizer, phases(), epoch_length=EPOCH_LENGTH, total_steps=total)
    optimizer.load_state_dict(saved[0])
    schedule.load_state_dict(saved[1])
    return schedule, optimizer, schedule.extend(policy)


def reference(phases: Callable[[], list[Phase]], total: int) -> list[list[float]]:
    """The lrs of a run planned for ``total`` steps from the start."""
    optimizer = make_optimizer()
    schedule = LRSchedule(optimizer, phases(), epoch_length=EPOCH_LENGTH, total_steps=total)
    return run(schedule, optimizer, range(total))


def cosine(k: int, length: int) -> float:
    return (1 + math.cos(math.pi * k / length)) / 2


def test_extending_a_finished_run_restarts_the_phases_that_ran_to_its_end() -> None:
    finished = stopped_at(default_schedule, 12, 12)
    assert finished[1]["param_groups"][0]["lr"] == pytest.approx(0.0)  # the cosine's end
    schedule, optimizer, said = resumed(default_schedule, finished, 20, ScheduleExtension.restart)
    assert said == "scheduler.p starts again at step 12 and runs to step 20"
    assert schedule.lrs_ahead(8) == pytest.approx([cosine(k, 8) * BASE_LRS[0] for k in range(8)])
    used = run(schedule, optimizer, range(12, 20))
    # A warm restart (SGDR): the cosine again, from the base lr to 0 over the added steps.
    assert_lrs(used, per_step([cosine(k, 8) for k in range(8)]))
    assert schedule.last_lr == pytest.approx([0.0, 0.0])

    # The extended run, stopped and resumed with its own length, continues exactly.
    schedule, optimizer, _ = resumed(default_schedule, finished, 20, ScheduleExtension.restart)
    run(schedule, optimizer, range(12, 15))
    saved = through_bytes((optimizer.state_dict(), schedule.state_dict()))
    again, optimizer, said = resumed(default_schedule, saved, 20, ScheduleExtension.restart)
    assert said is None
    assert run(again, optimizer, range(15, 20)) == used[3:]


def test_a_stopped_run_extended_restarts_where_it_would_have_ended() -> None:
    # Stopped at step 7 of 12 and resumed with 20: the cosine still ends at 12, then starts
    # again, as if the run had finished and been extended. Where it stopped does not matter.
    stopped, optimizer, said = resumed(
        default_schedule, stopped_at(default_schedule, 7, 12), 20, RESTART
    )
    assert said == "scheduler.p starts again at step 12 and runs to step 20"
    used = run(stopped, optimizer, range(7, 20))
    assert used[:5] == reference(default_schedule, 12)[7:]
    assert_lrs(used[5:], per_step([cosine(k, 8) for k in range(8)]))


def test_stretch_follows_the_longer_runs_schedule_from_the_resumed_step() -> None:
    longer = reference(default_schedule, 20)
    for step in (7, 12):
        saved = stopped_at(default_schedule, step, 12)
        schedule, optimizer, said = resumed(default_schedule, saved, 20, ScheduleExtension.stretch)
        assert said == (
            "scheduler.p now ends at step 20 (was step 12); the lr follows the schedule of a "
            "20-step run from here"
        )
        assert_lrs(run(schedule, optimizer, range(step, 20)), longer[step:])


def test_hold_keeps_the_ended_schedule_and_says_so() -> None:
    def decay() -> list[Phase]:
        return [phase(lrs.CosineAnnealingLR, eta_min=0.01, by_epoch=False)]

    schedule, optimizer, said = resumed(
        decay, stopped_at(decay, 12, 12), 20, ScheduleExtension.hold
    )
    assert said == "scheduler.p ended at step 12; the lr holds where the schedule left it"
    assert_lrs(run(schedule, optimizer, range(12, 20)), [[0.01, 0.01]] * 8)


def test_a_phase_that_began_after_a_short_run_opens_in_its_extension() -> None:
    # A smoke run of 12 steps never reached the cosine (begin=24); extended to 36 steps, the
    # warmup finishes and the cosine opens where it would have in a 36-step run.
    def late() -> list[Phase]:
        return [
            phase(lrs.LinearLR, start_factor=0.5, end=24, by_epoch=False),
            phase(lrs.CosineAnnealingLR, begin=24, by_epoch=False),
        ]

    saved = stopped_at(late, 12, 12)
    schedule, optimizer, said = resumed(late, saved, 36, RESTART)
    assert said == "scheduler.p opens at step 24 and runs to step 36"
    assert_lrs(run(schedule, optimizer, range(12, 36)), reference(late, 36)[12:])


def test_epoch_phases_restart_at_the_end_of_the_epoch_the_run_ended_in() -> None:
    # 10 steps of 3 per epoch: the first run ended inside its 4th epoch, so the cosine over
    # epochs restarts when that epoch ends, at step 12.
    def by_epoch() -> list[Phase]:
        return [phase(lrs.CosineAnnealingLR)]

    schedule, optimizer, said = resumed(by_epoch, stopped_at(by_epoch, 10, 10), 18, RESTART)
    assert said == "scheduler.p starts again at epoch 4 and runs to epoch 6"
    used = run(schedule, optimizer, range(10, 18))
    assert_lrs(used, per_step([cosine(3, 4)] * 2 + [cosine(0, 2)] * 3 + [cosine(1, 2)] * 3))


def test_a_shorter_run_keeps_its_schedule_unless_stretched() -> None:
    saved = stopped_at(default_schedule, 7, 20)
    schedule, optimizer, said = resumed(default_schedule, saved, 12, RESTART)
    assert said == (
        "the schedule keeps the shape it had for 20 steps and is cut at step 12 "
        "(trainer.extend_schedule=stretch would fit it to the new end)"
    )
    assert run(schedule, optimizer, range(7, 12)) == reference(default_schedule, 20)[7:12]

    schedule, optimizer, _ = resumed(default_schedule, saved, 12, ScheduleExtension.stretch)
    assert_lrs(run(schedule, optimizer, range(7, 12)), reference(default_schedule, 12)[7:])


# ----------------------------------------------------------------------------- errors


ERRORS = {
    "convert_step_based": (
        phase(lrs.CosineAnnealingLR, by_epoch=False, convert_to_iter_based=True),
        r"scheduler\.p\.convert_to_iter_based=True needs scheduler\.p\.by_epoch=True",
    ),
    "convert_unsupported_class": (
        phase(lrs.CyclicLR, base_lr=0.1, max_lr=1.0, convert_to_iter_based=True),
        r"scheduler\.p\._target_=torch\.optim\.lr_scheduler\.CyclicLR is not supported "
        "with convert_to_iter_based",
    ),
    "unsupported_class": (
        phase(lrs.ReduceLROnPlateau),
        r"scheduler\.p\._target_=.*ReduceLROnPlateau is not supported; use one of",
    ),
    "t_max_given": (
        phase(lrs.CosineAnnealingLR, T_max=10),
        r"scheduler\.p\.T_max=10: .*set scheduler\.p\.end instead",
    ),
    "total_iters_given": (
        phase(lrs.LinearLR, total_iters=3),
        r"scheduler\.p\.total_iters=3: .*set scheduler\.p\.end instead",
    ),
    "constant_total_iters_given": (
        phase(lrs.ConstantLR, total_iters=3),
        r"scheduler\.p\.total_iters=3: .*set scheduler\.p\.end instead",
    ),
    "polynomial_total_iters_given": (
        phase(lrs.PolynomialLR, total_iters=3),
        r"scheduler\.p\.total_iters=3: .*set scheduler\.p\.end instead",
    ),
    "onecycle_total_steps_given": (
        phase(lrs.OneCycleLR, total_steps=3, by_epoch=False),
        r"scheduler\.p\.total_steps=3: .*set scheduler\.p\.end instead",
    ),
    "onecycle_by_epoch": (
        phase(lrs.OneCycleLR),
        r"scheduler\.p\.by_epoch=True, but OneCycleLR .* set scheduler\.p\.by_epoch=False",
    ),
    "last_epoch_given": (
        phase(lrs.StepLR, step_size=1, last_epoch=3),
        r"scheduler\.p\.last_epoch=3",
    ),
    "begin_not_before_end": (
        phase(lrs.ConstantLR, begin=3, end=3),
        r"scheduler\.p\.begin=3 is not before scheduler\.p\.end=3 \(epochs\)",
    ),
    "negative_begin": (
        phase(lrs.ConstantLR, begin=-1, end=2),
        r"scheduler\.p\.begin=-1 is negative",
    ),
    "torch_rejects_arguments": (
        phase(lrs.LinearLR, start_factor=2.0),
        r"scheduler\.p: torch\.optim\.lr_scheduler\.LinearLR\(.*'start_factor': 2\.0",
    ),
    "torch_fails_first_step": (
        phase(lrs.StepLR, step_size=0),
        r"scheduler\.p: .*StepLR.*failed on its first step",
    ),
    "not_a_class": (
        Phase(factory=lambda optimizer: lrs.StepLR(optimizer, 1), name="scheduler.p"),
        r"scheduler\.p\._target_=.* is not a class",
    ),
}


@pytest.mark.parametrize("case", ERRORS)
def test_misconfigured_phase_names_its_key(case: str) -> None:
    bad, message = ERRORS[case]
    optimizer = make_optimizer()
    lr_before = [g["lr"] for g in optimizer.param_groups]
    with pytest.raises(ValueError, match=message):
        LRSchedule(optimizer, [bad], epoch_length=EPOCH_LENGTH, total_steps=STEPS)
    assert [g["lr"] for g in optimizer.param_groups] == lr_before


def test_a_run_shorter_than_the_schedule_says_what_it_does_instead_of_failing() -> None:
    """A smoke run (trainer.max_epochs=1) keeps the full run's schedule shape, and notes it
    (logged once by the strategy: no warning per rank, none per rebuild)."""
    optimizer = make_optimizer()
    warmup = phase(lrs.LinearLR, start_factor=0.5, end=24, by_epoch=False)
    decay = phase(lrs.CosineAnnealingLR, begin=24, by_epoch=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule = LRSchedule(
            optimizer, [warmup, decay], epoch_length=EPOCH_LENGTH, total_steps=STEPS
        )
    messages = " ".join(text for _, text in schedule.notes)
    assert "inside scheduler.p's window [0, 24)" in messages
    assert "begins at 24 steps, after training ends (12 steps): it is skipped" in messages
    used = run(schedule, optimizer, range(STEPS))
    # Still warming up over 24 steps: halfway through at the end of the 12-step run.
    expected = [[lr * (0.5 + 0.5 * t / 24) for lr in BASE_LRS] for t in range(STEPS)]
    assert torch.allclose(torch.tensor(used), torch.tensor(expected), rtol=1e-6)


def test_milestone_outside_the_window_is_a_warning_note() -> None:
    schedule = LRSchedule(
        make_optimizer(),
        [phase(lrs.MultiStepLR, milestones=[2, 5])],
        epoch_length=EPOCH_LENGTH,
        total_steps=STEPS,
    )
    ((level, text),) = schedule.notes
    assert level == logging.WARNING and "scheduler.p.milestones: [5]" in text
