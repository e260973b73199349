"""Sweeps: one MLflow parent run per Hydra multirun, one child run per job.

Hydra calls :class:`SweepCallback` in two places: ``on_multirun_start``/``_end`` in the
process that launches the jobs, ``on_job_start``/``_end`` in the process that runs each
job (the same process for Hydra's basic launcher, a worker process for joblib, a Slurm
job for submitit). So what jobs need from the launching process (the parent run id, the
swept keys) travels in ``<sweep dir>/.xp_sweep.json``, and what the launching process
needs from the jobs (status, final metrics, run id) in ``<sweep dir>/.xp_jobs/<num>.json``.

Re-running a sweep skips its jobs whose config already FINISHED in the experiment and
resumes those that were stopped: KILLED, or left RUNNING by a process that died (its run
directory's lock is free). A config is identified by :func:`config_hash`, stored on
every run as the tag ``xp.config_hash``.

This module imports neither torch nor mlflow at import time.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
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
from xp.tracking import default_artifact_location, default_tracking_uri, flatten_params

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
    "trainer.objective",
    "strategy.master_port",
    "test",
    "test_checkpoint",
)
"""Config keys left out of :func:`config_hash`: where a run is recorded and how it is
shown, never what it computes. Hydra's own settings (run and sweep directories) are not
part of the job's config at all."""

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

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

    def save(self) -> None:
        path = Path(self.sweep_dir) / SWEEP_FILE
        _write_atomically(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, sweep_dir: str | Path) -> SweepInfo | None:
        path = Path(sweep_dir) / SWEEP_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


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
    if job.info.parent_run_id:
        tags["mlflow.parentRunId"] = job.info.parent_run_id
    return job.name, tags


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
    """Skip a job whose config FINISHED in the experiment; resume one that was stopped.

    Called by ``xp.run.run`` before anything is built. Outside a multirun, with
    ``resume=`` given, with tracking off, or with ``sweep.fresh=true`` the job runs
    anew (None or a plan without skip/resume). A skipped or resumed job leaves no folder
    of its own in this sweep: the run it continues or reuses keeps its directory.
    """
    global _PLAN
    _PLAN = None
    if not _in_multirun() or target is not None or cfg.get("test") or os.environ.get(WORKER_ENV):
        return None
    digest = config_hash(_plain(cfg))
    _PLAN = plan = JobPlan(config_hash=digest)
    if not cfg.tracking.enabled or sweep_settings(cfg).fresh:
        return plan
    from mlflow import MlflowClient

    uri = _tracking_uri(cfg)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    if experiment is None:
        return plan
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`xp.config_hash` = '{digest}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    finished = [r for r in runs if r.info.status == "FINISHED"]
    objective = str(cfg.trainer.objective)
    if finished:
        run = finished[0]
        plan.skip = True
        plan.previous_run_id = run.info.run_id
        plan.run_dir = run.data.tags.get("xp.run_dir")
        plan.metrics = _final_metrics(plan.run_dir, dict(run.data.metrics))
        value = plan.metrics.get(objective)
        plan.objective = None if value is None else float(value)
        plan.note = "FINISHED before (sweep.fresh=true reruns it)"
        _remove_fresh_dir(log_dir)
        say(
            f"xp: skipping {_job_label()}: it FINISHED before as run {run.info.run_id}; "
            "sweep.fresh=true reruns it.",
            file=sys.stderr,
        )
        return plan
    if runs and _stopped(runs[0]):
        from xp.resume import ResumeError, resolve

        run = runs[0]
        try:
            plan.resume = resolve(
                run.info.run_id,
                tracking_uri=uri,
                experiment_name=cfg.experiment_name,
                outputs=_launch_dir() / "outputs",
            )
        except ResumeError as e:
            plan.note = f"{_stopped_label(run)} {run.info.run_id} cannot resume ({e}); ran anew"
            say(f"xp: {_job_label()}: {plan.note}.", file=sys.stderr)
            return plan
        plan.previous_run_id = run.info.run_id
        plan.run_dir = plan.resume.run_dir
        plan.note = f"resumed {_stopped_label(run)} {run.info.run_id} in {plan.resume.run_dir}"
        _remove_fresh_dir(log_dir)
        say(f"xp: {_job_label()}: {plan.note}.", file=sys.stderr)
    return plan


