"""Claiming a run directory: exactly one launch gets each, a taken one is never written."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from xp.rundir import CLAIM_FILE, RunDirError, claim, claimed_here, experiment_name_error


def test_a_new_directory_is_claimed_with_its_claim_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XP_TIMESTAMP", "20260101_000000")
    path = tmp_path / "exp" / "20260101_000000"
    assert claim(path, named_by_timestamp=True) == path
    assert (path / CLAIM_FILE).is_file()
    assert os.environ["XP_RUN_DIR"] == str(path)
    assert claimed_here(path / "0_job") and not claimed_here(tmp_path / "exp" / "other")


def test_a_taken_timestamp_gives_way_to_the_next_free_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XP_TIMESTAMP", "20260101_000000")
    taken = tmp_path / "exp" / "20260101_000000"
    (taken / "checkpoints").mkdir(parents=True)
    (taken.with_name("20260101_000000_2")).mkdir()
    (taken.with_name("20260101_000000_2") / CLAIM_FILE).touch()  # claimed a moment ago
    claimed = claim(taken, named_by_timestamp=True)
    assert claimed.name == "20260101_000000_3"
    assert os.environ["XP_TIMESTAMP"] == "20260101_000000_3"  # the log and MLflow follow it
    assert list((taken / "checkpoints").iterdir()) == []


def test_a_named_directory_that_holds_a_run_is_refused_with_the_fixes(tmp_path: Path) -> None:
    path = tmp_path / "custom"
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "step_00000010.pt").write_bytes(b"weights")
    (path / "metrics.json").write_text("{}")
    with pytest.raises(RunDirError) as e:
        claim(path, named_by_timestamp=False)
    assert f"hydra.run.dir={path} already holds another run's files" in str(e.value)
    assert f"resume={path}" in str(e.value) and "new or empty directory" in str(e.value)
    assert sorted(p.name for p in path.iterdir()) == ["checkpoints", "metrics.json"]
    (path / "checkpoints" / "step_00000010.pt").unlink()  # a run with nothing to resume
    with pytest.raises(RunDirError) as e:
        claim(path, named_by_timestamp=False)
    assert "stopped before its first checkpoint" in str(e.value) and "resume=" not in str(e.value)
    assert f"rm -r {path}" in str(e.value)


def test_an_empty_named_directory_is_claimed(tmp_path: Path) -> None:
    path = tmp_path / "made_by_the_user"
    path.mkdir()
    assert claim(path, named_by_timestamp=False) == path


def _claim_in_child(path: str, by_timestamp: bool, barrier, results) -> None:
    os.environ["XP_TIMESTAMP"] = Path(path).name
    barrier.wait()
    try:
        results.put(str(claim(Path(path), named_by_timestamp=by_timestamp)))
    except RunDirError:
        results.put("refused")


@pytest.mark.parametrize("by_timestamp", [True, False], ids=["timestamp", "named"])
def test_eight_processes_racing_for_one_directory_never_share_it(
    tmp_path: Path, by_timestamp: bool
) -> None:
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    path = str(tmp_path / "exp" / "20260101_000000")
    procs = [
        ctx.Process(target=_claim_in_child, args=(path, by_timestamp, barrier, results))
        for _ in range(8)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    claimed = [g for g in got if g != "refused"]
    if by_timestamp:
        assert len(set(claimed)) == 8  # eight launches, eight directories
    else:
        assert claimed == [path] and got.count("refused") == 7


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../../x", "outside outputs"),
        ("/etc/x", "outside outputs"),
        ("a/../../b", "outside outputs"),
        (".", "outside outputs"),
        ("", "is empty"),
        ("x" * 300, "300 characters long"),
        ("tab\there", "control characters"),
    ],
)
def test_experiment_names_that_are_not_folder_names_are_refused(name: str, why: str) -> None:
    error = experiment_name_error(name)
    assert error is not None and why in error


@pytest.mark.parametrize("name", ["default", "team/probe", "probe_1.2-x", "Ünïcode"])
def test_plain_experiment_names_are_accepted(name: str) -> None:
    assert experiment_name_error(name) is None


def test_a_claim_the_launch_never_used_is_removed_at_exit(tmp_path: Path) -> None:
    """A launch refused after its claim (a sweep whose settings are wrong) leaves nothing."""
    import subprocess
    import sys

    script = (
        "import os, sys; from pathlib import Path; from xp.rundir import claim; "
        "os.environ['XP_LAUNCH_DIR'] = sys.argv[1]; exp = Path(sys.argv[1]) / 'outputs' / 'exp'; "
        "claim(exp / 'multirun' / 'x', named_by_timestamp=False); "
        "used = claim(exp / 'used', named_by_timestamp=False); "
        "(used / 'run.json').write_text('{}')"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    assert not (tmp_path / "outputs" / "exp" / "multirun").exists()
    assert (tmp_path / "outputs" / "exp" / "used" / "run.json").is_file()
