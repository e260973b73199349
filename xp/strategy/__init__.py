"""Strategies: how a run uses its processes and devices."""

from xp.strategy.base import DEFAULT_OPTIM, Prepared, Strategy, TrainingLength
from xp.strategy.ddp import DDPStrategy
from xp.strategy.distributed import DistributedStrategy
from xp.strategy.single import SingleDeviceStrategy

__all__ = [
    "DEFAULT_OPTIM",
    "DDPStrategy",
    "DistributedStrategy",
    "Prepared",
    "SingleDeviceStrategy",
    "Strategy",
    "TrainingLength",
]