def _stopped(run: Any) -> bool:
    """KILLED, or RUNNING in MLflow while no process trains it (killed hard: ``kill -9``, a
    lost node, a Slurm job past its time limit)."""
    if run.info.status == "KILLED":
        return True
    if run.info.status != "RUNNING":
        return False
    from xp.resume import RunDirLock

    run_dir = run.data.tags.get("xp.run_dir")
    return bool(run_dir) and RunDirLock(Path(run_dir)).dead()


def _stopped_label(run: Any) -> str:
    if run.info.status == "KILLED":
        return "KILLED run"
    return "run left RUNNING by a process that is gone,"


def _job_label() -> str:
    job = _this_job()
    return f"job #{job.num} ({job.name})" if job else "this job"


def _remove_fresh_dir(log_dir: Path) -> None:
    """Hydra made the job's folder (only .hydra/ in it); nothing of the job goes there."""
    from xp.resume import LOCK_FILE

    if log_dir.is_dir() and {p.name for p in log_dir.iterdir()} <= {".hydra", LOCK_FILE}:
        shutil.rmtree(log_dir, ignore_errors=True)


def _final_metrics(run_dir: str | None, fallback: dict[str, float]) -> dict[str, float]:
    """The run's final metrics (``metrics.json`` in its directory), else MLflow's latest."""
    if run_dir:
        path = Path(run_dir) / "metrics.json"
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    return fallback


