"""The one place where config becomes objects, and the life of a run around the loop.

Below this module no DictConfig travels: the strategy, the loop, the tracker and the
data get typed settings (dataclass instances) and built objects.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import traceback
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
    DataConfig,
    Launcher,
    ModelConfig,
    MultiOptimConfig,
    OptimConfig,
    PhaseConfig,
    StrategyConfig,
    TrackingConfig,
    TrainerConfig,
)
from xp.data import Datasets, EpochLoader
from xp.dist import infer_launcher
from xp.env import git_info
from xp.launch import launch_workers, port_in_use
from xp.log import close_logger
from xp.optim import OptimSpec
from xp.scheduler import Phase
from xp.strategy.base import Prepared, Strategy, TrainingLength
from xp.tracking import (
    MlflowTracker,
    TrackingError,
    default_artifact_location,
    default_tracking_uri,
    flatten_params,
)
from xp.trainer import Trainer, training_length

USER_ERRORS = (ValueError, TypeError, CheckpointError, TrackingError)
"""Errors a user causes with config or input: reported as one message, no traceback."""


def launch_dir() -> Path:
    """The directory the command was started in (fixed at start by ``xp.__main__``)."""
    return Path(os.environ.get("XP_LAUNCH_DIR") or os.getcwd()).resolve()


# --------------------------------------------------------------------------- builders


def _plain(node: DictConfig) -> dict[str, Any]:
    """A resolved plain dict: lists stay lists and enums become strings (weights_only-safe)."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def build_factory(node: DictConfig, schema: type, key: str) -> partial[Any]:
    """A partial of ``node._target_`` with the node's arguments, minus xp's own fields.

    ``schema`` is the base schema whose fields are xp's settings (batch size, accumulation,
    phase window...); the rest of the node is the target's keyword arguments.
    """
    own = {f.name for f in fields(schema)} - {"_target_", "_partial_"}
    kwargs = {k: v for k, v in _plain(node).items() if k not in own}
    kwargs["_partial_"] = True
    try:
        return instantiate(kwargs)
    except InstantiationException as e:
        raise ValueError(
            f"{key}._target_={kwargs.get('_target_')!r} could not be built: "
            f"{str(e).strip().splitlines()[-1]}. Check the dotted path and that its package "
            "is installed."
        ) from e


def build_strategy(cfg: DictConfig, log_dir: Path) -> Strategy:
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
) -> tuple[EpochLoader, EpochLoader | None]:
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
    val = None
    if datasets.val is not None:
        val = EpochLoader(datasets.val, shuffle=False, pad=False, **common)
    return train, val


def build_tracker(
    cfg: DictConfig, strategy: Strategy, settings: TrackingConfig
) -> MlflowTracker | None:
    if not settings.enabled or not strategy.is_main_process:
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
    git = git_info(launch_dir())
    if git:
        tags["mlflow.source.git.commit"] = git["git_commit"]
        tags["xp.git_commit"] = git["git_commit"]
        tags["xp.git_dirty"] = str(git["git_dirty"]).lower()
    return MlflowTracker(
        settings,
        tracking_uri=uri,
        experiment_name=cfg.experiment_name,
        run_name=strategy.timestamp,
        tags=tags,
        params=flatten_params(_plain(cfg)),
        artifact_location=default_artifact_location(uri, cfg.experiment_name),
        logger=strategy.logger,
    )


# --------------------------------------------------------------------------- the run


@dataclass
class Built:
    """Every object of a run, built from its config and ready to train."""

    strategy: Strategy
    prepared: Prepared
    train_loader: EpochLoader
    val_loader: EpochLoader | None
    length: TrainingLength
    trainer: TrainerConfig
    tracking: TrackingConfig
    config_yaml: str


def build(cfg: DictConfig, log_dir: Path) -> Built:
    """Turn the composed config into objects: strategy, data, model, optimizers, schedules.

    Everything a user can get wrong in config fails here, before any MLflow run exists.
    On failure the strategy built so far is torn down.
    """
    strategy = build_strategy(cfg, log_dir)
    try:
        data: DataConfig = OmegaConf.to_object(cfg.data)  # type: ignore[assignment]
        datasets = build_factory(cfg.data, DataConfig, "data")()
        if not isinstance(datasets, Datasets):
            raise TypeError(
                f"data._target_={cfg.data._target_!r} returned a {type(datasets).__name__}; it "
                "must return xp.data.Datasets(train=..., val=...)."
            )
        train_loader, val_loader = build_loaders(datasets, data, strategy)
        optim = build_optim(cfg.optim)
        first = optim if isinstance(optim, OptimSpec) else next(iter(optim.values()), None)
        trainer: TrainerConfig = OmegaConf.to_object(cfg.trainer)  # type: ignore[assignment]
        length = training_length(
            trainer,
            batches_per_epoch=len(train_loader),
            accumulative_counts=max(1, first.settings.accumulative_counts if first else 1),
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
            train_loader=train_loader,
            val_loader=val_loader,
            length=length,
            trainer=trainer,
            tracking=OmegaConf.to_object(cfg.tracking),  # type: ignore[arg-type]
            config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        )
    except BaseException:
        strategy.teardown()
        raise


