"""``test=<run>``: evaluate a finished (or stopped) run's checkpoint on the test split.

The run is built from the config it was trained with (:mod:`xp.restore`), its best
checkpoint (``test_checkpoint=best``, else its latest) is loaded, and ``test/*`` is logged
onto the same MLflow run at that checkpoint's step. Its training state and its MLflow
status stay as they were.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from xp.build import build, build_tracker, build_trainer
from xp.checkpoint import Checkpointer
from xp.config import TestCheckpoint, TrackingConfig
from xp.errors import exit_on_user_error
from xp.log import close_logger, say
from xp.resume import ResumeTarget
from xp.rundir import in_launch_dir, launch_dir
from xp.strategy.base import Strategy
from xp.tracking import MlflowTracker, TrackingError, client, default_tracking_uri


def evaluate(cfg: DictConfig, target: ResumeTarget, log_dir: Path, spec: str) -> float | None:
    """Evaluate ``target``'s checkpoint on the test split; the objective's ``test/`` value.

    ``spec`` is ``test=`` as given: a checkpoint named by its path is the one evaluated.
    """
    strategy: Strategy | None = None
    tracker: MlflowTracker | None = None
    status = "FINISHED"
    try:
        with in_launch_dir():  # relative paths in the config: from where the command ran
            built = build(cfg, log_dir, target.timestamp)
        strategy = built.strategy
        if built.test_loader is None:
            raise ValueError(
                f"test={spec}: data._target_={cfg.data._target_!r} gives no test split; set "
                "data.test_fraction (digits) or data.test (a dataset), or the test= of your "
                "data factory."
            )
        checkpoint = _checkpoint_to_test(target, cfg.test_checkpoint, strategy)
        # The trainer first: its callbacks' states (an EMA's average) load with the weights.
        trainer = build_trainer(built)
        state = strategy.load_checkpoint(checkpoint, states=True)
        step = int(state.get("progress", {}).get("step", 0))
        metrics = trainer.evaluate(built.test_loader, "test")
        if strategy.is_main_process:
            (Path(target.run_dir) / "test_metrics.json").write_text(
                json.dumps({"checkpoint": str(checkpoint), "step": step, **metrics}, indent=2)
            )
        tracker = build_tracker(cfg, strategy, built.tracking, target)
        run_id = None
        if tracker is not None:
            status = _run_status(built.tracking, target.run_id)
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
        say(
            f"xp: tested {checkpoint} on the test split"
            + (f"; MLflow run {run_id}" if run_id else "")
        )
        objective = metrics.get("test/" + built.trainer.objective.split("/", 1)[-1])
        return None if objective is None else float(objective)
    except BaseException as e:
        if tracker is not None:
            with contextlib.suppress(TrackingError):
                tracker.close(status)  # test= leaves the run's status as it found it
        exit_on_user_error(e)
        raise
    finally:
        built = trainer = None  # type: ignore[assignment]
        if strategy is not None:
            strategy.teardown()
        close_logger()


def _checkpoint_to_test(target: ResumeTarget, which: Any, strategy: Strategy) -> Path:
    """The named checkpoint; else the run's best (``test_checkpoint=best``) or latest."""
    given = Path(target.checkpoint)
    if target.named:
        return given
    if TestCheckpoint(which) is TestCheckpoint.best:
        best = Checkpointer(Path(target.run_dir) / "checkpoints").best()
        if best is not None:
            return best
        strategy.logger.info("The run recorded no best checkpoint; testing its latest.")
    return given


def _run_status(settings: TrackingConfig, run_id: str | None) -> str:
    """The status an MLflow run had before ``test=`` re-opened it (FINISHED if unknown)."""
    if run_id is None:
        return "FINISHED"
    try:
        uri = settings.tracking_uri or default_tracking_uri(launch_dir())
        status = client(uri).get_run(run_id).info.status
    except Exception:  # the store is checked when the tracker starts; keep FINISHED here
        return "FINISHED"
    return status if status in ("FINISHED", "FAILED", "KILLED") else "FINISHED"
