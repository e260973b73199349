"""DistributedDataParallel: a full model replica per process, gradients all-reduced."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from xp.strategy.distributed import DistributedStrategy

_BUFFERS_KWARG = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else "broadcast_buffers"
)


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
            # torch 2.13 renamed it (the buffers are synced at start either way: every rank
            # starts from rank 0's model); older torch knows only the old name.
            _BUFFERS_KWARG: broadcast_buffers,
            "bucket_cap_mb": bucket_cap_mb,
        }
        self._sync_bn = sync_bn
        super().__init__(**kwargs)

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        if self._sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if callable(getattr(model, "train_step", None)):
            # A model that steps its optimizers itself (a GAN: several forwards and backwards
            # per batch, each over part of the model) is more than one DDP forward can
            # follow. mmengine wraps each part in a DDP of its own; here the replicas start
            # equal and each optimizer wrapper averages its gradients before it steps, which
            # holds for any train_step (at the price of no overlap with backward).
            self.broadcast_module(model)
            return model
        device_ids = [self.root_device] if self.root_device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, **self._ddp_kwargs)

    def _no_sync(self, model: nn.Module) -> Callable[[], Any] | None:
        return model.no_sync if isinstance(model, DistributedDataParallel) else None

    def _sync_grads(self, model: nn.Module) -> Callable[[list[torch.Tensor]], None] | None:
        return None if isinstance(model, DistributedDataParallel) else self._average_grads

    def _average_grads(self, params: list[torch.Tensor]) -> None:
        """One all-reduce of the flattened gradients of ``params``, divided by world size."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        for param, synced in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
            if param.grad is None:
                param.grad = synced
            else:
                param.grad.copy_(synced)
