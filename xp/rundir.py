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
import os
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

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
    from xp.resume import RunDirLock

    holder = RunDirLock(path).holder()
    if holder is not None:
        return (
            f"hydra.run.dir={path} is the directory of a run that is still training ({holder}); "
            "give a new or empty directory."
        )
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
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

    def _claim(self, config: DictConfig, key: str) -> None:
        from xp.dist import dist_info, infer_launcher
        from xp.launch import receive_claim, share_claim

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
