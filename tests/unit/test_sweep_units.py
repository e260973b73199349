"""xp.sweep and xp.compare: the config hash, directions, tables, checks; a sweep's jobs sharing
one MLflow writer (in a process of their own)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xp.rundir import JOB_DIR_OVERRIDES_BYTES, job_dir_name
from xp.sweep import (
    SWEEP_KEY_TAG,
    EarlierRun,
    JobRecord,
    _earlier_runs,
    announce,
    config_hash,
    direction_of,
    rank_records,
    reusable,
    sweep_arguments,
    sweep_key,
    swept_params,
)
from xp.table import format_table, markdown_table


def test_config_hash_ignores_where_a_run_is_recorded_but_not_what_it_computes() -> None:
    base = {
        "experiment_name": "a",
        "tracking": {"tracking_uri": "sqlite:///x.db", "flush_interval_s": 2.0},
        "optim": {"lr": 0.001},
        "trainer": {"max_steps": 20, "progress_bar": None, "objective": "val/acc"},
    }
    same = {
        **base,
        "experiment_name": "b",
        "tracking": {"tracking_uri": "http://127.0.0.1:5000", "flush_interval_s": 0.2},
        "trainer": {"max_steps": 20, "progress_bar": True, "objective": "val/loss"},
        "sweep": {"fresh": True},
    }
    assert config_hash(base) == config_hash(same)
    assert config_hash(base) != config_hash({**base, "optim": {"lr": 0.003}})
    assert config_hash(base) != config_hash({**base, "trainer": {"max_steps": 21}})
    assert len(config_hash(base)) == 64


def test_direction_rule() -> None:
    assert direction_of("val/acc") == "max"
    assert direction_of("val/loss") == "min"
    assert direction_of("val/error_rate") == "min"
    assert direction_of("val/loss", "max") == "max"


def test_records_rank_best_first_and_failed_last() -> None:
    records = [
        JobRecord(0, "a", [], "FINISHED", objective=0.5),
        JobRecord(1, "b", [], "FAILED"),
        JobRecord(2, "c", [], "SKIPPED", objective=0.9),
        JobRecord(3, "d", [], "FINISHED", objective=0.7),
    ]
    assert [r.name for r in rank_records(records, "max")] == ["c", "d", "a", "b"]
    assert [r.name for r in rank_records(records, "min")] == ["a", "d", "c", "b"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "optim.lr="], "optim.lr= has no value"),
        (["-m", "optim.lr=0.1,"], "optim.lr=0.1, has an empty value in its list"),
        (["--multirun", "optim.lr=0.1,,0.2"], "has an empty value"),
    ],
)
def test_empty_sweep_values_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sweep_arguments(args)


def test_sweep_arguments_keep_good_commands() -> None:
    args = ["-m", "optim=adamw,sgd", "optim.lr=1e-3,3e-3", "model.hidden_sizes=[64,64]"]
    assert sweep_arguments(args) == args
    assert sweep_arguments(["experiment_name="]) == ["experiment_name="]  # not a sweep
    # hydra/sweeper=optuna alone searches xp's preset space.
    assert sweep_arguments(["-m", "hydra/sweeper=optuna"])[-1] == "search=optuna"
    custom = ["-m", "hydra/sweeper=optuna", "+hydra.sweeper.params.optim.lr=interval(0.1, 1)"]
    assert sweep_arguments(custom) == custom


def test_tables() -> None:
    text = format_table(["run", "val/acc"], [["a", "0.5"], ["bb", "0.75"]])
    assert text.splitlines() == ["run  val/acc", "---  -------", "a        0.5", "bb      0.75"]
    assert markdown_table(["a|b"], [["1"]]).splitlines() == ["| a\\|b |", "| --- |", "| 1 |"]


# --------------------------------------------------------------------------- same sweep


def test_sweep_key_is_the_command_not_its_order_nor_its_sweep_settings() -> None:
    basic = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    launcher = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    key = sweep_key("default", ["optim=adamw,sgd", "optim.lr=1e-3,3e-3"], basic, launcher)
    again = ["optim.lr=1e-3,3e-3", "optim=adamw,sgd", "sweep.fresh=true", "+sweep.direction=max"]
    assert sweep_key("default", again, basic, launcher) == key
    others = [
        sweep_key("default", ["optim.lr=1e-3,3e-3"], basic, launcher),  # the README's joblib line
        sweep_key("other", ["optim=adamw,sgd", "optim.lr=1e-3,3e-3"], basic, launcher),
        sweep_key("default", ["optim=adamw,sgd", "optim.lr=1e-3,3e-3"], "Optuna", launcher),
        sweep_key("default", ["optim=adamw,sgd", "optim.lr=1e-3,3e-3"], basic, "Joblib"),
        sweep_key(
            "default", ["optim=adamw,sgd", "optim.lr=1e-3,3e-3"], basic, launcher, {"a": "1,2"}
        ),
    ]
    assert len({key, *others}) == 6


def _earlier(run_id: str, status: str, job: int, start: int, digest: str = "h") -> EarlierRun:
    return EarlierRun(run_id, status, digest, job, "parent", None, start)


def test_a_finished_run_wins_else_the_newest_stopped_one_resumes() -> None:
    done, killed, failed = (
        _earlier("done", "FINISHED", 0, 1),
        _earlier("killed", "KILLED", 0, 3),
        _earlier("failed", "FAILED", 0, 2),
    )
    assert reusable([killed, done, failed]) == (done, None)
    assert reusable([failed, killed]) == (None, killed)
    assert reusable([killed, _earlier("failed", "FAILED", 0, 4)]) == (None, None)  # newest failed
    assert reusable([]) == (None, None)


def test_the_start_of_a_sweep_says_what_it_skips_and_resumes() -> None:
    earlier = [
        *[_earlier(f"f{n}", "FINISHED", n, n) for n in range(3)],
        _earlier("k", "KILLED", 3, 9),
        _earlier("x", "FAILED", 4, 9),
        _earlier("old", "FINISHED", 9, 1),  # a job this grid no longer has
    ]
    text = announce(earlier, ["p2", "p1"], 8, tracked=True, fresh=False)
    assert text == (
        "xp: this sweep ran before (2 times, last as parent p2): 3 of 8 jobs FINISHED will be "
        "skipped, 1 KILLED will be resumed, 4 will run; sweep.fresh=true runs everything anew."
    )
    new = announce([], [], 4, tracked=True, fresh=False)
    assert new.startswith("xp: a new sweep: all 4 jobs run (runs outside this sweep are never")
    assert "sweep.fresh=true runs everything anew" in new
    fresh = announce(earlier, ["p2"], 8, tracked=True, fresh=True)
    assert (
        fresh
        == "xp: sweep.fresh=true: all 8 jobs run anew, although this sweep ran before (parent p2)."
    )
    lazy = announce(earlier, ["p2"], None, tracked=True, fresh=False)
    assert lazy.startswith(
        "xp: this sweep ran before (parent p2): 4 of its runs FINISHED, 1 KILLED."
    )
    assert "each job says if it is skipped" in lazy
    assert "no job is skipped or resumed" in announce([], [], 2, tracked=False, fresh=False)


def test_earlier_runs_are_those_of_the_same_sweep_only(mlflow_uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("default")
    same = {"xp.config_hash": "h0"}
    plain = client.create_run(experiment, tags=same).info.run_id  # `python -m xp`, no sweep
    client.set_terminated(plain, "FINISHED")
    parent = client.create_run(
        experiment, tags={SWEEP_KEY_TAG: "k1", "xp.sweep_role": "parent"}
    ).info.run_id
    child = client.create_run(
        experiment,
        tags={**same, SWEEP_KEY_TAG: "k1", "mlflow.parentRunId": parent, "xp.sweep_job": "0"},
    ).info.run_id
    client.log_metric(child, "val/acc", 0.25, step=1)
    client.log_metric(child, "val/acc", 0.75, step=2)  # the final step's value counts
    client.set_terminated(child, "KILLED")
    other = client.create_run(
        experiment, tags={**same, SWEEP_KEY_TAG: "k2", "mlflow.parentRunId": "elsewhere"}
    ).info.run_id
    client.set_terminated(other, "FINISHED")

    parents, runs = _earlier_runs(mlflow_uri, "default", "k1")
    assert parents == [parent]
    (run,) = runs
    assert (run.run_id, run.status, run.job, run.parent_run_id) == (child, "KILLED", 0, parent)
    assert run.metrics == {"val/acc": 0.75}
    assert reusable(runs) == (None, run)  # the plain FINISHED run with this config is not reused
    assert _earlier_runs(mlflow_uri, "nowhere", "k1") == ([], [])


# --------------------------------------------------------------------------- job folders


def test_a_long_override_list_gives_a_short_job_folder() -> None:
    overrides = "target_allowlist=[" + ",".join(f"package_{i:03d}." for i in range(30)) + "]"
    assert len(overrides) > 400
    name = job_dir_name(7, overrides)
    assert name.startswith("7_target_allowlist=[package_000.")
    # The folder, and a log file named after it inside it, fit the 255-byte file-name limit.
    assert len(f"{name}.log".encode()) < 255
    assert job_dir_name(7, overrides[:-5] + "X.]") != name  # a cut keeps jobs apart
    assert job_dir_name(0, "optim.lr=0.001,optim=sgd") == "0_optim.lr=0.001,optim=sgd"
    assert job_dir_name(1, "") == "1_"
    assert "/" not in job_dir_name(2, "data.root=/tmp/digits")
    wide = job_dir_name(3, "experiment_name=" + "é" * 200)  # 2 bytes a character
    assert len(wide.encode()) <= 2 + JOB_DIR_OVERRIDES_BYTES + 9
    wide.encode().decode()  # cut between characters, never inside one


def test_swept_values_become_params_that_sort_first() -> None:
    params = swept_params(
        ["optim=sgd", "optim.lr=0.003", "trainer.max_steps=20"], ["optim", "optim.lr"]
    )
    assert params == {"_swept.optim": "sgd", "_swept.optim.lr": "0.003"}
    # MLflow's compare view plots the first three differing params in sort order.
    assert sorted([*params, "checkpoint.keep", "data.batch_size", "model.dropout"])[:2] == list(
        params
    )


# --------------------------------------------------------------------------- xp compare


@pytest.fixture
def many_params(mlflow_uri: str) -> str:
    """Three runs of 121 params (60 differ between them) and an empty run that failed early."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("default")
    for n in range(3):
        run = client.create_run(experiment, run_name=f"run{n}").info.run_id
        params = [Param(f"same.key_{i:02d}", "x") for i in range(60)]
        params += [Param(f"model.layer_{i:02d}", f"value-{n}-{i}" * 3) for i in range(60)]
        params.append(Param("_swept.optim.lr", str(0.001 * (n + 1))))
        for start in range(0, len(params), 100):
            client.log_batch(run, params=params[start : start + 100])
        metrics = {"val/acc": 0.5 + n / 10, "val/loss": 1.0 - n / 10, "train/loss": 2.0}
        client.log_batch(run, metrics=[Metric(k, v, 0, 10) for k, v in metrics.items()])
        client.set_terminated(run, "FINISHED")
    empty = client.create_run(experiment, run_name="failed-early").info.run_id
    client.set_terminated(empty, "FAILED")
    return mlflow_uri


