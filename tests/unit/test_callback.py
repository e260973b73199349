"""Callbacks through a real Trainer on one process: events, errors, EarlyStopping, EMA, resume."""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from xp.__main__ import CONF_DIR
from xp.callback import (
    EMA,
    Callback,
    CallbackError,
    CallbackValueError,
    EarlyStopping,
    build_callbacks,
)
from xp.checkpoint import Checkpointer, CheckpointError, load_file
from xp.config import (
    AdamWConfig,
    CheckpointConfig,
    RandomnessConfig,
    TrainerConfig,
    register_schemas,
)
from xp.data import EpochLoader
from xp.export import export_model_state
from xp.export import main as export_main
from xp.metric import Accuracy
from xp.optim import OptimSpec
from xp.rundir import register_resolvers
from xp.strategy import SingleDeviceStrategy
from xp.task import SupervisedTask
from xp.trainer import Trainer, TrainingStopped, training_length


class Net(nn.Module):
    """A small classifier with a buffer (BatchNorm's statistics) beside its parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build(
    run_dir: Path,
    settings: TrainerConfig,
    callbacks: dict[str, Callback] | None = None,
    *,
    task: SupervisedTask | None = None,
    checkpoint: CheckpointConfig | None = None,
) -> Trainer:
    """8 steps an epoch of 16 samples, validation on 72; a checkpoint every 5 steps."""
    strategy = SingleDeviceStrategy(
        log_dir=run_dir,
        experiment_name="t",
        randomness=RandomnessConfig(seed=0),
        threads_per_process=1,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = x[:, :3].argmax(dim=1)
    train = EpochLoader(TensorDataset(x[:128], y[:128]), batch_size=16, shuffle=True, seed=0)
    val = EpochLoader(TensorDataset(x[128:], y[128:]), batch_size=32, shuffle=False, seed=0)
    length = training_length(settings, batches_per_epoch=len(train))
    prepared = strategy.prepare(
        Net, optim=OptimSpec(partial(torch.optim.AdamW, lr=3e-2), AdamWConfig(lr=3e-2))
    )
    return Trainer(
        strategy,
        prepared,
        train_loader=train,
        val_loader=val,
        settings=settings,
        length=length,
        checkpointer=Checkpointer(strategy.checkpoint_dir, keep=0),
        task=task or SupervisedTask(metrics={"acc": Accuracy()}),
        checkpoint=checkpoint or CheckpointConfig(interval_steps=5),
        callbacks=callbacks,
    )


def resume(trainer: Trainer) -> Trainer:
    """What ``resume=`` does: restore the newest checkpoint into a trainer built alike."""
    latest = trainer.checkpointer.latest()
    assert latest is not None
    trainer.load_state(trainer.strategy.resume(latest))
    return trainer


def assert_equal(a: Any, b: Any, where: str = "checkpoint") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def latest_state(trainer: Trainer) -> dict[str, Any]:
    path = trainer.checkpointer.latest()
    assert path is not None
    return load_file(path)


# --------------------------------------------------------------------------- events


class Recorder(Callback):
    """Notes every event it gets, with what the event carries."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def setup(self, trainer: Trainer) -> None:
        self.events.append(("setup",))

    def on_fit_start(self, trainer: Trainer) -> None:
        self.events.append(("fit_start", trainer.progress.step))

    def on_train_step_end(self, trainer: Trainer, step: int, values: Any) -> None:
        assert isinstance(values["loss"], torch.Tensor) and not values["loss"].requires_grad
        self.events.append(("step", step))

    def on_train_log(self, trainer: Trainer, step: int, metrics: Any) -> None:
        self.events.append(("log", step, "train/loss" in metrics and "train/lr" in metrics))

    def on_evaluate_start(self, trainer: Trainer, split: str) -> None:
        assert not trainer.model.training
        self.events.append(("evaluate", split))

    def on_evaluate_end(self, trainer: Trainer, split: str) -> None:
        self.events.append(("evaluated", split))

    def on_validation_end(self, trainer: Trainer, step: int, metrics: Any) -> None:
        self.events.append(("validated", step, sorted(metrics)))

    def on_checkpoint_saved(self, trainer: Trainer, step: int, path: Path) -> None:
        self.events.append(("saved", step, path.is_file()))

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        self.events.append(("fit_end", status))


