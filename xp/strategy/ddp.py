"""DistributedDataParallel: a full model replica per process, gradients all-reduced."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from xp.strategy.distributed import DistributedStrategy


class DDPStrategy(DistributedStrategy):
    """Wrap the model in ``DistributedDataParallel``; rank 0 writes single-file checkpoints.

    Args:
        find_unused_parameters: Allow parameters without a gradient in a step.
        static_graph: The graph is the same every step.
        gradient_as_bucket_view: Gradients as views into the all-reduce buckets.
        broadcast_buffers: Broadcast buffers from rank 0 before each forward.
        bucket_cap_mb: Size of the all-reduce buckets.
        sync_bn: Convert BatchNorm layers to SyncBatchNorm.
        **kwargs: See :class:`~xp.strategy.distributed.DistributedStrategy`.
    """

    def __init__(
        self,
        *,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = True,
        broadcast_buffers: bool = True,
        bucket_cap_mb: float = 25.0,
        sync_bn: bool = False,
        **kwargs: Any,
    ) -> None:
        self._ddp_kwargs: dict[str, Any] = {
            "find_unused_parameters": find_unused_parameters,
            "static_graph": static_graph,
            "gradient_as_bucket_view": gradient_as_bucket_view,
            "broadcast_buffers": broadcast_buffers,
            "bucket_cap_mb": bucket_cap_mb,
        }
        self._sync_bn = sync_bn
        super().__init__(**kwargs)

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        if self._sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [self.root_device] if self.root_device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, **self._ddp_kwargs)

    def _no_sync(self, model: nn.Module) -> Callable[[], Any] | None:
        assert isinstance(model, DistributedDataParallel)
        return model.no_sync
