"""Checkpoint checksums: recorded at save, verified at load, and resume=/load_from= falling
back past a truncated or bit-flipped newest checkpoint to the newest one that verifies."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from xp.checkpoint import (
    COMPLETE_MARKER,
    AsyncCheckpointWriter,
    CheckpointCorrupt,
    Checkpointer,
    atomic_save,
    checksum_file,
    file_digests,
    folder_files,
    load_file,
    verify,
    write_marker,
)
from xp.resume import ResumeError, _from_path, checkpoint_for_load, resolve


def state(step: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(256, 64, generator=g)}, "progress": {"step": step}}


def flip_a_weight_byte(path: Path) -> None:
    """Change one byte of tensor data, where torch's zip container does not notice."""
    data = bytearray(path.read_bytes())
    w = load_file(path, check=False)["model"]["w"]
    offset = data.find(w.numpy().tobytes()[:64])
    assert offset > 0, "the tensor's bytes are stored as they are"
    data[offset + 100] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def run_dir_with_checkpoints(tmp_path: Path, steps: tuple[int, ...] = (1, 2, 3)) -> Path:
    run_dir = tmp_path / "outputs" / "exp" / "20260101_000000"
    (run_dir / ".hydra").mkdir(parents=True)
    checkpoints = Checkpointer(run_dir / "checkpoints", keep=0)
    for step in steps:
        atomic_save(state(step), checkpoints.path_for(step))
    return run_dir


# --------------------------------------------------------------------------- recorded at save


def test_a_saved_file_has_its_sha256_beside_it_in_sha256sum_format(tmp_path: Path) -> None:
    path = atomic_save(state(1), tmp_path / "step_00000001.pt")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checksum_file(path).read_text() == f"{expected}  step_00000001.pt\n"
    check = subprocess.run(
        ["sha256sum", "-c", checksum_file(path).name], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert verify(path) is True


def test_the_background_writer_records_the_checksum_too(tmp_path: Path) -> None:
    path = tmp_path / "step_00000002.pt"
    with AsyncCheckpointWriter() as writer:
        writer.submit(state(2), path)
    assert (
        checksum_file(path).read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()
    )


# --------------------------------------------------------------------------- verified at load


def test_a_bit_flipped_checkpoint_is_refused_instead_of_loading(tmp_path: Path) -> None:
    path = atomic_save(state(1), tmp_path / "step_00000001.pt")
    flip_a_weight_byte(path)
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch") as e:
        load_file(path)
    assert e.value.path == path and "use an earlier checkpoint" in str(e.value)


def test_a_truncated_checkpoint_is_named_truncated(tmp_path: Path) -> None:
    path = atomic_save(state(1), tmp_path / "step_00000001.pt")
    truncate(path)
    with pytest.raises(CheckpointCorrupt, match="truncated"):
        load_file(path)


def test_checkpoints_saved_before_checksums_still_load(tmp_path: Path) -> None:
    path = atomic_save(state(4), tmp_path / "step_00000004.pt", checksum=False)
    assert not checksum_file(path).exists()
    assert verify(path) is False
    assert load_file(path)["progress"] == {"step": 4}
    assert Checkpointer(tmp_path).latest_verified() == (path, [])


def test_a_sharded_folder_is_checked_file_by_file_against_its_marker(tmp_path: Path) -> None:
    folder = tmp_path / "step_00000005"
    folder.mkdir()
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata"):
        (folder / name).write_bytes(name.encode() * 1000)
    write_marker(folder, file_digests(folder, folder_files(folder)), kind="test")
    record = json.loads((folder / COMPLETE_MARKER).read_text())
    assert sorted(record["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert verify(folder) is True
    # Two ranks share the work: each checks every other file.
    assert verify(folder, share=(0, 2)) and verify(folder, share=(1, 2))

    data = bytearray((folder / "__1_0.distcp").read_bytes())
    data[10] ^= 0xFF
    (folder / "__1_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match=r"checksum mismatch in __1_0\.distcp"):
        verify(folder)
    truncate(folder / ".metadata")
    with pytest.raises(CheckpointCorrupt, match=r"truncated: \.metadata has 4500 bytes, 9000"):
        verify(folder)
    (folder / ".metadata").unlink()
    with pytest.raises(CheckpointCorrupt, match=r"\.metadata is missing"):
        verify(folder)


# --------------------------------------------------------------------------- resume falls back


def test_resume_of_a_run_dir_falls_back_to_the_newest_checkpoint_that_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = run_dir_with_checkpoints(tmp_path)
    checkpoints = Checkpointer(run_dir / "checkpoints", keep=2)
    truncate(checkpoints.path_for(3))
    flip_a_weight_byte(checkpoints.path_for(2))

    checkpoint, found_dir = _from_path(run_dir)

    assert (checkpoint, found_dir) == (checkpoints.path_for(1), run_dir)
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000003.pt" in err and "truncated" in err
    assert "skipping checkpoint step_00000002.pt" in err and "checksum mismatch" in err
    assert "using step_00000001.pt, the newest checkpoint that verifies" in err
    # Moved aside, not deleted: the resumed run's saves and pruning keep the good one.
    assert (run_dir / "checkpoints" / "step_00000003.pt.corrupt").is_file()
    assert (run_dir / "checkpoints" / "step_00000002.pt.corrupt").is_file()
    atomic_save(state(2), checkpoints.path_for(2))
    checkpoints.prune()
    assert checkpoints.list() == [checkpoints.path_for(1), checkpoints.path_for(2)]
    assert load_file(checkpoints.path_for(1))["progress"] == {"step": 1}


def test_resume_and_load_from_resolve_past_a_corrupt_newest_checkpoint(
    tmp_path: Path, mlflow_uri: str
) -> None:
    run_dir = run_dir_with_checkpoints(tmp_path, steps=(1, 2))
    flip_a_weight_byte(Checkpointer(run_dir / "checkpoints").path_for(2))
    target = resolve(
        str(run_dir), tracking_uri=mlflow_uri, experiment_name=None, outputs=tmp_path / "outputs"
    )
    assert Path(target.checkpoint).name == "step_00000001.pt"

    run_dir = run_dir_with_checkpoints(tmp_path / "again", steps=(1, 2))
    truncate(Checkpointer(run_dir / "checkpoints").path_for(2))
    loaded = checkpoint_for_load(str(run_dir), tracking_uri=mlflow_uri, outputs=tmp_path)
    assert loaded.name == "step_00000001.pt"


def test_resume_of_a_corrupt_checkpoint_by_its_path_is_an_error_naming_it(tmp_path: Path) -> None:
    run_dir = run_dir_with_checkpoints(tmp_path, steps=(1, 2))
    newest = Checkpointer(run_dir / "checkpoints").path_for(2)
    flip_a_weight_byte(newest)
    with pytest.raises(ResumeError) as e:
        _from_path(newest)
    message = str(e.value)
    assert f"resume={newest}" in message and "checksum mismatch" in message
    assert f"resume={run_dir}" in message  # the fix: the run directory picks a good one
    with pytest.raises(ResumeError, match=f"load_from={newest}"):
        _from_path(newest, key="load_from")
    assert newest.is_file()  # named by the user: left where it is


def test_a_run_dir_whose_every_checkpoint_is_corrupt_says_so(tmp_path: Path) -> None:
    run_dir = run_dir_with_checkpoints(tmp_path, steps=(1,))
    truncate(Checkpointer(run_dir / "checkpoints").path_for(1))
    with pytest.raises(ResumeError, match=r"no complete checkpoint that verifies \(corrupt"):
        _from_path(run_dir)
