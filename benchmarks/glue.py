"""The baseline of the sweep cases: the Hydra + MLflow glue people write by hand.

A Hydra app (config in ``benchmarks/glue_conf/``) that trains xp's default experiment the
plain way (xp's digits split and MLP, AdamW, a ``DataLoader``) and records it the way the
MLflow docs show: a Hydra callback opens the sweep's parent run when the multirun starts
and ends it when it ends; each job is a child run (``mlflow.start_run(parent_run_id=...)``)
with the config flattened as params, the train loss every ``trainer.log_interval_steps``
steps, the validation loss and accuracy after each epoch, and the config and a checkpoint
as artifacts. The store is ``$MLFLOW_TRACKING_URI`` (else ``outputs/mlflow.db``). Jobs of
Hydra's basic launcher run one after the other in this process; joblib's run in its
workers, which inherit the parent run's id from the environment. No summary: xp's side
pays for its own.

    python -m benchmarks.glue -m optim.lr=0.001,0.002 [hydra/launcher=joblib]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
import mlflow
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from xp.data import digits
from xp.model import MLP

PARENT_ENV = "GLUE_PARENT_RUN_ID"


def _tracking_uri() -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('outputs/mlflow.db').resolve()}"
    )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


class ParentRun(Callback):
    """The sweep's parent run: created before the jobs, ended after them."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        client = MlflowClient(_tracking_uri())
        experiment = client.get_experiment_by_name(config.experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(config.experiment_name)
        )
        run = client.create_run(experiment_id, run_name="sweep")
        for override in config.hydra.overrides.task:
            key, _, value = str(override).partition("=")
            client.log_param(run.info.run_id, key, value)
        os.environ[PARENT_ENV] = run.info.run_id  # the jobs (and joblib's workers) read it

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        MlflowClient(_tracking_uri()).set_terminated(os.environ[PARENT_ENV], "FINISHED")


@hydra.main(config_path="glue_conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    mlflow.set_tracking_uri(_tracking_uri())
    mlflow.set_experiment(cfg.experiment_name)
    name = HydraConfig.get().job.override_dirname or "run"
    with mlflow.start_run(run_name=name, parent_run_id=os.environ.get(PARENT_ENV)):
        mlflow.log_params(_flatten(OmegaConf.to_container(cfg, resolve=True)))
        torch.manual_seed(cfg.seed)
        data = digits()
        model = MLP(64, list(cfg.model.hidden_sizes), 10, dropout=cfg.model.dropout)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        train = DataLoader(data.train, batch_size=cfg.data.batch_size, shuffle=True)
        val = DataLoader(data.val, batch_size=cfg.data.batch_size)
        step, accuracy = 0, 0.0
        for _epoch in range(cfg.trainer.max_epochs):
            model.train()
            for inputs, targets in train:
                loss = F.cross_entropy(model(inputs), targets)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % cfg.trainer.log_interval_steps == 0:
                    mlflow.log_metric("train/loss", loss.item(), step=step)
            model.eval()
            total_loss, correct, seen = 0.0, 0, 0
            with torch.no_grad():
                for inputs, targets in val:
                    logits = model(inputs)
                    total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
                    correct += int((logits.argmax(1) == targets).sum())
                    seen += len(targets)
            accuracy = correct / seen
            mlflow.log_metrics({"val/loss": total_loss / seen, "val/acc": accuracy}, step=step)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        checkpoint = run_dir / "checkpoint.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
        mlflow.log_artifact(str(checkpoint))
        mlflow.log_dict(OmegaConf.to_container(cfg, resolve=True), "config.yaml")
    return accuracy


if __name__ == "__main__":
    main()
