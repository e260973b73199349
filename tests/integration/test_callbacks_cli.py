"""Callbacks from the command line: composed, removed, built by config, failing clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.test_cli import only_run

pytestmark = pytest.mark.slow


def test_early_stopping_and_ema_from_the_command_line(xp, workdir: Path, store) -> None:
    result = xp(
        "+callbacks=[early_stopping,ema]", "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.monitor=val/acc", "callbacks.early_stopping.mode=max",
        "callbacks.ema.decay=0.9", "trainer.max_epochs=40", "trainer.objective=val/acc",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(store)
    assert run.info.status == "FINISHED"
    assert "val/acc did not improve" in run.data.tags["xp.stopped_early"]
    steps = [m.step for m in store.get_metric_history(run.info.run_id, "val/acc")]
    assert steps[-1] < 40 * 20  # it ended before trainer.max_epochs

    exported = xp("export", f"ckpt={run.info.run_id}", "out=ema.pt", "ema=true")
    assert exported.returncode == 0, exported.stderr[-3000:]
    plain = xp("export", f"ckpt={run.info.run_id}", "out=plain.pt")
    assert plain.returncode == 0, plain.stderr[-3000:]
    ema = torch.load(workdir / "ema.pt", weights_only=True)
    weights = torch.load(workdir / "plain.pt", weights_only=True)
    assert set(ema) == set(weights)
    assert any(not torch.equal(ema[k], weights[k]) for k in weights)  # the average differs


def test_a_callback_that_does_not_import_is_named_before_training(xp, workdir: Path) -> None:
    (workdir / "myconf" / "callbacks").mkdir(parents=True)
    (workdir / "myconf" / "callbacks" / "mine.yaml").write_text(
        "mine:\n  _target_: mypkg.nowhere.Callback\n"
    )
    result = xp("--config-dir", "myconf", "+callbacks=mine", "trainer.max_epochs=1")
    assert result.returncode == 1
    assert "callbacks.mine._target_='mypkg.nowhere.Callback' could not be built" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (workdir / "outputs").iterdir()) == ["mlflow.db"]
