"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the ranks.

Checkpoints are folders that every rank writes in parallel with
``torch.distributed.checkpoint`` (DCP): the model and optimizer shards, plus ``extra.pt``
(schedules, RNG states, progress, config) from rank 0 and, last, the ``COMPLETE`` marker,
which records every file's size and sha256 (each rank hashes its own shards). DCP
reshards on load, so a run saved on N ranks resumes on M.

DCP's reader unpickles the folder's ``.metadata`` and the non-tensor entries of its shards
without restriction; xp reads both through :class:`SafeReader`, which builds only DCP's
own metadata classes and plain data, so a crafted folder cannot run code.

With ``checkpoint.async_save=true`` training waits only while DCP copies the shards into
host memory; DCP's thread writes them, and rank 0 then writes ``extra.pt`` and the marker.
One save is in flight at most: the next one (and :meth:`FSDPStrategy.wait_for_checkpoints`)
first waits for it, so a kill mid-save leaves the previous checkpoint the latest.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import gc
import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
)
from torch.futures import Future as TorchFuture

from xp.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    call_on_done,
    file_digests,
    is_complete,
    load_file,
    own_files,
    restricted_load,
    save_with_digest,
    unpickling_refusal,
    verify,
    wait_for_background_save,
    write_marker,
)
from xp.config import DType
from xp.optim import OptimWrapper
from xp.strategy.distributed import DistributedStrategy

EXTRA_FILE = "extra.pt"
"""What rank 0 writes beside the shards: schedules, RNG states, progress, config, meta."""
_SHARDED = ("model", "optim")
"""The checkpoint entries that DCP writes as shards, with those of
:meth:`~xp.strategy.base.Strategy.register_state` (an EMA's sharded average); the rest goes
to ``extra.pt``."""
_DTYPES = {DType.fp32: torch.float32, DType.bf16: torch.bfloat16, DType.fp16: torch.float16}
_SHARD_WRITER = re.compile(r"^__(\d+)_")
"""DCP names the files rank r writes ``__<r>_<n>.distcp``."""
_PATHS = frozenset(
    {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}
)
_METADATA_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset(
        {"Size", *(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))}
    ),
    "pathlib": _PATHS,  # StorageMeta.checkpoint_id: the folder it was saved to
    "pathlib._local": _PATHS,  # where Python 3.13 defines them
    "collections": frozenset({"OrderedDict"}),
}
"""What DCP pickles into ``.metadata``: its own dataclasses, sizes, dtypes and paths."""


