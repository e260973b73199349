"""Sweeps: one MLflow parent run per Hydra multirun, one child run per job.

Hydra calls :class:`SweepCallback` in two places: ``on_multirun_start``/``_end`` in the
process that launches the jobs, ``on_job_start``/``_end`` in the process that runs each
job (the same process for Hydra's basic launcher, a worker process for joblib, a Slurm
job for submitit). So what jobs need from the launching process (the parent run id, the
swept keys) travels in ``<sweep dir>/.xp_sweep.json``, and what the launching process
needs from the jobs (status, final metrics, run id) in ``<sweep dir>/.xp_jobs/<num>.json``.

Re-running a sweep skips its jobs whose config already FINISHED in an earlier run of the
same sweep and resumes those that were stopped there: KILLED, or left RUNNING by a
process that died (its run directory's lock is free). A sweep is identified by
:func:`sweep_key` (tag ``xp.sweep_key`` on the parent and every child), a job's config by
:func:`config_hash` (tag ``xp.config_hash`` on every run). Runs outside the sweep (plain
runs, other sweeps) are never skipped over or resumed. The launching process asks MLflow
once, when the sweep starts, for the earlier runs of the sweep, says what will be
skipped or resumed, and hands the answer to the jobs in ``.xp_sweep.json``.

This module imports neither torch nor mlflow at import time.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import csv
import functools
import hashlib
import hmac
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from xp.log import say
from xp.tracking import (
    client,
    default_artifact_location,
    default_tracking_uri,
    drop_early_writer,
    flatten_params,
    keep_writers,
    start_early_writer,
)

if TYPE_CHECKING:
    from xp.resume import ResumeTarget  # imports torch

SWEEP_FILE = ".xp_sweep.json"
"""In the sweep directory: the parent run and what every job needs to know of the sweep."""
JOBS_DIR = ".xp_jobs"
"""In the sweep directory: one record per finished job, read when the sweep ends."""
WORKER_ENV = "XP_SWEEP_JOB"
"""Carries a job's sweep facts to the workers of a distributed job."""

HASH_EXCLUDED = (
    "experiment_name",
    "tracking",
    "target_allowlist",
    "sweep",
    "trainer.progress_bar",
    "trainer.progress_interval_s",
    "trainer.objective",
    "strategy.master_port",
    "test",
    "test_checkpoint",
)
"""Config keys left out of :func:`config_hash`: where a run is recorded and how it is
shown, never what it computes. Hydra's own settings (run and sweep directories) are not
part of the job's config at all."""

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"

SWEEP_KEY_TAG = "xp.sweep_key"
"""On a sweep's parent and children: :func:`sweep_key`; a re-run reuses runs with the same."""
SWEPT_PARAM_PREFIX = "_swept."
"""Prefix of the params that repeat a child's swept values (``_swept.optim.lr``): MLflow's
compare view plots the first three differing params in sort order, and ``_`` sorts
before every key of xp's config."""
RUN_NAME_CHARS = 250
"""MLflow's SQL stores keep a run's name in a column of 250 characters."""

PLUGINS = {
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "sweep"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}
"""Config group options that need a Hydra plugin: (module, xp extra that installs it)."""

_MINIMIZED = re.compile(r"loss|error", re.IGNORECASE)


class JobFailed(RuntimeError):
    """A sweep's job ended with an error; Hydra records it and the sweep carries on."""


# --------------------------------------------------------------------------- settings


@dataclass
class SweepSettings:
    """``sweep.<key>=...`` on the command line."""

    fresh: bool = False
    """Run every job anew, even where the same config already FINISHED or was KILLED."""
    direction: str | None = None
    """``max`` or ``min`` for trainer.objective; null: min if its name holds loss or error."""


def sweep_settings(cfg: DictConfig) -> SweepSettings:
    """The ``sweep`` node of the composed config (absent: the defaults).

    Raises:
        ValueError: an unknown key or a wrong value, naming it.
    """
    node = cfg.get("sweep")
    if node is None:  # a config composed without xp's schema
        return SweepSettings()
    fresh = bool(node.get("fresh", False))
    direction = node.get("direction")  # the schema's Mode enum type-checked it at compose time
    direction = None if direction is None else str(getattr(direction, "value", direction))
    return SweepSettings(fresh=fresh, direction=direction)


