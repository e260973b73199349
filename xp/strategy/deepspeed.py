"""DeepSpeed ZeRO: xp's torch optimizer and LR schedule, driven through DeepSpeed's engine.

DeepSpeed is an optional extra and slow to import, so this module imports it only when a
strategy is built or a checkpoint exported.

xp builds the torch optimizer (with its param groups) as for every strategy; the engine
partitions it (ZeRO 1: optimizer state, 2: + gradients, 3: + parameters) but keeps the
same param group dicts, so the LR schedule that the loop steps sets the lr DeepSpeed
applies. Accumulation windows stay xp's: every micro-batch tells the engine whether it
ends one, so an epoch's short last window steps, as with the other strategies.

A checkpoint is a folder ``step_XXXXXXXX/``: the engine's own files, written by every
rank, and ``extra.pt`` (schedules, every rank's RNG state, progress, config) from rank 0,
then the ``COMPLETE`` marker with every file's size and sha256. Then rank 0 points
``checkpoints/latest`` at it, as DeepSpeed's own ``save_checkpoint`` does, so that
DeepSpeed's tools (``python checkpoints/zero_to_fp32.py checkpoints out/``) find it.

DeepSpeed reads its files with ``torch.load(weights_only=False)``; before it does, xp
loads each of them with ``torch.load(weights_only=True)`` (tensor data memory-mapped, not
read), admitting only the few DeepSpeed classes its checkpoints hold.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from xp.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    atomic_save,
    file_digests,
    load_file,
    own_files,
    unpickling_refusal,
    verify,
    write_marker,
    write_text_atomic,
)
from xp.config import AMP, DType
from xp.optim import OptimSpec, OptimWrapper, OptimWrapperDict
from xp.strategy.distributed import DistributedStrategy

__all__ = [
    "INSTALL_HINT",
    "DeepSpeedOptimWrapper",
    "DeepSpeedStrategy",
    "export_model_state",
    "import_deepspeed",
]

INSTALL_HINT = (
    "strategy=deepspeed needs DeepSpeed, which is not installed: pip install 'xp[deepspeed]' "
    "(build it against your torch: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)"
)
EXTRA_FILE = "extra.pt"
"""What xp saves beside the engine's files in a checkpoint folder (rank 0, weights_only-safe)."""
LATEST_FILE = "latest"
"""In the checkpoints folder: the name of the newest complete checkpoint, for DeepSpeed's tools."""
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")
"""DeepSpeed names the files data-parallel rank r writes ``[bf16_]zero_pp_rank_<r>_...``."""

# Raw DeepSpeed keys that xp derives from its own settings: set there, so the loop's
# accumulation, the LR schedule and the batch size agree with what the engine does.
_DERIVED_KEYS = {
    "train_batch_size": "data.batch_size (per process) and optim.accumulative_counts",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "optim.accumulative_counts",
    "gradient_clipping": "optim.clip_grad.max_norm",
    "optimizer": "optim (xp builds the torch optimizer)",
    "scheduler": "scheduler (xp's LR schedule drives the optimizer's lr)",
    "managed_gradient_accumulation": "optim.accumulative_counts (xp marks each window's end)",
    "zero_optimization.stage": "strategy.zero_stage",
    "zero_optimization.offload_optimizer.device": "strategy.offload_optimizer",
    "zero_optimization.offload_param.device": "strategy.offload_param",
    "bf16.enabled": "strategy.precision",
    "bfloat16.enabled": "strategy.precision",
    "fp16.enabled": "strategy.precision",
}

# Classes DeepSpeed pickles into its checkpoint files, besides what torch.load(weights_only=
# True) admits anyway. DeepSpeed reads those files with an unrestricted torch.load, so xp
# first loads each with weights_only=True, admitting these and nothing else.
_DEEPSPEED_PICKLE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def import_deepspeed(*, cpu: bool = False) -> ModuleType:
    """``import deepspeed``, on its CPU accelerator when ``cpu``.

    Raises:
        ValueError: DeepSpeed is not installed (or does not import), with the install command.
    """
    # DeepSpeed picks its accelerator once, on import; the variable is set only for that
    # moment so that processes started later (tests, sweeps on GPUs) choose for themselves.
    previous = os.environ.get("DS_ACCELERATOR")
    if cpu and previous is None:
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        import deepspeed
    except ImportError as e:
        raise ValueError(f"{INSTALL_HINT}. (import deepspeed said: {e})") from e
    finally:
        if previous is None:
            os.environ.pop("DS_ACCELERATOR", None)
    return deepspeed


