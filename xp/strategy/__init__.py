"""Strategies: how a run uses its processes and devices."""

from xp.strategy.base import DEFAULT_OPTIM, Prepared, Strategy, TrainingLength
from xp.strategy.single import SingleDeviceStrategy

__all__ = ["DEFAULT_OPTIM", "Prepared", "SingleDeviceStrategy", "Strategy", "TrainingLength"]
