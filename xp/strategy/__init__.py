"""Strategies: how a run uses its processes and devices."""

from typing import TYPE_CHECKING, Any

from xp.strategy.base import DEFAULT_OPTIM, Prepared, Strategy, TrainingLength
from xp.strategy.ddp import DDPStrategy
from xp.strategy.deepspeed import DeepSpeedStrategy
from xp.strategy.distributed import DistributedStrategy
from xp.strategy.single import SingleDeviceStrategy

if TYPE_CHECKING:
    from xp.strategy.fsdp import FSDPStrategy

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


def __getattr__(name: str) -> Any:
    # FSDPStrategy loads when named: it imports torch.distributed.tensor, with which gloo runs
    # of the other strategies now and then deadlock at exit (torch 2.13).
    if name == "FSDPStrategy":
        from xp.strategy.fsdp import FSDPStrategy

        return FSDPStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