class FSDPStrategy(DistributedStrategy):
    """Shard the model with FSDP2 over a 1-D device mesh of all ranks.

    Args:
        shard_modules: Class names of the modules to shard one by one (e.g. ``["Block"]``),
            so that only one of them is gathered at a time; the root is always sharded.
        reshard_after_forward: Free gathered parameters after forward (gathered again in
            backward): less memory, more communication.
        param_dtype: dtype of gathered parameters for compute; None keeps theirs.
        reduce_dtype: dtype of the gradient reduce-scatter; None follows ``param_dtype``.
        cpu_offload: Keep sharded parameters, gradients and optimizer state in CPU memory
            (for accelerator runs).
        activation_checkpointing: Class names of the modules whose activations are
            recomputed in backward instead of stored (non-reentrant checkpointing).
        **kwargs: See :class:`~xp.strategy.distributed.DistributedStrategy`.
    """

    sharded_checkpoints = True

    def __init__(
        self,
        *,
        shard_modules: Sequence[str] = (),
        reshard_after_forward: bool = True,
        param_dtype: DType | None = None,
        reduce_dtype: DType | None = None,
        cpu_offload: bool = False,
        activation_checkpointing: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        self._shard_modules = list(shard_modules)
        self._reshard_after_forward = reshard_after_forward
        self._param_dtype = param_dtype
        self._reduce_dtype = reduce_dtype
        self._cpu_offload = cpu_offload
        self._activation_checkpointing = list(activation_checkpointing)
        self._async_save: _AsyncSave | None = None
        self._in_flight: tuple[Path, Future[None]] | None = None
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ wrapping

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        if self._cpu_offload and self.root_device.type == "cpu":
            raise ValueError(
                "strategy.cpu_offload=true moves sharded state off an accelerator into CPU "
                f"memory, but this run computes on {self.root_device}, where it already is; "
                "set strategy.cpu_offload=false (or run on CUDA)."
            )
        # Each rank built (and with randomness.diff_rank_seed, initialized) its own model;
        # sharding it as is would splice rank 0's rows of one shard with rank 1's of another.
        self.broadcast_module(model)
        to_shard = _modules_of_classes(
            model, self._shard_modules, "strategy.shard_modules", root=True
        )
        to_checkpoint = _modules_of_classes(
            model, self._activation_checkpointing, "strategy.activation_checkpointing", root=False
        )
        if to_checkpoint:
            chosen = {id(m) for m in to_checkpoint}
            apply_activation_checkpointing(
                model,
                checkpoint_wrapper_fn=partial(
                    checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
                ),
                check_fn=lambda m: id(m) in chosen,
            )
            # Shard the wrapper rather than the module inside it, so that FSDP gathers the
            # parameters before the recomputed region instead of inside it.
            outer = {
                id(m._checkpoint_wrapped_module): m
                for m in model.modules()
                if isinstance(m, CheckpointWrapper)
            }
            to_shard = [outer.get(id(m), m) for m in to_shard]
        options: dict[str, Any] = {
            "mesh": init_device_mesh(self.root_device.type, (self.world_size,)),
            "reshard_after_forward": self._reshard_after_forward,
        }
        if self._param_dtype is not None or self._reduce_dtype is not None:
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=_DTYPES[self._param_dtype] if self._param_dtype else None,
                reduce_dtype=_DTYPES[self._reduce_dtype] if self._reduce_dtype else None,
            )
        if self._cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        own_step = callable(getattr(model, "train_step", None))
        if own_step:
            # Its train_step calls the parts (a GAN's generator, discriminator) directly, never
            # the root's forward, whose hooks would gather the root's parameters: shard each
            # part as a root of its own instead (mmengine wraps each part separately too).
            direct = [name for name, _ in model.named_parameters(recurse=False)]
            if direct:
                raise ValueError(
                    f"strategy=fsdp with {type(model).__qualname__}.train_step needs every "
                    f"parameter inside a submodule, but {direct[:3]} sit on the model itself; "
                    "move them into a submodule, or use strategy=ddp."
                )
            parts = [child for child in model.children() if any(True for _ in child.parameters())]
            to_shard = [m for m in to_shard if m is not model] + parts
        # Children before parents: a parameter belongs to the innermost sharded module.
        for module in to_shard:
            if module is not model:
                fully_shard(module, **options)
        if not own_step:
            fully_shard(model, **options)
        self.logger.info(
            "FSDP: sharded %d module(s)%s over %d rank(s).",
            len([m for m in to_shard if m is not model]),
            "" if own_step else " and the root",
            self.world_size,
        )
        return model

    def _no_sync(self, model: nn.Module) -> Callable[[], Any] | None:
        if not isinstance(model, FSDPModule):
            return None  # a model with its own train_step: its parts sync every backward
        skipping = False
        syncing = True

        @contextlib.contextmanager
        def no_sync() -> Iterator[None]:
            nonlocal skipping
            skipping = True
            try:
                yield
            finally:
                skipping = False

        def settle_sync(module: nn.Module, args: Any) -> None:
            # FSDP2 decides in backward whether to reduce-scatter gradients, but the optimizer
            # wrapper enters no_sync around the forward only: each forward fixes the choice
            # for the backward that follows it (setting it visits every module, so only on
            # a change).
            nonlocal syncing
            if syncing == skipping:
                syncing = not skipping
                model.set_requires_gradient_sync(syncing)

        model.register_forward_pre_hook(settle_sync)
        return no_sync

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model itself: FSDP2 shards the user's module in place."""
        return model

    def reshard(self, model: nn.Module) -> None:
        """Free every gathered copy of the parameters and register the sharded ones.

        The root does not reshard after its forward (its parameters are used again in
        backward), so after an evaluation its gathered copy stays registered until
        something reshards it; FSDP's maintainers advise an explicit ``reshard()`` there
        (pytorch/pytorch#154655). Shards written in place meanwhile (an EMA's swap) must
        be what the next forward gathers.
        """
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _teardown_distributed(self) -> None:
        try:
            # A save in flight completes first: its thread needs the group.
            self._finish_async_save()
        finally:
            if self._async_save is not None:
                async_save, self._async_save = self._async_save, None
                async_save.close()
            super()._teardown_distributed()
            # FSDP's modules keep the (now destroyed) process group in reference cycles. Freed
            # by the interpreter's own shutdown, gloo's threads abort the process about one
            # run in four ("terminate called without an active exception"); collected at
            # exit, while everything still stands, they end cleanly. Registered once,
            # however many teardowns.
            atexit.unregister(gc.collect)
            atexit.register(gc.collect)

    # ------------------------------------------------------------------ state

    def optim_state_dict(self) -> dict[str, Any]:
        """The wrappers' state, each optimizer's keyed by parameter name with sharded tensors.

        Names rather than positions, and DTensor shards, are what DCP needs to reshard the
        state at another world size.
        """
        state = super().optim_state_dict()
        for wrapper, entry in self._wrapper_states(state):
            entry["optimizer"] = get_optimizer_state_dict(self.prepared.model, wrapper.optimizer)
        return state

    def load_optim_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`optim_state_dict` returned (onto this run's shards)."""
        for wrapper, entry in self._wrapper_states(state):
            set_optimizer_state_dict(self.prepared.model, wrapper.optimizer, entry["optimizer"])
            # The wrapper restores its counters and GradScaler; its optimizer is already
            # loaded, so it gets its own state back.
            wrapper.load_state_dict({**entry, "optimizer": wrapper.optimizer.state_dict()})

    def _wrapper_states(self, state: Mapping[str, Any]) -> list[tuple[OptimWrapper, Any]]:
        """Each optimizer wrapper with its entry of ``state``."""
        wrapper = self.prepared.optim_wrapper
        if wrapper is None:
            return []
        if isinstance(wrapper, OptimWrapper):
            return [(wrapper, state)]
        if set(state) != set(wrapper):
            raise CheckpointError(
                f"The checkpoint holds optimizers {sorted(state)}, but this run has "
                f"{sorted(wrapper)}; resume with the same optim.optimizers names."
            )
        return [(w, state[name]) for name, w in wrapper.items()]

    # ------------------------------------------------------------------ checkpoints

    def use_async_checkpoints(self, on_done: Callable[[Path], object] | None = None) -> bool:
        """Save later checkpoints with DCP's ``async_save``; every rank must call it.

        Args:
            on_done: Called on rank 0, on DCP's thread, after each checkpoint is complete.
        """
        if self._async_save is None:
            self._async_save = _AsyncSave(pinned=self.root_device.type == "cuda")
        self._async_save.on_done = on_done
        return True

    def wait_for_checkpoints(self) -> None:
        """Block until the checkpoint in flight is written (on rank 0: and marked complete)."""
        super().wait_for_checkpoints()
        self._finish_async_save()

    def _write_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        """Every rank writes its shards; rank 0 writes ``extra.pt`` and then the marker."""
        # Never two saves in flight: DCP's thread would run two saves' collectives at once.
        self._finish_async_save()
        if self.is_main_process:
            # Saving over a folder: it stops counting as complete before any shard changes
            # (no rank writes before dcp.save's planning, which waits for rank 0).
            (path / COMPLETE_MARKER).unlink(missing_ok=True)
        rest = dict(state)
        shards = {key: rest.pop(key) for key in (*_SHARDED, *self._states) if key in rest}
        if self._async_save is not None:
            extra = copy.deepcopy(rest) if self.is_main_process else None
            self._in_flight = (path, self._async_save.submit(shards, path, extra))
            return
        dcp.save(shards, checkpoint_id=path)
        # Each rank hashes the shards it wrote; rank 0 records them all in the marker.
        digests = self.all_gather_object(_rank_digests(path, self.rank, self.world_size))
        if self.is_main_process:
            _finish_folder(path, rest, digests)
        self.barrier()

    def _finish_async_save(self) -> None:
        """Wait for the save in flight, if any (rank 0: until its folder is complete)."""
        if self._in_flight is not None:
            path, done = self._in_flight
            self._in_flight = None
            wait_for_background_save(path, done)

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        """The checkpoint without its shards, which :meth:`_restore_states` loads."""
        if path.is_file():
            raise CheckpointError(
                f"Checkpoint {path} is a single file; strategy=fsdp reads the sharded folders "
                "it writes (step_XXXXXXXX/). Load it with the strategy that wrote it."
            )
        if not path.is_dir():
            raise CheckpointError(
                f"Checkpoint {path} does not exist; check the path or the run id."
            )
        if not is_complete(path):
            raise CheckpointError(
                f"Checkpoint folder {path} is incomplete: it has no {COMPLETE_MARKER} marker, so "
                "its save was interrupted. Use an earlier checkpoint from the same folder."
            )
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
        """Load the model shards (then the optimizer's) into this run's sharding."""
        saved = SafeReader(path).read_metadata()
        model = self._load_shards(path, {"model": self._model_target(saved)})["model"]
        super()._restore_states(
            {**checkpoint, "model": model},
            path,
            strict=strict,
            revise_keys=revise_keys,
            optimizer=False,
        )
        if optimizer and any(fqn[0] == "optim" for fqn in saved.planner_data.values()):
            # Only now: reading into the optimizer needs its state initialised (a step with
            # lr 0), which a model-only load must not do.
            target = self._load_shards(path, {"optim": self.optim_state_dict()})
            self.load_optim_state_dict(target["optim"])

    def _restore_registered(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        """Load each registered state from the shards into its own (sharded) tensors.

        Only the names the checkpoint holds are loaded (a callback added on resume starts
        fresh); names it holds that this run lacks are handed over empty, to be reported.
        """
        saved = SafeReader(path).read_metadata()
        for key, stateful in self._states.items():
            names = {str(fqn[1]) for fqn in saved.planner_data.values() if fqn[0] == key}
            if len(names) == 0:
                stateful.load_state_dict({})
                continue
            own = stateful.state_dict()
            target = {name: value for name, value in own.items() if name in names}
            loaded = self._load_shards(path, {key: target})[key] if target else {}
            stateful.load_state_dict({**{name: {} for name in names - set(own)}, **loaded})

    def _model_target(self, saved: dcp.Metadata) -> dict[str, Any]:
        """Where each saved model entry loads: this run's shard, or a whole tensor.

        Entries that fit the model load into its own (sharded) state; the others load whole,
        so that the strict check can report them by name and shape.
        """
        own = self.model_state_dict()
        target: dict[str, Any] = {}
        for key, meta in saved.state_dict_metadata.items():
            fqn = saved.planner_data[key]
            if fqn[0] != "model":
                continue
            name = ".".join(str(part) for part in fqn[1:])
            mine = own.get(name)
            if not isinstance(meta, TensorStorageMetadata) or (
                isinstance(mine, torch.Tensor) and mine.shape == meta.size
            ):
                target[name] = mine
            else:
                target[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
        return target

    def _load_shards(self, path: Path, target: dict[str, Any]) -> dict[str, Any]:
        try:
            dcp.load(target, storage_reader=SafeReader(path))
        except dcp.CheckpointException as e:
            _raise_refusal(e)
            raise CheckpointError(
                f"Checkpoint {path} does not fit this run's {' and '.join(target)} "
                f"({str(e).strip().splitlines()[-1]}); resume with the model and optimizer "
                "config it was saved with."
            ) from e
        return target


def _rank_digests(path: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Sizes and sha256 of the files ``rank`` wrote into a checkpoint folder (rank 0: the
    rest too, but ``extra.pt``, whose digest it takes while writing it)."""
    return file_digests(path, own_files(path, rank, world_size, _SHARD_WRITER, skip=(EXTRA_FILE,)))


def _finish_folder(path: Path, extra: dict[str, Any], digests: Sequence[Mapping[str, Any]]) -> None:
    """Rank 0, once DCP's save returned: ``extra.pt``, then the marker that makes it count.

    DCP's save returns on rank 0 only once every rank's shards (each fsync'd) and the
    metadata are written, so the folder is complete now.

    Args:
        digests: Every rank's :func:`_rank_digests`.
    """
    sha256 = save_with_digest(extra, path / EXTRA_FILE)
    files = {name: record for rank_files in digests for name, record in rank_files.items()}
    files[EXTRA_FILE] = {"bytes": (path / EXTRA_FILE).stat().st_size, "sha256": sha256}
    write_marker(path, files, kind="fsdp")


class _AsyncSave:
    """DCP's ``async_save`` on a group of its own, into kept host copies, then the marker.

    Rank 0 writes ``extra.pt`` and the marker once every rank's shards are written.
    Created on every rank, in the same order (a new group is a collective).

    Args:
        pinned: Stage into pinned memory (shards on CUDA).
    """

    def __init__(self, *, pinned: bool) -> None:
        # DCP's thread runs collectives (planning, the final gather) while training runs
        # FSDP's on the default group; sharing a group would interleave the two. gloo also
        # gives NCCL runs the CPU backend that async_save requires.
        self.group = dist.new_group(backend="gloo")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # One stager for the whole run: it keeps its host copies and refills them on the next
        # save, where async_save's own stager would allocate (and page in) a fresh copy each time.
        self.stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=pinned,
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=False,
            )
        )
        self.on_done: Callable[[Path], object] | None = None

    def submit(
        self, shards: dict[str, Any], path: Path, extra: dict[str, Any] | None
    ) -> Future[None]:
        """Copy ``shards`` to host memory and write them in the background.

        Args:
            shards: This rank's model and optimizer state dicts.
            path: The checkpoint folder.
            extra: What rank 0 writes beside the shards once they are all written; None
                on the other ranks.

        Returns:
            Done once this rank's part is written (rank 0: the folder is complete and
            ``on_done`` has run).
        """
        saved = dcp.async_save(
            shards, checkpoint_id=path, process_group=self.group, async_stager=self.stager
        )
        assert isinstance(saved, Future)  # an AsyncSaveResponse only for async staging
        done: Future[None] = Future()

        def finish(saved: Future[Any]) -> None:
            # On DCP's thread: every rank hashes its shards there, off the training thread.
            try:
                failed: BaseException | None = None
                try:
                    saved.result()
                    digests = _rank_digests(path, self.rank, self.world_size)
                except BaseException as e:
                    failed, digests = e, None
                # Every rank joins the gather, also one whose write failed, or the rest
                # would wait for it.
                gathered: list[Any] = [None] * self.world_size
                dist.all_gather_object(gathered, digests, group=self.group)
                if failed is not None:
                    raise failed
                if extra is not None:
                    lost = [rank for rank, d in enumerate(gathered) if d is None]
                    if lost:
                        raise CheckpointError(
                            f"Rank(s) {lost} failed to write their shards of {path}; it is left "
                            "incomplete (the previous checkpoint stays the latest)."
                        )
                    _finish_folder(path, extra, gathered)
                    call_on_done(self.on_done, path)
            except BaseException as e:
                done.set_exception(e)
            else:
                done.set_result(None)

        saved.add_done_callback(finish)
        return done

    def close(self) -> None:
        """Free the host copies and leave the group (after the last save is done)."""
        self.stager.close()
        if dist.is_initialized():
            # gloo: a rank may still be sending the last save's result to another.
            dist.barrier(group=self.group)
            dist.destroy_process_group(self.group)


def export_model_state(path: Path, *, check: bool = True) -> dict[str, torch.Tensor]:
    """The full model state dict of an FSDP checkpoint folder, as plain CPU tensors.

    Reads the shards in this one process, without a process group (so call it where none
    is initialised). Keys are the user's module names, as ``model.state_dict()`` has them.

    Args:
        path: A complete FSDP checkpoint folder.
        check: Verify its files' checksums first.

    Raises:
        CheckpointError: The folder is incomplete, corrupt, or its pickles name globals
            that DCP's metadata does not use.
    """
    state = read_sharded_entries(path, ("model",), check=check)
    if "model" not in state:
        raise CheckpointError(f"Checkpoint {path} has no model state; it was not written by xp.")
    return {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}


def read_sharded_entries(path: Path, keys: Sequence[str], *, check: bool = True) -> dict[str, Any]:
    """Entries of an FSDP checkpoint folder's shards (``model``, ``callbacks``...), whole.

    Read in this one process, without a process group; an entry the folder lacks is left
    out. Raises as :func:`export_model_state`.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(
            f"Checkpoint folder {path} is missing or incomplete (no {COMPLETE_MARKER} marker); "
            "export a complete checkpoint."
        )
    if check:
        verify(path)
    reader = SafeReader(path)
    # Its refusal first, before DCP would wrap it in its own exception.
    metadata = reader.read_metadata()
    present = {str(fqn[0]) for fqn in metadata.planner_data.values()} & set(keys)
    if not present:
        return {}
    with warnings.catch_warnings():
        # It warns that it assumes a single process, which is the point here.
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable")
        try:
            return _load_state_dict_from_keys(present, storage_reader=reader)
        except dcp.CheckpointException as e:
            _raise_refusal(e)
            raise CheckpointError(
                f"Checkpoint {path} could not be read ({str(e).strip().splitlines()[-1]})."
            ) from e


class SafeReader(dcp.FileSystemReader):
    """DCP's ``FileSystemReader`` without its two ways to run a checkpoint's code.

    DCP unpickles ``.metadata`` with ``pickle.load`` and the non-tensor entries of the
    shards (optimizer param groups, counters) with ``torch.load(weights_only=False)``.
    Here the metadata builds only DCP's own classes (the restricted unpickler of
    :func:`~xp.checkpoint.restricted_load`), every non-tensor entry must first load with
    ``torch.load(weights_only=True)``, and the metadata may name only files inside the
    folder. Tensors DCP already loads with ``weights_only=True``.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp.Metadata:
        rank = kwargs.get("rank")
        folder = Path(self.path)
        file = folder / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(file, "rb") as f:
                metadata = restricted_load(f, _METADATA_GLOBALS)
        except pickle.UnpicklingError as e:
            raise CheckpointError(_refused(file, e)) from e
        except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(
                f"Checkpoint {folder} has an unreadable {file.name} ({type(e).__name__}: {e}); "
                "use an earlier checkpoint."
            ) from e
        if not isinstance(metadata, dcp.Metadata):
            raise CheckpointError(
                f"Checkpoint {folder}: {file.name} holds a {type(metadata).__name__}, not DCP's "
                "metadata; it was not written by xp."
            )
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
                raise CheckpointError(
                    f"Checkpoint {folder}: {file.name} points at {name!r}, outside the folder; "
                    "it is refused. Only load checkpoints you trust."
                )
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = getattr(self, "load_id", None)
        metadata.storage_meta = storage_meta
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> TorchFuture[None]:
        return super().read_data(plan, cast(LoadPlanner, _VettedBytes(planner, Path(self.path))))


class _VettedBytes:
    """A load planner that lets only plain data through to ``planner.load_bytes``."""

    def __init__(self, planner: LoadPlanner, folder: Path) -> None:
        self._planner = planner
        self._folder = folder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        data = value.read()
        what = f"{self._folder} (entry {read_item.dest_index.fqn})"
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(_refused(what, e)) from e
        except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(
                f"Checkpoint {what} is corrupt ({type(e).__name__}); use an earlier checkpoint."
            ) from e
        # DCP's planner unpickles without restriction: it gets bytes that passed above.
        self._planner.load_bytes(read_item, io.BytesIO(data))


def _refused(what: Path | str, error: Exception) -> str:
    return (
        f"Checkpoint {what} pickles objects other than DCP's metadata and plain data "
        f"({unpickling_refusal(error)}), so it is refused: unpickling it could run code. Only "
        "load checkpoints you trust."
    )


def _raise_refusal(error: dcp.CheckpointException) -> None:
    """Raise the CheckpointError that DCP caught on some rank (a refusal), if any."""
    for failure in error.failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, CheckpointError):
            raise cause from error


def _modules_of_classes(
    model: nn.Module, names: Sequence[str], key: str, *, root: bool
) -> list[nn.Module]:
    """The modules of ``model`` whose class is named in ``names``, children before parents.

    Raises:
        ValueError: A name matches no module (``key`` is its config key).
    """
    candidates = [m for m in model.modules() if root or m is not model]
    classes = sorted({type(m).__name__ for m in candidates})
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise ValueError(
            f"{key}={list(names)}: {unknown[0]!r} is the class of no "
            f"{'module' if root else 'submodule'} of {type(model).__name__}; its classes are "
            f"{classes}. Name some of those."
        )
    wanted = set(names)
    return [m for m in reversed(candidates) if type(m).__name__ in wanted]
