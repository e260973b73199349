"""What a run shows of its progress: a bar on a terminal (a real pty), log lines elsewhere."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.integration.test_cli import only_run, run_dirs

pytestmark = pytest.mark.slow

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO xp: ")


def screen_lines(output: str) -> list[str]:
    """The lines a terminal shows for ``output``: ``\\r`` returns to the line's start,
    ``ESC[K`` erases to its end, text overwrites what is under the cursor."""
    lines: list[str] = []
    line: list[str] = []
    col = 0
    i = 0
    while i < len(output):
        if output.startswith("\x1b[K", i):
            del line[col:]
            i += 3
            continue
        char = output[i]
        i += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            lines.append("".join(line))
            line, col = [], 0
        else:
            if col < len(line):
                line[col] = char
            else:
                line.append(char)
            col += 1
    if line:
        lines.append("".join(line))
    return lines


def test_on_a_terminal_log_lines_print_above_the_bar(workdir: Path) -> None:
    """stderr is a pty: the bar redraws its line, and every log line is a line of its own."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80 columns
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "xp", "trainer.max_epochs=3", "trainer.log_interval_steps=5"],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every holder of the pty's other end has closed it
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    output = b"".join(chunks).decode()
    lines = screen_lines(output)
    bars = [line for line in lines if "step/s" in line]
    logged = [line for line in lines if " INFO xp: " in line]

    assert "\r[" in output, output[-2000:]  # the bar was drawn, in place
    glued = [line for line in lines if "step/s" in line and " INFO xp: " in line]
    assert not glued, "\n".join(glued)
    assert all(LOG_LINE.match(line) for line in logged), "\n".join(logged)
    for epoch in (1, 2, 3):
        assert any(f"INFO xp: epoch {epoch} step {20 * epoch}: val/loss" in x for x in logged)
    # The bar ends on its last state, below the epochs' lines, counting epochs as they do.
    (bar,) = bars
    assert bar.startswith("[" + "#" * 30 + "] 60/60 ") and " epoch 3 loss " in bar, bar
    assert len(bar) < 80  # longer, it would wrap, and each redraw would leave a line behind
    assert lines.index(bar) > lines.index(next(x for x in logged if "epoch 3 step 60" in x))
    assert "finished; log_dir" in stdout


def test_without_a_terminal_a_run_logs_progress_lines(xp, workdir: Path, store) -> None:
    """stderr is a pipe (a log file, CI, Slurm, nohup): no bar, a plain line every interval,
    in the console and in the run's log; epochs count from 1 there and in train/epoch."""
    result = xp("trainer.max_epochs=3", "trainer.progress_interval_s=0.01")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr and "[#" not in result.stderr
    progress = re.compile(
        r" INFO xp: step (\d+)/60 \((\d+)%\) epoch ([123])/3 loss \d+\.\d{4} lr \S+ "
        r"\d+\.\d step/s ETA \d+:\d\d:\d\d$"
    )
    found = [m for m in map(progress.search, result.stderr.splitlines()) if m]
    assert len(found) >= 3, result.stderr
    for match in found:
        step, percent, epoch = (int(g) for g in match.groups())
        assert percent == 100 * step // 60
        assert epoch == (step - 1) // 20 + 1  # steps 1-20 are epoch 1, as the log says
    (log_dir,) = run_dirs(workdir)
    log = (log_dir / f"{log_dir.name}.log").read_text()
    assert sum(1 for line in log.splitlines() if progress.search(line)) == len(found)

    run = only_run(store)
    epochs = store.get_metric_history(run.info.run_id, "train/epoch")
    assert [(m.step, m.value) for m in epochs][:2] == [(10, 1.0), (20, 1.0)]
    assert [(m.step, m.value) for m in epochs][-2:] == [(50, 3.0), (60, 3.0)]


def test_progress_lines_are_steady_in_time_not_tied_to_log_steps(xp, workdir: Path) -> None:
    """No log step in the whole run (trainer.log_interval_steps beyond its end): the lines
    still come every interval, from their own thread, with what is known (no metrics yet)."""
    result = xp(
        "trainer.max_epochs=100",
        "trainer.log_interval_steps=100000",
        "trainer.progress_interval_s=0.1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    progress = re.compile(
        r" INFO xp: step (\d+)/2000 \(\d+%\) epoch (\d+)/100 "
        r"(?:\d+\.\d step/s ETA (?:\d+:\d\d:\d\d|\?)|validation for \d+:\d\d:\d\d)$"
    )
    lines = [line for line in result.stderr.splitlines() if " INFO xp: step " in line]
    assert len(lines) >= 3, result.stderr  # 2000 steps take well over 0.3 s
    for line in lines:
        match = progress.search(line)
        assert match, line
        step, epoch = int(match.group(1)), int(match.group(2))
        assert epoch == max(1, -(-step // 20)), line  # the epoch that step belongs to
    assert "loss" not in "".join(lines)  # nothing logged: no metrics to show


def test_resume_downloads_print_no_progress_bars_into_logs(xp, workdir: Path, store) -> None:
    """resume= of a run whose directory is gone fetches it from MLflow's artifacts; in a log
    (stderr not a terminal) MLflow's download bars would be lines of tqdm noise."""
    assert xp("trainer.max_epochs=2").returncode == 0
    run = only_run(store)
    (log_dir,) = run_dirs(workdir)
    shutil.rmtree(log_dir)
    result = xp(f"resume={run.info.run_id}", "trainer.max_epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (log_dir / ".hydra" / "config.yaml").is_file()  # fetched (a folder: MLflow's bar)
    assert "Downloading artifacts" not in result.stderr and "it/s]" not in result.stderr, (
        result.stderr[-3000:]
    )
