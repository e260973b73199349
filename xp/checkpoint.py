"""Checkpoint files: atomic writes, checksums, safe loads, naming and retention.

A checkpoint is complete exactly when its final name exists: it is written under a
temporary name in the same folder, flushed to disk, then renamed. A kill during a save
therefore leaves the previous checkpoint as the latest one.

Every file of a checkpoint gets a sha256 when it is saved: a single file in a sidecar
``step_XXXXXXXX.pt.sha256`` (``sha256sum -c`` reads it), the files of a sharded folder in
its ``COMPLETE`` marker. :func:`verify` checks them, so a truncated or bit-flipped
checkpoint is named as such instead of loading (or failing) somewhere deep in torch.
Checkpoints saved before checksums existed still load, unverified.

:class:`AsyncCheckpointWriter` moves the write off the training thread: training waits
only for a copy of the state into host memory, and a background thread writes that copy
with :func:`atomic_save` (and computes its checksum).
"""

from __future__ import annotations

import builtins
import copy
import hashlib
import json
import os
import pickle
import re
import shutil
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch

_NAME = re.compile(r"^step_(\d{8,})(\.pt)?$")
_TMP_SUFFIX = ".tmp"
COMPLETE_MARKER = "COMPLETE"
"""A sharded checkpoint (a folder) is complete once this file exists in it."""
CHECKSUM_SUFFIX = ".sha256"
"""A single-file checkpoint's sha256 sits beside it in ``<name>.sha256`` (sha256sum format)."""
CORRUPT_SUFFIX = ".corrupt"
"""A checkpoint that failed its checksum is moved aside under this suffix (never deleted)."""
_MARKER_FORMAT = "xp-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint whose files are not what was saved: truncated, changed or missing.

    Attributes:
        path: The checkpoint (file or folder).
        reason: What is wrong, in a few words (``checksum mismatch in __0_0.distcp``).
    """

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"Checkpoint {path} is corrupt ({reason}); use an earlier checkpoint from the "
            "same folder (resume= or load_from= of the run directory picks the newest one "
            "that verifies)."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised on one rank, it crosses to the others pickled (DCP gathers failures).
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------------- writing


def atomic_save(state: dict[str, Any], path: Path, *, checksum: bool = True) -> Path:
    """``torch.save`` to ``path`` so that ``path`` is either absent or complete.

    Args:
        state: What to save.
        path: Where.
        checksum: Write the file's sha256 beside it (``<path>.sha256``) before the file
            takes its name, so a complete checkpoint always has its checksum.
    """
    save_with_digest(state, path, sidecar=checksum)
    return path


def save_with_digest(state: dict[str, Any], path: Path, *, sidecar: bool = False) -> str:
    """:func:`atomic_save` that returns the sha256 of the written file.

    The digest is computed from the file just written (in the page cache), on a thread of
    its own while this one waits for the data to reach the disk, so it adds little to a
    save; hashing the bytes inside ``torch.save``'s writes measured slower (the two then
    run one after the other).

    Args:
        sidecar: Also write ``<path>.sha256`` (before ``path`` takes its name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            digest = _fsync_and_hash(f, tmp)
        if sidecar:
            write_text_atomic(checksum_file(path), f"{digest}  {path.name}\n", sync_dir=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # The rename itself must reach the disk too, or a power loss can undo it.
    _fsync_dir(path.parent)
    return digest


def write_text_atomic(path: Path, text: str, *, sync_dir: bool = True) -> None:
    """Write ``text`` to ``path`` under a temporary name, flush it to disk, then rename it."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_dir:
        _fsync_dir(path.parent)


def checksum_file(path: Path) -> Path:
    """Where the sha256 of the single-file checkpoint ``path`` is recorded."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fsync_and_hash(f: IO[bytes], path: Path) -> str:
    """fsync the open file ``f`` while another thread hashes ``path`` (its written bytes)."""
    result: dict[str, Any] = {}

    def digest() -> None:
        try:
            result["sha256"] = sha256_of(path)
        except BaseException as e:  # handed to the caller below
            result["error"] = e

    thread = threading.Thread(target=digest, name="xp-checksum", daemon=True)
    thread.start()
    try:
        os.fsync(f.fileno())
    finally:
        thread.join()
    if "error" in result:
        raise result["error"]
    return str(result["sha256"])


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        return h.hexdigest()


def file_digests(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of the files ``names`` of ``folder``."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(names):
        file = folder / name
        out[name] = {"bytes": file.stat().st_size, "sha256": sha256_of(file)}
    return out


def folder_files(folder: Path) -> builtins.list[str]:
    """The files of a sharded checkpoint that its marker records (not the marker, no temps)."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.endswith(_TMP_SUFFIX)
    )


def own_files(
    folder: Path, rank: int, world_size: int, owner: re.Pattern[str], skip: Collection[str] = ()
) -> builtins.list[str]:
    """The files of a sharded checkpoint that ``rank`` hashes for its marker.

    Those whose name ``owner`` matches with a rank (group 1) are that rank's (each rank
    hashes what it wrote, in parallel); rank 0 takes the rest.
    """
    mine = []
    for name in folder_files(folder):
        m = owner.search(name)
        writer = int(m.group(1)) if m else 0
        if (writer if writer < world_size else 0) == rank and name not in skip:
            mine.append(name)
    return mine


def write_marker(folder: Path, files: Mapping[str, Mapping[str, Any]], *, kind: str) -> None:
    """Write ``COMPLETE`` into a sharded checkpoint: its files' sizes and sha256, atomically.

    Args:
        folder: The checkpoint folder, every file of which is written and on disk.
        files: What :func:`file_digests` returned for them (from every rank).
        kind: Who wrote the folder (``fsdp``, ``deepspeed``), for people reading the file.
    """
    record = {"format": _MARKER_FORMAT, "kind": kind, "files": dict(sorted(files.items()))}
    write_text_atomic(folder / COMPLETE_MARKER, json.dumps(record, indent=1) + "\n")


def recorded_files(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The files and checksums a folder's marker records; None for a marker without them
    (a checkpoint saved before xp recorded checksums)."""
    try:
        record = json.loads((folder / COMPLETE_MARKER).read_bytes())
    except (OSError, ValueError):  # an older marker: a torch file, or "deepspeed"
        return None
    if not isinstance(record, dict) or record.get("format") != _MARKER_FORMAT:
        return None
    files = record.get("files")
    return dict(files) if isinstance(files, dict) else None


# --------------------------------------------------------------------------- verifying

_verified: dict[tuple[Any, ...], str] = {}
"""Files hashed in this process: (path, inode, size, mtime, ctime) -> sha256."""
_verified_lock = threading.Lock()


def _digest_cached(path: Path) -> str:
    """sha256 of ``path``, hashed once per process for as long as the file is unchanged.

    ``resume=`` verifies a checkpoint when it picks it and again when it loads it.
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _verified_lock:
        known = _verified.get(key)
    if known is None:
        known = sha256_of(path)
        with _verified_lock:
            _verified[key] = known
    return known


def verify(path: Path, *, share: tuple[int, int] = (0, 1)) -> bool:
    """Check a checkpoint against the checksums recorded when it was saved.

    Args:
        path: A single-file checkpoint, or a sharded checkpoint folder.
        share: ``(rank, world_size)``: check only every ``world_size``-th file of a
            folder, from the ``rank``-th, so that ranks share the work.

    Returns:
        True when it verified; False when it records no checksums (saved by an older xp).

    Raises:
        CheckpointCorrupt: A file is missing, truncated or differs from what was saved.
    """
    path = Path(path)
    if path.is_file():
        return _verify_file(path)
    files = recorded_files(path)
    if files is None:
        return False
    rank, world_size = share
    for name, record in sorted(files.items())[rank::world_size]:
        file = path / name
        if not file.is_file():
            raise CheckpointCorrupt(path, f"{name} is missing")
        size, saved = file.stat().st_size, int(record.get("bytes", -1))
        if size != saved:
            what = "truncated" if size < saved else "longer than saved"
            raise CheckpointCorrupt(path, f"{what}: {name} has {size} bytes, {saved} when saved")
        if _digest_cached(file) != record.get("sha256"):
            raise CheckpointCorrupt(path, f"checksum mismatch in {name}")
    return True


def _verify_file(path: Path) -> bool:
    recorded = checksum_file(path)
    try:
        line = recorded.read_text()
    except FileNotFoundError:
        line = None
    if line is not None and line.split()[:1] and _digest_cached(path) == line.split()[0]:
        return True
    # Not verified: a truncated zip (torch's format) has lost its central directory.
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointCorrupt(path, f"truncated or not a torch file: {e}") from e
    if line is None:
        return False
    raise CheckpointCorrupt(path, f"checksum mismatch with {recorded.name}")


# --------------------------------------------------------------------------- loading


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only the globals in ``allowed`` (module -> names); imports nothing else."""

    def __init__(self, file: IO[bytes], allowed: Mapping[str, Collection[str]]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        # Checked before anything is imported: importing a module can run code too.
        if name in self._allowed.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def restricted_load(file: IO[bytes], allowed: Mapping[str, Collection[str]]) -> Any:
    """Unpickle ``file`` building only the classes and functions in ``allowed``.

    For pickles that are not torch files (DCP's ``.metadata``); torch files go through
    ``torch.load(weights_only=True)``, which does the same for tensors.

    Raises:
        pickle.UnpicklingError: The pickle names a global outside ``allowed``.
    """
    return _RestrictedUnpickler(file, allowed).load()


def unpickling_refusal(error: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` (or :func:`restricted_load`) refused, in a line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip().split(". ", 1)[0]
    return text.splitlines()[0] if text else type(error).__name__


def load_file(path: Path, *, check: bool = True) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` onto the CPU.

    Args:
        path: A single-file checkpoint (or a file of a sharded one).
        check: Verify its recorded sha256 first, where one is recorded.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or holds pickled objects
            other than tensors and plain containers.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"Checkpoint {path} is a folder, the sharded checkpoint of strategy=fsdp or "
            "strategy=deepspeed; load it with the strategy that wrote it, or convert it "
            f"with `python -m xp export ckpt={path} out=model.pt`."
        )
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path or the run id.")
    if check and checksum_file(path).is_file():
        verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Checkpoint {path} holds objects other than tensors and plain containers, so it is "
            f"refused (torch.load(weights_only=True) said: {unpickling_refusal(e)}). Only load "
            "checkpoints you trust, re-saved as plain state dicts."
        ) from e
    except Exception as e:  # any file can be given: a text file fails deep in the unpickler
        raise CheckpointError(
            f"Checkpoint {path} is corrupt, truncated or not a checkpoint ({type(e).__name__}: "
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

    BEST_FILE = "best.json"
    """Names the best checkpoint (``checkpoint.monitor``), which pruning keeps."""

    def __init__(self, directory: Path, keep: int = 3, *, sharded: bool = False) -> None:
        if keep < 0:
            raise ValueError(f"checkpoint.keep={keep} must be >= 0 (0 keeps every checkpoint).")
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

    def latest_verified(self) -> tuple[Path | None, builtins.list[CheckpointCorrupt]]:
        """The newest complete checkpoint that verifies (:func:`verify`), and the newer
        ones that did not, newest first."""
        skipped: builtins.list[CheckpointCorrupt] = []
        for path in reversed(self.list()):
            try:
                verify(path)
            except CheckpointCorrupt as e:
                skipped.append(e)
                continue
            return path, skipped
        return None, skipped

    def set_aside(self, path: Path) -> Path:
        """Rename a corrupt checkpoint to ``<name>.corrupt`` (and its checksum with it).

        It then no longer counts as a checkpoint: nothing resumes from it, and pruning
        (which keeps the newest) neither keeps it in place of good ones nor deletes it.

        Returns:
            Its new path.
        """
        target = path.with_name(path.name + CORRUPT_SUFFIX)
        n = 1
        while target.exists():
            target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{n}")
            n += 1
        os.replace(path, target)
        recorded = checksum_file(path)
        if recorded.is_file():
            os.replace(recorded, checksum_file(target))
        return target

    def set_best(self, path: Path, info: Mapping[str, Any]) -> None:
        """Record ``path`` as the best checkpoint (``info``: its step, metric and value)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {**{k: v for k, v in info.items() if k != "path"}, "name": Path(path).name}
        tmp = self.directory / f".{self.BEST_FILE}.{os.getpid()}{_TMP_SUFFIX}"
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, self.directory / self.BEST_FILE)

    def best_info(self) -> dict[str, Any] | None:
        """What :meth:`set_best` recorded, or None."""
        record = self.directory / self.BEST_FILE
        if not record.is_file():
            return None
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and isinstance(info.get("name"), str) else None

    def best(self) -> Path | None:
        """The best complete checkpoint, or None when none was recorded (or it is gone)."""
        info = self.best_info()
        if info is None:
            return None
        path = self.directory / info["name"]
        return path if path.exists() and is_complete(path) else None

    def prune(self) -> builtins.list[Path]:
        """Delete all but the ``keep`` newest checkpoints (and the best), and leftovers of
        dead writers.

        A sharded folder older than the newest complete checkpoint and still without its
        marker is the remains of an interrupted save.
        """
        removed: builtins.list[Path] = []
        complete = self.list()
        best = self.best()
        if self.keep:
            for path in complete[: -self.keep]:
                if path == best:
                    continue
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
            if complete:
                # Checksums of files that a save never renamed into place (killed between).
                for recorded in self.directory.glob(f"step_*.pt{CHECKSUM_SUFFIX}"):
                    m = _NAME.match(recorded.name.removesuffix(CHECKSUM_SUFFIX))
                    if (
                        m
                        and int(m.group(1)) < newest
                        and not recorded.with_name(m.group(0)).exists()
                    ):
                        recorded.unlink(missing_ok=True)
        return removed


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        if _NAME.match(path.name):
            checksum_file(path).unlink(missing_ok=True)


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


# --------------------------------------------------------------------------- asynchronous saves

_Position = tuple[Any, ...]
"""Where a tensor sits in a state: the keys and indices that lead to it."""
_IMMUTABLE = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


def state_nbytes(state: Any) -> int:
    """Bytes of the tensors in ``state`` (nested dicts, lists and tuples), each view once."""
    seen: dict[tuple[Any, ...], int] = {}
    _collect_nbytes(state, seen)
    return sum(seen.values())


def _collect_nbytes(obj: Any, seen: dict[tuple[Any, ...], int]) -> None:
    if isinstance(obj, torch.Tensor):
        seen[_alias_key(obj)] = obj.numel() * obj.element_size()
    elif isinstance(obj, dict):
        for value in obj.values():
            _collect_nbytes(value, seen)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _collect_nbytes(value, seen)


def _alias_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two tensor objects that are the same view of the same memory."""
    if t.layout != torch.strided:
        return ("object", id(t))
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
    )


class _OnDoneFailed(Exception):
    """The file was written, then the ``on_done`` callback raised (its error is the cause)."""


def call_on_done(on_done: Callable[[Path], object] | None, path: Path) -> None:
    """Run a background save's ``on_done(path)``, marking an error in it as the callback's.

    :func:`wait_for_background_save` then reports it as such, not as a failed write.
    """
    if on_done is not None:
        try:
            on_done(path)
        except Exception as e:
            raise _OnDoneFailed from e


def wait_for_background_save(path: Path, future: Future[None]) -> None:
    """Block until the background save of ``path`` (and its :func:`call_on_done`) is done.

    Raises:
        CheckpointError: The save or its ``on_done`` failed, with what to do about it.
    """
    try:
        future.result()
    except _OnDoneFailed as e:
        cause = e.__cause__
        raise CheckpointError(
            f"Checkpoint {path} was saved, but on_done({path}) then raised "
            f"{type(cause).__name__}: {cause}; fix the callback (old checkpoints may not "
            "have been pruned)."
        ) from cause
    except Exception as e:
        raise CheckpointError(
            f"Writing checkpoint {path} in the background failed ({type(e).__name__}: {e}); "
            f"the previous checkpoint is untouched. Check that {path.parent} is writable "
            "and has free space."
        ) from e


class AsyncCheckpointWriter:
    """Writes single-file checkpoints on one background thread, one save at a time.

    :meth:`submit` blocks training only while it copies the state into host memory; a
    background thread then writes that copy with :func:`atomic_save`, so a kill during
    the write leaves the previous checkpoint complete. The copy goes into buffers kept
    from the previous save when the shapes and dtypes match (pinned memory for CUDA
    tensors), so after the first save it costs one memcpy per tensor and no allocation;
    the price is host memory for one copy of the state for as long as the writer lives.

    Call it from one thread (the training loop). Errors of a background save surface on
    that thread, as :class:`CheckpointError`, from the next :meth:`wait`, :meth:`submit`
    or :meth:`close`. Use it as a context manager, or call :meth:`close`, so the last
    save is on disk before the process moves on (e.g. to upload checkpoints).

    Args:
        on_done: Called with the path on the background thread after each file is
            complete, e.g. ``lambda path: checkpointer.prune()``.
    """

    def __init__(self, on_done: Callable[[Path], object] | None = None) -> None:
        self._on_done = on_done
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="xp-checkpoint"
        )
        self._pending: tuple[Path, Future[None]] | None = None
        self._buffers: dict[_Position, torch.Tensor] = {}

    @property
    def pending(self) -> Path | None:
        """The path of the save submitted last, until :meth:`wait` has collected it."""
        return self._pending[0] if self._pending is not None else None

    def submit(self, state: dict[str, Any], path: Path) -> None:
        """Snapshot ``state`` into host memory, then write it to ``path`` in the background.

        Waits for the previous save first, so at most one is ever in flight. Once this
        returns, training may change the tensors and containers of ``state`` freely.

        Raises:
            CheckpointError: The previous save failed; ``state`` was not submitted.
            RuntimeError: The writer is closed.
        """
        if self._executor is None:
            raise RuntimeError(
                f"AsyncCheckpointWriter.submit({path}) after close(); create a new writer."
            )
        self.wait()
        path = Path(path)
        snapshot = self._snapshot(state)
        self._pending = (path, self._executor.submit(self._write, snapshot, path))

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk and ``on_done`` has run.

        Raises:
            CheckpointError: The save or its ``on_done`` failed; raised once.
        """
        if self._pending is None:
            return
        path, future = self._pending
        self._pending = None
        wait_for_background_save(path, future)

    def close(self) -> None:
        """Wait for the save in flight, then stop the thread and free the buffers; idempotent.

        Raises:
            CheckpointError: The save in flight failed (the thread is stopped regardless).
        """
        if self._executor is None:
            return
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None
            self._buffers = {}

    def __enter__(self) -> AsyncCheckpointWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _write(self, snapshot: dict[str, Any], path: Path) -> None:
        atomic_save(snapshot, path)
        call_on_done(self._on_done, path)

    def _snapshot(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``state`` on the CPU that shares no memory training can write."""
        buffers: dict[_Position, torch.Tensor] = {}
        copies: dict[tuple[Any, ...], torch.Tensor] = {}
        devices: set[torch.device] = set()
        snapshot = self._copy(state, (), buffers, copies, devices)
        # Copies from CUDA were queued without blocking; the thread reads them next.
        for device in devices:
            torch.cuda.synchronize(device)
        # Buffers of tensors that are gone (a shape or key changed) are freed here.
        self._buffers = buffers
        return snapshot

    def _copy(
        self,
        obj: Any,
        position: _Position,
        buffers: dict[_Position, torch.Tensor],
        copies: dict[tuple[Any, ...], torch.Tensor],
        devices: set[torch.device],
    ) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._copy_tensor(obj.detach(), position, buffers, copies, devices)
        if isinstance(obj, _IMMUTABLE):
            return obj
        if type(obj) in (dict, OrderedDict):
            return type(obj)(
                (k, self._copy(v, (*position, k), buffers, copies, devices)) for k, v in obj.items()
            )
        if type(obj) is list or type(obj) is tuple:
            return type(obj)(
                self._copy(v, (*position, i), buffers, copies, devices) for i, v in enumerate(obj)
            )
        # Other objects (dict subclasses, dataclasses...) are rare in states; a deep copy
        # is correct for them, though it copies any tensors inside on their own device.
        return copy.deepcopy(obj)

    def _copy_tensor(
        self,
        t: torch.Tensor,
        position: _Position,
        buffers: dict[_Position, torch.Tensor],
        copies: dict[tuple[Any, ...], torch.Tensor],
        devices: set[torch.device],
    ) -> torch.Tensor:
        if t.layout != torch.strided or t.is_quantized:
            return t.to("cpu", copy=True)
        # Two entries holding the same view (tied weights) stay one tensor in the file.
        alias = _alias_key(t)
        if alias in copies:
            return copies[alias]
        pinned = t.is_cuda
        buffer = self._buffers.get(position)
        if (
            buffer is None
            or buffer.shape != t.shape
            or buffer.dtype != t.dtype
            or buffer.is_pinned() != pinned
        ):
            buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
        buffer.copy_(t, non_blocking=pinned)
        if pinned:
            devices.add(t.device)
        buffers[position] = copies[alias] = buffer
        return buffer
