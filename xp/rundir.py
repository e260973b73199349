"""The run directory: claimed by exactly one launch before anything writes into it.

Hydra makes a run's directory with ``mkdir(exist_ok=True)``, so two launches that compose
the same path (started in the same second, or given the same ``hydra.run.dir``) would
share it: one run's checkpoints and metrics in the other's folder. xp claims the
directory first, in a Hydra callback that runs before Hydra makes it
(:class:`RunDirCallback`, ``on_run_start`` and ``on_multirun_start``). A claim is the
exclusive creation of the directory's claim file (:data:`CLAIM_FILE`, the run's lock file)
in a directory that is new or empty, so of two launches exactly one wins:

- a directory named by the launch's timestamp (xp's default ``hydra.run.dir`` and
  ``hydra.sweep.dir``) that another launch has taken gives way to the next free name,
  ``<timestamp>_2``, ``_3``, ... (the timestamp follows it);
- a directory the user named (``hydra.run.dir=...``) that holds anything is refused, with
  ``resume=`` and another directory as the fixes.

One launch makes one claim. The process that composes first claims: the command itself,
xp's own launcher before it starts its workers, or rank 0 under torchrun, srun or mpirun,
which then hands the final timestamp (or its refusal) to the other ranks before they make
any directory (:mod:`xp.launch`). The processes of the launch inherit the claim in
``XP_RUN_DIR``; only they may delete what they claimed (a run that failed before
training). A resumed run (``resume=``, ``test=``) continues in its own directory and
claims nothing.

Nothing a config says writes outside the outputs root (``<launch dir>/outputs``) but the
directories a user names in ``hydra.run.dir`` and ``hydra.sweep.dir``: an
``experiment_name`` is one or more plain folder names.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from xp.dist import Launcher, dist_info, export_launcher_env, infer_launcher
from xp.log import say

ENV = "XP_RUN_DIR"
"""The directory this launch claimed (absolute); its processes inherit it."""
TIMESTAMP_ENV = "XP_TIMESTAMP"
RESUME_ENV = "XP_RESUME"
"""Set (by ``xp.__main__``) when the launch continues a run: ``resume=``."""
TEST_ENV = "XP_TEST"
"""The same for ``test=``: the launch evaluates a run in its own directory."""
CLAIM_FILE = ".xp-run.lock"
"""Created exclusively by the claim; the training process then locks it while it runs."""
_MAX_NAME_BYTES = 255
"""A file name's limit on Linux and macOS file systems."""
_MAX_EXPERIMENT_CHARS = 128
_EXPERIMENT_PART = re.compile(r"^[^\x00-\x1f/\\]+$")


class RunDirError(ValueError):
    """The run directory cannot be claimed; says why and what to do."""


class RunInUse(RunDirError):
    """The run is still training in a live process."""


LOCK_FILE = CLAIM_FILE
"""In a run directory: locked by the process that trains the run, while it runs."""