def direction_of(objective: str, explicit: str | None = None) -> str:
    """``max`` or ``min``: ``explicit`` if given, else min for a loss or an error, else max.

    The rule reads the metric's name after its last ``/``: ``val/loss`` and
    ``val/error_rate`` are minimized, ``val/acc`` and ``val/f1`` maximized.
    """
    if explicit is not None:
        return explicit
    return "min" if _MINIMIZED.search(objective.rsplit("/", 1)[-1]) else "max"


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of a resolved config, without :data:`HASH_EXCLUDED`.

    Args:
        config: The plain resolved config (``OmegaConf.to_container(cfg, resolve=True)``).
    """
    plain = copy.deepcopy(dict(config))
    for key in HASH_EXCLUDED:
        *parents, leaf = key.split(".")
        node: Any = plain
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    text = json.dumps(plain, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def sweep_key(
    experiment_name: str,
    overrides: Sequence[str],
    sweeper: str,
    launcher: str,
    search_space: Mapping[str, Any] | None = None,
) -> str:
    """sha256 of what makes two multiruns the same sweep.

    The same experiment, the same command-line overrides (in any order; ``sweep.*``
    settings such as ``sweep.fresh`` left out), the same sweeper and launcher, and the
    same search space (``hydra.sweeper.params``). The sweeper's and launcher's own
    settings (``hydra.sweeper.n_trials``, ``hydra.launcher.n_jobs``) are not part of it:
    more trials, or more jobs side by side, continue the same sweep.

    Args:
        experiment_name: The composed ``experiment_name``.
        overrides: The multirun's task overrides (``hydra.overrides.task``).
        sweeper: The sweeper's ``_target_``.
        launcher: The launcher's ``_target_``.
        search_space: ``hydra.sweeper.params``, if any.
    """
    kept = sorted(str(o) for o in overrides if not _is_sweep_setting(str(o)))
    space = {str(k): str(v) for k, v in (search_space or {}).items()}
    text = json.dumps(
        {
            "experiment_name": experiment_name,
            "overrides": kept,
            "sweeper": sweeper,
            "launcher": launcher,
            "search_space": space,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _is_sweep_setting(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key == "sweep" or key.startswith("sweep.")


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def _launch_dir() -> Path:
    return Path(os.environ.get("XP_LAUNCH_DIR") or os.getcwd()).resolve()


def _tracking_uri(cfg: DictConfig) -> str:
    return str(cfg.tracking.get("tracking_uri") or default_tracking_uri(_launch_dir()))


# --------------------------------------------------------------------------- the sweep file


@dataclass
class SweepInfo:
    """What the launching process tells every job of the sweep (``.xp_sweep.json``)."""

    sweep_dir: str
    parent_run_id: str | None
    """None when tracking is off (or the parent could not be created)."""
    tracking_uri: str | None
    experiment_name: str
    swept_keys: list[str]
    """The keys whose values differ between jobs; they name each child run."""
    objective: str
    direction: str
    needs_number: bool
    """The sweeper reads the objective (Optuna): a job without one is an error."""
    sweep_key: str = ""
    """:func:`sweep_key`; tagged on the parent and every child."""
    fresh: bool = False
    """``sweep.fresh=true``: no job is skipped or resumed."""
    earlier: list[dict[str, Any]] = field(default_factory=list)
    """The runs of earlier runs of this sweep (:class:`EarlierRun` as dicts), read from
    MLflow once when the sweep started; the jobs skip or resume from them."""

    def save(self) -> None:
        path = Path(self.sweep_dir) / SWEEP_FILE
        _write_atomically(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, sweep_dir: str | Path) -> SweepInfo | None:
        path = Path(sweep_dir) / SWEEP_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


@dataclass
class EarlierRun:
    """A child run of an earlier run of the same sweep, as MLflow had it when this one started."""

    run_id: str
    status: str
    config_hash: str
    job: int | None
    """Its job number in that sweep (``xp.sweep_job``)."""
    parent_run_id: str | None
    run_dir: str | None
    start_time: int
    metrics: dict[str, float] = field(default_factory=dict)
    """MLflow's latest value of each metric (the value at the run's last step)."""

    @classmethod
    def from_run(cls, run: Any) -> EarlierRun:
        tags = run.data.tags
        job = tags.get("xp.sweep_job", "")
        return cls(
            run_id=str(run.info.run_id),
            status=str(run.info.status),
            config_hash=tags.get("xp.config_hash", ""),
            job=int(job) if job.isdigit() else None,
            parent_run_id=tags.get("mlflow.parentRunId"),
            run_dir=tags.get("xp.run_dir"),
            start_time=int(run.info.start_time or 0),
            metrics={str(k): float(v) for k, v in run.data.metrics.items()},
        )

    def stopped(self) -> bool:
        """KILLED, or RUNNING in MLflow while no process trains it (killed hard: ``kill -9``,
        a lost node, a Slurm job past its time limit: its run directory's lock is free)."""
        if self.status == "KILLED":
            return True
        if self.status != "RUNNING" or not self.run_dir:
            return False
        from xp.rundir import RunDirLock

        return RunDirLock(Path(self.run_dir)).dead()

    def label(self) -> str:
        if self.status == "KILLED":
            return "KILLED run"
        return "run left RUNNING by a process that is gone,"


def reusable(earlier: Sequence[EarlierRun]) -> tuple[EarlierRun | None, EarlierRun | None]:
    """Of the earlier runs of one job: (the newest FINISHED, else None; the newest run, if
    no run FINISHED and it was stopped, to resume, else None)."""
    newest_first = sorted(earlier, key=lambda r: r.start_time, reverse=True)
    finished = [r for r in newest_first if r.status == "FINISHED"]
    if finished:
        return finished[0], None
    if newest_first and newest_first[0].stopped():
        return None, newest_first[0]
    return None, None


@dataclass
class JobRecord:
    """One job's outcome, written by the job, read when the sweep ends."""

    num: int
    name: str
    overrides: list[str]
    status: str
    """FINISHED, FAILED, or SKIPPED (the same config had FINISHED before)."""
    objective: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    run_dir: str | None = None
    note: str = ""

    def save(self, sweep_dir: str | Path) -> None:
        path = Path(sweep_dir) / JOBS_DIR / f"{self.num}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(asdict(self), indent=2))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_name(overrides: Sequence[str], swept: Sequence[str], num: int) -> str:
    """``optim=sgd,optim.lr=0.003``: the job's values of the swept keys."""
    keys = set(swept)
    picked = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys]
    return ",".join(picked or overrides) or f"job {num}"


def _run_name(name: str) -> str:
    """A job's name as its MLflow run's name: SQL stores keep at most 250 characters (the
    full overrides are the run's tag ``xp.overrides``)."""
    return name if len(name) <= RUN_NAME_CHARS else name[: RUN_NAME_CHARS - 3] + "..."


@dataclass
class _JobFacts:
    info: SweepInfo
    num: int
    name: str


def _this_job() -> _JobFacts | None:
    """The sweep job this process runs: from Hydra in a multirun, from the env in workers."""
    raw = os.environ.get(WORKER_ENV)
    if raw:
        data = json.loads(raw)
        return _JobFacts(SweepInfo(**data["info"]), int(data["num"]), str(data["name"]))
    if not _in_multirun():
        return None
    hydra = HydraConfig.get()
    info = SweepInfo.load(hydra.sweep.dir)
    if info is None:
        return None
    overrides = list(hydra.overrides.task)
    num = int(hydra.job.num)
    return _JobFacts(info, num, _job_name(overrides, info.swept_keys, num))


# --------------------------------------------------------------------------- xp.run's hooks


def job_params(cfg: DictConfig) -> dict[str, str]:
    """The params xp.run adds for this run: a sweep's job's swept values
    (:func:`swept_params`, which MLflow's compare view plots first); none outside a sweep."""
    job = _this_job()
    if job is None or not HydraConfig.initialized():
        return {}
    return swept_params([str(o) for o in HydraConfig.get().overrides.task], job.info.swept_keys)


def job_tags(cfg: DictConfig) -> tuple[str | None, dict[str, str]]:
    """The MLflow run name and tags xp.run adds for this run.

    Every run carries ``xp.config_hash``; a sweep's job is also named by its swept values
    and nested under the sweep's parent run.

    Returns:
        (the run name, or None outside a sweep; the tags)
    """
    tags = {"xp.config_hash": config_hash(_plain(cfg))}
    job = _this_job()
    if job is None:
        return None, tags
    tags["xp.sweep_dir"] = job.info.sweep_dir
    tags["xp.sweep_job"] = str(job.num)
    if job.info.sweep_key:
        tags[SWEEP_KEY_TAG] = job.info.sweep_key
    if job.info.parent_run_id:
        tags["mlflow.parentRunId"] = job.info.parent_run_id
    return _run_name(job.name), tags


@dataclass
class JobPlan:
    """What a sweep's job does before it trains: run, skip, or resume."""

    config_hash: str
    skip: bool = False
    objective: float | None = None
    """A skipped job's stored objective, returned to the sweeper."""
    resume: ResumeTarget | None = None
    previous_run_id: str | None = None
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    run_dir: str | None = None


_PLAN: JobPlan | None = None
"""The plan of the job this process runs now (read by on_job_end)."""