class DeepSpeedOptimWrapper(OptimWrapper):
    """The optimizer wrapper over a DeepSpeed engine: the engine backpropagates and steps.

    ``optimizer`` stays the torch optimizer xp built: the engine steps it with the lr of its
    param groups, which xp's LR schedule sets. The optimizer state itself lives in the
    engine's checkpoint files; :meth:`state_dict` holds only the micro-batch count.

    Args:
        engine: What ``deepspeed.initialize`` returned.
        wrapper: The wrapper xp built over the torch optimizer (its accumulation and
            clipping settings carry over; DeepSpeed clips by norm itself).
    """

    def __init__(self, engine: Any, wrapper: OptimWrapper) -> None:
        super().__init__(
            wrapper.optimizer,
            accumulative_counts=wrapper.accumulative_counts,
            device_type=wrapper.device_type,
            key=wrapper.key,
        )
        self.engine = engine
        self._clips = wrapper.max_norm is not None
        self._window_has_gradients = False

    def backward(self, loss: Tensor) -> None:
        """Backpropagates through the engine, telling it whether this micro-batch ends a window."""
        # Set before backward: ZeRO reduces gradients during backward at a window's end.
        self.engine.set_gradient_accumulation_boundary(self._will_update())
        # scale_loss already divided by the window (also a short last one); not again.
        self.engine.backward(loss, scale_wrt_gas=False)
        self._inner_count += 1
        self._window_has_gradients = True

    def step(self) -> Tensor | None:
        """Steps the engine (clip, optimizer step, zero the gradients).

        Returns:
            The total gradient norm before clipping when clipping, else None.
        """
        self.engine.step()
        self._window_has_gradients = False
        if not self._clips:
            return None
        return torch.as_tensor(self.engine.get_global_grad_norm())

    def zero_grad(self) -> None:
        """Drops the gradients the engine holds (its step already does)."""
        self.engine.optimizer.zero_grad()

    def skip_micro_batch(self) -> None:
        """Count a micro-batch whose loss is dropped (NaN/inf): no backward.

        Raises:
            ValueError: It ends a window whose earlier micro-batches have gradients: the
                engine finishes a window only in a backward, so it cannot step on them.
        """
        if self._will_update() and self._window_has_gradients:
            raise ValueError(
                f"A NaN/inf loss was dropped at the end of an accumulation window "
                f"({self._key}.accumulative_counts={self._accumulative_counts}); DeepSpeed "
                "ends a window only in a backward, so it cannot step on the window's other "
                f"micro-batches. With strategy=deepspeed use {self._key}.accumulative_counts=1 "
                "or trainer.nonfinite=stop."
            )
        self._inner_count += 1

    def state_dict(self) -> dict[str, Any]:
        """The micro-batch count; the optimizer state is in the engine's checkpoint files."""
        return {"inner_count": self._inner_count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what `state_dict` returned."""
        self._inner_count = int(state["inner_count"])


class DeepSpeedStrategy(DistributedStrategy):
    """DeepSpeed ZeRO over the process group xp created, with xp's optimizer and LR schedule.

    The model is built whole on every rank, then handed to ``deepspeed.initialize`` with
    the torch optimizer xp built. Mixed precision is DeepSpeed's (``precision``), not
    ``optim.amp``; floating-point inputs are cast to the parameters' dtype in
    :meth:`to_device`. Checkpoints are folders (see the module docstring).

    Args:
        zero_stage: 1 partitions optimizer state, 2 also gradients, 3 also parameters.
        precision: fp32, or bf16/fp16 parameters with fp32 master weights.
        offload_optimizer: Keep optimizer state (and the step) in CPU memory.
        offload_param: Keep parameters in CPU memory (ZeRO-3 only).
        config: Raw DeepSpeed config entries, merged (recursively) over those xp derives.
        **kwargs: See :class:`~xp.strategy.distributed.DistributedStrategy`.

    Raises:
        ValueError: DeepSpeed is not installed, or the settings contradict each other.
    """

    sharded_checkpoints = True

    def __init__(
        self,
        *,
        zero_stage: int = 2,
        precision: DType = DType.fp32,
        offload_optimizer: bool = False,
        offload_param: bool = False,
        config: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if zero_stage not in (1, 2, 3):
            raise ValueError(
                f"strategy.zero_stage={zero_stage} is not a ZeRO stage; use 1 (optimizer state), "
                "2 (+ gradients) or 3 (+ parameters)."
            )
        if offload_param and zero_stage != 3:
            raise ValueError(
                f"strategy.offload_param=true needs ZeRO-3, but strategy.zero_stage={zero_stage}; "
                "set strategy.zero_stage=3 or strategy.offload_param=false."
            )
        raw = dict(config or {})
        for dotted, xp_key in _DERIVED_KEYS.items():
            value = _lookup(raw, dotted)
            if value is not None:
                raise ValueError(
                    f"strategy.config.{dotted}={value!r}: xp derives this entry; set {xp_key} "
                    f"instead and drop strategy.config.{dotted}."
                )
        self._zero_stage = zero_stage
        self._precision = DType(precision)
        self._offload_optimizer = offload_optimizer
        self._offload_param = offload_param
        self._raw_config = raw
        self._deepspeed: ModuleType | None = None
        self._engine: Any = None
        self._input_dtype: torch.dtype | None = None
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ process group

    def _setup_distributed(self) -> None:
        # Before joining the process group, so that a missing DeepSpeed fails with nothing
        # to undo.
        self._deepspeed = import_deepspeed(cpu=not self._use_cuda)
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        wanted = "cuda" if self._use_cuda else "cpu"
        if accelerator.device_name() != wanted:
            raise ValueError(
                f"xp runs this process on {wanted}, but DeepSpeed already chose its "
                f"{accelerator.device_name()} accelerator (DS_ACCELERATOR="
                f"{os.environ.get('DS_ACCELERATOR')}); set strategy.device to match, or start "
                f"a fresh process with DS_ACCELERATOR={wanted}."
            )
        supported = {
            DType.bf16: accelerator.is_bf16_supported,
            DType.fp16: accelerator.is_fp16_supported,
        }
        if self._precision in supported and not supported[self._precision]():
            raise ValueError(
                f"strategy.precision={self._precision.value} is not supported by DeepSpeed on "
                f"{wanted} here; use strategy.precision=fp32"
                + (" or bf16." if self._precision is DType.fp16 else ".")
            )
        super()._setup_distributed()

    def _teardown_distributed(self) -> None:
        if self._engine is not None and self._owns_group and dist.is_initialized():
            # Through deepspeed.comm, which also forgets the subgroups DeepSpeed cloned from
            # this world, so that a later run in this process (a sweep) starts clean.
            dist.barrier()
            assert self._deepspeed is not None
            self._deepspeed.comm.destroy_process_group()
            self._engine = None
        super()._teardown_distributed()

    # ------------------------------------------------------------------ building

    def build_optim_wrapper(
        self, optim: OptimSpec | Mapping[str, OptimSpec], model: nn.Module
    ) -> OptimWrapper | OptimWrapperDict:
        """The wrapper xp builds for any strategy, after refusing what DeepSpeed cannot do."""
        if not isinstance(optim, OptimSpec):
            raise ValueError(
                f"optim.optimizers names {sorted(optim)}, but strategy=deepspeed drives one "
                "optimizer; use a single optimizer (e.g. optim=adamw) or strategy=ddp."
            )
        settings = optim.settings
        if settings.amp is not AMP.off:
            raise ValueError(
                f"optim.amp={AMP(settings.amp).value} with strategy=deepspeed: DeepSpeed manages "
                f"mixed precision itself; set optim.amp=off and "
                f"strategy.precision={AMP(settings.amp).value}."
            )
        clip = settings.clip_grad
        if clip.max_value is not None:
            raise ValueError(
                f"optim.clip_grad.max_value={clip.max_value}: DeepSpeed clips by norm only; use "
                "optim.clip_grad.max_norm instead (and max_value=null)."
            )
        if clip.max_norm is not None and clip.norm_type != 2.0:
            raise ValueError(
                f"optim.clip_grad.norm_type={clip.norm_type}: DeepSpeed clips by the 2-norm "
                "only; set optim.clip_grad.norm_type=2."
            )
        return super().build_optim_wrapper(optim, model)

    def _attach_optimizer(
        self,
        model: nn.Module,
        wrapper: OptimWrapper | OptimWrapperDict,
        *,
        batch_size: int | None,
    ) -> tuple[nn.Module, OptimWrapper | OptimWrapperDict]:
        assert isinstance(wrapper, OptimWrapper), "build_optim_wrapper refuses several optimizers"
        assert self._deepspeed is not None
        if batch_size is None:
            raise ValueError(
                "strategy=deepspeed needs the per-process batch size (data.batch_size); pass "
                "prepare(batch_size=...)."
            )
        # deepspeed.initialize broadcasts rank 0's parameters (DeepSpeedEngine._broadcast_model),
        # not its buffers.
        self.broadcast_module(model, parameters=False)
        config = self.engine_config(
            batch_size=batch_size,
            accumulative_counts=wrapper.accumulative_counts,
            max_norm=wrapper.max_norm,
        )
        engine, *_ = self._deepspeed.initialize(
            model=model, optimizer=wrapper.optimizer, config=config, dist_init_required=False
        )
        self._engine = engine
        self._input_dtype = (
            torch.bfloat16
            if engine.bfloat16_enabled()
            else torch.float16
            if engine.fp16_enabled()
            else None
        )
        return engine, DeepSpeedOptimWrapper(engine, wrapper)

    def engine_config(
        self, *, batch_size: int, accumulative_counts: int, max_norm: float | None
    ) -> dict[str, Any]:
        """The DeepSpeed config: what xp's settings say, with ``strategy.config`` merged over it.

        Args:
            batch_size: Samples per micro-batch per process.
            accumulative_counts: Micro-batches per optimizer step.
            max_norm: Clip the total gradient norm to this; None does not clip.
        """
        zero: dict[str, Any] = {"stage": self._zero_stage}
        if self._offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if self._offload_param:
            zero["offload_param"] = {"device": "cpu"}
        derived: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": batch_size,
            "gradient_accumulation_steps": accumulative_counts,
            "gradient_clipping": max_norm or 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": self._precision is DType.bf16},
            "fp16": {"enabled": self._precision is DType.fp16},
            # xp's optimizers are plain torch ones; DeepSpeed runs them, with a warning.
            "zero_allow_untested_optimizer": True,
            # With offload the torch optimizer steps the CPU copy: slower than DeepSpeed's
            # CPUAdam, but it is the optimizer that was configured.
            "zero_force_ds_cpu_optimizer": False,
        }
        return _merge(derived, self._raw_config)

    # ------------------------------------------------------------------ device

    def to_device(self, batch: Any) -> Any:
        """Move a batch to the device, and its floating-point tensors to the parameters' dtype."""
        batch = super().to_device(batch)
        if self._input_dtype is None:
            return batch
        return _cast_floats(batch, self._input_dtype)

    # ------------------------------------------------------------------ state

    @property
    def engine(self) -> Any:
        """The DeepSpeed engine (after :meth:`prepare` with an optimizer)."""
        if self._engine is None:
            raise RuntimeError("Call prepare(model, optim=...) before using the DeepSpeed engine.")
        return self._engine

    def model_state_dict(self) -> dict[str, Any]:
        """The whole model's state; under ZeRO-3 every rank must call it (it gathers)."""
        module = self.unwrap(self.prepared.model)
        if self._zero_stage < 3:
            return module.state_dict()
        assert self._deepspeed is not None
        with self._deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.clone() for k, v in module.state_dict().items()}

    def load_model_state_dict(
        self,
        state: Mapping[str, Any],
        *,
        strict: bool = True,
        revise_keys: Sequence[tuple[str, str]] = ((r"^module\.", ""),),
        source: str = "The checkpoint",
    ) -> None:
        """Load plain model weights (e.g. ``load_from`` a single-file checkpoint) into the engine.

        Every rank must call it. The engine's fp32 master weights are refreshed from them.
        """
        load = functools.partial(super().load_model_state_dict, source=source)
        engine = self._engine
        if engine is None:  # prepared without an optimizer: a plain module
            load(state, strict=strict, revise_keys=revise_keys)
            return
        if self._zero_stage < 3:
            load(state, strict=strict, revise_keys=revise_keys)
        else:
            assert self._deepspeed is not None
            params = list(self.unwrap(self.prepared.model).parameters())
            # Whole on every rank inside; rank 0's values are partitioned again on exit.
            with self._deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                load(state, strict=strict, revise_keys=revise_keys)
        engine.optimizer.refresh_fp32_params()

    def _checkpoint_states(self, *, save_optimizer: bool) -> dict[str, Any]:
        # The engine writes the model and optimizer state itself (the optimizer's always);
        # xp keeps the wrapper's micro-batch count, and the stage the files are laid out for.
        state: dict[str, Any] = {"deepspeed": {"zero_stage": self._zero_stage}}
        if save_optimizer:
            state["optim"] = self.optim_state_dict()
        return state

    def use_async_checkpoints(self, on_done: Callable[[Path], object] | None = None) -> bool:
        """False: DeepSpeed's engine writes its checkpoint files itself, synchronously."""
        if self.is_main_process:
            self.logger.warning(
                "checkpoint.async_save=true does not apply to strategy=deepspeed: its engine "
                "writes the checkpoint files itself (engine.save_checkpoint), so xp cannot "
                "copy the state and write it in the background; DeepSpeed's own asynchronous "
                "writers need its async_io op (libaio) or the datastates package. Checkpoints "
                "are saved synchronously."
            )
        return False

    def _write_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        """Every rank writes its engine files; rank 0 writes ``extra.pt``, the marker, and
        then ``latest``."""
        marker = path / COMPLETE_MARKER
        if self.is_main_process:
            # Overwriting a folder: it must not look complete while it is rewritten.
            marker.unlink(missing_ok=True)
        self.barrier()
        # No client_state: DeepSpeed would pickle it into files it reads back unrestricted.
        # No `latest` yet: DeepSpeed would point it at a folder without its marker.
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        if self.is_main_process:
            atomic_save(state, path / EXTRA_FILE, checksum=False)
        self.barrier()
        # Each rank hashes the files it wrote; rank 0 the rest (its own, extra.pt).
        mine = own_files(path, self.rank, self.world_size, _RANK_FILE)
        digests = self.all_gather_object(file_digests(path, mine))
        if self.is_main_process:
            _fsync_files(path)
            write_marker(path, {k: v for d in digests for k, v in d.items()}, kind="deepspeed")
            write_text_atomic(path.parent / LATEST_FILE, path.name)
        self.barrier()

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        if not path.is_dir():
            return super()._read_checkpoint(path)
        _check_complete(path)
        self.verify_checkpoint(path)
        return load_file(path / EXTRA_FILE, check=False)

    def _restore_states(
        self,
        checkpoint: Mapping[str, Any],
        path: Path,
        *,
        strict: bool,
        revise_keys: Sequence[tuple[str, str]],
        optimizer: bool,
    ) -> None:
        if not path.is_dir():
            # A single-file checkpoint of another strategy: plain state dicts.
            super()._restore_states(
                checkpoint, path, strict=strict, revise_keys=revise_keys, optimizer=False
            )
            if optimizer:
                self.logger.warning(
                    "%s is not a DeepSpeed checkpoint; only its model weights were loaded, the "
                    "optimizer starts afresh.",
                    path,
                )
            return
        if not optimizer:
            # Weights only (load_from, fine-tuning): gathered from the files, so any stage and
            # world size fit, and key rewriting and strictness work as for plain state dicts.
            self.load_model_state_dict(
                export_model_state(path, check=False),  # _read_checkpoint verified it
                strict=strict,
                revise_keys=revise_keys,
                source=f"Checkpoint {path}",
            )
            return
        saved = int(checkpoint.get("meta", {}).get("world_size", self.world_size))
        if saved != self.world_size:
            raise CheckpointError(
                f"Checkpoint {path} was saved by {saved} ranks, this run has {self.world_size}; "
                f"DeepSpeed's partitioned optimizer state resumes only on as many: set "
                f"strategy.nproc_per_node={saved}, or start from its weights with load_from."
            )
        stage = int(checkpoint.get("deepspeed", {}).get("zero_stage", self._zero_stage))
        if stage != self._zero_stage:
            raise CheckpointError(
                f"Checkpoint {path} was saved with strategy.zero_stage={stage}, this run has "
                f"strategy.zero_stage={self._zero_stage}; resume with strategy.zero_stage={stage}, "
                "or start from its weights with load_from."
            )
        _check_pickles(path)
        loaded, _ = self.engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=strict,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}.")
        if "optim" in checkpoint:
            self.load_optim_state_dict(checkpoint["optim"])

    def collect_env(self) -> tuple[dict[str, Any], dict[str, Any]]:
        system, runtime = super().collect_env()
        runtime["deepspeed"] = {
            "version": getattr(self._deepspeed, "__version__", None),
            "zero_stage": self._zero_stage,
            "precision": self._precision.value,
            "offload_optimizer": self._offload_optimizer,
            "offload_param": self._offload_param,
        }
        return system, runtime


