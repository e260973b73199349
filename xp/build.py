"""The one place where config becomes objects: strategy, data, model, optimizers,
schedules, the loop and the tracker.

Below this module no DictConfig travels: the strategy, the loop, the tracker and the data
get typed settings (dataclass instances) and built objects. Everything a user can get
wrong in config fails here, before any MLflow run exists.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, Node, OmegaConf

from xp.callback import Callback, build_callbacks
from xp.checkpoint import Checkpointer
from xp.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    MultiOptimConfig,
    OptimConfig,
    PhaseConfig,
    StrategyConfig,
    TaskConfig,
    TrackingConfig,
    TrainerConfig,
)
from xp.data import Datasets, EpochLoader
from xp.env import git_info
from xp.errors import innermost_message
from xp.optim import OptimSpec
from xp.restore import plain
from xp.resume import ResumeTarget
from xp.rundir import launch_dir
from xp.scheduler import Phase
from xp.strategy.base import Prepared, Strategy, TrainingLength
from xp.task import ModelStepTask, SupervisedTask, task_for_model
from xp.tracking import (
    MlflowTracker,
    default_artifact_location,
    default_tracking_uri,
    drop_early_writer,
    flatten_params,
    redact_secrets,
)
from xp.trainer import Trainer, training_length

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
            f"{key}._target_={kwargs.get('_target_')!r} could not be built: "
            f"{innermost_message(e)}. Check the dotted path, that its package is installed "
            "and importable from here, and its arguments."
        ) from e


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
    callbacks: dict[str, Callback] = field(default_factory=dict)
    """``callbacks.<name>``, built in the config's order."""


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
        callbacks=built.callbacks,
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
            callbacks=build_callbacks(cfg.get("callbacks")),
            # What is saved (config.yaml, every checkpoint) holds no password: a tracking
            # URI's is the command's to give again (resume= keeps the command's tracking).
            config_yaml=redacted_yaml(cfg),
        )
    except BaseException:
        strategy.teardown()
        raise


def redacted_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML without a URI's password or a secret's value: a value
    that was a secret reads ``'***'`` (a string, so the file stays YAML that loads)."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if redact_secrets(text) == text:
        return text
    resolved = copy.deepcopy(cfg)
    OmegaConf.set_readonly(resolved, False)
    OmegaConf.resolve(resolved)
    _redact_strings_in(resolved)
    return OmegaConf.to_yaml(resolved)


def _redact_strings_in(node: DictConfig | ListConfig) -> None:
    keys: Iterable[Any] = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in list(keys):
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            _redact_strings_in(child)
            continue
        value = child._value() if isinstance(child, Node) else None
        if isinstance(value, str) and redact_secrets(value) != value:
            node[key] = redact_secrets(value)


_NOT_PARAMS = ("test", "test_checkpoint")
"""Config keys that say what a command does with a run, not how the run trains."""


def build_tracker(
    cfg: DictConfig,
    strategy: Strategy,
    settings: TrackingConfig,
    target: ResumeTarget | None = None,
    env: Mapping[str, Any] | None = None,
    *,
    start_time_ms: int | None = None,
) -> MlflowTracker | None:
    """Rank 0's MLflow tracker of this run (None elsewhere, or with tracking off).

    ``env`` is what ``collect_env`` found (``env.json``): its facts become tags.
    ``start_time_ms`` is when the run started (None: now, or a resumed run's own start).
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
    if target is not None and target.run_dir_history:  # it moved: another machine's run
        tags["xp.run_dir_history"] = "\n".join(target.run_dir_history)
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
    from xp.sweep import job_params, job_tags

    # Every run: xp.config_hash. A sweep's job: named by its swept values, under the parent.
    sweep_name, sweep_tags = job_tags(cfg)
    tags.update(sweep_tags)
    return MlflowTracker(
        settings,
        tracking_uri=uri,
        experiment_name=cfg.experiment_name,
        run_name=sweep_name or strategy.timestamp,
        tags=tags,
        params={
            **flatten_params({k: v for k, v in _plain(cfg).items() if k not in _NOT_PARAMS}),
            **job_params(cfg),  # a sweep's job: its swept values, for MLflow's compare view
        },
        artifact_location=default_artifact_location(uri, cfg.experiment_name),
        run_id=target.run_id if target is not None else None,
        logger=strategy.logger,
        start_time_ms=start_time_ms,
    )


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
