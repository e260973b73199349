"""Checkpoints run no code: every pickle xp (or DCP, or DeepSpeed, on xp's behalf) reads from
a checkpoint goes through a restricted unpickler first.

Each payload would write a marker file if it were unpickled without restriction; each test
asserts a clear refusal and that the marker never appears. The attacker is assumed to
rewrite the checksums too (they are for corruption, not for trust).
"""

from __future__ import annotations

import io
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.extras import requires_extra
from xp.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    atomic_save,
    file_digests,
    folder_files,
    restricted_load,
    write_marker,
)
from xp.export import export_model_state
from xp.strategy.fsdp import SafeReader

needs_deepspeed = requires_extra("deepspeed", "deepspeed")


class Payload:
    """Unpickled without restriction, it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def reseal(folder: Path) -> None:
    """Write the marker with the checksums of the folder's files as they now are."""
    write_marker(folder, file_digests(folder, folder_files(folder)), kind="test")


def dcp_folder(folder: Path, model: dict[str, object]) -> Path:
    """A complete checkpoint folder as FSDP writes it: DCP's files, extra.pt, the marker."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is")
        dcp.save({"model": model}, checkpoint_id=folder, no_dist=True)
    atomic_save({"progress": {"step": 1}}, folder / "extra.pt", checksum=False)
    reseal(folder)
    return folder


# --------------------------------------------------------------------------- the unpickler


def test_restricted_load_refuses_a_global_before_importing_its_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "xp_evil_module.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    crafted = b"\x80\x02cxp_evil_module\nanything\nq\x00."
    with pytest.raises(pickle.UnpicklingError, match="'xp_evil_module.anything' is not allowed"):
        restricted_load(io.BytesIO(crafted), {"collections": {"OrderedDict"}})
    assert not marker.exists()
    assert "xp_evil_module" not in sys.modules
    allowed = restricted_load(
        io.BytesIO(pickle.dumps({"a": __import__("collections").OrderedDict(b=1)})),
        {"collections": {"OrderedDict"}},
    )
    assert allowed == {"a": {"b": 1}}


# --------------------------------------------------------------------------- DCP folders (FSDP)


def test_a_crafted_dcp_metadata_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = dcp_folder(tmp_path / "step_00000001", {"w": torch.ones(3)})
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(folder)

    with pytest.raises(CheckpointError, match=r"builtins\.exec.* is refused"):
        export_model_state(folder)  # xp export; resume=, test= and load_from= read it so too
    with pytest.raises(CheckpointError, match="is refused"):
        SafeReader(folder).read_metadata()
    assert not marker.exists()


def test_a_crafted_non_tensor_entry_of_a_dcp_shard_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # DCP writes non-tensor entries with torch.save and reads them with
    # torch.load(weights_only=False): the payload sits in the shard file.
    folder = dcp_folder(tmp_path / "step_00000001", {"w": torch.ones(3), "lr": Payload(marker)})
    with pytest.raises(CheckpointError, match=r"entry model\.lr.* is refused"):
        export_model_state(folder)
    assert not marker.exists()
    # Plain non-tensor entries still load.
    folder = dcp_folder(tmp_path / "step_00000002", {"w": torch.ones(3), "lr": [0.1, (0.9, 0.99)]})
    assert set(export_model_state(folder)) == {"w"}


def test_dcp_metadata_may_name_only_files_inside_its_folder(tmp_path: Path) -> None:
    folder = dcp_folder(tmp_path / "step_00000001", {"w": torch.ones(3)})
    metadata = SafeReader(folder).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = "../../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(folder)
    with pytest.raises(CheckpointError, match="outside the folder"):
        export_model_state(folder)


# --------------------------------------------------------------------------- DeepSpeed folders


def deepspeed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    atomic_save({"progress": {"step": 1}}, folder / "extra.pt", checksum=False)
    (folder / COMPLETE_MARKER).write_text("deepspeed\n")  # as xp wrote it before checksums
    return folder


@needs_deepspeed
@pytest.mark.parametrize("form", ["zip", "legacy", "raw pickle"])
def test_a_crafted_deepspeed_file_runs_no_code(tmp_path: Path, form: str) -> None:
    marker = tmp_path / "pwned"
    folder = deepspeed_folder(tmp_path)
    evil = {"module": {"w": torch.ones(2)}, "ds_version": Payload(marker)}
    target = folder / "mp_rank_00_model_states.pt"
    if form == "zip":
        torch.save(evil, target)
    elif form == "legacy":  # torch.load unpickles these files unrestricted, several pickles
        torch.save(evil, target, _use_new_zipfile_serialization=False)
    else:
        target.write_bytes(pickle.dumps(evil))
    # DeepSpeed's engine and its zero_to_fp32 read these files with weights_only=False.
    with pytest.raises(CheckpointError, match="is refused") as e:
        export_model_state(folder)
    assert str(target) in str(e.value)
    assert not marker.exists()
