"""Every option of every config group composes against its schema and builds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from tests.extras import requires_extra
from xp.__main__ import CONF_DIR
from xp.build import build
from xp.optim import OptimWrapper, OptimWrapperDict

GROUPS = (
    "strategy",
    "optim",
    "scheduler",
    "randomness",
    "model",
    "data",
    "task",
    "trainer",
    "checkpoint",
    "tracking",
    "experiment",
    "callbacks",
)
APPENDED = ("experiment", "callbacks")
"""Groups the primary config does not list: chosen with ``+group=option``."""
CASES = [
    (group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))
]
COMPANIONS = {
    ("optim", "gan"): ["model=gan_2d", "data=gaussian_mixture"],
    ("model", "digits_cnn"): ["data.as_images=true"],
    ("model", "addition_transformer"): ["data=addition"],
    ("data", "addition"): ["model=addition_transformer", "task=sequence"],
    ("task", "sequence"): ["model=addition_transformer", "data=addition"],
    ("task", "regression"): ["model.num_classes=1"],
}
"""Options that only make sense with others (a GAN's optimizers need the GAN's submodules)."""
EXTRAS = {("strategy", "deepspeed"): requires_extra("deepspeed", "deepspeed")}
"""Options that build a package of an optional extra (skipped, with the reason, without it)."""


def test_every_group_has_options() -> None:
    found = {group for group, _ in CASES}
    assert found == set(GROUPS)


@pytest.mark.parametrize(
    ("group", "option"),
    [pytest.param(g, o, id=f"{g}={o}", marks=EXTRAS.get((g, o), ())) for g, o in CASES],
)
def test_option_composes_and_builds(compose, group: str, option: str, tmp_path: Path) -> None:
    choice = f"+{group}={option}" if group in APPENDED else f"{group}={option}"
    cfg = compose(
        [
            choice,
            *COMPANIONS.get((group, option), []),
            "trainer.max_epochs=3",
            "trainer.max_steps=null",
        ]
    )
    built = build(cfg, tmp_path / "run")
    try:
        strategy, prepared = built.strategy, built.prepared
        assert strategy.log_dir == (tmp_path / "run").resolve()
        assert strategy.timestamp == "run"
        if group == "callbacks":
            assert type(built.callbacks[option]).__module__ == "xp.callback"
        assert isinstance(prepared.model, torch.nn.Module)
        assert len(built.train_loader) == math.ceil(
            len(built.train_loader.dataset) / cfg.data.batch_size  # type: ignore[arg-type]
        )
        wrapper = prepared.optim_wrapper
        if "optimizers" in cfg.optim:
            assert isinstance(wrapper, OptimWrapperDict)
            assert set(wrapper) == set(cfg.optim.optimizers)
            for name, sub in cfg.optim.optimizers.items():
                assert type(wrapper[name].optimizer).__name__ == sub._target_.rsplit(".", 1)[1]
        else:
            assert isinstance(wrapper, OptimWrapper)
            assert type(wrapper.optimizer).__name__ == cfg.optim._target_.rsplit(".", 1)[1]
        assert built.length.total_steps == 3 * built.length.epoch_length
        # Every schedule steps through the whole run without error and keeps lr finite.
        for schedule in prepared.schedules.values():
            for _ in range(built.length.total_steps):
                schedule.step_iter()
            assert all(math.isfinite(lr) and lr >= 0 for lr in schedule.last_lr)
    finally:
        built.strategy.teardown()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=abc", "optim.lr"),
        ("optim.lrr=1", "optim.lrr"),
        ("optim.amp=fp32", "optim.amp"),
        ("scheduler.cosine.etamin=0", "scheduler.cosine.etamin"),
        ("trainer.max_epochs=many", "trainer.max_epochs"),
        ("randomness.seed=x", "randomness.seed"),
    ],
)
def test_bad_value_fails_at_compose_time_naming_the_key(compose, override: str, key: str) -> None:
    with pytest.raises((ValidationError, ConfigAttributeError, ConfigCompositionException)) as e:
        compose([override])
    assert key in str(e.value) or key in str(e.value.__cause__)


def test_unknown_option_lists_the_valid_ones(compose) -> None:
    with pytest.raises(ConfigCompositionException) as e:
        compose(["strategy=nope"])
    assert "strategy/nope" in str(e.value)


def test_warmup_cosine_begins_where_warmup_ends(compose) -> None:
    cfg = compose(["scheduler=warmup_cosine", "scheduler.warmup.end=7"])
    assert cfg.scheduler.cosine.begin == 7


def test_one_schedule_per_optimizer(compose, tmp_path: Path) -> None:
    """`scheduler.<optimizer>.<phase>` gives each named optimizer its own schedule."""
    from omegaconf import OmegaConf

    from xp.build import build_phases
    from xp.config import ConstantLRConfig, StepLRConfig

    cfg = compose(["optim=backbone_head", "trainer.max_epochs=2"])
    per_optim = OmegaConf.create(
        {
            "backbone": {"step": OmegaConf.structured(StepLRConfig(step_size=1, gamma=0.5))},
            "head": {"keep": OmegaConf.structured(ConstantLRConfig(factor=1.0))},
        }
    )
    cfg.scheduler = per_optim
    phases = build_phases(cfg.scheduler)
    assert set(phases) == {"backbone", "head"}
    built = build(cfg, tmp_path / "run")
    try:
        schedules = built.prepared.schedules
        wrapper = built.prepared.optim_wrapper
        for _ in range(built.length.epoch_length):
            for schedule in schedules.values():
                schedule.step_iter()
        for schedule in schedules.values():
            schedule.step_epoch()
        assert wrapper["backbone"].get_lr()[0] == pytest.approx(3e-3 * 0.5)
        assert wrapper["head"].get_lr()[0] == pytest.approx(0.05)
    finally:
        built.strategy.teardown()
