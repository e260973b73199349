"""Case: from launch to the end of step 100, ``python -m xp`` vs the hand-written loop.

The tiny model of :mod:`benchmarks.step`, whole processes, each in a fresh launch
directory holding an empty MLflow store (as a user's second run finds it):

- xp: ``python -m xp`` with MLflow on (the default); the end of step 100 is the MLflow
  timestamp of ``train/loss`` at step 100 (taken on the training thread as the trainer
  hands the metrics over), minus the parent's ``time.time()`` just before the launch;
- xp, ``tracking=off``: the same without MLflow, for the breakdown; its end of step 100
  is when the parent reads the progress bar's ``100/100`` from the pipe;
- baseline: :mod:`benchmarks.loop` without MLflow, which prints ``time.time()`` at the end
  of step 100.

The note also checks that ``python -m xp --cfg job`` imports neither torch nor mlflow
and, outside ``--quick``, lists the slowest imports of one more run of each (``python -X
importtime``; the tracker's MLflow writer is a process of its own, not in that log).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, Workdir, env, interleave, run_json
from benchmarks.step import TINY, xp_overrides

STEP = 100
XP_ARGS = [*xp_overrides(TINY), f"trainer.max_steps={STEP}"]
LOOP_ARGS = ["-m", "benchmarks.loop", "--steps", str(STEP), "--warmup", "50",
             "--mark-step", str(STEP)]  # fmt: skip


def _xp_tracked(work: Workdir, exits: list[float]) -> float:
    launch = work.fresh()
    start = time.time()
    subprocess.run(
        [sys.executable, "-m", "xp", *XP_ARGS],
        cwd=launch, env=env(), capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    exits.append(time.time() - start)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(launch / 'outputs' / 'mlflow.db').as_posix()}")
    (run,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    (point,) = [m for m in history if m.step == STEP]
    return point.timestamp / 1000 - start


def _xp_untracked(work: Workdir) -> float:
    launch = work.fresh()
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xp", *XP_ARGS, "tracking=off", "trainer.progress_bar=true"],
        cwd=launch, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[float] = []
    tail = b""
    while chunk := os.read(proc.stderr.fileno(), 65536):
        tail = (tail + chunk)[-4096:]
        if not seen and f" {STEP}/{STEP} ".encode() in tail:
            seen.append(time.time())
    if proc.wait(timeout=600) != 0 or not seen:
        raise RuntimeError(f"python -m xp tracking=off failed: {tail.decode(errors='replace')}")
    return seen[0] - start


def _plain(exits: list[float]) -> float:
    start = time.time()
    mark = float(run_json(LOOP_ARGS)["mark_time"])
    exits.append(time.time() - start)
    return mark - start


def _import_log(args: list[str], cwd: Path) -> tuple[float, str]:
    """Wall seconds of ``python -X importtime ARGS`` and its import log.

    ``XP_FORK=0``: one process, so one log of everything xp imports (forked, ``python -m
    xp`` imports torch in a child while Hydra composes in the parent; xp/prefork.py).
    """
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        cwd=cwd, env=env(XP_FORK="0"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"python {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, out.stderr


_LINE = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \|( +)(\S+)$")


def _imports(log: str) -> tuple[set[str], list[tuple[float, str]]]:
    """Every imported module, and the top-level imports with their cumulative seconds."""
    names, top = set(), []
    for line in log.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        names.add(m.group(3))
        if len(m.group(2)) == 1:
            top.append((int(m.group(1)) / 1e6, m.group(3)))
    return names, sorted(top, reverse=True)


def _cfg_job(work: Workdir) -> dict[str, Any]:
    seconds, log = _import_log(["-m", "xp", "--cfg", "job"], work.fresh())
    names, top = _imports(log)
    return {
        "seconds": seconds,
        "import_s": sum(s for s, _ in top),
        "torch": any(n == "torch" or n.startswith("torch.") for n in names),
        "mlflow": any(n == "mlflow" or n.startswith("mlflow.") for n in names),
    }


def _slowest(top: list[tuple[float, str]], n: int = 5) -> str:
    return ", ".join(f"{name} {s:.2f}" for s, name in top[:n])


def measure(rounds: int, quick: bool) -> dict[str, Any]:
    """Seconds from launch to the end of step 100: xp (``xp``) and the loop (``baseline``)."""
    work = Workdir()
    exits: dict[str, list[float]] = {"xp": [], "baseline": []}
    try:
        results: dict[str, Any] = interleave(
            rounds,
            {
                "xp": partial(_xp_tracked, work, exits["xp"]),
                "xp_untracked": partial(_xp_untracked, work),
                "baseline": partial(_plain, exits["baseline"]),
            },
            parallel=quick,
        )
        results["exits"] = exits
        results["cfg_job"] = _cfg_job(work)
        if not quick:
            _, xp_log = _import_log(["-m", "xp", *XP_ARGS], work.fresh())
            _, loop_log = _import_log(LOOP_ARGS, REPO)
            results["xp_imports"] = _imports(xp_log)[1]
            results["loop_imports"] = _imports(loop_log)[1]
        return results
    finally:
        work.close()


def note(results: dict[str, Any]) -> str:
    job = results["cfg_job"]
    exits = results["exits"]
    text = (
        f"without MLflow (`tracking=off`) xp reached step {STEP} after "
        f"{statistics.median(results['xp_untracked']):.2f} s (median). Launch to the end of "
        f"the process, MLflow run closed: xp {statistics.median(exits['xp']):.2f} s, the loop "
        f"{statistics.median(exits['baseline']):.2f} s (median). `python -m xp --cfg "
        f"job`: {job['seconds']:.2f} s under `-X importtime`, {job['import_s']:.2f} s of "
        f"imports; imports torch: {'YES' if job['torch'] else 'no'}, mlflow: "
        f"{'YES' if job['mlflow'] else 'no'}."
    )
    if "xp_imports" in results:
        xp_top, loop_top = results["xp_imports"], results["loop_imports"]
        text += (
            f" Imports of one more run (`-X importtime`, seconds, cumulative): xp "
            f"{sum(s for s, _ in xp_top):.2f} ({_slowest(xp_top)}); loop "
            f"{sum(s for s, _ in loop_top):.2f} ({_slowest(loop_top)})."
        )
    return text
