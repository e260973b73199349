"""One process on one device."""

from __future__ import annotations

from typing import Any

import torch

from xp.config import Device
from xp.strategy.base import Strategy


class SingleDeviceStrategy(Strategy):
    """Train in this process on one device: CUDA when available (``device=auto``), else CPU.

    Args:
        device: auto, cpu or cuda.
        **kwargs: See :class:`~xp.strategy.base.Strategy`.
    """

    def __init__(self, *, device: Device = Device.auto, **kwargs: Any) -> None:
        if device is Device.cuda and not torch.cuda.is_available():
            raise ValueError(
                "strategy.device=cuda, but CUDA is not available here; use strategy.device=cpu "
                "or strategy.device=auto."
            )
        use_cuda = device is Device.cuda or (device is Device.auto and torch.cuda.is_available())
        self._device = (
            torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        )
        super().__init__(**kwargs)
        if self.world_size > 1:
            raise ValueError(
                f"strategy=single, but the {self.launcher.value} launcher started "
                f"{self.world_size} processes; use strategy=ddp (or fsdp, deepspeed) to train "
                "on several, or launch one process."
            )

    @property
    def root_device(self) -> torch.device:
        return self._device

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return tensor.clone()

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]
