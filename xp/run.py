"""The one place where config becomes objects, and the life of a run around the loop.

Below this module no DictConfig travels: the strategy, the loop, the tracker and the
data get typed settings (dataclass instances) and built objects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from xp.checkpoint import Checkpointer, CheckpointError
from xp.config import (
    CheckpointConfig,
    DataConfig,
    Launcher,
    ModelConfig,
    MultiOptimConfig,
    OptimConfig,
    PhaseConfig,
    StrategyConfig,
    TaskConfig,
    TestCheckpoint,
    TrackingConfig,
    TrainerConfig,
)
from xp.data import Datasets, EpochLoader
from xp.dist import dist_info, infer_launcher
from xp.env import git_info
from xp.launch import launch_workers, port_error, port_in_use
from xp.log import close_logger, say
from xp.optim import OptimSpec
from xp.restore import plain, restore_config
from xp.resume import (
    LOCK_FILE,
    RUN_ID,
    TEST_ENV,
    ResumeError,
    ResumeTarget,
    RunDirLock,
    checkpoint_for_load,
)
from xp.rundir import claimed_here
from xp.scheduler import Phase
from xp.strategy.base import Prepared, Strategy, TrainingLength
from xp.targets import UntrustedTarget, check_restored
from xp.task import ModelStepTask, SupervisedTask, task_for_model
from xp.tracking import (
    MlflowTracker,
    TrackingError,
    TrackingIncomplete,
    default_artifact_location,
    default_tracking_uri,
    drop_early_writer,
    flatten_params,
    redact_secrets,
)
from xp.trainer import Trainer, TrainingStopped, training_length

INCOMPLETE_RECORD_EXIT = 3
"""The exit status of a run that trained to its end while MLflow's record of it stayed
incomplete (the store or the writer failed): ``resume=<run id>`` completes it."""
USER_ERRORS = (ValueError, TypeError, CheckpointError, TrackingError)
"""Errors a user causes with config or input: reported as one message, no traceback."""


def launch_dir() -> Path:
    """The directory the command was started in (fixed at start by ``xp.__main__``)."""
    return Path(os.environ.get("XP_LAUNCH_DIR") or os.getcwd()).resolve()


@contextlib.contextmanager
def _in_launch_dir() -> Iterator[None]:
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


# --------------------------------------------------------------------------- builders


_plain = plain


def build_factory(node: DictConfig, schema: type | None, key: str) -> partial[Any]:
    """A partial of ``node._target_`` with the node's arguments, minus xp's own fields.

    ``schema`` is the base schema whose fields are xp's settings (batch size, accumulation,
    phase window...); the rest of the node is the target's keyword arguments.
    """
    own = {f.name for f in fields(schema)} - {"_target_", "_partial_"} if schema else set()
    kwargs = {k: v for k, v in _plain(node).items() if k not in own}
    if "_target_" not in kwargs:
        raise ValueError(f"{key} has no _target_; name the class or function that builds it.")
    kwargs["_partial_"] = True
    try:
        return instantiate(kwargs)
    except InstantiationException as e:
        raise ValueError(
            f"{key}._target_={kwargs.get('_target_')!r} could not be built: {_cause(e)}. Check "
            "the dotted path, that its package is installed and importable from here, and "
            "its arguments."
        ) from e


def _cause(error: BaseException) -> str:
    """The innermost error's message (an ImportError under Hydra's wrapper, say)."""
    inner = error
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = str(inner).strip().splitlines() or [type(inner).__name__]
    text = lines[-1] if inner is error else f"{type(inner).__name__}: {lines[-1]}"
    return text


def settings_of(node: DictConfig, schema: type[Any], key: str) -> Any:
    """xp's own fields of an open node (``data``), type-checked against ``schema``."""
    own = {f.name for f in fields(schema)}
    values = {k: v for k, v in _plain(node).items() if k in own}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except Exception as e:  # omegaconf's ValidationError and friends name the field
        raise ValueError(f"{key}: {str(e).strip().splitlines()[0]}") from None