def test_events_reach_a_callback_in_the_order_of_the_loop(tmp_path: Path) -> None:
    recorder = Recorder()
    settings = TrainerConfig(max_epochs=2, log_interval_steps=4)
    trainer = build(tmp_path, settings, {"rec": recorder})
    trainer.fit()
    trainer.strategy.teardown()

    def epoch(first: int) -> list[tuple[Any, ...]]:
        events: list[tuple[Any, ...]] = []
        for step in range(first, first + 8):
            events.append(("step", step))
            if step % 4 == 0:
                events.append(("log", step, True))
            if step % 5 == 0 and step % 8:
                events.append(("saved", step, True))
        end = first + 7
        return [
            *events,
            ("evaluate", "val"),
            ("evaluated", "val"),
            ("validated", end, ["val/acc", "val/loss"]),
            ("saved", end, True),
        ]

    expected = [("setup",), ("fit_start", 0), *epoch(1), *epoch(9), ("fit_end", "FINISHED")]
    assert recorder.events == expected


def test_a_callback_that_leaves_the_step_event_alone_is_not_called_per_step(
    tmp_path: Path,
) -> None:
    class OnValidation(Callback):
        def on_validation_end(self, trainer: Trainer, step: int, metrics: Any) -> None:
            pass

    trainer = build(tmp_path, TrainerConfig(max_epochs=1), {"v": OnValidation()})
    assert not trainer.callbacks.listens("on_train_step_end")
    assert trainer.callbacks.listens("on_validation_end")
    trainer.strategy.teardown()


