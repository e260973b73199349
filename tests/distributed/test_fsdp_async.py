"""FSDP with ``checkpoint.async_save=true``: DCP's async_save on 2 CPU ranks over gloo."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.distributed.test_fsdp import (
    assert_same,
    full_model,
    full_state,
    make_strategy,
    prepare,
    teardown,
    train_step,
)
from xp.checkpoint import Checkpointer, is_complete

pytestmark = pytest.mark.slow

STEPS = 6


def _checkpointer(tmp: Path, name: str, keep: int = 0) -> Checkpointer:
    return Checkpointer(tmp / name / "checkpoints", keep=keep, sharded=True)


# --------------------------------------------------------------------------- bit-exact resume


def _async_resumes_like_sync(rank: int, world_size: int, tmp: Path) -> None:
    # Synchronous saves: the reference, and the state the checkpoint must hold.
    sync = make_strategy(tmp, "sync")
    prepared = prepare(sync)
    for step in range(STEPS):
        if step == 3:
            sync.save_checkpoint(_checkpointer(tmp, "sync").path_for(3))
            at_save = copy.deepcopy(full_state(prepared))
        train_step(sync, prepared, step)
    straight = full_model(prepared)

    strategies = [sync, make_strategy(tmp, "async")]
    assert strategies[1].use_async_checkpoints()
    prepared = prepare(strategies[1])
    path = _checkpointer(tmp, "async").path_for(3)
    for step in range(STEPS):
        if step == 3:
            strategies[1].save_checkpoint(path, extra={"progress": {"step": 3}})
        # Steps 3-5 change the parameters and moments while the save may still be writing.
        train_step(strategies[1], prepared, step)
    strategies[1].wait_for_checkpoints()  # rank 0: until the folder is marked complete
    strategies[1].barrier()  # the others return once their shards are written
    assert is_complete(path)
    assert_same(full_model(prepared), straight, "async saves change nothing in training")

    strategies.append(make_strategy(tmp, "resumed"))
    prepared = prepare(strategies[2])
    assert _checkpointer(tmp, "async").latest() == path
    assert strategies[2].resume(path)["progress"] == {"step": 3}
    model, optim = full_state(prepared)
    assert_same(model, at_save[0], "model")
    assert_same(optim, at_save[1], "optim")
    for step in range(3, STEPS):
        train_step(strategies[2], prepared, step)
    assert_same(full_model(prepared), straight, "resumed")
    teardown(strategies)


def test_async_checkpoint_resumes_bit_exactly_like_a_synchronous_one(spawn, tmp_path) -> None:
    spawn(_async_resumes_like_sync, 2, tmp_path)


# --------------------------------------------------------------------------- one save in flight


def _back_to_back(rank: int, world_size: int, tmp: Path) -> None:
    strategy = make_strategy(tmp, "run")
    checkpoints = _checkpointer(tmp, "run", keep=1)
    finished: list[str] = []

    def on_done(path: Path) -> None:
        finished.append(path.name)
        checkpoints.prune()

    assert strategy.use_async_checkpoints(on_done=on_done)
    prepared = prepare(strategy)
    train_step(strategy, prepared, 0)
    strategy.save_checkpoint(checkpoints.path_for(1))
    strategy.save_checkpoint(checkpoints.path_for(2))
    if strategy.is_main_process:
        # The second save waited for the first, which was complete (and pruned around)
        # before the second began.
        assert finished[:1] == ["step_00000001"]
        assert is_complete(checkpoints.path_for(1))
    train_step(strategy, prepared, 1)
    strategy.wait_for_checkpoints()
    if strategy.is_main_process:
        assert finished == ["step_00000001", "step_00000002"]
        # keep=1: the first went once the second was complete, never before.
        assert checkpoints.list() == [checkpoints.path_for(2)]
        assert sorted(p.name for p in checkpoints.directory.iterdir()) == ["step_00000002"]
    else:
        assert finished == []  # pruning is rank 0's alone
    strategy.teardown()


def test_a_save_waits_for_the_one_in_flight(spawn, tmp_path: Path) -> None:
    spawn(_back_to_back, 2, tmp_path)


# --------------------------------------------------------------------------- killed mid-save


def _killed_while_saving(rank: int, world_size: int, tmp: Path) -> None:
    strategy = make_strategy(tmp, "killed")
    checkpoints = _checkpointer(tmp, "killed")
    strategy.use_async_checkpoints()
    prepared = prepare(strategy)
    for step in range(4):
        if step == 2:
            strategy.save_checkpoint(checkpoints.path_for(2), extra={"progress": {"step": 2}})
        train_step(strategy, prepared, step)
    strategy.save_checkpoint(checkpoints.path_for(4), extra={"progress": {"step": 4}})
    # Killed with the save of step 4 in flight: this thread holds the GIL from the submit to
    # the kill, so DCP's thread gets no further than starting its plan.
    os.kill(os.getpid(), signal.SIGKILL)


def _resume_latest(rank: int, world_size: int, tmp: Path) -> None:
    straight = make_strategy(tmp, "straight")
    prepared = prepare(straight)
    for step in range(STEPS):
        train_step(straight, prepared, step)
    expected = full_model(prepared)

    resumed = make_strategy(tmp, "resumed")
    prepared = prepare(resumed)
    latest = _checkpointer(tmp, "killed").latest()
    assert latest is not None and latest.name == "step_00000002"
    assert resumed.resume(latest)["progress"] == {"step": 2}
    for step in range(2, STEPS):
        train_step(resumed, prepared, step)
    assert_same(full_model(prepared), expected, "resumed after the kill")
    teardown([straight, resumed])


def test_a_kill_during_an_async_save_leaves_the_previous_checkpoint_latest(
    spawn, tmp_path: Path
) -> None:
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        spawn(_killed_while_saving, 2, tmp_path)
    checkpoints = _checkpointer(tmp_path, "killed")
    assert checkpoints.list() == [checkpoints.path_for(2)]
    assert not is_complete(checkpoints.path_for(4))
    spawn(_resume_latest, 2, tmp_path)


# --------------------------------------------------------------------------- the CLI


def test_cli_run_with_async_saves_writes_complete_checkpoints(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(
        [
            sys.executable, "-m", "xp", "strategy=fsdp", "strategy.nproc_per_node=2",
            "checkpoint.async_save=true", "trainer.max_epochs=2", "checkpoint.interval_steps=2",
            "checkpoint.keep=2", "tracking.enabled=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "synchronously" not in output, output[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "default").iterdir()
    folders = sorted((run_dir / "checkpoints").iterdir())
    # Several saves, each pruned down to the newest two once complete; none left half-done.
    assert len(folders) == 2, folders
    assert all(p.is_dir() and is_complete(p) for p in folders), folders
    assert all((p / "extra.pt").is_file() and (p / ".metadata").is_file() for p in folders)
