"""resume= and test= build a run from the config it saved: safely, and without the user's
--config-dir where the saved values are enough."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import yaml

from tests.integration.test_cli import only_run, run_dirs

pytestmark = pytest.mark.slow

SHORT = ["trainer.max_epochs=1", "trainer.log_interval_steps=5"]


class _WritesMarker:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_run_never_runs_code_through_resume_or_test(xp, workdir: Path, store) -> None:
    first = xp(*SHORT)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = run_dirs(workdir)
    run_id = only_run(store).info.run_id
    marker = workdir / "marker"
    pickled = workdir / "evil.pkl"
    pickled.write_bytes(pickle.dumps(_WritesMarker(str(marker))))
    payload = {"_target_": "torch.load", "f": str(pickled), "weights_only": False}

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["task"]["metrics"]["acc"] = payload  # nested: a metric xp builds
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    for command in (f"resume={run_id}", f"test={run_dir}"):
        result = xp(command, "trainer.max_epochs=2")
        assert result.returncode == 1, result.stderr[-2000:]
        assert "task.metrics.acc._target_='torch.load'" in result.stderr
        assert "torch.serialization" in result.stderr and "Traceback" not in result.stderr
        assert not marker.exists()

    # The config text inside the checkpoint, when config.yaml is gone.
    (run_dir / "config.yaml").unlink()
    (checkpoint,) = (run_dir / "checkpoints").glob("step_*.pt")
    state = torch.load(checkpoint, weights_only=True)
    saved = yaml.safe_load(state["config"])
    saved["model"] = {**payload, "_target_": "xp.model.torch.load"}
    state["config"] = yaml.safe_dump(saved)
    torch.save(state, checkpoint)
    for sidecar in checkpoint.parent.glob(f"{checkpoint.name}.*"):  # a checksum, if any
        sidecar.unlink()
    result = xp(f"resume={checkpoint}", "trainer.max_epochs=2")
    assert result.returncode == 1
    assert "model._target_='xp.model.torch.load'" in result.stderr
    assert not marker.exists()


MYCONF = {
    "model/mynet.yaml": "_target_: torch.nn.Sequential\n",
    "experiment/mine.yaml": (
        "# @package _global_\n"
        "defaults: [{override /model: mynet}]\n"
        "model: {_args_: [{_target_: torch.nn.Flatten}, "
        "{_target_: torch.nn.Linear, in_features: 64, out_features: 10}]}\n"
    ),
}


def test_test_and_resume_of_a_run_from_a_config_dir_need_not_give_it_again(
    xp, workdir: Path, store
) -> None:
    for name, text in MYCONF.items():
        (workdir / "myconf" / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / "myconf" / name).write_text(text)
    first = xp("--config-dir", "myconf", "+experiment=mine", *SHORT)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = only_run(store).info.run_id

    tested = xp(f"test={run_id}")
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "test/acc" in store.get_run(run_id).data.metrics
    resumed = xp(f"resume={run_id}", "trainer.max_epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert store.get_run(run_id).info.status == "FINISHED"
