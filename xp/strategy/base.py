"""The strategy: sets up a run's environment, then builds, wraps, saves and loads its parts.

Descended from mmengine's ``BaseStrategy``: the same responsibilities (environment,
randomness, model, optimizer wrappers, LR schedules and scaling, logger, state dicts,
load-or-resume, collect_env), with typed inputs, explicit return values and a resume that
restores RNG state. Subclasses override the small hooks that differ (device, process
group, model wrapping, collectives, checkpoint I/O), never whole methods.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
import re
import socket
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from xp import randomness as rnd
from xp.checkpoint import (
    AsyncCheckpointWriter,
    CheckpointCorrupt,
    Checkpointer,
    CheckpointError,
    atomic_save,
    load_file,
    verify,
)
from xp.config import (
    AutoScaleLRConfig,
    CompileConfig,
    Launcher,
    RandomnessConfig,
    StartMethod,
)
from xp.dist import DistInfo, default_threads, dist_info, infer_launcher
from xp.env import collect_system_env
from xp.log import build_logger
from xp.optim import (
    OptimSpec,
    OptimWrapper,
    OptimWrapperDict,
    build_optim_wrapper,
    build_optim_wrapper_dict,
)
from xp.scheduler import LRSchedule, Phase

ModelSource = nn.Module | Callable[[], nn.Module]
DEFAULT_OPTIM = "default"
"""The name of the only optimizer of a single-optimizer run (in schedules and state)."""


class Stateful(Protocol):
    """Something with a state that checkpoints keep (a run's callbacks)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class TrainingLength:
    """How long training runs, in optimizer steps; schedules default their ends to it."""

    epoch_length: int
    """Optimizer steps per epoch."""
    total_steps: int
    """Optimizer steps of the whole run."""


@dataclass
class Prepared:
    """What :meth:`Strategy.prepare` built."""

    model: nn.Module
    """The model, on its device, wrapped for the strategy (DDP, FSDP...) and compiled."""
    optim_wrapper: OptimWrapper | OptimWrapperDict | None = None
    schedules: dict[str, LRSchedule] = field(default_factory=dict)
    """One LR schedule per optimizer name (``default`` for a single optimizer)."""


class Strategy(ABC):
    """Base of every strategy.

    Constructing a strategy sets up the environment: launcher and process group, threads
    per process, multiprocessing start method, the open-file limit, cuDNN flags and seeds.
    :meth:`teardown` undoes what needs undoing; a strategy is also a context manager.

    Args:
        log_dir: The run directory (Hydra's run dir): logs, checkpoints, config.
        experiment_name: Names the experiment (and the folder above ``log_dir``).
        randomness: Seeds and determinism.
        launcher: How the processes were started; None infers it from the environment.
        cudnn_benchmark: Let cuDNN benchmark kernels (off when deterministic).
        mp_start_method: Start method for worker processes; None keeps the default.
        threads_per_process: torch threads; None divides the cores among local processes.
        resource_limit: Raise the soft open-file limit to at least this.
        compile: ``torch.compile`` settings.
        auto_scale_lr: Linear LR scaling settings.
        timestamp: When the run was launched; default: the run directory's name.
    """

    sharded_checkpoints: bool = False
    """Checkpoints are folders written by every rank (FSDP, DeepSpeed), not one file."""

    def __init__(
        self,
        *,
        log_dir: Path | str,
        experiment_name: str,
        randomness: RandomnessConfig | None = None,
        launcher: Launcher | None = None,
        cudnn_benchmark: bool = False,
        mp_start_method: StartMethod | None = None,
        threads_per_process: int | None = None,
        resource_limit: int = 4096,
        compile: CompileConfig | None = None,
        auto_scale_lr: AutoScaleLRConfig | None = None,
        timestamp: str | None = None,
    ) -> None:
        self._log_dir = Path(log_dir).resolve()
        self._timestamp = timestamp or self._log_dir.name
        self._experiment_name = experiment_name
        self._randomness = randomness or RandomnessConfig()
        self._compile = compile or CompileConfig()
        self._auto_scale_lr = auto_scale_lr or AutoScaleLRConfig()
        self._env_settings: dict[str, Any] = {
            "cudnn_benchmark": cudnn_benchmark,
            "mp_start_method": mp_start_method.value if mp_start_method else None,
            "threads_per_process": threads_per_process,
            "resource_limit": resource_limit,
        }
        self._info: DistInfo = dist_info(launcher or infer_launcher())
        self._seed: int = 0
        self._prepared: Prepared | None = None
        self._async_writer: AsyncCheckpointWriter | None = None
        self._states: dict[str, Stateful] = {}
        self._setup_env(
            cudnn_benchmark=cudnn_benchmark,
            mp_start_method=mp_start_method,
            threads_per_process=threads_per_process,
            resource_limit=resource_limit,
        )
        self.logger = self.build_logger()

    # ------------------------------------------------------------------ identity

    @property
    def log_dir(self) -> Path:
        """The run directory: ``<work_dir>/<timestamp>``, the same on every rank."""
        return self._log_dir

    @property
    def work_dir(self) -> Path:
        """The experiment's folder, which holds one run directory per run."""
        return self._log_dir.parent

    @property
    def timestamp(self) -> str:
        """When the run was launched (``YYYYmmdd_HHMMSS``), the same on every rank.

        It names the log file and the MLflow run; the run directory is named after it
        unless ``hydra.run.dir`` says otherwise (a sweep's job directory, say).
        """
        return self._timestamp

    @property
    def experiment_name(self) -> str:
        return self._experiment_name

    @property
    def launcher(self) -> Launcher:
        return self._info.launcher

    @property
    def distributed(self) -> bool:
        return self._info.distributed

    @property
    def rank(self) -> int:
        return self._info.rank

    @property
    def local_rank(self) -> int:
        return self._info.local_rank

    @property
    def world_size(self) -> int:
        return self._info.world_size

    @property
    def is_main_process(self) -> bool:
        """Rank 0: the process that writes files and talks to MLflow."""
        return self._info.rank == 0

    @property
    def seed(self) -> int:
        """The base seed in force (drawn at start-up when ``randomness.seed`` is null)."""
        return self._seed

    @property
    def randomness(self) -> RandomnessConfig:
        return self._randomness

    @property
    def checkpoint_dir(self) -> Path:
        return self._log_dir / "checkpoints"

    # ------------------------------------------------------------------ small parts

    @property
    @abstractmethod
    def root_device(self) -> torch.device:
        """The device this process computes on."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait until every process reaches this point."""

    @abstractmethod
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src``, on every rank."""

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """``tensor`` reduced over every rank with ``op`` (sum or mean); a new tensor."""

    @abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""

    def _setup_distributed(self) -> None:  # noqa: B027 (a hook: a no-op unless distributed)
        """Join the process group (distributed strategies)."""

    def _teardown_distributed(self) -> None:  # noqa: B027
        """Leave the process group (distributed strategies)."""

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        """Wrap the model for the strategy (DDP, FSDP...); the identity by default."""
        return model

    def _attach_optimizer(
        self,
        model: nn.Module,
        wrapper: OptimWrapper | OptimWrapperDict,
        *,
        batch_size: int | None,
    ) -> tuple[nn.Module, OptimWrapper | OptimWrapperDict]:
        """Join model and optimizer where the strategy needs both (DeepSpeed's engine)."""
        return model, wrapper

    def _no_sync(self, model: nn.Module) -> Callable[[], Any] | None:
        """A context factory that skips gradient sync on accumulating micro-batches."""
        return None

    def _sync_grads(self, model: nn.Module) -> Callable[[list[torch.Tensor]], None] | None:
        """Averages gradients over ranks before a step, where the wrapper does not."""
        return None

    def reshard(self, model: nn.Module) -> None:  # noqa: B027 (a hook: a no-op unless sharded)
        """Leave the model's parameters in their resting form, as an optimizer step does.

        A strategy that gathers sharded parameters for a forward (FSDP) frees the gathered
        copies, so that parameters written in place outside an optimizer step (an EMA
        swapping its average in) are what the next forward uses. A no-op elsewhere.
        """

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside whatever :meth:`_wrap_model` put around it."""
        return getattr(model, "module", model)

    # ------------------------------------------------------------------ environment

    def _setup_env(
        self,
        *,
        cudnn_benchmark: bool,
        mp_start_method: StartMethod | None,
        threads_per_process: int | None,
        resource_limit: int,
    ) -> None:
        if mp_start_method is not None:
            multiprocessing.set_start_method(mp_start_method.value, force=True)
        torch.set_num_threads(self._threads(threads_per_process))
        self._raise_open_file_limit(resource_limit)
        self._setup_distributed()
        if self.rank != 0:
            # A library's deprecation notices are the same on every rank: rank 0 shows them.
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category)
        torch.backends.cudnn.benchmark = cudnn_benchmark and not self._randomness.deterministic
        self._set_randomness()

    def _threads(self, requested: int | None) -> int:
        if requested is not None:
            if requested < 1:
                raise ValueError(
                    f"strategy.threads_per_process={requested} must be >= 1 (or null to divide "
                    "the cores among the processes of this machine)."
                )
            return requested
        return default_threads(self._info)

    @staticmethod
    def _raise_open_file_limit(wanted: int) -> None:
        if platform.system() == "Windows":
            return
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = (
            max(wanted, soft) if hard == resource.RLIM_INFINITY else min(max(wanted, soft), hard)
        )
        if target != soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))

    def _set_randomness(self) -> None:
        cfg = self._randomness
        seed = cfg.seed
        if seed is None:
            seed = self.broadcast_object(rnd.draw_seed() if self.is_main_process else None)
        assert seed is not None
        self._seed = seed + self.rank if cfg.diff_rank_seed else seed
        rnd.set_deterministic(cfg.deterministic)
        rnd.seed_everything(self._seed)

    def build_logger(self) -> logging.Logger:
        """Log to ``<log_dir>/<timestamp>.log`` and the console (rank 0), warnings elsewhere."""
        return build_logger(self._log_dir / f"{self.timestamp}.log", rank=self.rank)

    def teardown(self) -> None:
        """Finish background writes and leave the process group; safe to call twice."""
        if self._async_writer is not None:
            writer, self._async_writer = self._async_writer, None
            writer.close()
        self._teardown_distributed()

    def __enter__(self) -> Strategy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # ------------------------------------------------------------------ building

    def prepare(
        self,
        model: ModelSource,
        *,
        optim: OptimSpec | Mapping[str, OptimSpec] | None = None,
        schedules: Sequence[Phase] | Mapping[str, Sequence[Phase]] | None = None,
        length: TrainingLength | None = None,
        batch_size: int | None = None,
        compile: CompileConfig | bool | None = None,
    ) -> Prepared:
        """Build the model, its optimizer wrapper(s) and LR schedules, ready to train.

        Args:
            model: A module, or a factory that builds one (so a strategy can choose where).
            optim: One optimizer, or several by name (each owning a submodule).
            schedules: LR phases for every optimizer, or per optimizer name.
            length: The training length that schedules need; required with ``schedules``.
            batch_size: Per-process batch size, for ``auto_scale_lr``.
            compile: ``torch.compile`` settings for this model (True: the defaults); None
                keeps the strategy's ``compile`` config.

        Returns:
            The prepared model, optimizer wrapper and schedules (also kept for state dicts).
        """
        built = self.build_model(model)
        built = self._init_weights(built)
        built = built.to(self.root_device)
        if compile is not None:
            if isinstance(compile, bool):
                compile = CompileConfig(enabled=compile)
            self._compile = compile
        built = self.compile_model(built)
        wrapped = self._wrap_model(built)
        prepared = Prepared(model=wrapped)
        if optim is not None:
            wrapper = self.build_optim_wrapper(optim, wrapped)
            if self._auto_scale_lr.enabled:
                self._scale_lr(wrapper, optim, batch_size)
            prepared.model, prepared.optim_wrapper = self._attach_optimizer(
                wrapped, wrapper, batch_size=batch_size
            )
            if schedules:
                if length is None:
                    raise ValueError("prepare(schedules=...) needs the training length.")
                prepared.schedules = self.build_schedules(schedules, prepared.optim_wrapper, length)
        elif schedules:
            raise ValueError("LR schedules need an optimizer; pass optim= to prepare().")
        self._prepared = prepared
        return prepared

    def build_model(self, model: ModelSource) -> nn.Module:
        """The module itself, or what the factory builds."""
        built = model if isinstance(model, nn.Module) else model()
        if not isinstance(built, nn.Module):
            raise TypeError(
                f"model._target_ built a {type(built).__name__}, not a torch.nn.Module; point "
                "model._target_ at a Module class or a function returning one."
            )
        return built

    def _init_weights(self, model: nn.Module) -> nn.Module:
        init = getattr(model, "init_weights", None)
        if callable(init):
            init()
        return model

    def compile_model(self, model: nn.Module) -> nn.Module:
        """``torch.compile`` the configured method of the model, when enabled."""
        cfg = self._compile
        if not cfg.enabled:
            return model
        method = getattr(model, cfg.target, None)
        if not callable(method):
            raise ValueError(
                f"strategy.compile.target={cfg.target!r} is not a method of "
                f"{type(model).__name__}; use forward or another method name."
            )
        kwargs: dict[str, Any] = {"fullgraph": cfg.fullgraph, "dynamic": cfg.dynamic}
        if cfg.mode is not None:
            kwargs["mode"] = cfg.mode
        setattr(model, cfg.target, torch.compile(method, **kwargs))
        self.logger.info(
            "Compiled %s.%s; the first steps will be slow.", type(model).__name__, cfg.target
        )
        return model

    def build_optim_wrapper(
        self, optim: OptimSpec | Mapping[str, OptimSpec], model: nn.Module
    ) -> OptimWrapper | OptimWrapperDict:
        """One optimizer wrapper, or an :class:`OptimWrapperDict` for named optimizers."""
        module = self.unwrap(model)
        no_sync = self._no_sync(model)
        sync_grads = self._sync_grads(model)
        device_type = self.root_device.type
        if isinstance(optim, OptimSpec):
            return build_optim_wrapper(
                optim.factory,
                module,
                optim.settings,
                device_type=device_type,
                no_sync=no_sync,
                sync_grads=sync_grads,
            )
        if not optim:
            raise ValueError("optim.optimizers is empty; name at least one optimizer.")
        missing = [name for name, spec in optim.items() if not spec.settings.params]
        if missing:
            raise ValueError(
                f"optim.optimizers.{missing[0]}.params is not set; with several optimizers each "
                "names the submodule it owns."
            )
        return build_optim_wrapper_dict(
            {name: spec.factory for name, spec in optim.items()},
            module,
            {name: spec.settings for name, spec in optim.items()},
            device_type=device_type,
            no_sync=no_sync,
            sync_grads=sync_grads,
        )

    def _scale_lr(
        self,
        wrapper: OptimWrapper | OptimWrapperDict,
        optim: OptimSpec | Mapping[str, OptimSpec],
        batch_size: int | None,
    ) -> None:
        cfg = self._auto_scale_lr
        if batch_size is None:
            raise ValueError("strategy.auto_scale_lr.enabled needs the batch size in prepare().")
        if cfg.base_batch_size < 1:
            raise ValueError(
                f"strategy.auto_scale_lr.base_batch_size={cfg.base_batch_size} must be >= 1."
            )
        spec = optim if isinstance(optim, OptimSpec) else next(iter(optim.values()))
        # The batch one optimizer step sees: every rank's micro-batches of one window.
        real = self.world_size * batch_size * spec.settings.accumulative_counts
        ratio = real / cfg.base_batch_size
        wrappers = [wrapper] if isinstance(wrapper, OptimWrapper) else list(wrapper.values())
        for w in wrappers:
            w.scale_lr(ratio)
        self.logger.info(
            "auto_scale_lr: lr tuned for batch %d, real batch %d (world %d x %d x accumulation %d);"
            " scaled by %.4g.",
            cfg.base_batch_size,
            real,
            self.world_size,
            batch_size,
            spec.settings.accumulative_counts,
            ratio,
        )

    def build_schedules(
        self,
        schedules: Sequence[Phase] | Mapping[str, Sequence[Phase]],
        wrapper: OptimWrapper | OptimWrapperDict,
        length: TrainingLength,
    ) -> dict[str, LRSchedule]:
        """One :class:`LRSchedule` per optimizer (the same phases for all, or per name)."""
        wrappers = (
            {DEFAULT_OPTIM: wrapper} if isinstance(wrapper, OptimWrapper) else dict(wrapper.items())
        )
        if isinstance(schedules, Mapping):
            unknown = sorted(set(schedules) - set(wrappers))
            if unknown:
                raise ValueError(
                    f"scheduler has schedules for {unknown}, which are not optimizers; "
                    f"the optimizers are {sorted(wrappers)}."
                )
            per_optim = {name: schedules.get(name, ()) for name in wrappers}
        else:
            per_optim = {name: schedules for name in wrappers}
        built = {
            name: LRSchedule(
                wrappers[name].optimizer,
                phases,
                epoch_length=length.epoch_length,
                total_steps=length.total_steps,
            )
            for name, phases in per_optim.items()
            if phases
        }
        # What the run's length does to the schedule, said once (rank 0; the same phases of
        # several optimizers once).
        for level, note in dict.fromkeys(n for s in built.values() for n in s.notes):
            self.logger.log(level, "Schedule: %s", note)
        return built

    # ------------------------------------------------------------------ device

    def to_device(self, batch: Any) -> Any:
        """Move a batch (tensors in tuples, lists and dicts) to :attr:`root_device`."""
        device = self.root_device
        if device.type == "cpu":
            return batch
        return _move(batch, device)

    # ------------------------------------------------------------------ state

    @property
    def prepared(self) -> Prepared:
        if self._prepared is None:
            raise RuntimeError("Call prepare() before saving or loading state.")
        return self._prepared

    def model_state_dict(self) -> dict[str, Any]:
        """The user's module's state (without wrapper prefixes)."""
        return self.unwrap(self.prepared.model).state_dict()

    def optim_state_dict(self) -> dict[str, Any]:
        wrapper = self.prepared.optim_wrapper
        return wrapper.state_dict() if wrapper is not None else {}

    def scheduler_state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in self.prepared.schedules.items()}

    def load_model_state_dict(
        self,
        state: Mapping[str, Any],
        *,
        strict: bool = True,
        revise_keys: Sequence[tuple[str, str]] = ((r"^module\.", ""),),
        source: str = "The checkpoint",
    ) -> None:
        """Load model weights, rewriting key prefixes first (a leading ``module.`` by default).

        Args:
            state: The weights, by name.
            strict: Every tensor of the model must be in ``state``, with its shape, and
                nothing else; otherwise only those that match load (and the rest is logged).
            revise_keys: ``(pattern, replacement)`` rewrites of the names in ``state``.
            source: What the weights come from, for messages (``Checkpoint <path>``).

        Raises:
            CheckpointError: with ``strict``, when keys or shapes do not match.
        """
        revised = dict(state)
        for pattern, repl in revise_keys:
            revised = {re.sub(pattern, repl, k): v for k, v in revised.items()}
        module = self.unwrap(self.prepared.model)
        own = module.state_dict()
        mismatched = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in revised.items()
            if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
        ]
        missing = sorted(set(own) - set(revised))
        unexpected = sorted(set(revised) - set(own))
        matched = len(own) - len(missing) - len(mismatched)
        summary = "; ".join(
            f"{what} {_shortened(names)}"
            for what, names in (
                ("shape mismatch", mismatched),
                ("missing", missing),
                ("unexpected", unexpected),
            )
            if names
        )
        if strict and summary:
            raise CheckpointError(
                f"{source} does not fit this model: {matched} of the model's {len(own)} "
                f"tensors match ({summary}). Use the model config the checkpoint was trained "
                "with; to start a new run from the matching tensors only (load_from=), set "
                "load_from_strict=false."
            )
        if mismatched:
            bad = {m.split(":")[0] for m in mismatched}
            revised = {k: v for k, v in revised.items() if k not in bad}
        module.load_state_dict(revised, strict=False)
        if summary:
            self.logger.warning(
                "Loaded %d of the model's %d tensors from %s%s; not loaded: %s.",
                matched,
                len(own),
                source[0].lower() + source[1:],
                " (none matched: the model starts from its own initialization)"
                if matched == 0
                else "",
                summary,
            )

    def load_optim_state_dict(self, state: Mapping[str, Any]) -> None:
        wrapper = self.prepared.optim_wrapper
        if wrapper is not None:
            wrapper.load_state_dict(dict(state))

    def load_scheduler_state_dict(self, state: Mapping[str, Any]) -> None:
        schedules = self.prepared.schedules
        if set(state) != set(schedules):
            raise CheckpointError(
                f"The checkpoint has LR schedules for {sorted(state)}, this run for "
                f"{sorted(schedules)}; resume with the scheduler config it was saved with."
            )
        for name, schedule in schedules.items():
            schedule.load_state_dict(state[name])

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self,
        path: Path,
        *,
        extra: Mapping[str, Any] | None = None,
        save_optimizer: bool = True,
        save_schedulers: bool = True,
    ) -> Path:
        """Save model, optimizer(s), schedules, every rank's RNG state and ``extra``.

        Every rank must call it (RNG states are gathered); rank 0 writes the file.
        """
        state = self._checkpoint_states(save_optimizer=save_optimizer)
        if save_schedulers:
            state["schedulers"] = self.scheduler_state_dict()
        state["rng"] = self.all_gather_object(rnd.rng_state())
        state["meta"] = {
            "world_size": self.world_size,
            "seed": self.seed,
            "torch": str(torch.__version__),  # a TorchVersion, which weights_only refuses
            "strategy": type(self).__name__,
        }
        for key, stateful in self._states.items():
            state[key] = stateful.state_dict()
        state.update(extra or {})
        self._write_checkpoint(state, Path(path))
        return Path(path)

    def register_state(self, key: str, stateful: Stateful) -> None:
        """Keep ``stateful``'s state in every checkpoint under ``key``; :meth:`resume` (and
        :meth:`load_checkpoint` with ``states=True``) restores it.

        Its tensors may be DTensors sharded like the parameters (an EMA under FSDP): a
        strategy with sharded checkpoints saves and loads them sharded.
        """
        reserved = {"model", "optim", "schedulers", "rng", "meta"}
        if key in reserved:
            raise ValueError(f"register_state({key!r}): {sorted(reserved)} are the strategy's own.")
        self._states[key] = stateful

    def _restore_registered(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        """Give each registered state its entry of the checkpoint (none: it starts fresh)."""
        for key, stateful in self._states.items():
            stateful.load_state_dict(checkpoint.get(key) or {})

    def _checkpoint_states(self, *, save_optimizer: bool) -> dict[str, Any]:
        """The model and optimizer entries of a checkpoint (DeepSpeed's engine saves its own)."""
        state: dict[str, Any] = {"model": self.model_state_dict()}
        if save_optimizer:
            state["optim"] = self.optim_state_dict()
        return state

    def _restore_states(
        self,
        checkpoint: Mapping[str, Any],
        path: Path,
        *,
        strict: bool,
        revise_keys: Sequence[tuple[str, str]],
        optimizer: bool,
    ) -> None:
        """Load a read checkpoint's model (and optimizer) entries; DeepSpeed's engine reads its own.

        Raises:
            CheckpointError: The checkpoint has no model state.
        """
        if "model" not in checkpoint:
            raise CheckpointError(
                f"Checkpoint {path} has no model state; it was not written by xp."
            )
        self.load_model_state_dict(
            checkpoint["model"],
            strict=strict,
            revise_keys=revise_keys,
            source=f"Checkpoint {path}",
        )
        if optimizer and "optim" in checkpoint:
            self.load_optim_state_dict(checkpoint["optim"])

    def use_async_checkpoints(self, on_done: Callable[[Path], object] | None = None) -> bool:
        """Write later checkpoints in the background; False where the strategy cannot.

        Args:
            on_done: Called on the writer's thread after each checkpoint is complete.
        """
        if self.sharded_checkpoints:
            # A sharded strategy writes its folders in its own _write_checkpoint; it offers
            # asynchronous saves by overriding this (FSDP does).
            self.logger.warning(
                "checkpoint.async_save=true: %s has no asynchronous save for its sharded "
                "checkpoints; they are saved synchronously.",
                type(self).__name__,
            )
            return False
        if self.is_main_process:
            self._async_writer = AsyncCheckpointWriter(on_done=on_done)
        return True

    def wait_for_checkpoints(self) -> None:
        """Block until a checkpoint being written in the background is complete."""
        if self._async_writer is not None:
            self._async_writer.wait()

    def _write_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        """Write a single-file checkpoint from rank 0 (in the background when asked)."""
        if self.is_main_process:
            if self._async_writer is not None:
                self._async_writer.submit(state, path)
            else:
                atomic_save(state, path)
        self.barrier()

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        return load_file(path)

    def load_checkpoint(
        self,
        path: Path,
        *,
        strict: bool = True,
        revise_keys: Sequence[tuple[str, str]] = ((r"^module\.", ""),),
        states: bool = False,
    ) -> dict[str, Any]:
        """Load only the model weights of a checkpoint (fine-tuning); returns the checkpoint.

        Args:
            states: Also restore the states registered with :meth:`register_state` (the
                callbacks': ``test=`` evaluates an EMA's average), not only the weights.
        """
        checkpoint = self._read_checkpoint(Path(path))
        self._restore_states(
            checkpoint, Path(path), strict=strict, revise_keys=revise_keys, optimizer=False
        )
        if states:
            self._restore_registered(checkpoint, Path(path))
        self.logger.info("Loaded model weights from %s.", path)
        return checkpoint

    def resume(
        self,
        path: Path,
        *,
        resume_optimizer: bool = True,
        resume_schedulers: bool = True,
    ) -> dict[str, Any]:
        """Restore model, optimizer(s), schedules and RNG state; returns the checkpoint.

        The caller continues from the trainer progress it saved in the checkpoint.
        """
        checkpoint = self._read_checkpoint(Path(path))
        self._restore_states(
            checkpoint,
            Path(path),
            strict=True,
            revise_keys=((r"^module\.", ""),),
            optimizer=resume_optimizer,
        )
        self._restore_registered(checkpoint, Path(path))
        if resume_schedulers and "schedulers" in checkpoint:
            try:
                self.load_scheduler_state_dict(checkpoint["schedulers"])
            except ValueError as e:
                progress = checkpoint.get("progress")
                if progress is None:
                    raise CheckpointError(f"{e} (and {path} records no progress to replay)") from e
                # A run extended (or shortened) on resume: continue on the new length's schedule.
                for schedule in self.prepared.schedules.values():
                    schedule.fast_forward(steps=progress["step"], epochs=progress["epoch"])
                self.logger.warning("LR schedule replayed for the new training length (%s).", e)
        states = checkpoint.get("rng") or []
        if self.rank < len(states):
            rnd.set_rng_state(states[self.rank])
        else:
            self.logger.warning(
                "The checkpoint holds RNG states for %d ranks, this run has %d; ranks without "
                "one keep their fresh seeds.",
                len(states),
                self.world_size,
            )
        self.logger.info("Resumed from %s.", path)
        return checkpoint

    def load_or_resume(
        self, *, load_from: Path | None = None, resume: bool | Path = False
    ) -> dict[str, Any] | None:
        """mmengine's rule: resume wins over load_from; ``resume=True`` finds the latest.

        Args:
            load_from: A checkpoint whose weights start the run (nothing else restored).
            resume: A checkpoint to resume from, or True for the newest checkpoint of any
                run of this experiment (``load_from`` when given).

        Returns:
            The loaded checkpoint, or None when there was nothing to load.
        """
        if resume is True:
            found = Path(load_from) if load_from is not None else self.find_latest_checkpoint()
            if found is None:
                self.logger.info(
                    "resume=True but no checkpoint under %s; starting fresh.", self.work_dir
                )
                return None
            return self.resume(found)
        if resume:
            return self.resume(Path(resume))
        if load_from is not None:
            return self.load_checkpoint(Path(load_from), strict=False)
        return None

    def find_latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of any run of this experiment that verifies.

        Newer ones that fail their checksums are skipped, with a warning naming them.
        """
        candidates: list[Path] = []
        if self.work_dir.is_dir():
            for run_dir in self.work_dir.iterdir():
                if not run_dir.is_dir():
                    continue
                found, skipped = Checkpointer(run_dir / "checkpoints").latest_verified()
                for corrupt in skipped:
                    self.logger.warning("Skipping checkpoint %s: %s.", corrupt.path, corrupt.reason)
                if found is not None:
                    candidates.append(found)
        return max(candidates, key=lambda p: p.stat().st_mtime, default=None)

    def verify_checkpoint(self, path: Path) -> bool:
        """Check every file of a checkpoint against its recorded checksums, on every rank.

        The ranks share the files of a folder and agree on the outcome, so all raise or
        none does. Returns False for a checkpoint that records no checksums (an older one).

        Raises:
            CheckpointCorrupt: A file is missing, truncated or changed since it was saved.
        """
        outcome: tuple[bool, str | None] = (False, None)
        try:
            outcome = (verify(path, share=(self.rank, self.world_size)), None)
        except CheckpointCorrupt as e:
            outcome = (False, e.reason)
        outcomes = self.all_gather_object(outcome) if self.world_size > 1 else [outcome]
        reasons = [reason for _, reason in outcomes if reason]
        if reasons:
            raise CheckpointCorrupt(path, reasons[0])
        return any(verified for verified, _ in outcomes)

    # ------------------------------------------------------------------ environment info

    def collect_env(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """System facts and this run's runtime settings."""
        system = collect_system_env(Path(os.environ.get("XP_LAUNCH_DIR", os.getcwd())))
        runtime: dict[str, Any] = {
            **self._env_settings,
            "threads": torch.get_num_threads(),
            "randomness": {**asdict(self._randomness), "seed_in_force": self.seed},
            "launcher": self.launcher.value,
            "distributed": self.distributed,
            "world_size": self.world_size,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "node_rank": self._info.node_rank,
            "hostname": socket.gethostname(),
            "device": str(self.root_device),
            "strategy": type(self).__name__,
        }
        if os.environ.get("SLURM_JOB_ID"):
            runtime["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        return system, runtime


def _shortened(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` names, and how many more there are."""
    head = ", ".join(names[:shown])
    return f"[{head}{f', ... ({len(names) - shown} more)' if len(names) > shown else ''}]"


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _move(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_move(v, device) for v in obj)
    return obj
