"""The life of one run, top to bottom: plan, restore, build, track, fit, close.

:func:`run` is Hydra's job for one composed config. Each step's details live in the module
of its concern: a sweep's planning in :mod:`xp.sweep`, restoring a resumed run's config in
:mod:`xp.restore`, config becoming objects in :mod:`xp.build`, starting several workers in
:mod:`xp.launch`, evaluating a finished run in :mod:`xp.evaluate`, stop signals in
:mod:`xp.stop`, the run directory in :mod:`xp.rundir`. What stays here is the order, and
what a run leaves behind whatever happens: its files, its MLflow record, its exit status.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from xp.build import Built, build, build_tracker, build_trainer
from xp.checkpoint import Checkpointer
from xp.config import Launcher, TrackingConfig
from xp.dist import dist_info, infer_launcher
from xp.errors import INCOMPLETE_RECORD_EXIT, exit_on_user_error, is_user_error
from xp.log import close_logger, say
from xp.restore import plain, restore_config
from xp.resume import (
    RUN_ID,
    TEST_ENV,
    ResumeError,
    ResumeTarget,
    checkpoint_for_load,
)
from xp.rundir import RunDirError, RunDirLock, discard, in_launch_dir, launch_dir
from xp.stop import requeue_on_slurm, stop_on_signals
from xp.strategy.base import Strategy
from xp.targets import UntrustedTarget, check_restored, targets_in
from xp.tracking import (
    MlflowTracker,
    TrackingError,
    TrackingIncomplete,
    default_tracking_uri,
    drop_early_writer,
)
from xp.trainer import Trainer, TrainingStopped


def run(cfg: DictConfig) -> float | None:
    """Train the composed experiment; returns ``trainer.objective`` for Hydra's sweepers."""
    from xp.launch import hand_back

    objective = _run(cfg)
    hand_back(objective)  # a worker of xp's own launcher: to the process that started it
    return objective


def _run(cfg: DictConfig) -> float | None:
    from xp.sweep import plan_job

    started_ms = int(time.time() * 1000)
    log_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    tested = ResumeTarget.from_env(TEST_ENV) if cfg.get("test") else None
    target = tested or ResumeTarget.from_env()
    plan = plan_job(cfg, log_dir, target)  # a sweep's job: anew, skipped, or resumed
    if plan is not None and plan.skip:
        return plan.objective
    if plan is not None and plan.resume is not None:
        target, log_dir = plan.resume, Path(plan.resume.run_dir)
    spec = str(cfg.get("test") or "")  # the restored config no longer names it
    cfg, accepted = _restore(cfg, target)
    if infer_launcher() is Launcher.none and int(cfg.strategy.get("nproc_per_node", 1)) != 1:
        from xp.launch import run_workers

        drop_early_writer()  # the workers start their own; this process does not track
        port = cfg.strategy.get("master_port")
        return run_workers(
            log_dir,
            int(cfg.strategy.nproc_per_node),
            None if port is None else int(port),
        )
    if tested is not None:
        from xp.evaluate import evaluate

        return evaluate(cfg, tested, log_dir, spec)
    with _Life(log_dir) as life:
        life.build(cfg, target)
        life.track(cfg, target, accepted, _start_time_ms(started_ms, target))
        metrics = life.fit()
        return life.close(metrics)


