"""xp.sweep and xp.compare without processes: the config hash, directions, tables, checks."""

from __future__ import annotations

import pytest

from xp.compare import format_table, markdown_table
from xp.sweep import JobRecord, config_hash, direction_of, rank_records, sweep_arguments


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