class StopsAt(Callback):
    """Does what the run's signal handler does, at one step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, trainer: Trainer, step: int, values: Any) -> None:
        if step == self.step:
            trainer.request_stop(signal.SIGTERM)


class Fails(SupervisedTask):
    def train_step(self, *args: Any) -> Any:
        raise RuntimeError("the model broke")


def test_the_end_of_training_says_finished_killed_or_failed(tmp_path: Path) -> None:
    settings = TrainerConfig(max_epochs=2, log_interval_steps=4)
    killed = Recorder()
    trainer = build(tmp_path / "killed", settings, {"stop": StopsAt(3), "rec": killed})
    with pytest.raises(TrainingStopped):
        trainer.fit()
    trainer.strategy.teardown()
    assert killed.events[-2:] == [("saved", 3, True), ("fit_end", "KILLED")]

    failed = Recorder()
    trainer = build(tmp_path / "failed", settings, {"rec": failed}, task=Fails())
    with pytest.raises(RuntimeError, match="the model broke"):
        trainer.fit()
    trainer.strategy.teardown()
    assert failed.events[-1] == ("fit_end", "FAILED")


class Broken(Callback):
    def on_train_log(self, trainer: Trainer, step: int, metrics: Any) -> None:
        raise ZeroDivisionError("division by zero")


def test_a_callback_that_raises_stops_the_run_naming_it_and_the_event(tmp_path: Path) -> None:
    recorder = Recorder()
    settings = TrainerConfig(max_epochs=2, log_interval_steps=4)
    trainer = build(tmp_path, settings, {"bad": Broken(), "r": recorder})
    with pytest.raises(CallbackError) as raised:
        trainer.fit()
    trainer.strategy.teardown()
    assert str(raised.value) == (
        "callbacks.bad (tests.unit.test_callback.Broken) failed in on_train_log: "
        "ZeroDivisionError: division by zero"
    )
    assert isinstance(raised.value.__cause__, ZeroDivisionError)
    assert recorder.events[-1] == ("fit_end", "FAILED")


def test_a_monitor_that_validation_never_logs_is_a_user_error(tmp_path: Path) -> None:
    stopping = EarlyStopping(monitor="val/f1")
    trainer = build(tmp_path, TrainerConfig(max_epochs=2), {"early_stopping": stopping})
    with pytest.raises(CallbackValueError) as raised:
        trainer.fit()
    trainer.strategy.teardown()
    assert isinstance(raised.value, ValueError)  # one error line, no traceback
    assert str(raised.value).startswith(
        "callbacks.early_stopping (xp.callback.EarlyStopping) failed in on_validation_end: "
        "ValueError: monitor='val/f1' is never logged: validation logs ['val/acc', 'val/loss']"
    )


def test_early_stopping_needs_validation(tmp_path: Path) -> None:
    with pytest.raises(CallbackValueError, match=r"failed in setup: .*needs validation"):
        build(
            tmp_path,
            TrainerConfig(max_epochs=2, val_interval_epochs=0),
            {"early_stopping": EarlyStopping()},
        )


# --------------------------------------------------------------------------- config


@pytest.fixture
def compose_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("XP_LAUNCH_DIR", str(tmp_path))
    monkeypatch.setenv("XP_TIMESTAMP", "20260101_000000")
    register_resolvers()
    register_schemas()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return _compose


def test_callbacks_compose_from_the_command_line_and_build(compose_conf) -> None:
    cfg = compose_conf("+callbacks=[early_stopping,ema]", "callbacks.early_stopping.patience=5")
    built = build_callbacks(cfg.callbacks)
    assert list(built) == ["early_stopping", "ema"]
    stopping, ema = built["early_stopping"], built["ema"]
    assert isinstance(stopping, EarlyStopping) and isinstance(ema, EMA)
    assert (stopping.monitor, stopping.mode.value, stopping.patience) == ("val/loss", "min", 5)
    assert (ema.decay, ema.every_n_steps, ema.validate_with_ema) == (0.999, 1, True)

    removed = compose_conf("+callbacks=[early_stopping,ema]", "~callbacks.ema")
    assert list(build_callbacks(removed.callbacks)) == ["early_stopping"]
    assert build_callbacks(compose_conf().callbacks) == {}
    with pytest.raises(ConfigCompositionException) as typo:
        compose_conf("+callbacks=early_stopping", "callbacks.early_stopping.patiense=5")
    assert "callbacks.early_stopping.patiense" in str(typo.value)


def test_a_callback_that_does_not_build_is_named(tmp_path: Path) -> None:
    missing = OmegaConf.create({"mine": {"_target_": "nopkg_xp_test.Mine"}})
    with pytest.raises(ValueError) as raised:
        build_callbacks(missing)
    assert str(raised.value).startswith(
        "callbacks.mine._target_='nopkg_xp_test.Mine' could not be built: "
    )
    assert "nopkg_xp_test" in str(raised.value).split("built: ", 1)[1]
    with pytest.raises(ValueError, match=r"callbacks.mine has no _target_"):
        build_callbacks(OmegaConf.create({"mine": {"patience": 3}}))
    with pytest.raises(TypeError, match=r"callbacks.mine._target_='collections.OrderedDict' built"):
        build_callbacks(OmegaConf.create({"mine": {"_target_": "collections.OrderedDict"}}))
    bad = OmegaConf.create({"es": {"_target_": "xp.callback.EarlyStopping", "patience": 0}})
    with pytest.raises(ValueError, match=r"callbacks.es._target_=.*patience=0 must be >= 1"):
        build_callbacks(bad)
    assert build_callbacks(OmegaConf.create({"off": None})) == {}


# --------------------------------------------------------------------------- EarlyStopping


def test_early_stopping_ends_the_run_finished_at_the_validation_that_decided(
    tmp_path: Path,
) -> None:
    settings = TrainerConfig(max_epochs=12, log_interval_steps=4)
    seen: list[float] = []

    class Losses(Callback):
        def on_validation_end(self, trainer: Trainer, step: int, metrics: Any) -> None:
            seen.append(metrics["val/loss"])

    stopping = EarlyStopping(monitor="val/loss", mode="min", patience=2, min_delta=0.02)
    trainer = build(tmp_path, settings, {"early_stopping": stopping, "losses": Losses()})
    metrics = trainer.fit()
    trainer.strategy.teardown()
    # The run ends at the second validation in a row not 0.02 below the best, no later.
    best, wait, decided = float("inf"), 0, None
    for i, value in enumerate(seen):
        best, wait = (value, 0) if value < best - 0.02 else (best, wait + 1)
        if wait == 2:
            decided = i
            break
    assert decided == len(seen) - 1 > 2
    assert trainer.progress.step == 8 * len(seen) < trainer.length.total_steps
    assert metrics["val/loss"] == seen[-1]  # the objective: what the deciding validation saw
    assert trainer.stopped_early is not None
    assert trainer.stopped_early.startswith("val/loss did not improve by more than 0.02 in 2")

    # The last checkpoint is of the stop; resumed, the run has nothing left to do.
    state = latest_state(trainer)
    assert state["progress"]["step"] == trainer.progress.step
    assert state["stopped_early"] == trainer.stopped_early
    assert state["callbacks"]["early_stopping"]["wait"] == 2
    again = resume(build(tmp_path, settings, {"early_stopping": EarlyStopping(patience=2)}))
    assert again.fit() == metrics
    assert again.progress.step == trainer.progress.step
    again.strategy.teardown()


class Asks(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, trainer: Trainer, step: int, values: Any) -> None:
        if step == self.step:
            trainer.request_finish("enough")


def test_a_finish_asked_mid_epoch_validates_and_saves_before_the_end(tmp_path: Path) -> None:
    recorder = Recorder()
    trainer = build(
        tmp_path, TrainerConfig(max_epochs=4, log_interval_steps=4), {"a": Asks(11), "r": recorder}
    )
    trainer.fit()
    trainer.strategy.teardown()
    assert trainer.stopped_early == "enough"
    assert recorder.events[-6:] == [
        ("step", 11),
        ("evaluate", "val"),
        ("evaluated", "val"),
        ("validated", 11, ["val/acc", "val/loss"]),
        ("saved", 11, True),
        ("fit_end", "FINISHED"),
    ]


# --------------------------------------------------------------------------- EMA


class Reference(Callback):
    """Keeps an average of its own, one tensor at a time, to check EMA's against."""

    def __init__(self, decay: float, every: int) -> None:
        self.decay, self.every = decay, every
        self.average: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: Trainer) -> None:
        self.average = {k: p.detach().clone() for k, p in trainer.module.named_parameters()}

    def on_train_step_end(self, trainer: Trainer, step: int, values: Any) -> None:
        if step % self.every == 0:
            for name, param in trainer.module.named_parameters():
                self.average[name].mul_(self.decay).add_(param.detach(), alpha=1 - self.decay)