def plan_job(cfg: DictConfig, log_dir: Path, target: ResumeTarget | None) -> JobPlan | None:
    """Skip a job whose config FINISHED in an earlier run of this sweep; resume one stopped there.

    Called by ``xp.run.run`` before anything is built. Outside a multirun, with
    ``resume=`` given, with tracking off, or with ``sweep.fresh=true`` the job runs
    anew (None or a plan without skip/resume). Only the runs of earlier runs of the same
    sweep (:func:`sweep_key`) count, as MLflow listed them when this sweep started
    (``.xp_sweep.json``): this asks MLflow nothing more, except to resume. A skipped or
    resumed job leaves no folder of its own in this sweep: the run it continues or reuses
    keeps its directory.
    """
    global _PLAN
    _PLAN = None
    if not _in_multirun() or target is not None or cfg.get("test") or os.environ.get(WORKER_ENV):
        return None
    digest = config_hash(_plain(cfg))
    _PLAN = plan = JobPlan(config_hash=digest)
    job = _this_job()
    if job is None or not cfg.tracking.enabled:
        return plan
    # A requeued Slurm job (submitit's, preempted or timed out) continues its own run,
    # which the sweep's start could not list.
    own = _requeued_job_runs(cfg, digest)
    if not own and (job.info.fresh or sweep_settings(cfg).fresh):
        return plan
    earlier = own or [EarlierRun(**e) for e in job.info.earlier]
    finished, stopped = reusable([e for e in earlier if e.config_hash == digest])
    label = f"job #{job.num} ({job.name})"
    if finished is not None:
        plan.skip = True
        plan.previous_run_id = finished.run_id
        plan.run_dir = finished.run_dir
        plan.metrics = dict(finished.metrics)
        value = plan.metrics.get(str(cfg.trainer.objective))
        plan.objective = None if value is None else float(value)
        plan.note = f"FINISHED in this sweep's earlier run (parent {finished.parent_run_id})"
        _remove_fresh_dir(log_dir)
        say(
            f"xp: skipping {label}: it FINISHED as run {finished.run_id} in an earlier run of "
            "this sweep; sweep.fresh=true reruns it.",
            file=sys.stderr,
        )
        return plan
    if stopped is not None:
        from xp.resume import ResumeError, resolve

        try:
            plan.resume = resolve(
                stopped.run_id,
                tracking_uri=_tracking_uri(cfg),
                experiment_name=cfg.experiment_name,
                outputs=_launch_dir() / "outputs",
            )
        except ResumeError as e:
            plan.note = f"{stopped.label()} {stopped.run_id} cannot resume ({e}); ran anew"
            say(f"xp: {label}: {plan.note}.", file=sys.stderr)
            return plan
        plan.previous_run_id = stopped.run_id
        plan.run_dir = plan.resume.run_dir
        plan.note = f"resumed {stopped.label()} {stopped.run_id} in {plan.resume.run_dir}"
        _remove_fresh_dir(log_dir)
        say(f"xp: {label}: {plan.note}.", file=sys.stderr)
        return plan
    same_job = [e for e in earlier if e.job == job.num and e.status in ("FINISHED", "KILLED")]
    if same_job and not job.info.needs_number:
        # A grid numbers its jobs the same way every time: this job ran before with another
        # config, so a config file (or a default in code) changed since. It trains; say why.
        previous = max(same_job, key=lambda e: e.start_time)
        plan.note = f"config differs from run {previous.run_id} ({previous.status} as this job)"
        say(
            f"xp: {label} runs anew: its config differs from that of run {previous.run_id}, "
            f"which {previous.status} as this job in an earlier run of this sweep (a config "
            "file or a default changed since).",
            file=sys.stderr,
        )
    return plan


def _requeued_job_runs(cfg: DictConfig, digest: str) -> list[EarlierRun]:
    """In a Slurm job that was requeued: the run of this config it started before."""
    if not os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_RESTART_COUNT", "0") in (
        "",
        "0",
    ):
        return []
    from xp.stop import requeued_run

    run = requeued_run({"xp.config_hash": digest}, tracking_uri=_tracking_uri(cfg))
    return [] if run is None else [EarlierRun.from_run(run)]


def _remove_fresh_dir(log_dir: Path) -> None:
    """Hydra made the job's folder (only .hydra/ in it); nothing of the job goes there."""
    from xp.rundir import LOCK_FILE

    if log_dir.is_dir() and {p.name for p in log_dir.iterdir()} <= {".hydra", LOCK_FILE}:
        shutil.rmtree(log_dir, ignore_errors=True)


def _metrics_file(run_dir: str | None) -> dict[str, float]:
    """A run's ``metrics.json``: the record of a job's metrics only when tracking is off.

    With tracking on, MLflow is the record (the file can be overwritten by a later run in
    the same directory): see :func:`_mlflow_metrics`.
    """
    path = Path(run_dir) / "metrics.json" if run_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, TypeError, OSError, AttributeError) as e:
        say(f"xp: could not read the metrics in {path}: {e}", file=sys.stderr)
        return {}


