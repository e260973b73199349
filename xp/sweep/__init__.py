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

This package imports neither torch nor mlflow at import time.

Its modules, each importing only those above it:

- :mod:`xp.sweep.records`: what a sweep keeps and shares: its settings (``sweep.*``), the
  config hash and the sweep key, ``.xp_sweep.json`` (:class:`SweepInfo`), a job's record
  (:class:`JobRecord`), the earlier runs a job may reuse (:class:`EarlierRun`).
- :mod:`xp.sweep.plan`: a job's plan (skip, resume, fresh) and the other hooks xp.run calls
  in the job's process: its run's params and tags, its workers' launch, its errors.
- :mod:`xp.sweep.summary`: the summary, best job first (``summary.csv``, ``summary.md``, the
  terminal's table).
- :mod:`xp.sweep.runs`: the sweep's questions to MLflow and its records there: the earlier
  runs, the parent run and its close, a failed job's child run, the jobs' runs at the end.
- :mod:`xp.sweep.callback`: :class:`SweepCallback` (Hydra's events in the launching process
  and in each job's), and the command line's side of a multirun (:func:`sweep_arguments`,
  :func:`exit_status`).

What other code uses is re-exported here: ``from xp.sweep import ...`` and conf/config.yaml's
``_target_: xp.sweep.SweepCallback`` keep working, and so does a callback pickled by that
path (a submitit job requeued after an upgrade).
"""

from xp.sweep.callback import (
    BASIC_LAUNCHER,
    BASIC_SWEEPER,
    COMPOSED_DIR,
    PLUGINS,
    SweepCallback,
    announce,
    exit_status,
    sweep_arguments,
)
from xp.sweep.callback import _ComposedConfigs as _ComposedConfigs  # for tests
from xp.sweep.plan import JobPlan, job_errors, job_params, job_tags, plan_job, worker_launch
from xp.sweep.records import (
    HASH_EXCLUDED,
    JOBS_DIR,
    RUN_NAME_CHARS,
    SWEEP_FILE,
    SWEEP_KEY_TAG,
    SWEPT_PARAM_PREFIX,
    WORKER_ENV,
    EarlierRun,
    JobFailed,
    JobRecord,
    SweepInfo,
    SweepSettings,
    config_hash,
    direction_of,
    reusable,
    sweep_key,
    sweep_settings,
    swept_params,
)
from xp.sweep.runs import _earlier_runs as _earlier_runs  # for tests
from xp.sweep.summary import rank_records, summary_rows, write_summary

__all__ = [
    "BASIC_LAUNCHER",
    "BASIC_SWEEPER",
    "COMPOSED_DIR",
    "HASH_EXCLUDED",
    "JOBS_DIR",
    "PLUGINS",
    "RUN_NAME_CHARS",
    "SWEEP_FILE",
    "SWEEP_KEY_TAG",
    "SWEPT_PARAM_PREFIX",
    "WORKER_ENV",
    "EarlierRun",
    "JobFailed",
    "JobPlan",
    "JobRecord",
    "SweepCallback",
    "SweepInfo",
    "SweepSettings",
    "announce",
    "config_hash",
    "direction_of",
    "exit_status",
    "job_errors",
    "job_params",
    "job_tags",
    "plan_job",
    "rank_records",
    "reusable",
    "summary_rows",
    "sweep_arguments",
    "sweep_key",
    "sweep_settings",
    "swept_params",
    "worker_launch",
    "write_summary",
]
