"""``xp compare``: a table of runs, the params that differ between them and their final metrics.

``python -m xp compare <parent run id | experiment name> [--sort METRIC] [--csv FILE]``

A parent run id compares the jobs of that sweep (its child runs); an experiment name
compares every run of the experiment except sweep parents.
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

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class CompareError(ValueError):
    """What was given to ``xp compare`` names no runs; says what to give instead."""


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, columns aligned, numbers right-aligned."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        bool(rows) and all(_is_number(row[i]) or not row[i] for row in rows)
        for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
    runs: Sequence[Any], sort: str | None, direction: str | None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: run, status, the params that differ, every final metric.

    Raises:
        CompareError: ``sort`` is not a metric of these runs.
    """
    from xp.sweep import direction_of

    params = [r.data.params for r in runs]
    keys = sorted({k for p in params for k in p})
    differing = [k for k in keys if len({p.get(k) for p in params}) > 1]
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
        metrics = [sort, *[m for m in metrics if m != sort]]
    header = ["run", "status", *differing, *metrics, "run_id"]
    rows = [
        [
            r.info.run_name or "",
            r.info.status,
            *[r.data.params.get(k, "") for k in differing],
            *[_number(r.data.metrics.get(m)) for m in metrics],
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
    parser.add_argument("--csv", metavar="FILE", type=Path, help="also write the table here")
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
    from mlflow import MlflowClient

    try:
        runs, objective = _runs(MlflowClient(uri), args.runs)
        sort = args.sort or (
            objective if objective and any(objective in r.data.metrics for r in runs) else None
        )
        header, rows = compare_table(runs, sort, args.direction)
    except CompareError as e:
        print(f"xp: error: {e}", file=sys.stderr)
        return 1
    print(format_table(header, rows))
    if args.csv is not None:
        tmp = args.csv.with_name(f".{args.csv.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
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
