"""AsyncCheckpointWriter: snapshots taken at submit, one save in flight, errors, kills."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import xp.checkpoint as ckpt
from xp.checkpoint import (
    AsyncCheckpointWriter,
    Checkpointer,
    CheckpointError,
    atomic_save,
    load_file,
    state_nbytes,
)


def make_state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": OrderedDict(
            {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g)}
        ),
        "optim": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(8, 4, generator=g)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "progress": {"step": seed, "history": [1.0, 2.0]},
        "rng": [torch.randint(0, 255, (16,), dtype=torch.uint8, generator=g)],
    }


def clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return type(obj)((k, clone(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(clone(v) for v in obj)
    return obj


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


class Gate:
    """Makes background saves wait until the test opens it, and logs what happened."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.opened = threading.Event()
        self._in_flight = 0

    def save(self, state: dict[str, Any], path: Path) -> Path:
        self._in_flight += 1
        self.log.append(f"start {path.name} in_flight={self._in_flight}")
        assert self.opened.wait(timeout=60), "the test never opened the gate"
        atomic_save(state, path)
        self.log.append(f"end {path.name}")
        self._in_flight -= 1
        return path


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    monkeypatch.setattr(ckpt, "atomic_save", gate.save)
    yield gate
    gate.opened.set()  # never leave a writer thread waiting


def test_file_holds_the_state_at_submit_time(gate: Gate, tmp_path: Path) -> None:
    state = make_state()
    expected = clone(state)
    path = tmp_path / "step_00000001.pt"
    with AsyncCheckpointWriter() as writer:
        writer.submit(state, path)
        assert writer.pending == path
        # Training goes on while the file is being written: in place and structurally.
        state["model"]["w"].add_(1.0)
        state["optim"]["state"][0]["exp_avg"].zero_()
        state["rng"][0].fill_(7)
        state["progress"]["step"] = 99
        state["progress"]["history"].append(3.0)
        gate.opened.set()
        writer.wait()
        assert writer.pending is None
    loaded = load_file(path)
    assert_same(expected, loaded)
    assert isinstance(loaded["model"], OrderedDict)


def test_second_submit_waits_for_the_first(gate: Gate, tmp_path: Path) -> None:
    first, second = tmp_path / "step_00000001.pt", tmp_path / "step_00000002.pt"
    states = [make_state(1), make_state(2)]
    expected = [clone(s) for s in states]
    with AsyncCheckpointWriter(on_done=lambda p: gate.log.append(f"done {p.name}")) as writer:
        writer.submit(states[0], first)
        opener = threading.Timer(0.05, gate.opened.set)
        opener.start()
        writer.submit(states[1], second)
        gate.log.append("second submit returned")
        # The second snapshot went into the first one's buffers (same shapes): still safe.
        states[1]["model"]["w"].add_(1.0)
    opener.join()
    assert gate.log[:3] == [
        "start step_00000001.pt in_flight=1",
        "end step_00000001.pt",
        "done step_00000001.pt",
    ]
    # The second save may start before the training thread logs its return.
    rest = [e for e in gate.log[3:] if e != "second submit returned"]
    assert rest == [
        "start step_00000002.pt in_flight=1",
        "end step_00000002.pt",
        "done step_00000002.pt",
    ]
    assert_same(expected[0], load_file(first))
    assert_same(expected[1], load_file(second))


def test_changed_shapes_and_tied_tensors(tmp_path: Path) -> None:
    shared = torch.arange(6.0)
    with AsyncCheckpointWriter() as writer:
        writer.submit({"a": torch.zeros(3), "tied": [shared, shared]}, tmp_path / "one.pt")
        writer.submit({"a": torch.ones(5), "tied": [shared, shared]}, tmp_path / "two.pt")
    assert torch.equal(load_file(tmp_path / "one.pt")["a"], torch.zeros(3))
    two = load_file(tmp_path / "two.pt")
    assert torch.equal(two["a"], torch.ones(5))
    x, y = two["tied"]
    assert torch.equal(x, shared) and x.data_ptr() == y.data_ptr()


