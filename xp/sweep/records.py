"""What a sweep keeps and shares: its settings, its files, and what names its runs.

The launching process writes :class:`SweepInfo` (``<sweep dir>/.xp_sweep.json``) and each
job its :class:`JobRecord` (``<sweep dir>/.xp_jobs/<num>.json``); :func:`sweep_key` and
:func:`config_hash` say which earlier runs a job may skip over or resume
(:class:`EarlierRun`, :func:`reusable`). The other modules of :mod:`xp.sweep` import this
one; it imports none of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from xp.log import say
from xp.tracking import default_tracking_uri, flatten_params

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

SWEEP_KEY_TAG = "xp.sweep_key"
"""On a sweep's parent and children: :func:`sweep_key`; a re-run reuses runs with the same."""
SWEPT_PARAM_PREFIX = "_swept."
"""Prefix of the params that repeat a child's swept values (``_swept.optim.lr``): MLflow's
compare view plots the first three differing params in sort order, and ``_`` sorts
before every key of xp's config."""
RUN_NAME_CHARS = 250
"""MLflow's SQL stores keep a run's name in a column of 250 characters."""

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


# --------------------------------------------------------------------------- shared helpers


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


def _fail(message: str) -> None:
    say(f"xp: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