def build_task(node: DictConfig) -> SupervisedTask:
    """The supervised step and its metrics (``task``)."""
    settings: TaskConfig = OmegaConf.to_object(node)  # type: ignore[assignment]
    metrics = {}
    for name, sub in node.metrics.items():
        if not isinstance(sub, DictConfig) or "_target_" not in sub:
            raise ValueError(
                f"task.metrics.{name!s} has no _target_; name a metric class, e.g. "
                "{_target_: xp.metric.Accuracy}."
            )
        metrics[str(name)] = build_factory(sub, None, f"task.metrics.{name!s}")()
    return SupervisedTask(
        settings.loss,
        ignore_index=settings.ignore_index,
        input_key=settings.input_key,
        target_key=settings.target_key,
        metrics=metrics,
    )


def _defines_train_step(node: DictConfig) -> bool:
    """Whether ``model._target_`` is a class with its own ``train_step``."""
    try:
        target = get_class(str(node._target_))
    except Exception:  # a function that builds the model, or an error build() reports
        return False
    return callable(getattr(target, "train_step", None))


def build_strategy(cfg: DictConfig, log_dir: Path, timestamp: str | None = None) -> Strategy:
    settings: StrategyConfig = OmegaConf.to_object(cfg.strategy)  # type: ignore[assignment]
    try:
        cls = get_class(settings._target_)
    except Exception as e:  # hydra raises ImportError or ValueError depending on the path
        raise ValueError(f"strategy._target_={settings._target_!r} does not import: {e}") from e
    kwargs = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "_target_"}
    strategy = cls(
        **kwargs,
        log_dir=log_dir,
        experiment_name=cfg.experiment_name,
        randomness=OmegaConf.to_object(cfg.randomness),
        timestamp=timestamp,
    )
    assert isinstance(strategy, Strategy)
    return strategy


def build_optim(node: DictConfig) -> OptimSpec | dict[str, OptimSpec]:
    """One optimizer spec, or several by name (``optim=multi``)."""
    if OmegaConf.get_type(node) is MultiOptimConfig or "optimizers" in node:
        return {
            name: OptimSpec(
                build_factory(sub, OptimConfig, f"optim.optimizers.{name}"),
                OmegaConf.to_object(sub),  # type: ignore[arg-type]
            )
            for name, sub in node.optimizers.items()
        }
    return OptimSpec(build_factory(node, OptimConfig, "optim"), OmegaConf.to_object(node))  # type: ignore[arg-type]


def build_phases(node: DictConfig) -> list[Phase] | dict[str, list[Phase]]:
    """The LR phases for every optimizer, or per optimizer name.

    ``scheduler`` maps phase names to phases (``scheduler.warmup``), or optimizer names to
    such mappings (``scheduler.generator.warmup``).
    """

    def phases(mapping: DictConfig, prefix: str) -> list[Phase]:
        built = []
        for name, sub in mapping.items():
            key = f"{prefix}.{name!s}"
            if not isinstance(sub, DictConfig) or "_target_" not in sub:
                raise ValueError(
                    f"{key} is not an LR phase (it has no _target_); extend a phase schema, e.g. "
                    f"defaults: [/schema/scheduler/phase/cosine@{name!s}]."
                )
            settings: PhaseConfig = OmegaConf.to_object(sub)  # type: ignore[assignment]
            built.append(
                Phase(
                    factory=build_factory(sub, PhaseConfig, key),
                    begin=settings.begin,
                    end=settings.end,
                    by_epoch=settings.by_epoch,
                    convert_to_iter_based=settings.convert_to_iter_based,
                    name=key,
                )
            )
        return built

    if all(isinstance(v, DictConfig) and "_target_" in v for v in node.values()):
        return phases(node, "scheduler")
    return {str(name): phases(sub, f"scheduler.{name!s}") for name, sub in node.items()}


def build_loaders(
    datasets: Datasets, settings: DataConfig, strategy: Strategy
) -> tuple[EpochLoader, EpochLoader | None, EpochLoader | None]:
    common: dict[str, Any] = {
        "batch_size": settings.batch_size,
        "seed": strategy.seed,
        "rank": strategy.rank,
        "world_size": strategy.world_size,
        "num_workers": settings.num_workers,
        "pin_memory": settings.pin_memory,
        "persistent_workers": settings.persistent_workers,
    }
    train = EpochLoader(datasets.train, shuffle=True, drop_last=settings.drop_last, **common)
    val, test = (
        None if split is None else EpochLoader(split, shuffle=False, pad=False, **common)
        for split in (datasets.val, datasets.test)
    )
    return train, val, test


_NOT_PARAMS = ("test", "test_checkpoint")
"""Config keys that say what a command does with a run, not how the run trains."""


def build_tracker(
    cfg: DictConfig,
    strategy: Strategy,
    settings: TrackingConfig,
    target: ResumeTarget | None = None,
    env: Mapping[str, Any] | None = None,
) -> MlflowTracker | None:
    """Rank 0's MLflow tracker of this run (None elsewhere, or with tracking off).

    ``env`` is what ``collect_env`` found (``env.json``): its facts become tags.
    """
    if not settings.enabled or not strategy.is_main_process:
        drop_early_writer()  # the config turned tracking off: it is not needed
        return None
    uri = settings.tracking_uri or default_tracking_uri(launch_dir())
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    tags = {
        "xp.run_dir": str(strategy.log_dir),
        "xp.overrides": " ".join(overrides),
        "xp.world_size": str(strategy.world_size),
        "xp.seed": str(strategy.seed),
        "xp.strategy": type(strategy).__name__,
        "mlflow.source.name": "xp",
    }
    if os.environ.get("SLURM_JOB_ID"):
        tags["xp.slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    if target is not None:
        del tags["xp.overrides"]  # resume= and test= re-open the run: keep how it started
    if target is not None and not cfg.get("test"):
        tags["xp.resumed_from"] = target.checkpoint
        tags["xp.resume_overrides"] = " ".join(target.overrides)
    if cfg.load_from:
        tags["xp.load_from"] = str(cfg.load_from)
    if env is not None:
        tags.update(_env_tags(env))
    git = (
        {k: v for k, v in env["system"].items() if k.startswith("git_")}
        if env is not None
        else git_info(launch_dir())
    )
    if git:
        tags["mlflow.source.git.commit"] = git["git_commit"]
        tags["xp.git_commit"] = git["git_commit"]
        tags["xp.git_dirty"] = str(git["git_dirty"]).lower()
    from xp.sweep import job_tags

    # Every run: xp.config_hash. A sweep's job: named by its swept values, under the parent.
    sweep_name, sweep_tags = job_tags(cfg)
    tags.update(sweep_tags)
    return MlflowTracker(
        settings,
        tracking_uri=uri,
        experiment_name=cfg.experiment_name,
        run_name=sweep_name or strategy.timestamp,
        tags=tags,
        params=flatten_params({k: v for k, v in _plain(cfg).items() if k not in _NOT_PARAMS}),
        artifact_location=default_artifact_location(uri, cfg.experiment_name),
        run_id=target.run_id if target is not None else None,
        logger=strategy.logger,
    )


# --------------------------------------------------------------------------- the run


@dataclass
class Built:
    """Every object of a run, built from its config and ready to train."""

    strategy: Strategy
    prepared: Prepared
    task: SupervisedTask | ModelStepTask
    train_loader: EpochLoader
    val_loader: EpochLoader | None
    test_loader: EpochLoader | None
    length: TrainingLength
    trainer: TrainerConfig
    checkpoint: CheckpointConfig
    tracking: TrackingConfig
    config_yaml: str


def build_trainer(built: Built, *, checkpoint_extra: Mapping[str, Any] | None = None) -> Trainer:
    """The training loop over what :func:`build` made; its tracker is attached later."""
    strategy = built.strategy
    return Trainer(
        strategy,
        built.prepared,
        train_loader=built.train_loader,
        val_loader=built.val_loader,
        settings=built.trainer,
        length=built.length,
        checkpointer=Checkpointer(
            strategy.checkpoint_dir, built.checkpoint.keep, sharded=strategy.sharded_checkpoints
        ),
        task=built.task,
        checkpoint=built.checkpoint,
        checkpoint_extra=checkpoint_extra,
    )


def build(cfg: DictConfig, log_dir: Path, timestamp: str | None = None) -> Built:
    """Turn the composed config into objects: strategy, data, model, optimizers, schedules.

    Everything a user can get wrong in config fails here, before any MLflow run exists.
    On failure the strategy built so far is torn down.
    """
    strategy = build_strategy(cfg, log_dir, timestamp)
    try:
        data: DataConfig = settings_of(cfg.data, DataConfig, "data")
        datasets = build_factory(cfg.data, DataConfig, "data")()
        if not isinstance(datasets, Datasets):
            raise TypeError(
                f"data._target_={cfg.data._target_!r} returned a {type(datasets).__name__}; it "
                "must return xp.data.Datasets(train=..., val=..., test=...)."
            )
        train_loader, val_loader, test_loader = build_loaders(datasets, data, strategy)
        supervised = build_task(cfg.task)
        optim = build_optim(cfg.optim)
        first = optim if isinstance(optim, OptimSpec) else next(iter(optim.values()), None)
        trainer: TrainerConfig = OmegaConf.to_object(cfg.trainer)  # type: ignore[assignment]
        # A model with its own train_step counts a step per batch; its wrappers accumulate.
        accumulation = 1 if _defines_train_step(cfg.model) or first is None else None
        length = training_length(
            trainer,
            batches_per_epoch=len(train_loader),
            accumulative_counts=accumulation or max(1, first.settings.accumulative_counts),  # type: ignore[union-attr]
        )
        prepared = strategy.prepare(
            build_factory(cfg.model, ModelConfig, "model"),
            optim=optim,
            schedules=build_phases(cfg.scheduler),
            length=length,
            batch_size=data.batch_size,
        )
        return Built(
            strategy=strategy,
            prepared=prepared,
            task=task_for_model(strategy.unwrap(prepared.model), supervised),
            train_loader=train_loader,
            val_loader=val_loader,
            test_loader=test_loader,
            length=length,
            trainer=trainer,
            checkpoint=OmegaConf.to_object(cfg.checkpoint),  # type: ignore[arg-type]
            tracking=OmegaConf.to_object(cfg.tracking),  # type: ignore[arg-type]
            # What is saved (config.yaml, every checkpoint) holds no password: a tracking
            # URI's is the command's to give again (resume= keeps the command's tracking).
            config_yaml=redact_secrets(OmegaConf.to_yaml(cfg, resolve=True)),
        )
    except BaseException:
        strategy.teardown()
        raise


def run(cfg: DictConfig) -> float | None:
    """Train the composed experiment; returns ``trainer.objective`` for Hydra's sweepers."""
    log_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    tested = ResumeTarget.from_env(TEST_ENV) if cfg.get("test") else None
    target = tested or ResumeTarget.from_env()
    # Only a directory this launch claimed (xp.rundir) is ever removed by it.
    created_here = target is None and claimed_here(log_dir)
    # ---- sweeps (xp.sweep): a re-run sweep's job skips its FINISHED twin, resumes a KILLED one
    from xp.sweep import plan_job

    plan = plan_job(cfg, log_dir, target)
    if plan is not None and plan.skip:
        return plan.objective
    if plan is not None and plan.resume is not None:
        target, log_dir, created_here = plan.resume, Path(plan.resume.run_dir), False
    # ---- end of sweeps
    accepted: dict[str, Any] = {}
    # What this command trusts: its own overrides and config files, never a saved config's.
    allowed = list(cfg.target_allowlist or [])
    if target is not None:
        try:
            cfg, accepted = restore_config(cfg, target, HydraConfig.get().runtime.choices)
            check_restored(_plain(cfg), allowed)
        except (ResumeError, UntrustedTarget) as e:
            say(f"xp: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    elif cfg.get("test"):
        say(
            f"xp: error: test={cfg.test} was not resolved to a run; give it on the command line "
            "(python -m xp test=<run id | run directory | checkpoint>).",
            file=sys.stderr,
        )
        raise SystemExit(1)
    nproc = int(cfg.strategy.get("nproc_per_node", 1))
    if infer_launcher() is Launcher.none and nproc != 1:
        drop_early_writer()  # the workers start their own; this process does not track
        return _run_workers(cfg, log_dir, nproc, created_here)
    if tested is not None:
        return _test(cfg, tested, accepted, log_dir)
    lock: RunDirLock | None = None
    tracker: MlflowTracker | None = None
    strategy: Strategy | None = None
    started = False
    try:
        lock = _hold_run_dir(log_dir)
        # What load_from= names is checked before anything is built: one error line.
        weights = _load_from(cfg) if cfg.load_from and target is None else None
        with _in_launch_dir():  # relative paths in the config: from where the command ran
            built = build(cfg, log_dir, _timestamp(target))
        strategy = built.strategy
        facts = _run_facts(cfg, strategy.timestamp)
        trainer = build_trainer(built, checkpoint_extra={"config": built.config_yaml, "run": facts})
        resumed = None
        if target is not None:
            resumed = strategy.resume(Path(target.checkpoint))
            trainer.load_state(resumed)
        elif weights is not None:
            strategy.load_checkpoint(weights, strict=cfg.load_from_strict)
        env = _write_run_files(strategy, built.config_yaml, facts)
        tracker = build_tracker(cfg, strategy, built.tracking, target, env)
        if tracker is not None:
            tracker.start()
            _log_start_files(tracker, strategy)
        trainer.tracker = tracker
        if resumed is not None:
            trainer.replay_unstored_metrics(resumed)
        started = True
        if target is not None and target.overrides:
            strategy.logger.info(
                "Resumed with %s: %s",
                " ".join(target.overrides),
                ", ".join(f"{k} now {v!r}" for k, v in accepted.items()) or "nothing changes",
            )
        strategy.logger.info(
            "Run %s: %s %d steps (%d per epoch) on %s; logs in %s",
            strategy.timestamp,
            f"step {trainer.progress.step} of" if target else "",
            built.length.total_steps,
            built.length.epoch_length,
            strategy.root_device,
            log_dir,
        )
        run_id = None
        # A stop signal after the last step (while artifacts upload) lets the run finish.
        incomplete: TrackingIncomplete | None = None
        with _stop_on_signals(trainer):
            metrics = trainer.fit()
            if tracker is not None:
                _log_run_files(tracker, strategy, trainer, built.tracking)
                run_id = tracker.run_id
                try:
                    tracker.close("FINISHED")
                except TrackingIncomplete as e:  # trained to the end; the record lacks some
                    incomplete = e
        if strategy.is_main_process:
            (log_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run_id = strategy.broadcast_object(run_id)
        strategy.logger.info(
            "Done: %s", ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        )
        say(
            f"xp: rank {strategy.rank}/{strategy.world_size} finished; log_dir {log_dir}"
            + (f"; MLflow run {run_id}" if run_id else "")
        )
        if incomplete is not None:
            say(f"xp: error: {incomplete}", file=sys.stderr)
            raise SystemExit(INCOMPLETE_RECORD_EXIT)
        objective = metrics.get(built.trainer.objective)
        return None if objective is None else float(objective)
    except TrainingStopped as e:
        _finish_failed(tracker, strategy, "KILLED", f"Stopped by {signal.Signals(e.signum).name}.")
        if strategy is not None:
            _requeue_on_slurm(strategy, e.signum)
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:
        _finish_failed(tracker, strategy, "KILLED", "Interrupted (Ctrl-C).")
        raise
    except BaseException as e:
        _finish_failed(tracker, strategy, "FAILED", "".join(traceback.format_exception(e)))
        if not started and created_here:
            _remove_half_made_run_dir(log_dir)
        _exit_on_user_error(e)
        raise
    finally:
        # Drop the run's objects before the process group goes (see the strategy's teardown).
        built = trainer = None  # type: ignore[assignment]
        if strategy is not None:
            strategy.teardown()
        close_logger()
        if lock is not None:
            lock.release()


def _hold_run_dir(log_dir: Path) -> RunDirLock | None:
    """The training process of rank 0 holds the run directory's lock while it runs.

    Two processes training into one directory (``resume=`` of a run that still trains)
    would interleave their checkpoints and metrics: the second stops here instead.
    """
    if dist_info(infer_launcher()).rank != 0:
        return None
    lock = RunDirLock(log_dir)
    lock.acquire()  # RunInUse, a user error: printed as such
    return lock


def _test(
    cfg: DictConfig,
    target: ResumeTarget,
    accepted: Mapping[str, Any],
    log_dir: Path,
) -> float | None:
    """``test=<run>``: evaluate a checkpoint of that run on the test split, log ``test/*``
    onto the same MLflow run, and leave its training state and status as they were."""
    strategy: Strategy | None = None
    tracker: MlflowTracker | None = None
    status = "FINISHED"
    try:
        with _in_launch_dir():  # relative paths in the config: from where the command ran
            built = build(cfg, log_dir, _timestamp(target))
        strategy = built.strategy
        if built.test_loader is None:
            raise ValueError(
                f"test={cfg.test}: data._target_={cfg.data._target_!r} gives no test split; set "
                "data.test_fraction (digits) or data.test (a dataset), or the test= of your "
                "data factory."
            )
        checkpoint = _checkpoint_to_test(target, cfg.test_checkpoint, strategy, str(cfg.test))
        state = strategy.load_checkpoint(checkpoint)
        step = int(state.get("progress", {}).get("step", 0))
        trainer = build_trainer(built)
        metrics = trainer.evaluate(built.test_loader, "test")
        if strategy.is_main_process:
            (Path(target.run_dir) / "test_metrics.json").write_text(
                json.dumps({"checkpoint": str(checkpoint), "step": step, **metrics}, indent=2)
            )
        tracker = build_tracker(cfg, strategy, built.tracking, target)
        run_id = None
        if tracker is not None:
            status = _run_status(built.tracking, cfg, target.run_id)
            tracker.start()
            tracker.set_tags({"xp.test_checkpoint": str(checkpoint), "xp.test_step": str(step)})
            tracker.log_metrics(metrics, step)
            run_id = tracker.run_id
            tracker.close(status)
        strategy.logger.info(
            "Tested %s (step %d): %s",
            checkpoint.name,
            step,
            ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())),
        )
        say(f"xp: tested {checkpoint} on the test split; MLflow run {run_id}")
        objective = metrics.get("test/" + built.trainer.objective.split("/", 1)[-1])
        return None if objective is None else float(objective)
    except BaseException as e:
        if tracker is not None:
            with contextlib.suppress(TrackingError):
                tracker.close(status)  # test= leaves the run's status as it found it
        _exit_on_user_error(e)
        raise
    finally:
        built = trainer = None  # type: ignore[assignment]
        if strategy is not None:
            strategy.teardown()
        close_logger()


def _exit_on_user_error(error: BaseException) -> None:
    """A config or input error is one ``xp: error:`` line and exit status 1, no traceback
    (``HYDRA_FULL_ERROR=1`` shows it)."""
    if isinstance(error, USER_ERRORS) and not os.environ.get("HYDRA_FULL_ERROR"):
        say(f"xp: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _checkpoint_to_test(target: ResumeTarget, which: Any, strategy: Strategy, spec: str) -> Path:
    """The named checkpoint; else the run's best (``test_checkpoint=best``) or latest."""
    given = Path(target.checkpoint)
    if Path(spec).exists() and Path(spec).resolve() == given.resolve():
        return given
    if TestCheckpoint(which) is TestCheckpoint.best:
        best = Checkpointer(Path(target.run_dir) / "checkpoints").best()
        if best is not None:
            return best
        strategy.logger.info("The run recorded no best checkpoint; testing its latest.")
    return given


def _run_status(settings: TrackingConfig, cfg: DictConfig, run_id: str | None) -> str:
    """The status an MLflow run had before ``test=`` re-opened it (FINISHED if unknown)."""
    if run_id is None:
        return "FINISHED"
    try:
        from xp.tracking import client

        uri = settings.tracking_uri or default_tracking_uri(launch_dir())
        status = client(uri).get_run(run_id).info.status
    except Exception:  # the store is checked when the tracker starts; keep FINISHED here
        return "FINISHED"
    return status if status in ("FINISHED", "FAILED", "KILLED") else "FINISHED"


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM, SIGINT and SIGUSR1 (Slurm's warning) stop after the current step.

    A second Ctrl-C interrupts at once; a SIGTERM beside a Ctrl-C (``python -m xp``'s
    parent passes a SIGINT sent to the process group on as SIGTERM) does not. When the
    loop stops on a signal, the handlers stay while the run saves and closes: a repeated
    SIGTERM (the parent passing on one the process group also got, a scheduler's
    reminder) must not kill the process with its MLflow run half closed. The process ends
    right after.
    """
    stops = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]

    interrupts = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                raise KeyboardInterrupt
        trainer.request_stop(signum)

    previous = {sig: signal.signal(sig, handler) for sig in stops}
    stopped = False
    try:
        yield
    except TrainingStopped:
        stopped = True
        raise
    finally:
        if not stopped:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _requeue_on_slurm(strategy: Strategy, signum: int) -> None:
    """Requeue the Slurm job after a preemption warning; it resumes itself into this run."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not strategy.is_main_process or signum not in (signal.SIGUSR1, signal.SIGTERM):
        return
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        strategy.logger.error(
            "Could not requeue Slurm job %s (%s); requeue it yourself, it resumes this run.",
            job,
            e,
        )
        return
    if result.returncode == 0:
        strategy.logger.warning("Requeued Slurm job %s; it will resume this run.", job)
    else:
        strategy.logger.error("scontrol requeue %s failed: %s", job, result.stderr.strip())


def _timestamp(target: ResumeTarget | None) -> str | None:
    """The run's timestamp: the launch's, or the one a resumed run was started with."""
    if target is not None and target.timestamp:
        return target.timestamp
    return os.environ.get("XP_TIMESTAMP")


def _run_facts(cfg: DictConfig, timestamp: str) -> dict[str, Any]:
    """What resume needs besides the states: the experiment, its timestamp, the config
    group choices and the config directories they came from (``--config-dir``)."""
    choices, config_dirs = {}, []
    if HydraConfig.initialized():
        runtime = HydraConfig.get().runtime
        choices = {k: v for k, v in runtime.choices.items() if not k.startswith("hydra")}
        config_dirs = [
            str(source.path).removeprefix("file://")
            for source in runtime.config_sources
            if source.provider == "command-line" and str(source.path).startswith("file://")
        ]
    return {
        "experiment_name": cfg.experiment_name,
        "timestamp": timestamp,
        "choices": choices,
        "config_dirs": config_dirs,
    }


def _load_from(cfg: DictConfig) -> Path:
    spec = str(cfg.load_from)
    if not RUN_ID.match(spec):
        spec = str(launch_dir() / spec)  # relative to where the command ran (hydra.job.chdir)
    return checkpoint_for_load(
        spec,
        tracking_uri=cfg.tracking.tracking_uri or default_tracking_uri(launch_dir()),
        outputs=launch_dir() / "outputs",
    )


def _run_workers(cfg: DictConfig, log_dir: Path, nproc: int, created_here: bool) -> float | None:
    """Start ``nproc`` workers of this same command; they train and write the run."""
    if nproc < 1:
        if created_here:
            _remove_half_made_run_dir(log_dir)
        say(
            f"xp: error: strategy.nproc_per_node={nproc} must be >= 1 (the number of worker "
            "processes on this machine).",
            file=sys.stderr,
        )
        raise SystemExit(1)
    port = cfg.strategy.get("master_port")
    error = port_error(port)
    if error is None and port is not None and port_in_use(int(port)):
        error = (
            f"strategy.master_port={port} is already in use on this machine; pick another "
            "port, or null for a free one."
        )
    if error is not None:
        if created_here:
            _remove_half_made_run_dir(log_dir)
        say(f"xp: error: {error}", file=sys.stderr)
        raise SystemExit(1)
    from xp.sweep import worker_launch

    # A sweep's job gives its workers its own overrides and directory, not the whole sweep.
    with worker_launch(log_dir, nproc) as argv:
        status = launch_workers(nproc, port, argv)
    if status != 0:
        if created_here and _fresh_run_dir(log_dir):
            _remove_half_made_run_dir(log_dir)
        raise SystemExit(status)
    metrics_file = log_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    objective = metrics.get(cfg.trainer.objective)
    return None if objective is None else float(objective)


_START_FILES = ("config.yaml", "env.json", "run.json")
"""Written and recorded as the run starts, so every run has them, FAILED and KILLED too."""


def _write_run_files(
    strategy: Strategy, config_yaml: str, facts: dict[str, Any]
) -> dict[str, Any] | None:
    """Rank 0 writes the resolved config, the run's facts and the environment; the
    environment (``collect_env``), or None on other ranks."""
    if not strategy.is_main_process:
        return None
    (strategy.log_dir / "config.yaml").write_text(config_yaml)
    (strategy.log_dir / "run.json").write_text(json.dumps(facts, indent=2))
    system, runtime = strategy.collect_env()
    env = {"system": system, "runtime": runtime}
    (strategy.log_dir / "env.json").write_text(json.dumps(env, indent=2, default=str))
    return env


def _log_start_files(tracker: MlflowTracker, strategy: Strategy) -> None:
    for name in _START_FILES:
        if (strategy.log_dir / name).exists():
            tracker.log_artifact(strategy.log_dir / name)
    if (strategy.log_dir / ".hydra").is_dir():
        tracker.log_artifacts(strategy.log_dir / ".hydra", ".hydra")


def _env_tags(env: Mapping[str, Any]) -> dict[str, str]:
    """The facts of ``env.json`` people filter runs by, as MLflow tags."""
    system, runtime = env.get("system", {}), env.get("runtime", {})
    tags = {
        "xp.torch": system.get("torch"),
        "xp.cuda": system.get("cuda"),
        "xp.device": runtime.get("device"),
        "xp.hostname": runtime.get("hostname"),
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def _log_run_files(
    tracker: MlflowTracker, strategy: Strategy, trainer: Trainer, settings: TrackingConfig
) -> None:
    log_dir = strategy.log_dir
    if settings.log_checkpoints:
        for path in trainer.checkpointer.list():
            tracker.log_checkpoint(path)
    for handler in logging.getLogger("xp").handlers:
        handler.flush()
    log_file = log_dir / f"{strategy.timestamp}.log"
    if log_file.exists():
        tracker.log_artifact(log_file)


def _finish_failed(
    tracker: MlflowTracker | None, strategy: Strategy | None, status: str, error: str
) -> None:
    if strategy is not None:
        strategy.logger.error(
            "Run %s: %s", status, error.strip().splitlines()[-1] if error.strip() else status
        )
    if tracker is None:
        return
    log_file = strategy.log_dir / f"{strategy.timestamp}.log" if strategy else None
    try:
        if log_file is not None and log_file.exists():
            tracker.log_artifact(log_file)
        if strategy is not None and status == "KILLED" and tracker.settings.log_checkpoints:
            # A stopped run is resumed later, maybe where this folder is gone: keep its state.
            latest = Checkpointer(strategy.checkpoint_dir).latest()
            if latest is not None:
                tracker.log_checkpoint(latest)
            for name in ("config.yaml", "run.json"):
                if (strategy.log_dir / name).exists():
                    tracker.log_artifact(strategy.log_dir / name)
        tracker.close(status, error=error)
    except TrackingError as e:
        say(f"xp: could not record the run's end in MLflow: {e}", file=sys.stderr)


def _fresh_run_dir(log_dir: Path) -> bool:
    """Whether the run dir holds nothing but what Hydra just wrote (so it is ours to remove)."""
    if not log_dir.is_dir():
        return False
    return {p.name for p in log_dir.iterdir()} <= {".hydra", LOCK_FILE}


def _remove_half_made_run_dir(log_dir: Path) -> None:
    """A run that failed before training leaves no folder behind (the error was printed)."""
    close_logger()
    shutil.rmtree(log_dir, ignore_errors=True)
    parent = log_dir.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