def test_ema_averages_the_weights_and_validation_sees_them_while_training_does_not(
    tmp_path: Path,
) -> None:
    settings = TrainerConfig(max_epochs=3, log_interval_steps=4)
    plain = build(tmp_path / "plain", settings)
    plain_metrics = plain.fit()
    plain.strategy.teardown()

    ema, reference = EMA(decay=0.8, every_n_steps=3), Reference(0.8, 3)
    trainer = build(tmp_path / "ema", settings, {"ema": ema, "reference": reference})
    metrics = trainer.fit()
    assert ema.updates == 24 // 3
    for name, param in trainer.module.named_parameters():
        assert torch.allclose(ema.average[name], reference.average[name], rtol=0, atol=1e-6), name
        # Validating the average left training's weights as they were.
        assert torch.equal(param, dict(plain.module.named_parameters())[name]), name
    assert metrics != plain_metrics
    # What validation measured is the average's: the training weights with it put in.
    with torch.no_grad():
        for name, param in trainer.module.named_parameters():
            param.copy_(ema.average[name])
    ema.validate_with_ema = False
    assert trainer.evaluate(trainer.val_loader, "val") == metrics  # type: ignore[arg-type]
    trainer.strategy.teardown()


def test_ema_is_exported_and_tested_from_its_checkpoint(tmp_path: Path, capsys) -> None:
    settings = TrainerConfig(max_epochs=2, log_interval_steps=4)
    ema = EMA(decay=0.9)
    trainer = build(tmp_path / "run", settings, {"ema": ema})
    trainer.fit()
    trainer.strategy.teardown()
    checkpoint = trainer.checkpointer.latest()
    assert checkpoint is not None
    saved = load_file(checkpoint)

    out = tmp_path / "ema.pt"
    assert export_main([f"ckpt={tmp_path / 'run'}", f"out={out}", "ema=true"]) == 0
    exported = torch.load(out, weights_only=True)
    assert set(exported) == set(saved["model"])  # a whole state dict: buffers too
    for name, value in exported.items():
        expected = ema.average.get(name, saved["model"][name])
        assert torch.equal(value, expected), name
    assert "body.1.running_mean" in exported  # BatchNorm's statistics, the model's own
    assert set(export_model_state(checkpoint, ema="ema")) == set(exported)

    # test=: a trainer built alike loads the weights and the average, and tests the average.
    fresh_ema = EMA(decay=0.9)
    tester = build(tmp_path / "test", settings, {"ema": fresh_ema})
    tester.strategy.load_checkpoint(checkpoint, states=True)
    tested = tester.evaluate(tester.val_loader, "test")  # type: ignore[arg-type]
    tester.strategy.teardown()
    reference = build(tmp_path / "reference", settings)
    reference.module.load_state_dict(exported)
    assert tested == reference.evaluate(reference.val_loader, "test")  # type: ignore[arg-type]
    reference.strategy.teardown()

    plain = build(tmp_path / "plain", TrainerConfig(max_epochs=1))
    plain.fit()
    plain.strategy.teardown()
    capsys.readouterr()
    assert export_main([f"ckpt={tmp_path / 'plain'}", f"out={tmp_path / 'x.pt'}", "ema=true"]) == 1
    assert "ema=true: " in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"ema=other: .* holds no average of callbacks.other"):
        export_model_state(checkpoint, ema="other")


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stop_at", [11, 40], ids=["mid-epoch", "epoch-end"])
def test_resume_with_early_stopping_and_ema_is_bit_exact(tmp_path: Path, stop_at: int) -> None:
    settings = TrainerConfig(max_epochs=12, log_interval_steps=4)

    def callbacks(*extra: Callback) -> dict[str, Callback]:
        return {
            "early_stopping": EarlyStopping(patience=2, min_delta=0.02),
            "ema": EMA(decay=0.9, every_n_steps=2),
            **{f"x{i}": c for i, c in enumerate(extra)},
        }

    straight = build(tmp_path / "straight", settings, callbacks())
    expected = straight.fit()
    straight.strategy.teardown()
    assert straight.stopped_early is not None and straight.progress.step > stop_at

    stopped = build(tmp_path / "stopped", settings, callbacks(StopsAt(stop_at)))
    with pytest.raises(TrainingStopped):
        stopped.fit()
    stopped.strategy.teardown()
    assert latest_state(stopped)["callbacks"]["ema"]["updates"] == stop_at // 2

    resumed = resume(build(tmp_path / "stopped", settings, callbacks()))
    assert resumed.fit() == expected
    resumed.strategy.teardown()
    assert resumed.stopped_early == straight.stopped_early
    assert resumed.progress == straight.progress
    assert_equal(latest_state(resumed), latest_state(straight))


def test_a_restored_configs_callbacks_pass_the_target_check() -> None:
    from xp.targets import UntrustedTarget, check_restored

    ours = {"callbacks": {"ema": {"_target_": "xp.callback.EMA", "decay": 0.9}}}
    check_restored(ours)
    theirs = {"callbacks": {"mine": {"_target_": "mypkg_xp_test.callbacks.Mine"}}}
    with pytest.raises(UntrustedTarget, match=r"^callbacks\.mine\._target_='mypkg_xp_test"):
        check_restored(theirs)
    sneaky = {"callbacks": {"mine": {"_target_": "xp.callback.torch.load"}}}
    with pytest.raises(UntrustedTarget, match=r"^callbacks\.mine\._target_="):
        check_restored(sneaky)