@contextlib.contextmanager
def worker_launch(log_dir: Path, nproc: int) -> Iterator[list[str]]:
    """The arguments for the workers of this (distributed) run, and their environment.

    A single run's workers repeat its command line. A sweep's job gives its workers its
    own overrides (never the whole sweep), its own directory, the KILLED run it resumes
    (see :func:`plan_job`) and its sweep facts; its threads are divided among them. The
    environment is restored after.
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
    env = {WORKER_ENV: json.dumps({"info": asdict(job.info), "num": job.num, "name": job.name})}
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


def run_task(cfg: DictConfig) -> float | None:
    """Hydra's task function: train; in a sweep, an error ends the job, not the sweep.

    ``xp.run`` reports a user's mistake as one line and exits 1; in a multirun that
    would stop every job after this one, so it becomes :class:`JobFailed`, which Hydra
    records for this job. A stop signal (exit status above 128) still ends the sweep.
    """
    from xp.run import run

    if not _in_multirun():
        return run(cfg)
    tee = _ErrorTee(sys.stderr)
    sys.stderr = tee
    try:
        return run(cfg)
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled in a launcher's worker (joblib, submitit): that process composes the
        # job's config, which needs xp's resolvers and schemas.
        self.__dict__.update(state)
        from xp.__main__ import _register_resolvers
        from xp.config import register_schemas

        _register_resolvers()
        register_schemas()

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
        sweep_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(sweep_dir / JOBS_DIR, ignore_errors=True)
        overrides = [str(o) for o in config.hydra.overrides.task]
        swept = _swept_keys(overrides, config)
        uri = _tracking_uri(config) if config.tracking.enabled else None
        info = SweepInfo(
            sweep_dir=str(sweep_dir),
            parent_run_id=None,
            tracking_uri=uri,
            experiment_name=str(config.experiment_name),
            swept_keys=swept,
            objective=objective,
            direction=direction,
            needs_number=sweeper != BASIC_SWEEPER,
        )
        if uri is not None:
            info.parent_run_id = _create_parent(config, info, overrides, sweeper)
        info.save()
        self._info = info
        atexit.register(self._end_if_cut_short)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end("FINISHED")

    def _end_if_cut_short(self) -> None:
        # The sweep stopped before Hydra's on_multirun_end (a signal, a sweeper that gave
        # up): the parent still gets the summary of the jobs that ended.
        if not self._ended and self._info is not None:
            records = _load_records(Path(self._info.sweep_dir))
            self._end("FAILED" if any(r.status == "FAILED" for r in records) else "KILLED")

    def _end(self, status: str) -> None:
        global _EXIT_STATUS
        info = self._info
        if info is None or self._ended:
            return
        self._ended = True
        records = _load_records(Path(info.sweep_dir))
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
        if job_return.status == JobStatus.COMPLETED:
            value = job_return._return_value
            if plan is not None and plan.skip:
                record.status = "SKIPPED"
                record.run_id = plan.previous_run_id
                record.metrics = plan.metrics
            else:
                record.metrics = _final_metrics(record.run_dir, {})
            if value is not None:
                with contextlib.suppress(TypeError, ValueError):
                    record.objective = float(value)
            if info.needs_number and record.objective is None:
                known = ", ".join(sorted(record.metrics)) or "none"
                error = (
                    f"trainer.objective={info.objective!r} gave {value!r}, not a number; the "
                    f"sweeper needs one from every job. The final metrics were: {known}. Set "
                    "trainer.objective to one of them (and keep validation on for val/ ones)."
                )
                misconfigured = True
            elif info.needs_number and math.isnan(record.objective or 0.0):
                error = f"trainer.objective={info.objective!r} is NaN"
        else:
            exc = job_return._return_value
            error = str(exc).strip() or type(exc).__name__
        if error is not None:
            record.status = "FAILED"
            record.note = error.strip().splitlines()[0]
            if not misconfigured:
                say(f"xp: job #{num} ({name}) FAILED: {record.note}", file=sys.stderr)
        if info.tracking_uri and record.run_id is None:
            record.run_id = _child_run_id(info, num, name, config, plan, error)
            if record.status == "FAILED" and not record.metrics and record.run_id:
                record.metrics = _mlflow_metrics(info.tracking_uri, record.run_id)
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


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    if uri.lower().startswith(("http://", "https://")):
        # Fail in seconds, not after MLflow's minutes of retries, when the server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    return MlflowClient(uri)


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
    if plan is not None:
        tags["xp.config_hash"] = plan.config_hash
    run = client.create_run(experiment.experiment_id, run_name=name, tags=tags)
    params = [Param(k, v) for k, v in flatten_params(plain).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    client.set_terminated(run.info.run_id, "FAILED")
    return str(run.info.run_id)


def _mlflow_metrics(uri: str, run_id: str) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in _client(uri).get_run(run_id).data.metrics.items()}
    except Exception:
        return {}


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
    metrics = sorted({k for r in ranked for k in r.metrics} - {objective})
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


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..." if width > 8 else text[:width]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def write_summary(
    sweep_dir: Path, records: Sequence[JobRecord], objective: str, direction: str
) -> str:
    """Write ``summary.csv`` and ``summary.md`` into the sweep directory; the terminal table."""
    from xp.compare import format_table, markdown_table

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
    # The terminal gets the short form: no directories, run ids cut to 8 characters.
    keep = [i for i, h in enumerate(header) if h not in ("overrides", "run_dir")]
    names = [
        "#" if header[i] == "job" else "run" if header[i] == "run_id" else header[i] for i in keep
    ]
    names.insert(1, "job")
    short = []
    for row in rows:
        cells = [_cut(row[i], 8 if header[i] == "run_id" else 60) for i in keep]
        short.append([cells[0], row[1], *cells[1:]])
    return f"{title}\n{format_table(names, short)}\nSummary: {sweep_dir / 'summary.md'}"


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
