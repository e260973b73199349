"""A sweep's runs in MLflow: the earlier runs of the sweep, the parent run, the child run of
a job that failed before its run existed, the jobs' runs and metrics when the sweep ends,
and the parent's close with the summary.

mlflow is imported by the functions that ask it, never at import time.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xp.log import say
from xp.sweep.plan import JobPlan
from xp.sweep.records import (
    SWEEP_KEY_TAG,
    EarlierRun,
    JobRecord,
    SweepInfo,
    _fail,
    _now_ms,
    _plain,
    _run_name,
    swept_params,
)
from xp.sweep.summary import rank_records
from xp.tracking import client, default_artifact_location, flatten_params


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

    try:
        client = _client(uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return [], []
        runs = _search_all(
            client, experiment.experiment_id, f"tags.`{SWEEP_KEY_TAG}` = '{key}'", "DESC"
        )
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

    try:
        client = _client(info.tracking_uri)
        experiment = client.get_experiment_by_name(info.experiment_name)
        runs = (
            []
            if experiment is None
            else _search_all(
                client,
                experiment.experiment_id,
                f"tags.`mlflow.parentRunId` = '{info.parent_run_id}'",
                "ASC",
            )
        )
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


def _search_all(client: Any, experiment_id: str, filter_string: str, order: str) -> list[Any]:
    """Every active run of the experiment that matches, page by page, by start time."""
    from mlflow.entities import ViewType

    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=[f"attributes.start_time {order}"],
            max_results=1000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs
