"""A sweep's summary: its jobs' records, best first, as ``summary.csv``, ``summary.md``
and a table for the terminal."""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from xp.sweep.records import JOBS_DIR, JobRecord


def _load_records(sweep_dir: Path) -> list[JobRecord]:
    folder = sweep_dir / JOBS_DIR
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.glob("*.json")):
        with contextlib.suppress(ValueError, OSError, TypeError):
            records.append(JobRecord(**json.loads(path.read_text())))
    return sorted(records, key=lambda r: r.num)


def rank_records(records: Sequence[JobRecord], direction: str) -> list[JobRecord]:
    """Best first by objective (``direction`` max or min); jobs without one last, by number."""

    def key(record: JobRecord) -> tuple[int, float, int]:
        value = record.objective
        if value is None or math.isnan(value) or record.status == "FAILED":
            return (1, 0.0, record.num)
        return (0, -value if direction == "max" else value, record.num)

    return sorted(records, key=key)


def summary_rows(
    records: Sequence[JobRecord], objective: str, direction: str
) -> tuple[list[str], list[list[str]]]:
    """The summary table: header and rows, best job first."""
    ranked = rank_records(records, direction)
    kind = objective.split("/")[0] + "/"  # val/acc: the other val/ metrics next to it
    metrics = sorted(
        {k for r in ranked for k in r.metrics} - {objective},
        key=lambda m: (not m.startswith(kind), m),
    )
    header = ["job", "overrides", "status", objective, *metrics, "run_id", "run_dir", "note"]
    rows = []
    for r in ranked:
        value = r.objective if r.objective is not None else r.metrics.get(objective)
        rows.append(
            [
                str(r.num),
                r.name,
                r.status,
                _number(value),
                *[_number(r.metrics.get(k)) for k in metrics],
                r.run_id or "",
                r.run_dir or "",
                r.note,
            ]
        )
    return header, rows


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def write_summary(
    sweep_dir: Path, records: Sequence[JobRecord], objective: str, direction: str
) -> str:
    """Write ``summary.csv`` and ``summary.md`` into the sweep directory; the terminal table."""
    from xp.table import fit_table, format_table, markdown_table, terminal_width

    header, rows = summary_rows(records, objective, direction)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    counts = {s: sum(r.status == s for r in records) for s in ("FINISHED", "SKIPPED", "FAILED")}
    title = (
        f"Sweep {sweep_dir.name}: {len(records)} jobs ({counts['FINISHED']} finished, "
        f"{counts['SKIPPED']} skipped, {counts['FAILED']} failed), best first by {objective} "
        f"({direction})"
    )
    (sweep_dir / "summary.md").write_text(f"# {title}\n\n{markdown_table(header, rows)}\n")
    # The terminal gets the short form: no directories, run ids cut to 8 characters, the
    # columns that fit its width (every one is in summary.csv and summary.md).
    keep = [i for i, h in enumerate(header) if h not in ("overrides", "run_dir")]
    names = [
        "#" if header[i] == "job" else "run" if header[i] == "run_id" else header[i] for i in keep
    ]
    names.insert(1, "job")
    ids = header.index("run_id")
    short = [
        [row[keep[0]], row[1], *(row[i][:8] if i == ids else row[i] for i in keep[1:])]
        for row in rows
    ]
    width = terminal_width()
    limits = {"job": 60, "note": 60}
    shown, cells, left = fit_table(names, short, width, ["status", objective, "run"], limits)
    note = ""
    if left:
        note = f"\n({', '.join(left)} did not fit in {width} characters: see the summary)"
    return f"{title}\n{format_table(shown, cells)}{note}\nSummary: {sweep_dir / 'summary.md'}"
