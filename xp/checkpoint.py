"""Checkpoint files: atomic writes, safe loads, naming and retention.

A checkpoint is complete exactly when its final name exists: it is written under a
temporary name in the same folder, flushed to disk, then renamed. A kill during a save
therefore leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import builtins
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step_(\d{8,})(\.pt)?$")
_TMP_SUFFIX = ".tmp"
COMPLETE_MARKER = "COMPLETE"
"""A sharded checkpoint (a folder) is complete once this file exists in it."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""


def atomic_save(state: dict[str, Any], path: Path) -> Path:
    """``torch.save`` to ``path`` so that ``path`` is either absent or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # The rename itself must reach the disk too, or a power loss can undo it.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_file(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` onto the CPU.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or holds pickled objects
            other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path or the run id.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Checkpoint {path} holds objects other than tensors and plain containers, so it is "
            f"refused (torch.load(weights_only=True) said: {str(e).splitlines()[0]}). Only load "
            "checkpoints you trust, re-saved as plain state dicts."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); use an earlier checkpoint "
            "from the same folder."
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(
            f"Checkpoint {path} holds a {type(state).__name__}, not a dict of states; it was not "
            "written by xp."
        )
    return state


def is_complete(path: Path) -> bool:
    """A single-file checkpoint that exists, or a sharded one whose marker is written."""
    return path.is_file() or (path.is_dir() and (path / COMPLETE_MARKER).is_file())


class Checkpointer:
    """Names, lists and prunes the checkpoints of one run folder.

    Single-file checkpoints are ``step_XXXXXXXX.pt``; sharded ones (FSDP, DeepSpeed) are
    folders ``step_XXXXXXXX/`` that count only once their ``COMPLETE`` marker exists.

    Args:
        directory: Where the checkpoints live (``<log_dir>/checkpoints``).
        keep: How many of the newest checkpoints to keep; 0 keeps all.
        sharded: Name new checkpoints as folders.
    """

    def __init__(self, directory: Path, keep: int = 3, *, sharded: bool = False) -> None:
        if keep < 0:
            raise ValueError(
                f"trainer.keep_checkpoints={keep} must be >= 0 (0 keeps every checkpoint)."
            )
        self.directory = Path(directory)
        self.keep = keep
        self.sharded = sharded

    def path_for(self, step: int) -> Path:
        """Where the checkpoint taken after ``step`` optimizer steps goes."""
        return self.directory / (f"step_{step:08d}" if self.sharded else f"step_{step:08d}.pt")

    def list(self) -> builtins.list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.directory.iterdir()
            if (m := _NAME.match(p.name)) and is_complete(p)
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.list()
        return found[-1] if found else None

    def prune(self) -> builtins.list[Path]:
        """Delete all but the ``keep`` newest checkpoints, and leftovers of dead writers.

        A sharded folder older than the newest complete checkpoint and still without its
        marker is the remains of an interrupted save.
        """
        removed: builtins.list[Path] = []
        complete = self.list()
        if self.keep:
            for path in complete[: -self.keep]:
                _remove(path)
                removed.append(path)
        if complete and self.directory.is_dir():
            newest = int(_NAME.match(complete[-1].name).group(1))  # type: ignore[union-attr]
            for path in self.directory.iterdir():
                m = _NAME.match(path.name)
                if m and path.is_dir() and not is_complete(path) and int(m.group(1)) < newest:
                    _remove(path)
                    removed.append(path)
        if self.directory.is_dir():
            for tmp in self.directory.glob(f".*{_TMP_SUFFIX}"):
                # Only files of dead writers: ours are renamed before prune runs.
                if not _owned_by_live_process(tmp):
                    _remove(tmp)
        return removed


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _owned_by_live_process(tmp: Path) -> bool:
    pid_part = tmp.name.removesuffix(_TMP_SUFFIX).rsplit(".", 1)[-1]
    if not pid_part.isdigit():
        return False
    try:
        os.kill(int(pid_part), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