def test_compare_fits_the_terminal_and_keeps_everything_in_all_and_csv(
    many_params: str, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from xp.compare import main

    monkeypatch.setenv("COLUMNS", "100")
    assert main(["default", "--tracking-uri", many_params]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 6 and max(map(len, lines)) <= 100
    # Metrics first (validation ones before the rest), then the swept values.
    assert lines[0].split()[:6] == [
        "run",
        "status",
        "val/acc",
        "val/loss",
        "_swept.optim.lr",
        "run_id",
    ]
    assert "same.key_00" not in out
    assert "xp: 61 more columns did not fit in 100 characters (train/loss, model.layer_00," in err
    assert "--all prints every column, --csv FILE writes them." in err

    table = tmp_path / "runs.csv"
    assert main(["default", "--tracking-uri", many_params, "--all", "--csv", str(table)]) == 0
    out, _ = capsys.readouterr()
    header = out.splitlines()[0].split()
    assert len(header) == 2 + 3 + 121 + 1  # run, status, every metric, every param, run_id
    assert "value-2-59" * 3 in out  # values in full
    with open(table, newline="") as f:
        assert next(csv.reader(f)) == header


def test_a_run_without_params_does_not_make_every_param_differ(many_params: str) -> None:
    from mlflow import MlflowClient

    from xp.compare import compare_table

    client = MlflowClient(many_params)
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert len(runs) == 4
    header, rows = compare_table(runs, "val/acc", None)
    assert header[:4] == ["run", "status", "val/acc", "val/loss"]
    assert [row[0] for row in rows] == ["run2", "run1", "run0", "failed-early"]
    assert "same.key_00" not in header and "model.layer_00" in header
    assert header.index("_swept.optim.lr") < header.index("model.layer_00")


JOBS_IN_ONE_PROCESS = """
import json, os, sys, tempfile
from pathlib import Path
from xp.config import TrackingConfig
from xp.tracking import MlflowTracker, keep_writers

keep_writers(True)  # what SweepCallback.on_job_start does in a job's process
for job in range(2):
    tracker = MlflowTracker(
        TrackingConfig(flush_interval_s=0.05), tracking_uri=sys.argv[1], experiment_name="sweep",
        run_name=f"job {job}", params={"optim.lr": str(job)},
    )
    tracker.start()
    for step in range(1, 21):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    checkpoint = Path(tempfile.mkdtemp()) / "step_00000020.pt"
    checkpoint.write_text("weights")
    tracker.log_artifact(checkpoint)
    tracker.close("FINISHED")
    print(json.dumps({"run_id": tracker.run_id, "writer": tracker._process.pid}), flush=True)
os._exit(0)  # dies between jobs, its writer idle
"""


def test_jobs_in_one_process_share_a_writer_and_each_run_is_complete_when_it_ends(
    mlflow_uri: str, tmp_path: Path
) -> None:
    """A sweep's jobs (Hydra's basic launcher: one process) pay the MLflow writer's start-up
    once: each job's run is FINISHED with every point and file when its close() returns, the
    next job's run goes through the same writer, and the writer leaves with the process."""
    from mlflow import MlflowClient

    script = tmp_path / "jobs.py"
    script.write_text(JOBS_IN_ONE_PROCESS)
    out = subprocess.run(
        [sys.executable, str(script), mlflow_uri], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(jobs) == 2
    assert jobs[0]["writer"] == jobs[1]["writer"]  # one writer for both jobs
    client = MlflowClient(mlflow_uri)
    for job in jobs:
        run = client.get_run(job["run_id"])
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(job["run_id"], "train/loss")) == 20
        assert [a.path for a in client.list_artifacts(job["run_id"])] == ["step_00000020.pt"]
    assert {client.get_run(j["run_id"]).data.params["optim.lr"] for j in jobs} == {"0", "1"}
    deadline = time.monotonic() + 15
    while Path(f"/proc/{jobs[0]['writer']}").exists():
        stat = Path(f"/proc/{jobs[0]['writer']}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            break  # exited; its zombie waits for init
        assert time.monotonic() < deadline, "the kept writer outlived its process"
        time.sleep(0.1)


class _WritesMarker:
    """A pickle payload that, if loaded, writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_job_takes_its_config_as_the_sweep_composed_it_and_never_an_unsigned_file(
    tmp_path: Path,
) -> None:
    """Each job's config is composed once (the sweep's check of the batch) and taken by the
    job that runs it, in any process of the sweep; a file in the sweep directory that this
    sweep did not sign is never unpickled: the job composes its own."""
    import hmac
    import os
    import pickle

    from omegaconf import OmegaConf

    from xp.sweep import _ComposedConfigs

    store = _ComposedConfigs(tmp_path / ".xp_configs", os.urandom(32))
    config = OmegaConf.create({"optim": {"lr": 0.003}, "hydra": {"job": {"num": 0}}})
    store.put(["optim.lr=0.003"], config)
    assert store.take(["optim.lr=0.001"]) is None  # not composed: the job composes it
    taken = store.take(["optim.lr=0.003"])
    assert taken == config
    assert store.take(["optim.lr=0.003"]) is None  # taken once; nothing left behind
    assert list((tmp_path / ".xp_configs").iterdir()) == []

    marker = tmp_path / "marker"
    payload = pickle.dumps(_WritesMarker(marker))
    path = store._path(["optim.lr=0.1"])
    for forged in (
        b"\0" * 32 + payload,
        hmac.new(os.urandom(32), payload, "sha256").digest() + payload,
    ):
        path.write_bytes(forged)
        assert store.take(["optim.lr=0.1"]) is None
        assert not marker.exists()


_COMPOSE_BOTH_WAYS = """
import json, os, sys, tempfile
from pathlib import Path
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf
import xp.sweep.callback as callback
from xp.__main__ import CONF_DIR
from xp.config import register_schemas
from xp.rundir import register_resolvers

register_resolvers()
register_schemas()
jobs = json.loads(sys.argv[1])
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    loader = GlobalHydra.instance().config_loader()
    master = loader.load_configuration("config", ["hydra.sweep.dir=sweep"], RunMode.MULTIRUN)
    callback._compose_each_job_once(None)  # Hydra's own composition, every job in full
    fresh = [OmegaConf.to_yaml(loader.load_sweep_config(master, job)) for job in jobs]
    store = callback._ComposedConfigs(Path(tempfile.mkdtemp()), os.urandom(32))
    callback._compose_each_job_once(store)  # a sweep's: each choice of groups composed once
    kept = [OmegaConf.to_yaml(loader.load_sweep_config(master, job)) for job in jobs]
    print(json.dumps({"fresh": fresh, "kept": kept, "reused": len(callback._KEPT_CONFIGS)}))
"""


def test_a_sweep_composes_each_choice_of_groups_once_and_each_job_as_hydra_would() -> None:
    """The jobs' configs from the sweep's kept compositions equal Hydra's own, job by job:
    value overrides, added and list values, group choices that come back, a dict value."""
    jobs = [
        ["optim=adamw", "optim.lr=0.001"],
        ["optim=adamw", "optim.lr=0.003", "model.hidden_sizes=[64]"],
        ["optim=sgd", "optim.lr=0.001", "+tags.note=a"],
        ["optim=adamw", "optim.lr=0.002"],
        ["optim=sgd", "optim.lr=0.003", "trainer.max_steps=7"],
        ["optim=adamw", "optim={lr: 0.5}"],
        ["optim=adamw", "scheduler=constant", "optim.lr=0.004"],
    ]
    result = subprocess.run(
        [sys.executable, "-c", _COMPOSE_BOTH_WAYS, json.dumps(jobs)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for job, fresh, kept in zip(jobs, out["fresh"], out["kept"], strict=True):
        assert kept == fresh, job
    assert out["reused"] == 3  # adamw, sgd, adamw+constant: merged once each
    import yaml

    kept = [yaml.safe_load(text) for text in out["kept"]]
    assert kept[5]["optim"]["lr"] == 0.5 and kept[1]["model"]["hidden_sizes"] == [64]
    assert kept[3]["optim"]["lr"] == 0.002 and kept[3]["model"]["hidden_sizes"] == [128, 128]
    assert kept[2]["tags"] == {"note": "a"} and not kept[4].get("tags")