@contextlib.contextmanager
def worker_launch(log_dir: Path, nproc: int) -> Iterator[list[str]]:
    """The arguments for the workers of this (distributed) run, and their environment.

    A single run's workers repeat its command line. A sweep's job gives its workers its
    own overrides (never the whole sweep), its own directory, the KILLED run it resumes
    (see :func:`plan_job`), its sweep facts and its start (its MLflow run's start time,
    not the sweep's); its threads are divided among them. The environment is restored
    after.
    """
    job = _this_job() if _in_multirun() else None
    if job is None:
        yield sys.argv[1:]
        return
    hydra = HydraConfig.get()
    quoted = str(log_dir).replace("\\", "\\\\").replace("'", "\\'")
    argv = [
        *hydra.overrides.task,
        f"hydra.run.dir='{quoted}'",
        "hydra.output_subdir=null",  # the job wrote its .hydra/ already
    ]
    # The earlier runs stay behind: only this process plans the job, and an environment
    # variable has a size limit (128 KiB on Linux).
    info = {**asdict(job.info), "earlier": []}
    env = {
        WORKER_ENV: json.dumps({"info": info, "num": job.num, "name": job.name}),
        "XP_START_MS": str(_now_ms()),
    }
    if _PLAN is not None and _PLAN.resume is not None:
        from xp.resume import ENV

        env[ENV] = _PLAN.resume.to_env()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit():
        env["OMP_NUM_THREADS"] = str(max(1, int(threads) // max(1, nproc)))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield argv
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------- the task


class _ErrorTee(io.TextIOBase):
    """stderr as it is, remembering the last ``xp: error:`` line for the summary."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.last_error = ""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.startswith("xp: error:"):
                self.last_error = line[len("xp: error:") :].strip()
        return int(self._stream.write(text) or 0)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return int(self._stream.fileno())

    def isatty(self) -> bool:
        return bool(self._stream.isatty())


@contextlib.contextmanager
def job_errors() -> Iterator[None]:
    """Around a run in Hydra's task function: in a sweep, an error ends the job, not the sweep.

    ``xp.run`` reports a user's mistake as one line and exits 1; in a multirun that
    would stop every job after this one, so it becomes :class:`JobFailed`, which Hydra
    records for this job. A stop signal (exit status above 128) still ends the sweep.
    Outside a multirun nothing changes.
    """
    if not _in_multirun():
        yield
        return
    tee = _ErrorTee(sys.stderr)
    sys.stderr = tee
    try:
        yield
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if code == 0 or code > 128:
            raise
        raise JobFailed(tee.last_error or f"the job exited with status {code}") from None
    finally:
        sys.stderr = tee._stream


# --------------------------------------------------------------------------- command line


def sweep_arguments(args: Sequence[str]) -> list[str]:
    """Check a command line before Hydra composes anything; the arguments to compose.

    ``hydra/sweeper=optuna`` without a search space of its own gets xp's preset
    (``search=optuna``, conf/search/optuna.yaml).

    Raises:
        ValueError: a sweeper or launcher whose plugin is not installed (naming the
            extra), or in a multirun an override without a value (``optim.lr=``) or with
            an empty one in a list (``optim.lr=1e-3,``).
    """
    for arg in args:
        key, _, value = arg.partition("=")
        plugin = PLUGINS.get((key.lstrip("+"), value))
        if plugin is not None and not _importable(plugin[0]):
            raise ValueError(
                f"{key}={value} needs a Hydra plugin that is not installed ({plugin[0]}); "
                f"install it with: pip install 'xp[{plugin[1]}]'"
            )
    out = list(args)
    if "hydra/sweeper=optuna" in out and not any(
        a.startswith(("search=", "+search=", "hydra.sweeper.params", "+hydra.sweeper.params"))
        for a in out
    ):
        out.append("search=optuna")
    if not {"-m", "--multirun"} & set(args):
        return out
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith(("-", "~")) or value.startswith(("'", '"')):
            continue
        if not value.strip():
            raise ValueError(
                f"{key}= has no value; give one ({key}=<value>), or several to sweep "
                f"({key}=<a>,<b>)."
            )
        if not value.startswith(("[", "{")) and "(" not in value:
            parts = value.split(",")
            if len(parts) > 1 and any(not p.strip() for p in parts):
                raise ValueError(f"{arg} has an empty value in its list; remove the extra comma.")
    return out


def _importable(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


_EXIT_STATUS = 0


def exit_status() -> int:
    """1 when a job of the last multirun in this process failed, else 0."""
    return _EXIT_STATUS


# --------------------------------------------------------------------------- the callback


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks.sweep`` in conf/config.yaml) that records sweeps.

    Single runs pass through it untouched.
    """

    def __init__(self) -> None:
        self._info: SweepInfo | None = None
        self._ended = False
        self._composed: _ComposedConfigs | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled in a launcher's worker (joblib, submitit), for each job: that process
        # composes the job's config, which needs xp's resolvers and schemas (once), or
        # takes the one the sweep composed already.
        self.__dict__.update(state)
        global _REGISTERED
        if not _REGISTERED:
            from xp.config import register_schemas
            from xp.rundir import register_resolvers

            register_resolvers()
            register_schemas()
            _REGISTERED = True
        _compose_each_job_once(self.__dict__.get("_composed"))

    # ------------------------------------------------------------------ launching process

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _EXIT_STATUS
        _EXIT_STATUS = 0
        self._ended = False
        try:
            settings = sweep_settings(config)
        except ValueError as e:
            _fail(str(e))
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        objective = str(config.trainer.objective)
        direction = direction_of(objective, settings.direction)
        sweeper = str(config.hydra.sweeper.get("_target_", ""))
        _check_sweeper_direction(config, objective, direction)
        if os.environ.pop("MLFLOW_RUN_ID", None):
            say(
                "xp: MLFLOW_RUN_ID is ignored in a sweep: every job records its own child run "
                "under the sweep's parent run.",
                file=sys.stderr,
            )
        _divide_threads_among_jobs(config)
        _follow_jobs_without_accounting(config)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(sweep_dir / JOBS_DIR, ignore_errors=True)
        overrides = [str(o) for o in config.hydra.overrides.task]
        swept = _swept_keys(overrides, config)
        uri = _tracking_uri(config) if config.tracking.enabled else None
        launcher = str(config.hydra.launcher.get("_target_", ""))
        self._composed = _ComposedConfigs(sweep_dir / COMPOSED_DIR, os.urandom(32))
        _compose_each_job_once(self._composed)
        space = config.hydra.sweeper.get("params") if "params" in config.hydra.sweeper else None
        info = SweepInfo(
            sweep_dir=str(sweep_dir),
            parent_run_id=None,
            tracking_uri=uri,
            experiment_name=str(config.experiment_name),
            swept_keys=swept,
            objective=objective,
            direction=direction,
            needs_number=sweeper != BASIC_SWEEPER,
            sweep_key=sweep_key(
                str(config.experiment_name),
                overrides,
                sweeper,
                launcher,
                OmegaConf.to_container(space) if space else None,  # type: ignore[arg-type]
            ),
            fresh=settings.fresh,
        )
        parents: list[str] = []
        if uri is not None:
            if launcher == BASIC_LAUNCHER:
                # The jobs run in this process and share one writer (on_job_start): it
                # imports mlflow on another core while this process reads the earlier runs
                # and imports torch, instead of after the first job.
                start_early_writer()
            parents, earlier = _earlier_runs(uri, info.experiment_name, info.sweep_key)
            info.earlier = [asdict(e) for e in earlier]
        say(
            announce(
                [EarlierRun(**e) for e in info.earlier],
                parents,
                _grid_jobs(config, overrides),
                tracked=uri is not None,
                fresh=settings.fresh,
            ),
            file=sys.stderr,
        )
        if uri is not None:
            info.parent_run_id = _create_parent(config, info, overrides, sweeper)
        info.save()
        self._info = info
        atexit.register(self._end_if_cut_short)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        keep_writers(False)
        drop_early_writer()  # the jobs' writer, kept between them
        self._end("FINISHED")

    def _end_if_cut_short(self) -> None:
        # The sweep stopped before Hydra's on_multirun_end (a signal, a sweeper that gave
        # up): the parent still gets the summary of the jobs that ended.
        if not self._ended and self._info is not None:
            records = _load_records(Path(self._info.sweep_dir))
            self._end("FAILED" if any(r.status == "FAILED" for r in records) else "KILLED")

    def _end(self, status: str) -> None:
        global _EXIT_STATUS
        if self._composed is not None:
            self._composed.clear()
        info = self._info
        if info is None or self._ended:
            return
        self._ended = True
        records = _load_records(Path(info.sweep_dir))
        if info.tracking_uri and info.parent_run_id:
            _take_runs_of_jobs(info, records)
        failed = sum(r.status == "FAILED" for r in records)
        if failed or status != "FINISHED":
            _EXIT_STATUS = 1
        table = write_summary(Path(info.sweep_dir), records, info.objective, info.direction)
        say(table)
        if info.parent_run_id is None:
            return
        try:
            _close_parent(info, records, "FAILED" if failed and status == "FINISHED" else status)
        except Exception as e:  # the summary files stay in the sweep directory
            say(
                f"xp: could not record the sweep's summary on parent run {info.parent_run_id} "
                f"in {info.tracking_uri}: {e}; it is in {info.sweep_dir}.",
                file=sys.stderr,
            )

    # ------------------------------------------------------------------ job process

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _PLAN
        _PLAN = None
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        # Jobs that run one after the other in this process (Hydra's basic launcher, a
        # joblib worker) share one MLflow writer: its start-up (a second or two) is paid
        # once, not per job; each job's record is still complete when the job ends.
        keep_writers(True)
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # submitit warns with SIGUSR2 before a time limit; xp's graceful stop (save,
            # mark the run KILLED, requeue) listens to SIGUSR1, and the requeued job
            # resumes the KILLED run (see plan_job).
            signal.signal(signal.SIGUSR2, _forward_to_sigusr1)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            self._record_job(config, job_return)
        except SystemExit:
            raise
        except Exception as e:
            say(f"xp: could not record job #{config.hydra.job.num}: {e}", file=sys.stderr)

    def _record_job(self, config: DictConfig, job_return: JobReturn) -> None:
        global _PLAN
        hydra = config.hydra
        info = SweepInfo.load(hydra.sweep.dir)
        if info is None:
            return
        num = int(hydra.job.num)
        overrides = [str(o) for o in hydra.overrides.task]
        name = _job_name(overrides, info.swept_keys, num)
        plan, _PLAN = _PLAN, None
        log_dir = Path(str(hydra.runtime.output_dir))
        record = JobRecord(num=num, name=name, overrides=overrides, status="FINISHED")
        if plan is not None:
            record.note = plan.note
            record.run_dir = plan.run_dir
        if record.run_dir is None:
            record.run_dir = str(log_dir)
        error: str | None = None
        misconfigured = False
        value: Any = None
        if job_return.status == JobStatus.COMPLETED:
            value = job_return._return_value
            if plan is not None and plan.skip:
                record.status = "SKIPPED"
                record.run_id = plan.previous_run_id
                record.metrics = plan.metrics  # MLflow's, as the sweep found them at its start
            if value is not None:
                with contextlib.suppress(TypeError, ValueError):
                    record.objective = float(value)
        else:
            exc = job_return._return_value
            error = str(exc).strip() or type(exc).__name__
        if record.status != "SKIPPED" and not info.tracking_uri:
            record.metrics = _metrics_file(record.run_dir)
        elif record.status != "SKIPPED" and error is not None:
            # A job that failed before its run existed gets a FAILED child run now. The runs
            # of the others are read once, when the sweep ends (_runs_of_jobs).
            record.run_id = _child_run_id(info, num, name, config, plan, error)
        if error is None and info.needs_number:
            if record.objective is None:
                if info.tracking_uri and record.status != "SKIPPED":
                    # MLflow is the record of a run's metrics; the run directory's
                    # metrics.json may belong to a later run that reused the directory.
                    run_id = _child_run_id(info, num, name, config, plan, None)
                    if run_id:
                        record.metrics = _mlflow_metrics(info.tracking_uri, run_id, num)
                known = ", ".join(sorted(record.metrics)) or "none"
                error = (
                    f"trainer.objective={info.objective!r} gave {value!r}, not a number; the "
                    f"sweeper needs one from every job. The final metrics were: {known}. Set "
                    "trainer.objective to one of them (and keep validation on for val/ ones)."
                )
                misconfigured = True
            elif math.isnan(record.objective):
                error = f"trainer.objective={info.objective!r} is NaN"
        if error is not None:
            record.status = "FAILED"
            record.note = error.strip().splitlines()[0]
            if not misconfigured:
                say(f"xp: job #{num} ({name}) FAILED: {record.note}", file=sys.stderr)
        record.save(info.sweep_dir)
        if misconfigured:
            # Every later trial would fail the same way: stop the sweep now.
            say(f"xp: error: {error}", file=sys.stderr)
            raise SystemExit(1)
        if error is not None:
            # A grid sweep carries on past a failed job (Hydra's basic sweeper would raise
            # at the end of the batch and skip the summary); other sweepers (Optuna) get
            # the failure and decide themselves.
            if info.needs_number:
                job_return.status = JobStatus.FAILED
                job_return.return_value = JobFailed(record.note)
            else:
                job_return.status = JobStatus.COMPLETED
                job_return.return_value = None


def _follow_jobs_without_accounting(config: DictConfig) -> None:
    """submitit follows its Slurm jobs with ``sacct``, which fails where Slurm keeps no
    accounting (``AccountingStorageType=accounting_storage/none``): every poll printed an
    error and a warning, and a job's state stayed unknown. There, it asks ``squeue``."""
    launcher = str(config.hydra.launcher.get("_target_", ""))
    if "submitit" not in launcher.lower() or "slurm" not in launcher.lower():
        return
    try:
        shown = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return  # submitit's own sacct calls say what is wrong
    if not re.search(r"^AccountingStorageType\s*=\s*accounting_storage/none", shown, re.M):
        return
    from submitit.slurm.slurm import SlurmInfoWatcher

    if getattr(SlurmInfoWatcher._make_command, "__name__", "") == "_squeue_command":
        return
    read_sacct = SlurmInfoWatcher.read_info

    def _squeue_command(self: Any) -> list[str] | None:
        jobs = {x.split("_")[0] for x in self._registered - self._finished}
        if not jobs:
            return None
        # Finished jobs stay listed for the cluster's MinJobAge (300 s by default).
        return ["squeue", "--noheader", "--states=all", "-o", "%i|%T|%N", "-j", ",".join(jobs)]

    def read_squeue(self: Any, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        return read_sacct(self, "JobID|State|NodeList\n" + text)

    SlurmInfoWatcher._make_command = _squeue_command  # type: ignore[method-assign]
    SlurmInfoWatcher.read_info = read_squeue  # type: ignore[method-assign]
    say(
        "xp: Slurm keeps no accounting here (AccountingStorageType=accounting_storage/none): "
        "the sweep follows its jobs with squeue instead of sacct.",
        file=sys.stderr,
    )


def _forward_to_sigusr1(signum: int, frame: Any) -> None:
    handler = signal.getsignal(signal.SIGUSR1)
    if callable(handler):  # xp's stop handler is installed while the job trains
        handler(signal.SIGUSR1, frame)


def _fail(message: str) -> None:
    say(f"xp: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _check_sweeper_direction(config: DictConfig, objective: str, direction: str) -> None:
    wanted = config.hydra.sweeper.get("direction") if "direction" in config.hydra.sweeper else None
    if wanted is None or OmegaConf.is_list(wanted):
        return
    name = str(getattr(wanted, "name", wanted)).lower()
    if name in ("maximize", "minimize") and name[:3] != direction:
        _fail(
            f"hydra.sweeper.direction={name}, but trainer.objective={objective!r} is "
            f"{direction}imized here; set hydra.sweeper.direction="
            f"{'maximize' if direction == 'max' else 'minimize'}, or sweep.direction="
            f"{name[:3]} if {objective!r} really is to be {name}d."
        )


COMPOSED_DIR = ".xp_configs"
"""In the sweep directory: the jobs' configs as the sweep composed them
(:class:`_ComposedConfigs`)."""

_REGISTERED = False
"""xp's resolvers and schemas are registered in this process (a launcher's worker)."""

_COMPOSED: _ComposedConfigs | None = None
"""Where this process keeps, or takes, the jobs' composed configs."""


class _ComposedConfigs:
    """Job configs Hydra's sweeper composed to check a batch, kept for the job that runs
    each (in this process, a joblib worker or a submitit job): one file a job, pickled as
    Hydra's launchers ship configs (about 20 KiB), signed with a key that only this sweep's
    processes hold (it travels in the pickled callback), taken and removed by the job."""

    def __init__(self, folder: Path, key: bytes) -> None:
        self.folder = folder
        self.key = key

    def _path(self, overrides: Sequence[str]) -> Path:
        name = hashlib.sha256(json.dumps(list(overrides)).encode()).hexdigest()[:32]
        return self.folder / f"{name}.pkl"

    def put(self, overrides: Sequence[str], config: DictConfig) -> None:
        data = pickle.dumps(config)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(overrides)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(hmac.new(self.key, data, "sha256").digest() + data)
        os.replace(tmp, path)

    def take(self, overrides: Sequence[str]) -> DictConfig | None:
        """The job's config, or None: never kept, taken already, or not signed by this sweep
        (then the job composes its own, as Hydra would)."""
        path = self._path(overrides)
        try:
            raw = path.read_bytes()
            path.unlink()
        except OSError:
            return None
        signature, data = raw[:32], raw[32:]
        if not hmac.compare_digest(signature, hmac.new(self.key, data, "sha256").digest()):
            return None
        config: DictConfig = pickle.loads(data)
        return config

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _compose_each_job_once(store: _ComposedConfigs | None) -> None:
    """Compose each job's config once, not twice.

    Before it launches a batch, Hydra's sweeper composes every job's config so that a bad
    one fails before any job runs (``validate_batch_is_legal``); the launcher then composes
    each again to run it (Hydra's basic launcher in this process, joblib's in its workers,
    submitit's in each Slurm job). xp's config takes 0.1-0.3 s to compose on 2 cores: most
    of a short job's own cost, twice. The sweeper's compositions are kept
    (:class:`_ComposedConfigs`) and each job takes its own, with the master config's
    resolver cache as Hydra copies it, instead of composing it again.
    """
    global _COMPOSED
    _COMPOSED = store
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.plugins.sweeper import Sweeper

    if getattr(ConfigLoaderImpl.load_sweep_config, "_xp_once", False):
        return
    compose = ConfigLoaderImpl.load_sweep_config
    validate = Sweeper.validate_batch_is_legal
    validating = False

    def validate_batch_is_legal(self: Any, batch: Sequence[Sequence[str]]) -> None:
        nonlocal validating
        validating = True
        try:
            validate(self, batch)
        finally:
            validating = False

    def load_sweep_config(
        self: Any, master_config: DictConfig, sweep_overrides: list[str]
    ) -> DictConfig:
        kept = _COMPOSED.take(sweep_overrides) if _COMPOSED is not None else None
        if kept is not None:
            OmegaConf.copy_cache(from_config=master_config, to_config=kept)
            return kept
        config: DictConfig = compose(self, master_config, sweep_overrides)
        if validating and _COMPOSED is not None:
            _COMPOSED.put(sweep_overrides, config)
        return config

    load_sweep_config._xp_once = True  # type: ignore[attr-defined]
    Sweeper.validate_batch_is_legal = validate_batch_is_legal  # type: ignore[method-assign]
    ConfigLoaderImpl.load_sweep_config = load_sweep_config  # type: ignore[method-assign]


def _divide_threads_among_jobs(config: DictConfig) -> None:
    """Jobs that run side by side (joblib) share the cores instead of each taking all."""
    launcher = str(config.hydra.launcher.get("_target_", ""))
    if "joblib" not in launcher.lower() or os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    n_jobs = int(config.hydra.launcher.get("n_jobs") or -1)
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    # Workers inherit this environment; xp's strategy reads it for its thread count.
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // min(parallel, cores)))


def _swept_keys(overrides: Sequence[str], config: DictConfig) -> list[str]:
    """The keys that vary between jobs: sweep overrides and the sweeper's search space."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))
            if o.is_sweep_override()]  # fmt: skip
    params = config.hydra.sweeper.get("params") if "params" in config.hydra.sweeper else None
    if params:
        keys += [str(k) for k in params if str(k) not in keys]
    return keys


def _sweep_params(overrides: Sequence[str], config: DictConfig) -> dict[str, str]:
    params = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o}
    space = config.hydra.sweeper.get("params") if "params" in config.hydra.sweeper else None
    for key, value in (space or {}).items():
        params.setdefault(str(key), str(value))
    for key in ("n_trials", "n_jobs", "direction"):
        if key in config.hydra.sweeper:
            params[f"hydra.sweeper.{key}"] = str(config.hydra.sweeper[key])
    return flatten_params(params)


@functools.lru_cache(maxsize=8)
def _client(tracking_uri: str) -> Any:
    """One ``MlflowClient`` per store for this process's sweep queries: making one verifies
    a SQL store's schema (about 10 ms), which each job paid three times."""
    return client(tracking_uri)


def _experiment_id(client: Any, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(
                client.create_experiment(
                    name, artifact_location=default_artifact_location(uri, name)
                )
            )
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"experiment_name={name!r} names a deleted experiment; restore it with `mlflow "
            f"experiments restore --experiment-id {experiment.experiment_id}` or pick another."
        )
    return str(experiment.experiment_id)


def _earlier_runs(uri: str, experiment_name: str, key: str) -> tuple[list[str], list[EarlierRun]]:
    """The earlier runs of the sweep ``key``: (its parents' ids, newest first; its children).

    One search by the tag :data:`SWEEP_KEY_TAG`, however many runs the experiment has.
    """
    from mlflow.entities import ViewType

    try:
        client = _client(uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return [], []
        runs: list[Any] = []
        token = None
        while True:
            page = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`{SWEEP_KEY_TAG}` = '{key}'",
                run_view_type=ViewType.ACTIVE_ONLY,
                order_by=["attributes.start_time DESC"],
                max_results=1000,
                page_token=token,
            )
            runs += list(page)
            token = page.token
            if not token:
                break
    except Exception as e:
        _fail(
            f"could not read the earlier runs of this sweep from {uri}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}. Check "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI, or sweep without tracking "
            "(tracking=off)."
        )
        raise  # unreachable: _fail exits
    parents = [r.info.run_id for r in runs if r.data.tags.get("xp.sweep_role") == "parent"]
    children = [EarlierRun.from_run(r) for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _grid_jobs(config: DictConfig, overrides: Sequence[str]) -> int | None:
    """How many jobs Hydra's basic sweeper makes of these overrides; None for other sweepers."""
    if str(config.hydra.sweeper.get("_target_", "")) != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    hydra = GlobalHydra.instance()
    loader = hydra.config_loader() if hydra.is_initialized() else None
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    try:
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
        return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    except HydraException:  # Hydra reports it itself when the sweep starts
        return None


def announce(
    earlier: Sequence[EarlierRun],
    parents: Sequence[str],
    jobs: int | None,
    *,
    tracked: bool,
    fresh: bool,
) -> str:
    """What a sweep says when it starts: which of its jobs it will skip or resume, and why.

    Args:
        earlier: The children of earlier runs of this sweep.
        parents: The parent runs of earlier runs of this sweep, newest first.
        jobs: The number of jobs (a grid), or None when the sweeper makes them as it goes.
        tracked: Whether tracking is on (skipping and resuming need MLflow).
        fresh: ``sweep.fresh=true``.
    """
    count = "every job runs" if jobs is None else f"all {jobs} job{'s' * (jobs != 1)} run"
    if not tracked:
        return f"xp: {count}: with tracking off no job is skipped or resumed."
    before = ""
    if parents:
        times = f"{len(parents)} times, last as parent" if len(parents) > 1 else "parent"
        before = f"this sweep ran before ({times} {parents[0]})"
    if fresh:
        return f"xp: sweep.fresh=true: {count} anew" + (f", although {before}." if before else ".")
    if not before and not earlier:
        return (
            f"xp: a new sweep: {count} (runs outside this sweep are "
            "never reused). Running the same command again skips the jobs it FINISHED and "
            "resumes those it left KILLED; sweep.fresh=true runs everything anew."
        )
    if not before:
        before = "this sweep ran before"
    if jobs is None:
        finished = sum(e.status == "FINISHED" for e in earlier)
        killed = sum(e.status == "KILLED" for e in earlier)
        return (
            f"xp: {before}: {finished} of its runs FINISHED, {killed} KILLED. The sweeper "
            "picks its jobs as it goes: each job says if it is skipped (its config FINISHED "
            "there) or resumed; sweep.fresh=true runs everything anew."
        )
    skipped = resumed = 0
    stopped: set[str] = set()
    for num in range(jobs):
        finished_run, stopped_run = reusable([e for e in earlier if e.job == num])
        skipped += finished_run is not None
        if stopped_run is not None:
            resumed += 1
            stopped.add(stopped_run.status)
    how = "KILLED" if stopped <= {"KILLED"} else "stopped (KILLED, or RUNNING but dead)"
    rest = jobs - skipped - resumed
    return (
        f"xp: {before}: {skipped} of {jobs} jobs FINISHED will be skipped, {resumed} {how} "
        f"will be resumed, {rest} will run; sweep.fresh=true runs everything anew."
    )


def _create_parent(
    config: DictConfig, info: SweepInfo, overrides: Sequence[str], sweeper: str
) -> str:
    from mlflow.entities import Param

    assert info.tracking_uri is not None
    try:
        client = _client(info.tracking_uri)
        experiment_id = _experiment_id(client, info.tracking_uri, info.experiment_name)
        tags = {
            "xp.sweep_role": "parent",
            "xp.sweep_dir": info.sweep_dir,
            "xp.sweeper": sweeper.rsplit(".", 1)[-1],
            "xp.launcher": str(config.hydra.launcher.get("_target_", "")).rsplit(".", 1)[-1],
            "xp.overrides": " ".join(overrides),
            "xp.objective": info.objective,
            "xp.direction": info.direction,
            "xp.swept_keys": ",".join(info.swept_keys),
            SWEEP_KEY_TAG: info.sweep_key,
            "mlflow.source.name": "xp",
        }
        run = client.create_run(
            experiment_id, run_name=f"sweep {Path(info.sweep_dir).name}", tags=tags
        )
        params = [Param(k, v) for k, v in _sweep_params(overrides, config).items()]
        for start in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[start : start + 100])
    except Exception as e:
        _fail(
            f"could not create the sweep's parent run in {info.tracking_uri}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}. Check "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI, or sweep without tracking "
            "(tracking=off)."
        )
        raise  # unreachable: _fail exits
    return str(run.info.run_id)


def _child_run_id(
    info: SweepInfo,
    num: int,
    name: str,
    config: DictConfig,
    plan: JobPlan | None,
    error: str | None,
) -> str | None:
    """The job's MLflow run; a job that failed before its run existed gets a FAILED one."""
    client = _client(info.tracking_uri or "")
    experiment = client.get_experiment_by_name(info.experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{info.parent_run_id}' and tags.`xp.sweep_job` = '{num}'"
        ),
        max_results=1,
    )
    if runs:
        return str(runs[0].info.run_id)
    if error is None or info.parent_run_id is None:
        return None
    from mlflow.entities import Param

    job_cfg = OmegaConf.masked_copy(config, [str(k) for k in config if k != "hydra"])
    try:
        plain = _plain(job_cfg)
    except Exception:  # the error may be the config itself: record it without params
        plain = {}
    tags = {
        "mlflow.parentRunId": info.parent_run_id,
        "xp.sweep_dir": info.sweep_dir,
        "xp.sweep_job": str(num),
        "xp.overrides": " ".join(str(o) for o in config.hydra.overrides.task),
        "xp.error": error[:5000],
        "mlflow.source.name": "xp",
    }
    if info.sweep_key:
        tags[SWEEP_KEY_TAG] = info.sweep_key
    if plan is not None:
        tags["xp.config_hash"] = plan.config_hash
    run = client.create_run(experiment.experiment_id, run_name=_run_name(name), tags=tags)
    swept = swept_params([str(o) for o in config.hydra.overrides.task], info.swept_keys)
    params = [Param(k, v) for k, v in {**flatten_params(plain), **swept}.items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    client.set_terminated(run.info.run_id, "FAILED")
    return str(run.info.run_id)


def _take_runs_of_jobs(info: SweepInfo, records: Sequence[JobRecord]) -> None:
    """Give each job that ran its MLflow run and that run's final metrics, as MLflow has
    them: one search for the parent's children when the sweep ends, however many jobs (a
    job that ended does not ask MLflow for its run; its record was complete when it ended).
    """
    assert info.tracking_uri is not None
    from mlflow.entities import ViewType

    try:
        client = _client(info.tracking_uri)
        experiment = client.get_experiment_by_name(info.experiment_name)
        runs: list[Any] = []
        token = None
        while experiment is not None:
            page = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{info.parent_run_id}'",
                run_view_type=ViewType.ACTIVE_ONLY,
                order_by=["attributes.start_time ASC"],
                max_results=1000,
                page_token=token,
            )
            runs += list(page)
            token = page.token
            if not token:
                break
    except Exception as e:
        say(
            f"xp: could not read the jobs' runs from {info.tracking_uri}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; the "
            "summary shows no metrics for them.",
            file=sys.stderr,
        )
        return
    by_job = {r.data.tags.get("xp.sweep_job"): r for r in runs}  # the newest run of a job
    for record in records:
        run = by_job.get(str(record.num))
        if record.status == "SKIPPED" or run is None:
            continue
        record.run_id = str(run.info.run_id)
        record.metrics = {str(k): float(v) for k, v in run.data.metrics.items()}


def _mlflow_metrics(uri: str, run_id: str, num: int) -> dict[str, float]:
    """A run's final metrics as MLflow has them: each metric's value at its last step."""
    try:
        metrics = _client(uri).get_run(run_id).data.metrics
    except Exception as e:
        say(
            f"xp: could not read the metrics of job #{num} (run {run_id}) from {uri}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; the "
            "summary shows none for it.",
            file=sys.stderr,
        )
        return {}
    return {str(k): float(v) for k, v in metrics.items()}


def swept_params(overrides: Sequence[str], swept: Sequence[str]) -> dict[str, str]:
    """The job's values of the swept keys as params: ``{"_swept.optim.lr": "0.003"}``.

    MLflow's compare view opens its parallel coordinates on the first three params (in
    sort order) whose values differ between the runs; these sort first, so the swept
    keys are the axes a user sees (see :data:`SWEPT_PARAM_PREFIX`).
    """
    keys = set(swept)
    values = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if sep and key in keys:
            values[f"{SWEPT_PARAM_PREFIX}{key}"] = value
    return flatten_params(values)


# --------------------------------------------------------------------------- the summary


def _load_records(sweep_dir: Path) -> list[JobRecord]:
    folder = sweep_dir / JOBS_DIR
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.glob("*.json")):
        with contextlib.suppress(ValueError, OSError, TypeError):
            records.append(JobRecord(**json.loads(path.read_text())))
    return sorted(records, key=lambda r: r.num)


def rank_records(records: Sequence[JobRecord], direction: str) -> list[JobRecord]:
    """Best first by objective (``direction`` max or min); jobs without one last, by number."""

    def key(record: JobRecord) -> tuple[int, float, int]:
        value = record.objective
        if value is None or math.isnan(value) or record.status == "FAILED":
            return (1, 0.0, record.num)
        return (0, -value if direction == "max" else value, record.num)

    return sorted(records, key=key)


def summary_rows(
    records: Sequence[JobRecord], objective: str, direction: str
) -> tuple[list[str], list[list[str]]]:
    """The summary table: header and rows, best job first."""
    ranked = rank_records(records, direction)
    kind = objective.split("/")[0] + "/"  # val/acc: the other val/ metrics next to it
    metrics = sorted(
        {k for r in ranked for k in r.metrics} - {objective},
        key=lambda m: (not m.startswith(kind), m),
    )
    header = ["job", "overrides", "status", objective, *metrics, "run_id", "run_dir", "note"]
    rows = []
    for r in ranked:
        value = r.objective if r.objective is not None else r.metrics.get(objective)
        rows.append(
            [
                str(r.num),
                r.name,
                r.status,
                _number(value),
                *[_number(r.metrics.get(k)) for k in metrics],
                r.run_id or "",
                r.run_dir or "",
                r.note,
            ]
        )
    return header, rows


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def write_summary(
    sweep_dir: Path, records: Sequence[JobRecord], objective: str, direction: str
) -> str:
    """Write ``summary.csv`` and ``summary.md`` into the sweep directory; the terminal table."""
    from xp.table import fit_table, format_table, markdown_table, terminal_width

    header, rows = summary_rows(records, objective, direction)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    counts = {s: sum(r.status == s for r in records) for s in ("FINISHED", "SKIPPED", "FAILED")}
    title = (
        f"Sweep {sweep_dir.name}: {len(records)} jobs ({counts['FINISHED']} finished, "
        f"{counts['SKIPPED']} skipped, {counts['FAILED']} failed), best first by {objective} "
        f"({direction})"
    )
    (sweep_dir / "summary.md").write_text(f"# {title}\n\n{markdown_table(header, rows)}\n")
    # The terminal gets the short form: no directories, run ids cut to 8 characters, the
    # columns that fit its width (every one is in summary.csv and summary.md).
    keep = [i for i, h in enumerate(header) if h not in ("overrides", "run_dir")]
    names = [
        "#" if header[i] == "job" else "run" if header[i] == "run_id" else header[i] for i in keep
    ]
    names.insert(1, "job")
    ids = header.index("run_id")
    short = [
        [row[keep[0]], row[1], *(row[i][:8] if i == ids else row[i] for i in keep[1:])]
        for row in rows
    ]
    width = terminal_width()
    limits = {"job": 60, "note": 60}
    shown, cells, left = fit_table(names, short, width, ["status", objective, "run"], limits)
    note = ""
    if left:
        note = f"\n({', '.join(left)} did not fit in {width} characters: see the summary)"
    return f"{title}\n{format_table(shown, cells)}{note}\nSummary: {sweep_dir / 'summary.md'}"


def _close_parent(info: SweepInfo, records: Sequence[JobRecord], status: str) -> None:
    assert info.tracking_uri is not None and info.parent_run_id is not None
    client = _client(info.tracking_uri)
    run_id = info.parent_run_id
    sweep_dir = Path(info.sweep_dir)
    for name in ("summary.csv", "summary.md", "optimization_results.yaml", "multirun.yaml"):
        if (sweep_dir / name).is_file():
            client.log_artifact(run_id, str(sweep_dir / name))
    ranked = rank_records(records, info.direction)
    best = ranked[0] if ranked and ranked[0].objective is not None else None
    from mlflow.entities import Metric, RunTag

    tags = [
        RunTag("xp.jobs", str(len(records))),
        RunTag("xp.failed_jobs", str(sum(r.status == "FAILED" for r in records))),
        RunTag("xp.skipped_jobs", str(sum(r.status == "SKIPPED" for r in records))),
    ]
    metrics = []
    if best is not None and best.objective is not None and best.status != "FAILED":
        tags += [RunTag("xp.best_job", best.name), RunTag("xp.best_run_id", best.run_id or "")]
        metrics.append(Metric(info.objective, best.objective, _now_ms(), 0))
    client.log_batch(run_id, metrics=metrics, tags=tags)
    client.set_terminated(run_id, status)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