def test_buffers_are_reused_and_each_tensor_loads_on_its_own(tmp_path: Path) -> None:
    state = make_state()
    state["extras"] = [torch.zeros(0, 3), torch.ones(3, dtype=torch.bool), torch.tensor(2.5)]
    expected = clone(state)
    with AsyncCheckpointWriter() as writer:
        writer.submit(state, tmp_path / "one.pt")
        writer.wait()
        first = {k: b.data_ptr() for k, b in writer._buffers.items()}
        state["model"]["w"].add_(1.0)
        writer.submit(state, tmp_path / "two.pt")
        assert {k: b.data_ptr() for k, b in writer._buffers.items()} == first
    one, two = load_file(tmp_path / "one.pt"), load_file(tmp_path / "two.pt")
    assert_same(expected, one)
    assert torch.equal(two["model"]["w"], expected["model"]["w"] + 1.0)
    # One storage per tensor in the file: a loaded tensor keeps only its own bytes alive.
    for t in (one["model"]["w"], one["optim"]["state"][0]["exp_avg"], *one["extras"]):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_state_nbytes_counts_each_view_once() -> None:
    shared = torch.zeros(10)
    state = {"a": shared, "b": [shared, torch.zeros(2, dtype=torch.float64)], "c": 3}
    assert state_nbytes(state) == 10 * 4 + 2 * 8


def test_failed_save_is_raised_by_wait_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    bad = tmp_path / "a_file" / "step_00000001.pt"
    with AsyncCheckpointWriter() as writer:
        writer.submit(make_state(), bad)
        with pytest.raises(CheckpointError, match=str(bad)) as info:
            writer.wait()
        assert "untouched" in str(info.value)
        writer.wait()  # raised once, then the writer is usable again
        good = tmp_path / "step_00000002.pt"
        writer.submit(make_state(), good)
    assert_same(make_state(), load_file(good))


def test_failed_save_is_raised_by_the_next_submit(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    bad = tmp_path / "a_file" / "step_00000001.pt"
    writer = AsyncCheckpointWriter()
    writer.submit(make_state(), bad)
    with pytest.raises(CheckpointError, match=str(bad)):
        writer.submit(make_state(), tmp_path / "step_00000002.pt")
    assert not (tmp_path / "step_00000002.pt").exists()  # that state was not submitted
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="after close"):
        writer.submit(make_state(), tmp_path / "step_00000003.pt")


def test_failing_on_done_is_reported_after_the_file_is_saved(tmp_path: Path) -> None:
    def prune(path: Path) -> None:
        raise PermissionError(f"cannot prune near {path}")

    path = tmp_path / "step_00000001.pt"
    writer = AsyncCheckpointWriter(on_done=prune)
    writer.submit(make_state(), path)
    with pytest.raises(CheckpointError, match="was saved, but on_done"):
        writer.close()
    assert_same(make_state(), load_file(path))


def test_save_failing_midway_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "step_00000001.pt"
    with AsyncCheckpointWriter() as writer:
        writer.submit(make_state(1), path)
        writer.wait()

        def partial_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            f.write(b"PK\x03\x04 half a zip file")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(torch, "save", partial_save)
        writer.submit(make_state(2), path)
        with pytest.raises(CheckpointError, match="No space left on device"):
            writer.wait()
    assert_same(make_state(1), load_file(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, f"{path.name}.sha256"]


@pytest.mark.slow
def test_kill_during_background_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL mid-write (no ``finally`` runs): the old file stays, prune clears the rest."""
    path, ready = tmp_path / "step_00000001.pt", tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import torch
        from xp.checkpoint import AsyncCheckpointWriter

        writer = AsyncCheckpointWriter()
        writer.submit({{"step": 1, "w": torch.ones(4)}}, Path({str(path)!r}))
        writer.wait()

        def stuck_save(obj, f, *args, **kwargs):
            f.write(b"PK\\x03\\x04 half a zip file")
            f.flush()
            Path({str(ready)!r}).touch()
            time.sleep(600)

        torch.save = stuck_save
        writer.submit({{"step": 2, "w": torch.zeros(4)}}, Path({str(path)!r}))
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the writer never started the second save (rc {proc.poll()})"
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert load_file(path)["step"] == 1
    leftovers = list(tmp_path.glob(".*.tmp"))
    assert len(leftovers) == 1
    Checkpointer(tmp_path).prune()
    assert load_file(path)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_snapshotted_into_pinned_memory(tmp_path: Path) -> None:
    state = {"w": torch.randn(1024, 1024, device="cuda"), "step": 1}
    expected = state["w"].cpu()
    path = tmp_path / "step_00000001.pt"
    with AsyncCheckpointWriter() as writer:
        writer.submit(state, path)
        state["w"].add_(1.0)
        writer.wait()
        assert all(b.is_pinned() for b in writer._buffers.values())
    assert torch.equal(load_file(path)["w"], expected)
