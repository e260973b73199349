"""Strategies: how a run uses its processes and devices."""

from xp.strategy.base import DEFAULT_OPTIM, Prepared, Strategy, TrainingLength
from xp.strategy.ddp import DDPStrategy
from xp.strategy.deepspeed import DeepSpeedStrategy
from xp.strategy.distributed import DistributedStrategy
from xp.strategy.fsdp import FSDPStrategy
from xp.strategy.single import SingleDeviceStrategy

__all__ = [
    "DEFAULT_OPTIM",
    "DDPStrategy",
    "DeepSpeedStrategy",
    "DistributedStrategy",
    "FSDPStrategy",
    "Prepared",
    "SingleDeviceStrategy",
    "Strategy",
    "TrainingLength",
]
