"""The base of strategies over a torch.distributed process group (DDP, FSDP, DeepSpeed)."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import socket
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from xp.config import Backend, Device
from xp.dist import (
    dist_info,
    export_launcher_env,
    free_port,
    in_slurm_batch_script,
    infer_launcher,
    port_error,
)
from xp.launch import workers_error
from xp.strategy.base import Strategy

_collect_at_exit = False
_BROADCAST_BUCKET_BYTES = 256 << 20
"""At most this much of a model crosses in one broadcast (a flat copy of it is made)."""


class DistributedStrategy(Strategy):
    """Joins (or, for one process, creates) the process group and provides the collectives.

    Args:
        device: auto (CUDA when available, one device per local rank), cpu or cuda.
        backend: nccl or gloo; None picks nccl on CUDA and gloo on the CPU.
        nproc_per_node: Workers to start without a launcher (used by ``xp.launch``).
        master_port: Rendezvous port for workers xp starts itself.
        timeout_s: How long a collective waits for the other ranks.
        **kwargs: See :class:`~xp.strategy.base.Strategy`.
    """

    def __init__(
        self,
        *,
        device: Device = Device.auto,
        backend: Backend | None = None,
        nproc_per_node: int = 1,
        master_port: int | None = None,
        timeout_s: float = 1800.0,
        **kwargs: Any,
    ) -> None:
        if nproc_per_node < 1:
            raise ValueError(
                f"strategy.nproc_per_node={nproc_per_node} must be >= 1 (the number of worker "
                "processes on this machine)."
            )
        bad_port = port_error(master_port)
        if bad_port is not None:
            raise ValueError(bad_port)
        bad_workers = workers_error(
            nproc_per_node, dist_info(kwargs.get("launcher") or infer_launcher())
        )
        if bad_workers is not None:
            raise ValueError(bad_workers)
        if device is Device.cuda and not torch.cuda.is_available():
            raise ValueError(
                "strategy.device=cuda, but CUDA is not available here; use strategy.device=cpu "
                "or strategy.device=auto."
            )
        self._use_cuda = device is Device.cuda or (
            device is Device.auto and torch.cuda.is_available()
        )
        chosen = backend or (Backend.nccl if self._use_cuda else Backend.gloo)
        if chosen is Backend.nccl and not self._use_cuda:
            raise ValueError(
                "strategy.backend=nccl needs CUDA, but "
                + ("strategy.device=cpu" if device is Device.cpu else "none is available")
                + "; use strategy.backend=gloo (or null to choose from the device)."
            )
        self._backend = chosen
        self._timeout = timedelta(seconds=timeout_s)
        self._master_port = master_port
        self._owns_group = False
        self._device = torch.device("cpu")
        self._ranks: list[dict[str, Any]] = []
        self._unshared: list[dict[str, Any]] = []
        super().__init__(**kwargs)
        self._warn_about_the_batch_script()

    # ------------------------------------------------------------------ process group

    def _setup_distributed(self) -> None:
        export_launcher_env(self.launcher, self._master_port)
        if self._use_cuda:
            self._device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self._device)
        if dist.is_initialized():
            return
        if not self.distributed:
            # One process still gets a process group, so DDP/FSDP/DeepSpeed work unchanged
            # (and a checkpoint saved by 2 ranks resumes on 1).
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(self._master_port or free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        global _collect_at_exit
        if not _collect_at_exit:
            # What a run's frames still held is freed before the interpreter tears down
            # modules, while the collectives it needs still work.
            atexit.register(gc.collect)
            _collect_at_exit = True
        dist.init_process_group(
            backend=self._backend.value,
            timeout=self._timeout,
            device_id=self._device if self._use_cuda else None,
        )
        self._owns_group = True
        if self.distributed:
            self._survey_ranks()

    def _survey_ranks(self) -> None:
        """Where every rank runs (host, node, local rank, threads), and whether it sees the
        run directory rank 0 claimed: outputs/ may not be shared between nodes.

        One file rank 0 writes and every rank looks for. Where some rank cannot see it, a
        strategy whose checkpoints every rank writes (FSDP, DeepSpeed) stops here, on
        every rank at once, before anything trains; otherwise only rank 0 writes, and the
        run trains (resuming it needs its directory on every node).

        Raises:
            ValueError: Sharded checkpoints and a run directory some rank cannot see.
        """
        probe: Path | None = None
        token = None
        if self.is_main_process:
            token = uuid.uuid4().hex
            probe = self.log_dir / f".xp-shared-{token}"
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text(socket.gethostname())
        token = self.broadcast_object(token)
        place = {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "node_rank": self._info.node_rank,
            "hostname": socket.gethostname(),
            "threads": torch.get_num_threads(),
            "sees_run_dir": (self.log_dir / f".xp-shared-{token}").is_file(),
        }
        self._ranks = self.all_gather_object(place)
        if probe is not None:
            probe.unlink()
        self._unshared = [r for r in self._ranks if not r["sees_run_dir"]]
        if self._unshared and self.sharded_checkpoints:
            hosts = sorted({r["hostname"] for r in self._unshared})
            error = (
                f"{type(self).__name__} saves checkpoints that every rank writes into "
                f"{self.checkpoint_dir}, but ranks {[r['rank'] for r in self._unshared]} (on "
                f"{', '.join(hosts)}) do not see the run directory rank 0 made there: outputs/ "
                "is not shared between the nodes. Start xp from a directory on a file system "
                "every node mounts (cd /shared/project; python -m xp ...), or give one with "
                "hydra.run.dir=/shared/.../run; strategy=ddp works without one (rank 0 "
                "writes alone)."
            )
            dist.destroy_process_group()
            self._owns_group = False
            raise ValueError(error)

    def _warn_about_the_batch_script(self) -> None:
        tasks = os.environ.get("SLURM_NTASKS", "")
        if in_slurm_batch_script() and tasks.isdigit() and int(tasks) > 1 and not self.distributed:
            self.logger.warning(
                "This Slurm job has %s tasks (SLURM_NTASKS), but xp runs in its batch script, "
                "outside srun: one process trains. Start it with srun python -m xp ... for "
                "one rank per task.",
                tasks,
            )

    def build_logger(self) -> logging.Logger:
        logger = super().build_logger()
        if self._unshared and self.is_main_process:
            logger.warning(
                "Ranks %s (on %s) do not see the run directory %s: outputs/ is not shared "
                "between the nodes. Rank 0 writes the run's files and checkpoints alone; "
                "resuming the run (resume=, a requeued job) needs its directory on every "
                "node: start xp from a directory on a file system every node mounts.",
                [r["rank"] for r in self._unshared],
                ", ".join(sorted({r["hostname"] for r in self._unshared})),
                self.log_dir,
            )
        return logger

    def _teardown_distributed(self) -> None:
        if self._owns_group and dist.is_initialized():
            # Wrapped models (DDP's reducer, FSDP's DTensors) hold the group; freed late, at
            # interpreter exit, they deadlock or abort in gloo's destructor now and then.
            self._prepared = None
            gc.collect()
            # gloo: without a barrier a rank can exit while another still sends, and abort.
            dist.barrier()
            dist.destroy_process_group()
        self._owns_group = False

    # ------------------------------------------------------------------ small parts

    @property
    def root_device(self) -> torch.device:
        return self._device

    @property
    def backend(self) -> Backend:
        return self._backend

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        if op not in ("sum", "mean"):
            raise ValueError(f"all_reduce(op={op!r}): use 'sum' or 'mean'.")
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        if op == "mean":
            out = out / self.world_size
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, model: nn.Module, *, parameters: bool = True, src: int = 0) -> None:
        """Rank ``src``'s parameters and buffers, copied into ``model`` on every rank.

        Every strategy starts from the model rank 0 built (mmengine broadcasts after
        ``init_weights`` too): with ``randomness.diff_rank_seed`` each rank initializes
        its own differently. One broadcast per dtype and bucket, not per tensor.

        Args:
            model: The built model, on this rank's device, before it is wrapped.
            parameters: Also the parameters (False: only the buffers).
            src: The rank whose values every rank gets.
        """
        if self.world_size == 1:
            return
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        tensors = [*model.parameters(), *model.buffers()] if parameters else [*model.buffers()]
        for tensor in tensors:
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.data)
        with torch.no_grad():
            for tensors in groups.values():
                for bucket in _buckets(tensors, _BROADCAST_BUCKET_BYTES):
                    # gloo broadcasts no bool tensors: their bytes cross as uint8.
                    raw = [t.view(torch.uint8) if t.dtype == torch.bool else t for t in bucket]
                    flat = _flatten_dense_tensors(raw)
                    dist.broadcast(flat, src=src)
                    for tensor, synced in zip(
                        raw, _unflatten_dense_tensors(flat, raw), strict=True
                    ):
                        tensor.copy_(synced)

    def collect_env(self) -> tuple[dict[str, Any], dict[str, Any]]:
        system, runtime = super().collect_env()
        runtime["backend"] = self._backend.value
        if self._ranks:
            runtime["ranks"] = self._ranks
        return system, runtime


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """``tensors`` in order, in runs of at most ``limit`` bytes (a larger tensor alone)."""
    out: list[list[torch.Tensor]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if out[-1] and size + nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(tensor)
        size += nbytes
    return [bucket for bucket in out if bucket]