class RunDirLock:
    """Who trains in a run directory: a lock its training process holds until it ends.

    A run killed hard (``kill -9``, a lost node) leaves its MLflow status at RUNNING; the
    lock, released by the kernel when the process dies, tells it apart from a live run, so
    ``resume=`` refuses a run that is still training and ``resume=auto`` and re-run sweeps
    pick up the dead ones. POSIX record locks (``lockf``): forked children (DataLoader
    workers) do not inherit them, and NFS honours them.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Hold the lock.

        Raises:
            RunInUse: another live process holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = _lock_or_holder(fd)
        if holder is not None:
            os.close(fd)
            raise RunInUse(in_use(self.path.parent, holder))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_who()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let go: the lock file goes too, so a run that ended reads as no live run.

        Removed while still held, so no other process can take a lock on it meanwhile;
        only a process that dies without getting here (``kill -9``) leaves it, free.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(fd)  # closing releases the lock

    def holder(self, wait_s: float = 0.0) -> str | None:
        """The live process that holds the lock ("pid N on HOST"), or None.

        ``wait_s`` gives a holder that is being killed time to go: ``kill -9`` of
        ``python -m xp`` kills its training process (:mod:`xp.prefork`) a moment later.
        Not for a directory this process holds: closing the probe would release it.
        """
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except OSError:  # no lock file: no xp process has trained here since it was added
                return None
            try:
                holder = _lock_or_holder(fd)
            finally:
                os.close(fd)  # releases the probe's lock, if it got it
            if holder is None or time.monotonic() >= deadline:
                return holder
            time.sleep(0.05)

    def dead(self) -> bool:
        """Whether no process trains here now (the lock file is free, or gone because the
        run's process ended) in a run directory that exists."""
        return self.path.parent.is_dir() and self.holder() is None


def _who() -> str:
    """This process as a lock holder: "pid N on HOST", N being the command a user started."""
    from xp.prefork import command_pid

    command = command_pid()
    if command is None:
        return f"pid {os.getpid()} on {socket.gethostname()}"
    return f"pid {command} on {socket.gethostname()}, training in pid {os.getpid()}"


def _lock_or_holder(fd: int) -> str | None:
    """Lock the open lock file; None when locked, else who holds it ("pid N on HOST")."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
    return None


def in_use(run_dir: Path, holder: str, key: str = "resume") -> str:
    then = "test it" if key == "test" else "resume"
    return (
        f"The run in {run_dir} is still training ({holder}); stop it first (Ctrl-C, or kill "
        f"-TERM that pid: it saves a checkpoint and stops), or wait for it to end, then {then}."
    )


def experiment_name_error(name: str) -> str | None:
    """Why ``experiment_name`` cannot name a folder under ``outputs/``, or None.

    It may hold ``/`` (``team/probe``: nested folders), not ``..``, ``.``, an absolute
    path, control characters or backslashes, and at most 128 characters.
    """
    fix = "name it with letters, digits, '-', '_' and '.' (e.g. experiment_name=probe_1)"
    if not name.strip():
        return f"experiment_name={name!r} is empty; {fix}."
    if len(name) > _MAX_EXPERIMENT_CHARS:
        return (
            f"experiment_name is {len(name)} characters long (at most {_MAX_EXPERIMENT_CHARS}: "
            f"it names a folder and the MLflow experiment); shorten it."
        )
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return (
            f"experiment_name={name!r} would place the run outside outputs/<experiment>/ "
            f"(absolute, empty, '.' or '..' parts); {fix}."
        )
    if not all(_EXPERIMENT_PART.match(p) for p in parts):
        return f"experiment_name={name!r} holds control characters or '\\'; {fix}."
    return None


def launch_dir() -> Path:
    """The directory the command was started in (fixed at start by ``xp.__main__``)."""
    return Path(os.environ.get("XP_LAUNCH_DIR") or os.getcwd()).resolve()


@contextlib.contextmanager
def in_launch_dir() -> Iterator[None]:
    """Work in the directory the command was started in, then go back.

    With ``hydra.job.chdir=true`` a run works in its run directory, but every path a user
    gives (a dataset's root, a tokenizer file) is relative to where the command ran: the
    run's parts are built from there.
    """
    here = os.getcwd()
    os.chdir(launch_dir())
    try:
        yield
    finally:
        os.chdir(here)


def holds_no_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but what the launch made before training (its
    claim file and Hydra's ``.hydra/``)."""
    return run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", CLAIM_FILE}


def discard(run_dir: Path) -> None:
    """Remove the directory of a run that failed before it trained (its error is printed),
    and its experiment folder if that is left empty; only a directory this launch claimed."""
    if not claimed_here(run_dir):
        return
    from xp.log import close_logger

    close_logger()  # its log file is in there
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def claimed_here(run_dir: Path) -> bool:
    """Whether this launch claimed ``run_dir``, or the sweep directory that holds it."""
    claimed = os.environ.get(ENV)
    if not claimed:
        return False
    run_dir = Path(run_dir).resolve()
    return run_dir == Path(claimed) or Path(claimed) in run_dir.parents


def claim(path: Path, *, named_by_timestamp: bool) -> Path:
    """Claim ``path`` for this launch; the claimed directory (another name, see below).

    Args:
        path: The directory to claim (absolute).
        named_by_timestamp: ``path`` ends in this launch's timestamp, which may change:
            a taken directory gives way to ``<timestamp>_2``, ``_3``, ... and
            ``XP_TIMESTAMP`` follows the name.

    Raises:
        RunDirError: ``path`` was named by the user and holds another run (or anything),
            or it cannot be created.
    """
    stamp = os.environ.get(TIMESTAMP_ENV, "")
    base = path.name
    candidate, n = path, 1
    while True:
        _check_name(candidate)
        try:
            if _claim_one(candidate):
                break
        except OSError as e:
            raise RunDirError(
                f"cannot create the run directory {candidate}: {e.strerror or e}; check that "
                "its parent is writable, or pick another (hydra.run.dir=...)."
            ) from None
        if not named_by_timestamp:
            raise RunDirError(_taken(candidate))
        n += 1
        candidate = path.with_name(f"{base}_{n}")
    if named_by_timestamp and candidate != path and stamp and base == stamp:
        os.environ[TIMESTAMP_ENV] = candidate.name
    os.environ[ENV] = str(candidate)
    atexit.register(_release_if_unused, candidate, os.getpid())
    return candidate


def _release_if_unused(path: Path, claimer: int) -> None:
    """At the claiming process's exit: a directory that got nothing but its claim file (the
    launch stopped before Hydra wrote into it: a refused sweep, a config error) goes,
    with the experiment folders above it that it leaves empty."""
    if os.getpid() != claimer or not path.is_dir():  # a forked child exits too
        return
    if {p.name for p in path.iterdir()} - {CLAIM_FILE}:
        return
    (path / CLAIM_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()
        outputs = Path(os.environ.get("XP_LAUNCH_DIR") or os.getcwd()) / "outputs"
        for parent in path.parents:
            if parent == outputs or outputs not in parent.parents:
                break
            parent.rmdir()  # OSError once one is not empty


def _check_name(path: Path) -> None:
    if len(path.name.encode()) > _MAX_NAME_BYTES:
        raise RunDirError(
            f"the run directory's name is {len(path.name.encode())} bytes long, over the file "
            f"system's {_MAX_NAME_BYTES}: {path.name[:60]}...; pick a shorter hydra.run.dir."
        )


def _claim_one(path: Path) -> bool:
    """Create the claim file in ``path`` if ``path`` is new or empty; whether it was."""
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        return False
    try:
        fd = os.open(path / CLAIM_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False  # another launch claimed it a moment ago
    os.close(fd)
    return True


def _taken(path: Path) -> str:
    holder = RunDirLock(path).holder()
    if holder is not None:
        return (
            f"hydra.run.dir={path} is the directory of a run that is still training ({holder}); "
            "give a new or empty directory."
        )
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
    checkpoints = path / "checkpoints"
    if not (checkpoints.is_dir() and any(checkpoints.glob("step_*"))):
        return (
            f"hydra.run.dir={path} holds a run that stopped before its first checkpoint "
            f"({shown}): nothing there can be resumed, and a new run never writes into "
            f"another's files; remove it (rm -r {path}) or give a new or empty directory."
        )
    return (
        f"hydra.run.dir={path} already holds another run's files ({shown}), and a new run "
        f"never writes into them; continue that run with `python -m xp resume={path}`, or give "
        "a new or empty directory."
    )


def _resolved(cfg: DictConfig, key: str) -> tuple[Path, bool]:
    """The directory ``key`` names (absolute), and whether the launch's timestamp names it."""
    raw = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    node = cfg.hydra.run if key == "hydra.run.dir" else cfg.hydra.sweep
    template = str(OmegaConf.to_container(node, resolve=False)["dir"])  # type: ignore[call-overload,index]
    path = Path(str(raw)).absolute()
    stamp = os.environ.get(TIMESTAMP_ENV, "")
    return path, "xp_timestamp" in template and path.name == stamp


class RunDirCallback(Callback):
    """Hydra callback (``hydra.callbacks.run_dir``, the first one) that claims the run's
    directory, or a sweep's, before Hydra makes it. See the module docstring."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._claim(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._claim(config, "hydra.sweep.dir")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # The sweep ended: its directory's claim file would read like a live run's lock.
        claimed = os.environ.get(ENV)
        if claimed and Path(claimed) == Path(str(config.hydra.sweep.dir)).absolute():
            (Path(claimed) / CLAIM_FILE).unlink(missing_ok=True)
            _redact_files(Path(claimed).glob("*.yaml"))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra has written .hydra/ with the command line as typed: no password stays there
        # (it is uploaded to MLflow with the run).
        subdir = config.hydra.output_subdir
        if subdir is not None:
            _redact_files((Path(str(config.hydra.runtime.output_dir)) / str(subdir)).glob("*"))

    def _claim(self, config: DictConfig, key: str) -> None:
        rank = dist_info(infer_launcher()).rank
        if rank != 0:
            # Rank 0 claims for the launch; the others take its timestamp (xp.launch).
            if not os.environ.get(TIMESTAMP_ENV):
                os.environ[TIMESTAMP_ENV] = receive_claim()
            return
        path: Path | None = None
        try:
            error = experiment_name_error(str(config.experiment_name))
            if error is not None:
                raise RunDirError(error)
            _check_tracking(config)
            path, by_timestamp = _resolved(config, key)
            if _inherits_claim(path):
                return
            if by_timestamp:
                outputs = Path(os.environ.get("XP_LAUNCH_DIR") or os.getcwd()) / "outputs"
                _check_inside(path, outputs.resolve())
            claimed = claim(path, named_by_timestamp=by_timestamp)
        except RunDirError as e:
            share_claim(None)
            say(f"xp: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        share_claim(os.environ.get(TIMESTAMP_ENV) or claimed.name)


def _redact_files(paths: Any) -> None:
    """Rewrite the text files among ``paths`` without URI passwords or secret values; a
    YAML file stays YAML that loads (a secret value becomes ``'***'``, not ``***``)."""
    import yaml

    from xp.tracking import redact_secrets, redact_strings

    for path in paths:
        if path.is_file():
            text = path.read_text(errors="replace")
            redacted = redact_secrets(text)
            if redacted == text:
                continue
            if path.suffix in (".yaml", ".yml"):
                with contextlib.suppress(yaml.YAMLError):
                    data = redact_strings(yaml.safe_load(text))
                    redacted = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
            path.write_text(redacted)


def _check_tracking(config: DictConfig) -> None:
    """A tracking URI no MLflow store takes fails before a directory is made."""
    from xp.tracking import TrackingError, check_tracking_uri

    tracking = config.get("tracking")
    if tracking is None or not tracking.get("enabled", True):
        return
    uri = tracking.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    try:
        if uri:
            check_tracking_uri(str(uri))
    except TrackingError as e:
        raise RunDirError(str(e)) from None


def _inherits_claim(path: Path) -> bool:
    """A resumed run's directory, or one inside what the launch claimed (a sweep's job,
    a worker of xp's own launcher): nothing to claim."""
    if os.environ.get(RESUME_ENV) or os.environ.get(TEST_ENV):
        return True
    return claimed_here(path)


def _check_inside(path: Path, outputs: Path) -> None:
    resolved = path.resolve()
    if resolved != outputs and outputs not in resolved.parents:
        raise RunDirError(
            f"the run directory {resolved} is outside {outputs}; check experiment_name, or name "
            "the directory yourself with hydra.run.dir=..."
        )


# --------------------------------------------------------------------------- every rank

_KEY = "xp/run_dir"
_REFUSED = "!refused"
_STORE: Any = None
"""The launch's store, kept for the life of the process: for srun and mpirun rank 0 hosts
it, and the other ranks may read from it after rank 0 has moved on."""


def _shared_store(timeout_s: float) -> tuple[Any, str] | None:
    """The store every rank of this launch reaches, and the key for this launch; None for
    one process."""
    global _STORE
    launcher = infer_launcher()
    if launcher is Launcher.none:
        return None
    info = dist_info(launcher)
    if info.world_size == 1:
        return None
    import torch.distributed as dist

    export_launcher_env(launcher, None)
    env = os.environ
    timeout = timedelta(seconds=timeout_s)
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's workers share their agent's store; a restart is a new launch.
        attempt = (
            f"{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        )
        if _STORE is None:
            _STORE = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        return _STORE, f"{_KEY}/{attempt}"
    if _STORE is None:
        _STORE = dist.TCPStore(
            host, port + 1, info.world_size, is_master=info.rank == 0, timeout=timeout
        )
    return _STORE, _KEY


def share_claim(timestamp: str | None, timeout_s: float = 300.0) -> None:
    """Rank 0: tell the other ranks the timestamp of the directory it claimed, or (None)
    that it refused to start; nothing to do for one process."""
    shared = _shared_store(timeout_s)
    if shared is not None:
        store, key = shared
        store.set(key, _REFUSED if timestamp is None else timestamp)


def receive_claim(timeout_s: float = 300.0) -> str:
    """The other ranks: wait for rank 0's claim; its timestamp.

    Exits with status 1 when rank 0 refused the run (it printed why).
    """
    shared = _shared_store(timeout_s)
    if shared is None:
        raise RuntimeError("receive_claim() is for ranks other than 0 of a launch")
    store, key = shared
    value = store.get(key).decode()
    if value == _REFUSED:
        raise SystemExit(1)
    return value


# --------------------------------------------------------------------------- names

JOB_DIR_OVERRIDES_BYTES = 100
"""A job folder keeps at most this much of its overrides in its name (see :func:`job_dir_name`)."""


def job_dir_name(num: int, overrides: str) -> str:
    """A job's folder name: ``<num>_<overrides>``, short enough for any file system.

    Hydra names a job's folder by its overrides, which can exceed the 255 bytes a file
    name may have (``[Errno 36] File name too long``). Overrides longer than
    :data:`JOB_DIR_OVERRIDES_BYTES` bytes are cut there and get ``~`` and 8 hex digits of
    their sha256, so two jobs never share a folder; ``/`` becomes ``_`` (a value that is a
    path would otherwise nest folders). The full overrides stay in the job's
    ``.hydra/overrides.yaml`` and in its MLflow run (tag ``xp.overrides``). Registered as
    the resolver ``xp_job_dir`` (``hydra.sweep.subdir`` in conf/config.yaml).

    Args:
        num: ``hydra.job.num``.
        overrides: ``hydra.job.override_dirname``.
    """
    text = str(overrides).replace("/", "_")
    raw = text.encode()
    if len(raw) <= JOB_DIR_OVERRIDES_BYTES:
        return f"{num}_{text}"
    head = raw[:JOB_DIR_OVERRIDES_BYTES].decode(errors="ignore")  # whole characters only
    return f"{num}_{head}~{hashlib.sha256(raw).hexdigest()[:8]}"


def _launch_timestamp() -> str:
    """``${xp_timestamp:}``: the launch's timestamp; on ranks other than 0, rank 0's (it
    claims the run directory first: xp.rundir, xp.launch)."""
    if not os.environ.get("XP_TIMESTAMP"):
        os.environ["XP_TIMESTAMP"] = receive_claim()
    return os.environ["XP_TIMESTAMP"]


def register_resolvers() -> None:
    """The resolvers xp's config uses to name directories: ``${xp_timestamp:}``,
    ``${xp_outputs:}`` and ``${xp_job_dir:num,overrides}``."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("xp_timestamp"):
        OmegaConf.register_new_resolver("xp_timestamp", _launch_timestamp)
    if not OmegaConf.has_resolver("xp_outputs"):
        OmegaConf.register_new_resolver(
            "xp_outputs", lambda: str(Path(os.environ["XP_LAUNCH_DIR"]) / "outputs")
        )
    if not OmegaConf.has_resolver("xp_job_dir"):
        OmegaConf.register_new_resolver("xp_job_dir", job_dir_name)
