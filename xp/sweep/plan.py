"""A sweep's job in the process that runs it: its plan, and the other hooks xp.run calls.

:func:`plan_job` decides, before anything is built, whether the job is skipped (its config
FINISHED in an earlier run of this sweep), resumed (it was stopped there) or runs anew;
:func:`job_params` and :func:`job_tags` name its MLflow run and nest it under the sweep's
parent; :func:`worker_launch` gives the workers of a distributed job their part;
:func:`job_errors` makes a job's error end the job, not the sweep. The plan of the job that
runs now stays here until the callback's ``on_job_end`` takes it (:func:`take_plan`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from xp.log import say
from xp.sweep.records import (
    SWEEP_KEY_TAG,
    WORKER_ENV,
    EarlierRun,
    JobFailed,
    _in_multirun,
    _launch_dir,
    _now_ms,
    _plain,
    _run_name,
    _this_job,
    _tracking_uri,
    config_hash,
    reusable,
    sweep_settings,
    swept_params,
)

if TYPE_CHECKING:
    from xp.resume import ResumeTarget  # imports torch

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


def take_plan() -> JobPlan | None:
    """The plan of the job this process ran, forgotten: the callback's on_job_end takes it."""
    global _PLAN
    plan, _PLAN = _PLAN, None
    return plan


def forget_plan() -> None:
    """Forget the plan of a job this process ran before: the callback's on_job_start."""
    global _PLAN
    _PLAN = None


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