def _restore(cfg: DictConfig, target: ResumeTarget | None) -> tuple[DictConfig, dict[str, Any]]:
    """A resumed (or tested) run's config, and the overrides that change it; the config as
    composed otherwise."""
    if target is None:
        if cfg.get("test"):
            say(
                f"xp: error: test={cfg.test} was not resolved to a run; give it on the command "
                "line (python -m xp test=<run id | run directory | checkpoint>).",
                file=sys.stderr,
            )
            raise SystemExit(1)
        return cfg, {}
    # What this command trusts: its own overrides and config files, never a saved config's:
    # target_allowlist, and each target this command composed itself (a requeued Slurm job
    # runs its first command again, a user's own model from their --config-dir included).
    allowed = [*(cfg.target_allowlist or []), *targets_in(OmegaConf.to_container(cfg))]
    try:
        restored, accepted = restore_config(cfg, target, HydraConfig.get().runtime.choices)
        check_restored(plain(restored), allowed)
    except (ResumeError, UntrustedTarget) as e:
        say(f"xp: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    return restored, accepted


def _start_time_ms(started_ms: int, target: ResumeTarget | None) -> int | None:
    """When the MLflow run started: at the launch (a sweep's job: when the job began); a
    resumed run keeps the start it has."""
    if target is not None:
        return None
    launched = os.environ.get("XP_START_MS", "")
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return started_ms if in_sweep or not launched.isdigit() else int(launched)


def _verbose() -> bool:
    """``hydra.verbose=true`` (or naming the ``xp`` logger) turns xp's log to DEBUG."""
    if not HydraConfig.initialized():
        return False
    verbose = HydraConfig.get().verbose
    if isinstance(verbose, str):
        return verbose in ("xp", "true", "True")
    if isinstance(verbose, bool):
        return verbose
    return "xp" in [str(v) for v in verbose or ()]


def _launch_timestamp() -> str | None:
    return os.environ.get("XP_TIMESTAMP")


class _Life:
    """One run from the lock on its directory to its exit: the steps, and what a failure
    at any of them leaves (``__exit__``): the MLflow run FAILED or KILLED with the error,
    a KILLED run's checkpoint uploaded, a directory that never trained removed, one error
    line for a user's mistake, the exit status of a stop signal."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.lock: RunDirLock | None = None
        self.built: Built | None = None
        self.strategy: Strategy | None = None
        self.trainer: Trainer | None = None
        self.tracker: MlflowTracker | None = None
        self.resumed: dict[str, Any] | None = None
        self.env: dict[str, Any] | None = None
        self.incomplete: TrackingIncomplete | None = None
        self.started = False

    def __enter__(self) -> _Life:
        if dist_info(infer_launcher()).rank == 0:
            # Two processes training in one directory would interleave their checkpoints.
            lock = RunDirLock(self.log_dir)
            try:
                lock.acquire()
            except RunDirError as e:  # another live process trains there
                say(f"xp: error: {e}", file=sys.stderr)
                raise SystemExit(1) from None
            self.lock = lock
        return self

    # ------------------------------------------------------------------ the steps

    def build(self, cfg: DictConfig, target: ResumeTarget | None) -> None:
        """Config becomes objects; the state of a resumed run, or load_from='s weights."""
        # What load_from= names is checked before anything is built: one error line.
        weights = _load_from(cfg) if cfg.load_from and target is None else None
        timestamp = target.timestamp if target else None
        with in_launch_dir():  # relative paths in the config: from where the command ran
            built = self.built = build(cfg, self.log_dir, timestamp or _launch_timestamp())
        strategy = self.strategy = built.strategy
        if _verbose():
            strategy.logger.setLevel(logging.DEBUG)
        model = strategy.unwrap(built.prepared.model)
        strategy.logger.debug(
            "Built %s (%d parameters), %d training batches per epoch; the config:\n%s",
            type(model).__name__,
            sum(p.numel() for p in model.parameters()),
            len(built.train_loader),
            built.config_yaml,
        )
        facts = _run_facts(cfg, strategy.timestamp)
        self.trainer = build_trainer(
            built, checkpoint_extra={"config": built.config_yaml, "run": facts}
        )
        if target is not None:
            self.resumed = strategy.resume(Path(target.checkpoint))
            self.trainer.load_state(self.resumed)
        elif weights is not None:
            strategy.load_checkpoint(weights, strict=cfg.load_from_strict)
        self.env = _write_run_files(strategy, built.config_yaml, facts)

    def track(
        self,
        cfg: DictConfig,
        target: ResumeTarget | None,
        accepted: dict[str, Any],
        start_time_ms: int | None,
    ) -> None:
        """The MLflow run starts (rank 0), with the run's files; training may begin."""
        assert self.built is not None and self.strategy is not None and self.trainer is not None
        strategy, trainer = self.strategy, self.trainer
        tracker = self.tracker = build_tracker(
            cfg, strategy, self.built.tracking, target, self.env, start_time_ms=start_time_ms
        )
        if tracker is not None:
            tracker.start()
            _log_start_files(tracker, strategy)
        trainer.tracker = tracker
        if self.resumed is not None:
            trainer.replay_unstored_metrics(self.resumed)
        self.started = True
        if target is not None and target.overrides:
            strategy.logger.info(
                "Resumed with %s: %s",
                " ".join(target.overrides),
                ", ".join(f"{k} now {v!r}" for k, v in accepted.items()) or "nothing changes",
            )
        strategy.logger.info(
            "Run %s: %s%d steps (%d per epoch) on %s; logs in %s",
            strategy.timestamp,
            f"step {trainer.progress.step} of " if target else "",
            self.built.length.total_steps,
            self.built.length.epoch_length,
            strategy.root_device,
            self.log_dir,
        )

    def fit(self) -> dict[str, float]:
        """Train to the end; a stop signal ends it early with a checkpoint (TrainingStopped).

        A stop signal after the last step (while the files upload) lets the run finish.
        """
        assert self.trainer is not None and self.strategy is not None and self.built
        with stop_on_signals(self.trainer):
            metrics = self.trainer.fit()
            if self.tracker is not None:
                _log_run_files(self.tracker, self.strategy, self.trainer, self.built.tracking)
                try:
                    self.tracker.close("FINISHED")
                except TrackingIncomplete as e:  # trained to the end; the record lacks some
                    self.incomplete = e
        return metrics

    def close(self, metrics: dict[str, float]) -> float | None:
        """The run's final metrics, where it is in MLflow, and its objective."""
        assert self.strategy is not None and self.built is not None
        strategy = self.strategy
        if strategy.is_main_process:
            (self.log_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run_id = strategy.broadcast_object(self.tracker.run_id if self.tracker else None)
        strategy.logger.info(
            "Done: %s", ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        )
        say(
            f"xp: rank {strategy.rank}/{strategy.world_size} finished; log_dir {self.log_dir}"
            + (f"; MLflow run {run_id}" if run_id else "")
        )
        if self.incomplete is not None:
            say(f"xp: error: {self.incomplete}", file=sys.stderr)
            raise SystemExit(INCOMPLETE_RECORD_EXIT)
        objective = metrics.get(self.built.trainer.objective)
        return None if objective is None else float(objective)

    # ------------------------------------------------------------------ whatever happens

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if isinstance(error, TrainingStopped):
                name = signal.Signals(error.signum).name
                self._record_end("KILLED", f"Stopped by {name}.")
                if self.strategy is not None:
                    requeue_on_slurm(self.strategy, error.signum)
                raise SystemExit(128 + error.signum) from None
            if isinstance(error, KeyboardInterrupt):
                self._record_end("KILLED", "Interrupted (Ctrl-C).")
            elif error is not None and not isinstance(error, SystemExit):
                # Before training, bad input is its one `xp: error:` line, said once.
                told = not self.started and is_user_error(error)
                self._record_end("FAILED", "".join(traceback.format_exception(error)), told)
                if not self.started:
                    discard(self.log_dir)
                exit_on_user_error(error)
        finally:
            # Drop the run's objects before the process group goes (the strategy's teardown).
            self.built = self.trainer = None
            if self.strategy is not None:
                self.strategy.teardown()
            close_logger()
            if self.lock is not None:
                self.lock.release()

    def _record_end(self, status: str, error: str, told: bool = False) -> None:
        """The log line (unless the error is ``told`` apart), and the MLflow run ended
        ``status`` with ``error`` (a KILLED run's newest checkpoint and config go along: it
        is resumed later, maybe elsewhere)."""
        strategy, tracker = self.strategy, self.tracker
        if strategy is not None and not told:
            last = error.strip().splitlines()[-1] if error.strip() else status
            strategy.logger.error("Run %s: %s", status, last)
        if tracker is None:
            return
        try:
            if strategy is not None:
                log_file = strategy.log_dir / f"{strategy.timestamp}.log"
                if log_file.exists():
                    tracker.log_artifact(log_file)
                if status == "KILLED" and tracker.settings.log_checkpoints:
                    latest = Checkpointer(strategy.checkpoint_dir).latest()
                    if latest is not None:
                        tracker.log_checkpoint(latest)
                    for name in ("config.yaml", "run.json"):
                        if (strategy.log_dir / name).exists():
                            tracker.log_artifact(strategy.log_dir / name)
            tracker.close(status, error=error)
        except TrackingError as e:
            say(f"xp: could not record the run's end in MLflow: {e}", file=sys.stderr)


# --------------------------------------------------------------------------- the run's files


def _load_from(cfg: DictConfig) -> Path:
    spec = str(cfg.load_from)
    if not RUN_ID.match(spec):
        spec = str(launch_dir() / spec)  # relative to where the command ran (hydra.job.chdir)
    return checkpoint_for_load(
        spec,
        tracking_uri=cfg.tracking.tracking_uri or default_tracking_uri(launch_dir()),
        outputs=launch_dir() / "outputs",
    )


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


def _log_run_files(
    tracker: MlflowTracker, strategy: Strategy, trainer: Trainer, settings: TrackingConfig
) -> None:
    """At the end: the checkpoints (``tracking.log_checkpoints``) and the whole log."""
    if settings.log_checkpoints:
        for path in trainer.checkpointer.list():
            tracker.log_checkpoint(path)
    for handler in logging.getLogger("xp").handlers:
        handler.flush()
    log_file = strategy.log_dir / f"{strategy.timestamp}.log"
    if log_file.exists():
        tracker.log_artifact(log_file)
