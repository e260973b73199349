"""``xp compare``: a table of runs, the params that differ between them and their final metrics.

``python -m xp compare <parent run id | experiment name> [--sort METRIC] [--all] [--csv FILE]``

A parent run id compares the jobs of that sweep (its child runs); an experiment name
compares every run of the experiment except sweep parents. Metrics are MLflow's: each
metric's latest value (at the run's last step). The terminal gets the columns that
matter first (the sort metric, the swept values, the other metrics, the params that
differ), as many as fit its width; ``--all`` prints every param and metric in full, and
``--csv`` writes them all.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xp.table import fit_table, format_table, terminal_width

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class CompareError(ValueError):
    """What was given to ``xp compare`` names no runs; says what to give instead."""


def _runs(client: Any, spec: str) -> tuple[list[Any], str | None]:
    """The runs ``spec`` names, and the objective their sweep was ranked by (if any)."""
    from mlflow.exceptions import MlflowException

    if RUN_ID.match(spec):
        try:
            parent = client.get_run(spec)
        except MlflowException as e:
            raise CompareError(
                f"{spec} is not a run in this store; give a sweep's parent run id or an "
                "experiment name (`python -m xp ui` lists both), or set --tracking-uri."
            ) from e
        runs = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{spec}'",
            max_results=10000,
        )
        if not runs:
            raise CompareError(
                f"run {spec} has no child runs; give the parent run of a sweep (its tag "
                "xp.sweep_role is parent) or an experiment name."
            )
        return runs, parent.data.tags.get("xp.objective")
    experiment = client.get_experiment_by_name(spec)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(
            f"{spec!r} is neither a run id nor an experiment in this store; the experiments "
            f"are: {', '.join(names) or 'none'}."
        )
    runs = client.search_runs([experiment.experiment_id], max_results=10000)
    runs = [r for r in runs if r.data.tags.get("xp.sweep_role") != "parent"]
    if not runs:
        raise CompareError(f"experiment {spec!r} has no runs to compare.")
    return runs, None


def compare_table(
    runs: Sequence[Any],
    sort: str | None,
    direction: str | None,
    *,
    every_param: bool = False,
) -> tuple[list[str], list[list[str]]]:
    """Header and rows, best first by ``sort``: run, status, metrics, params, run_id.

    Metrics come first: ``sort``, then those of its kind (``val/...`` for ``val/acc``;
    ``val/`` without ``sort``), then the rest. Params: the swept values that xp adds to
    sweep jobs (``_swept.*``) first, then the others in name order; only those that
    differ between the runs unless ``every_param`` (runs without any params, such as a job
    that failed before it started, do not make a param differ).

    Raises:
        CompareError: ``sort`` is not a metric of these runs.
    """
    from xp.sweep import direction_of

    params = [r.data.params for r in runs]
    keys = sorted({k for p in params for k in p}, key=lambda k: (not k.startswith("_swept."), k))
    voting = [p for p in params if p]
    if not every_param:
        keys = [k for k in keys if len({p.get(k) for p in voting}) > 1]
    metrics = sorted({k for r in runs for k in r.data.metrics})
    if sort is not None and sort not in metrics:
        raise CompareError(
            f"--sort {sort}: no run has this metric; the metrics are: {', '.join(metrics)}."
        )
    ordered = list(runs)
    if sort is not None:
        descending = direction_of(sort, direction) == "max"

        def key(run: Any) -> tuple[int, float]:
            value = run.data.metrics.get(sort)
            if value is None or math.isnan(value):
                return (1, 0.0)
            return (0, -value if descending else value)

        ordered.sort(key=key)
    kind = (sort or "val/").split("/")[0] + "/"
    metrics.sort(key=lambda m: (m != sort, not m.startswith(kind), m))
    header = ["run", "status", *metrics, *keys, "run_id"]
    rows = [
        [
            r.info.run_name or "",
            r.info.status,
            *[_number(r.data.metrics.get(m)) for m in metrics],
            *[r.data.params.get(k, "") for k in keys],
            r.info.run_id,
        ]
        for r in ordered
    ]
    return header, rows


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def main(argv: Sequence[str]) -> int:
    """The ``xp compare`` subcommand; returns its exit status."""
    parser = argparse.ArgumentParser(
        prog="xp compare",
        description="A table of runs: the params that differ between them and their final "
        "metrics. A sweep's parent run id compares its jobs; an experiment name, its runs.",
    )
    parser.add_argument("runs", metavar="PARENT_RUN_ID|EXPERIMENT")
    parser.add_argument(
        "--sort",
        metavar="METRIC",
        help="best first by this metric (default: the sweep's objective, when it has one)",
    )
    parser.add_argument(
        "--direction",
        choices=("max", "min"),
        help="for --sort; default: min for a loss or error, else max",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="every param (also those that are the same in every run) and metric, values "
        "in full, however wide (default: what fits the terminal, the most telling first)",
    )
    parser.add_argument(
        "--csv",
        metavar="FILE",
        type=Path,
        help="also write the table here, with every param and metric",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else ./outputs/mlflow.db",
    )
    args = parser.parse_args(list(argv))
    launch = Path(os.environ.get("XP_LAUNCH_DIR") or os.getcwd())
    uri = args.tracking_uri or _existing_store(launch)
    if uri is None:
        print(
            f"xp: error: there is no MLflow store at {launch / 'outputs' / 'mlflow.db'}; run "
            "from the directory the runs were started in, or give --tracking-uri.",
            file=sys.stderr,
        )
        return 1
    from xp.tracking import client

    try:
        runs, objective = _runs(client(uri), args.runs)
        sort = args.sort or (
            objective if objective and any(objective in r.data.metrics for r in runs) else None
        )
        full = compare_table(runs, sort, args.direction, every_param=True)
        header, rows = full if args.all else compare_table(runs, sort, args.direction)
    except CompareError as e:
        print(f"xp: error: {e}", file=sys.stderr)
        return 1
    if args.all:
        print(format_table(header, rows))
    else:
        width = terminal_width()
        metrics = [h for h in header if h in {k for r in runs for k in r.data.metrics}]
        swept = [h for h in header if h.startswith("_swept.")]
        first = [*metrics[:1], *swept, "run_id", *metrics[1:]]
        limits = {"run": 40, "run_id": 32}
        shown, cells, left = fit_table(header, rows, width, first, limits)
        print(format_table(shown, cells))
        if left:
            names = ", ".join(left[:4]) + (", ..." if len(left) > 4 else "")
            print(
                f"xp: {len(left)} more column{'s' * (len(left) != 1)} did not fit in {width} "
                f"characters ({names}); --all prints every column, --csv FILE writes them.",
                file=sys.stderr,
            )
    if args.csv is not None:
        tmp = args.csv.with_name(f".{args.csv.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(full[0])
            writer.writerows(full[1])
        os.replace(tmp, args.csv)
        print(f"Wrote {args.csv}")
    return 0


def _existing_store(launch: Path) -> str | None:
    """$MLFLOW_TRACKING_URI, or the default SQLite store if it exists (never created here)."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_env:
        return from_env
    db = launch.absolute() / "outputs" / "mlflow.db"
    return f"sqlite:///{db.as_posix()}" if db.is_file() else None