def export_model_state(path: Path, *, check: bool = True) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a DeepSpeed checkpoint folder, as CPU tensors.

    Needs no process group: the partitions are gathered from the files.

    Args:
        path: A complete DeepSpeed checkpoint folder.
        check: Verify its files' checksums first.

    Raises:
        CheckpointError: The folder is incomplete or corrupt, or its files pickle objects
            that DeepSpeed checkpoints do not hold.
        ValueError: DeepSpeed is not installed.
    """
    path = Path(path)
    _check_complete(path)
    if check:
        verify(path)
    import_deepspeed(cpu=True)
    _check_pickles(path)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _quiet():
        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


# --------------------------------------------------------------------------- helpers


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``: nested dicts key by key, everything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_cast_floats(v, dtype) for v in obj)
    return obj


def _check_complete(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(
            f"DeepSpeed checkpoint {path} is not a folder; give a step_XXXXXXXX folder of a run's "
            "checkpoints/."
        )
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"Checkpoint folder {path} has no {COMPLETE_MARKER} marker: its save was "
            "interrupted; use an earlier checkpoint."
        )


def _check_pickles(path: Path) -> None:
    """Refuse engine files that pickle anything but tensors, plain data and DeepSpeed's
    own state classes.

    DeepSpeed reads them with ``torch.load(weights_only=False)``; here each is first
    loaded with ``weights_only=True`` (its whole pickle, through torch's restricted
    unpickler; the tensor data memory-mapped, not read), which runs none of them. A file
    that is not a zip-format torch file is refused too: torch would unpickle a legacy or
    raw pickle file without restriction.
    """
    allowed = [_deepspeed_class(module, name) for module, name in _DEEPSPEED_PICKLE_GLOBALS]
    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if scoped is None:
        torch.serialization.add_safe_globals(allowed)
    for file in sorted(path.glob("*.pt")):
        if file.name == EXTRA_FILE:
            continue  # read with weights_only=True
        try:
            with scoped(allowed) if scoped is not None else contextlib.nullcontext():
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"Checkpoint file {file} pickles objects that DeepSpeed checkpoints do not hold "
                f"({unpickling_refusal(e)}); DeepSpeed would unpickle it without restriction, "
                "so it is refused. Only load checkpoints you trust."
            ) from e
        except (RuntimeError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(
                f"Checkpoint file {file} is corrupt or not a zip-format torch file "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
                "DeepSpeed would unpickle it without restriction, so it is refused. Use an "
                "earlier checkpoint."
            ) from e


def _deepspeed_class(module: str, name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(module), name)


def _fsync_files(path: Path) -> None:
    """Flush every file of a folder to disk, so the marker never outlives missing data."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # zero_to_fp32 prints its progress and progress bars on every rank; its errors raise.
    with (
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
        contextlib.redirect_stderr(null),
    ):
        yield
