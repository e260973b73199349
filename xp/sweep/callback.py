"""The Hydra callback that records a sweep, and the command line's side of a multirun.

:class:`SweepCallback`'s ``on_multirun_start``, in the launching process, reads the earlier
runs of the sweep, says what will be skipped or resumed (:func:`announce`), creates the
parent run and writes ``.xp_sweep.json``; ``on_job_end``, in the process that ran a job,
writes the job's record; ``on_multirun_end`` writes the summary and closes the parent.
Before Hydra composes anything :func:`sweep_arguments` checks the command line; after the
multirun :func:`exit_status` says whether a job failed.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import hmac
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from xp.log import say
from xp.sweep.plan import forget_plan, take_plan
from xp.sweep.records import (
    JOBS_DIR,
    EarlierRun,
    JobFailed,
    JobRecord,
    SweepInfo,
    _fail,
    _job_name,
    _tracking_uri,
    direction_of,
    reusable,
    sweep_key,
    sweep_settings,
)
from xp.sweep.runs import (
    _child_run_id,
    _close_parent,
    _create_parent,
    _earlier_runs,
    _mlflow_metrics,
    _take_runs_of_jobs,
)
from xp.sweep.summary import _load_records, write_summary
from xp.tracking import drop_early_writer, keep_writers, start_early_writer

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"

PLUGINS = {
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "sweep"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}
"""Config group options that need a Hydra plugin: (module, xp extra that installs it)."""


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
        forget_plan()
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
        hydra = config.hydra
        info = SweepInfo.load(hydra.sweep.dir)
        if info is None:
            return
        num = int(hydra.job.num)
        overrides = [str(o) for o in hydra.overrides.task]
        name = _job_name(overrides, info.swept_keys, num)
        plan = take_plan()
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
            # of the others are read once, when the sweep ends (runs._take_runs_of_jobs).
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


def _metrics_file(run_dir: str | None) -> dict[str, float]:
    """A run's ``metrics.json``: the record of a job's metrics only when tracking is off.

    With tracking on, MLflow is the record (the file can be overwritten by a later run in
    the same directory): see :func:`xp.sweep.runs._mlflow_metrics`.
    """
    path = Path(run_dir) / "metrics.json" if run_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, TypeError, OSError, AttributeError) as e:
        say(f"xp: could not read the metrics in {path}: {e}", file=sys.stderr)
        return {}


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
    _KEPT_DEFAULTS.clear()
    _KEPT_CONFIGS.clear()
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
    _compose_each_choice_once()


_KEPT_DEFAULTS: dict[tuple[Any, ...], Any] = {}
"""A sweep's defaults lists, by the overrides that choose configs (see below)."""
_KEPT_CONFIGS: list[tuple[Any, DictConfig]] = []
"""A sweep's composed configs before their value overrides, by their defaults list."""


def _compose_each_choice_once() -> None:
    """In a sweep, compose the configs of one choice of config groups once.

    Most of a job's composition is the same for every job that chooses the same options
    (``optim=adamw``, not ``optim.lr=...``): its defaults list (the tree of config files)
    and the merge of those files, about 0.1 s a job on 2 cores, paid by every job of a
    100-job sweep before the first one starts. Both are pure functions of the config name
    and the overrides that choose configs, so the sweep keeps them by those: a job whose
    choices were composed before gets a copy of that merge, and Hydra applies its value
    overrides, fills ``hydra.*`` and validates as it always does.
    """
    from hydra._internal import config_loader_impl as loader
    from hydra._internal.defaults_list import DefaultsList, Overrides

    if getattr(loader.create_defaults_list, "_xp_kept", False):
        return
    create = loader.create_defaults_list
    compose = loader.ConfigLoaderImpl._compose_config_from_defaults_list

    def create_defaults_list(
        repo: Any, config_name: str | None, overrides_list: list[Any], prepend_hydra: bool,
        skip_missing: bool,
    ) -> Any:  # fmt: skip
        if _COMPOSED is None:  # not in a sweep
            return create(repo, config_name, overrides_list, prepend_hydra, skip_missing)
        overrides = Overrides(repo=repo, overrides_list=overrides_list)
        values = {id(o) for o in overrides.config_overrides}
        choices = tuple(
            o.input_line
            for o in overrides_list
            if id(o) not in values and not o.is_sweep_override()
        )
        key = (config_name, prepend_hydra, skip_missing, choices)
        kept = _KEPT_DEFAULTS.get(key)
        if kept is None:
            kept = _KEPT_DEFAULTS[key] = create(
                repo, config_name, overrides_list, prepend_hydra, skip_missing
            )
            return kept
        return DefaultsList(
            defaults=kept.defaults,
            config_overrides=overrides.config_overrides,
            defaults_tree=kept.defaults_tree,
            overrides=kept.overrides,
        )

    def compose_config_from_defaults_list(self: Any, defaults: Any, repo: Any) -> DictConfig:
        if _COMPOSED is None:
            return compose(self, defaults, repo)
        for kept_defaults, config in _KEPT_CONFIGS:
            if kept_defaults is defaults:  # the same kept defaults list: the same files
                return copy.deepcopy(config)
        config = compose(self, defaults, repo)
        _KEPT_CONFIGS.append((defaults, copy.deepcopy(config)))
        return config

    create_defaults_list._xp_kept = True  # type: ignore[attr-defined]
    loader.create_defaults_list = create_defaults_list
    loader.ConfigLoaderImpl._compose_config_from_defaults_list = (  # type: ignore[method-assign]
        compose_config_from_defaults_list
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
