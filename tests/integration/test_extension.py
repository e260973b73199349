"""A user's own model, data and config, outside xp: trained, evaluated and checked by the CLI."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from tests.integration.test_cli import only_run, run_dirs

pytestmark = pytest.mark.slow

PACKAGE = {
    "mypkg/__init__.py": "",
    "mypkg/nets.py": """
        import torch
        from torch import nn


        class TinyNet(nn.Module):
            def __init__(self, width: int, classes: int = 3) -> None:
                super().__init__()
                self.body = nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, classes))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.body(x)


        class NoLoss(TinyNet):
            def train_step(self, batch, optim_wrapper):
                return {"score": self(batch["features"]).mean()}
    """,
    "mypkg/data.py": """
        import torch
        from torch.utils.data import Dataset


        class Blobs(Dataset):
            '''Three Gaussian blobs in 2-D, as dict samples {"features", "label"}.'''

            def __init__(self, size: int, seed: int) -> None:
                g = torch.Generator().manual_seed(seed)
                self.label = torch.randint(3, (size,), generator=g)
                centers = torch.tensor([[0.0, 3.0], [3.0, 0.0], [-3.0, -3.0]])
                self.features = centers[self.label] + torch.randn(size, 2, generator=g)

            def __len__(self) -> int:
                return len(self.label)

            def __getitem__(self, i: int) -> dict:
                return {"features": self.features[i], "label": self.label[i]}


        class Triples(Blobs):
            def __getitem__(self, i: int):
                return self.features[i], self.label[i], i
    """,
    "userconf/model/tiny.yaml": """
        _target_: mypkg.nets.TinyNet
        width: 16
    """,
    "userconf/data/blobs.yaml": """
        _target_: xp.data.Datasets
        batch_size: 32
        train: {_target_: mypkg.data.Blobs, size: 512, seed: 0}
        val: {_target_: mypkg.data.Blobs, size: 200, seed: 1}
        test: {_target_: mypkg.data.Blobs, size: 200, seed: 2}
    """,
    "userconf/experiment/blobs.yaml": """
        # @package _global_
        defaults:
          - override /model: tiny
          - override /data: blobs
        experiment_name: blobs
        target_allowlist: [mypkg.]  # test= and resume= may build mypkg's classes again
        task:
          input_key: features
          target_key: label
        optim:
          lr: 0.01
        trainer:
          max_epochs: 4
    """,
}


@pytest.fixture
def user_project(workdir: Path) -> Path:
    """A user's package and config folder, written beside the run (never inside xp)."""
    for name, text in PACKAGE.items():
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return workdir


@pytest.mark.parametrize(
    "strategy", [[], ["strategy=ddp", "strategy.nproc_per_node=2"]], ids=["single", "ddp"]
)
def test_user_package_trains_through_the_cli(xp, user_project: Path, store, strategy) -> None:
    result = xp("--config-dir", "userconf", "+experiment=blobs", *strategy)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(store, "blobs")
    assert run.info.status == "FINISHED"
    assert run.data.params["model._target_"] == "mypkg.nets.TinyNet"
    assert run.data.params["model.width"] == "16"
    assert run.data.metrics["val/acc"] >= 0.9
    assert run.data.tags["xp.world_size"] == ("2" if strategy else "1")
    (log_dir,) = run_dirs(user_project, "blobs")
    assert len(list((log_dir / "checkpoints").glob("step_*.pt"))) == 3


