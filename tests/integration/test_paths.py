"""Paths on the command line are relative to where the command ran, with hydra.job.chdir too."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cli import only_run, run_dirs
from tests.integration.test_restored_config import MYCONF

pytestmark = pytest.mark.slow

SHORT = ["trainer.max_epochs=1", "hydra.job.chdir=true"]


def test_config_dir_reaches_the_workers_of_a_run_that_changes_directory(xp, workdir: Path, store):
    for name, text in MYCONF.items():
        (workdir / "myconf" / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / "myconf" / name).write_text(text)
    result = xp(
        "--config-dir", "myconf", "+experiment=mine", "strategy=ddp",
        "strategy.nproc_per_node=2", *SHORT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert only_run(store).data.tags["xp.world_size"] == "2"


def test_load_from_a_relative_run_directory_in_a_run_that_changes_directory(
    xp, workdir: Path, store
) -> None:
    first = xp("trainer.max_epochs=1", "experiment_name=first")
    assert first.returncode == 0, first.stderr[-3000:]
    (source,) = run_dirs(workdir, "first")
    relative = source.relative_to(workdir)
    second = xp(f"load_from={relative}", "experiment_name=second", *SHORT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert only_run(store, "second").data.tags["xp.load_from"] == str(relative)