def run(cfg: DictConfig) -> float | None:
    """Train the composed experiment; returns ``trainer.objective`` for Hydra's sweepers."""
    log_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    created_here = _fresh_run_dir(log_dir)
    nproc = int(cfg.strategy.get("nproc_per_node", 1))
    if infer_launcher() is Launcher.none and nproc != 1:
        return _run_workers(cfg, log_dir, nproc, created_here)
    tracker: MlflowTracker | None = None
    strategy: Strategy | None = None
    started = False
    try:
        built = build(cfg, log_dir)
        strategy = built.strategy
        tracker = build_tracker(cfg, strategy, built.tracking)
        if tracker is not None:
            tracker.start()
        trainer = Trainer(
            strategy,
            built.prepared,
            train_loader=built.train_loader,
            val_loader=built.val_loader,
            settings=built.trainer,
            length=built.length,
            checkpointer=Checkpointer(
                strategy.checkpoint_dir,
                built.trainer.keep_checkpoints,
                sharded=strategy.sharded_checkpoints,
            ),
            tracker=tracker,
            checkpoint_extra={"config": built.config_yaml},
        )
        started = True
        if strategy.is_main_process:
            _write_run_files(strategy, built.config_yaml)
        strategy.logger.info(
            "Run %s: %d steps (%d per epoch) on %s; logs in %s",
            strategy.timestamp,
            built.length.total_steps,
            built.length.epoch_length,
            strategy.root_device,
            log_dir,
        )
        metrics = trainer.fit()
        run_id = None
        if tracker is not None:
            _log_run_files(tracker, strategy, trainer, built.tracking)
            run_id = tracker.run_id
            tracker.close("FINISHED")
        if strategy.is_main_process:
            (log_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run_id = strategy.broadcast_object(run_id)
        strategy.logger.info(
            "Done: %s", ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        )
        print(
            f"xp: rank {strategy.rank}/{strategy.world_size} finished; "
            f"log_dir {log_dir}; MLflow run {run_id}",
            flush=True,
        )
        objective = metrics.get(built.trainer.objective)
        return None if objective is None else float(objective)
    except KeyboardInterrupt:
        _finish_failed(tracker, strategy, "KILLED", "Interrupted (Ctrl-C).")
        raise
    except BaseException as e:
        _finish_failed(tracker, strategy, "FAILED", "".join(traceback.format_exception(e)))
        if not started and created_here:
            _remove_half_made_run_dir(log_dir)
        if isinstance(e, USER_ERRORS) and not os.environ.get("HYDRA_FULL_ERROR"):
            print(f"xp: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
    finally:
        if strategy is not None:
            strategy.teardown()
        close_logger()


def _run_workers(cfg: DictConfig, log_dir: Path, nproc: int, created_here: bool) -> float | None:
    """Start ``nproc`` workers of this same command; they train and write the run."""
    if nproc < 1:
        if created_here:
            _remove_half_made_run_dir(log_dir)
        print(
            f"xp: error: strategy.nproc_per_node={nproc} must be >= 1 (the number of worker "
            "processes on this machine).",
            file=sys.stderr,
        )
        raise SystemExit(1)
    port = cfg.strategy.get("master_port")
    if port is not None and port_in_use(int(port)):
        if created_here:
            _remove_half_made_run_dir(log_dir)
        print(
            f"xp: error: strategy.master_port={port} is already in use on this machine; pick "
            "another port, or null for a free one.",
            file=sys.stderr,
        )
        raise SystemExit(1)
    status = launch_workers(nproc, port, sys.argv[1:])
    if status != 0:
        if created_here and _fresh_run_dir(log_dir):
            _remove_half_made_run_dir(log_dir)
        raise SystemExit(status)
    metrics_file = log_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    objective = metrics.get(cfg.trainer.objective)
    return None if objective is None else float(objective)


def _write_run_files(strategy: Strategy, config_yaml: str) -> None:
    (strategy.log_dir / "config.yaml").write_text(config_yaml)
    system, runtime = strategy.collect_env()
    (strategy.log_dir / "env.json").write_text(
        json.dumps({"system": system, "runtime": runtime}, indent=2, default=str)
    )


def _log_run_files(
    tracker: MlflowTracker, strategy: Strategy, trainer: Trainer, settings: TrackingConfig
) -> None:
    log_dir = strategy.log_dir
    for name in ("config.yaml", "env.json"):
        if (log_dir / name).exists():
            tracker.log_artifact(log_dir / name)
    if (log_dir / ".hydra").is_dir():
        tracker.log_artifacts(log_dir / ".hydra", ".hydra")
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
        tracker.close(status, error=error)
    except TrackingError as e:
        print(f"xp: could not record the run's end in MLflow: {e}", file=sys.stderr)


def _fresh_run_dir(log_dir: Path) -> bool:
    """Whether the run dir holds nothing but what Hydra just wrote (so it is ours to remove)."""
    return {p.name for p in log_dir.iterdir()} <= {".hydra"} if log_dir.is_dir() else False


def _remove_half_made_run_dir(log_dir: Path) -> None:
    """A run that failed before training leaves no folder behind (the error was printed)."""
    close_logger()
    shutil.rmtree(log_dir, ignore_errors=True)
    parent = log_dir.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