def test_cli_override_wins_over_the_preset(xp, user_project: Path, store) -> None:
    result = xp(
        "--config-dir", "userconf", "+experiment=blobs", "model.width=8", "trainer.max_epochs=1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(store, "blobs")
    assert run.data.params["model.width"] == "8"
    assert run.data.params["trainer.max_epochs"] == "1"


def test_test_evaluates_the_best_checkpoint_onto_the_same_run(
    xp, user_project: Path, store
) -> None:
    # monitor val/loss with mode=max makes the first epoch the best: it is kept beside the
    # newest checkpoint and is the one test= evaluates.
    result = xp(
        "--config-dir", "userconf", "+experiment=blobs", "checkpoint.keep=1",
        "checkpoint.monitor=val/loss", "checkpoint.mode=max",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(store, "blobs")
    (log_dir,) = run_dirs(user_project, "blobs")
    kept = sorted(p.name for p in (log_dir / "checkpoints").glob("step_*.pt"))
    assert kept == ["step_00000016.pt", "step_00000064.pt"]
    assert run.data.tags["xp.best_checkpoint"] == "step_00000016.pt"
    assert run.data.tags["xp.best_metric"] == "val/loss"

    tested = xp("--config-dir", "userconf", f"test={run.info.run_id}")
    assert tested.returncode == 0, tested.stderr[-3000:]
    after = only_run(store, "blobs")  # still one run: test= wrote onto it
    assert after.info.run_id == run.info.run_id
    assert after.info.status == "FINISHED"
    assert 0.0 <= after.data.metrics["test/acc"] <= 1.0
    assert after.data.tags["xp.test_checkpoint"].endswith("step_00000016.pt")
    history = store.get_metric_history(run.info.run_id, "test/acc")
    assert [m.step for m in history] == [16]
    report = json.loads((log_dir / "test_metrics.json").read_text())
    assert report["test/acc"] == pytest.approx(after.data.metrics["test/acc"])
    # The weights tested are the best checkpoint's: evaluating them here gives the same.
    state = torch.load(log_dir / "checkpoints" / "step_00000016.pt", weights_only=True)
    assert state["progress"]["step"] == 16

    latest = xp("--config-dir", "userconf", f"test={log_dir}", "test_checkpoint=latest")
    assert latest.returncode == 0, latest.stderr[-3000:]
    assert "step_00000064.pt" in latest.stdout
    named = log_dir / "checkpoints" / "step_00000064.pt"
    exact = xp("--config-dir", "userconf", f"test={named}")  # a checkpoint is tested as named
    assert exact.returncode == 0, exact.stderr[-3000:]
    assert f"xp: tested {named}" in exact.stdout


def test_test_on_data_without_a_test_split_says_so(xp, workdir: Path, store) -> None:
    result = xp("trainer.max_epochs=1", "data.test_fraction=0")
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(store)
    tested = xp(f"test={run.info.run_id}")
    assert tested.returncode == 1
    assert "gives no test split" in tested.stderr
    assert "data.test_fraction" in tested.stderr
    assert only_run(store).info.status == "FINISHED"


def test_test_of_an_unknown_run_is_a_clear_error(xp, workdir: Path) -> None:
    result = xp("test=0123456789abcdef0123456789abcdef")
    assert result.returncode == 1
    assert "test=0123456789abcdef0123456789abcdef: no such MLflow run" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["model._target_=mypkg.missing.Net"],
            r"model._target_='mypkg.missing.Net' could not be built: .*mypkg.missing",
        ),
        (
            ["model._target_=mypkg.nets.NoLoss"],
            r"mypkg.nets.NoLoss.train_step returned \['score'\] but no loss",
        ),
        (
            ["data.train._target_=mypkg.data.Triples"],
            r"The data gave a list of 3 items, but the supervised step expects \(inputs, targets\)",
        ),
        (
            ["checkpoint.monitor=val/accuracy"],
            r"checkpoint.monitor='val/accuracy' is never logged: validation logs "
            r"\['val/acc', 'val/loss'\]",
        ),
        (
            ["checkpoint.monitor=val/acc", "trainer.val_interval_epochs=0"],
            r"checkpoint.monitor='val/acc' needs validation",
        ),
    ],
    ids=["target-does-not-import", "no-loss", "batch-layout", "monitor-never-logged", "no-val"],
)
def test_bad_user_code_fails_with_a_message_naming_it(
    xp, user_project: Path, store, args: list[str], message: str
) -> None:
    result = xp("--config-dir", "userconf", "+experiment=blobs", "trainer.max_epochs=1", *args)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    import re

    assert re.search(message, result.stderr), result.stderr[-2000:]
    experiment = store.get_experiment_by_name("blobs")
    runs = store.search_runs([experiment.experiment_id]) if experiment else []
    assert all(r.info.status == "FAILED" for r in runs)
