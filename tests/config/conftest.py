from __future__ import annotations

from collections.abc import Callable

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from xp.__main__ import CONF_DIR
from xp.config import register_schemas
from xp.rundir import register_resolvers


@pytest.fixture
def compose(monkeypatch, tmp_path) -> Callable[[list[str]], DictConfig]:
    """Compose conf/ with overrides, exactly as ``python -m xp`` does."""
    monkeypatch.setenv("XP_LAUNCH_DIR", str(tmp_path))
    monkeypatch.setenv("XP_TIMESTAMP", "20260101_000000")
    register_resolvers()
    register_schemas()

    def _compose(overrides: list[str]) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)

    return _compose
