"""Cases: a single run from its launch, ``python -m xp`` vs the hand-written loop.

The tiny model of :mod:`benchmarks.step`, whole processes, each in a fresh launch
directory holding an empty MLflow store (as a user's second run finds it). Every time is
measured from the launch, as a user waits: the benchmark's ``time.time()`` just before it
starts the command.

- xp: ``python -m xp`` with MLflow on (the default); the end of step 100 is the MLflow
  timestamp of ``train/loss`` at step 100 (taken on the training thread as the trainer
  hands the metrics over);
- xp, ``tracking=off``: the same without MLflow, for the breakdown; its end of step 100
  is when the benchmark reads the progress bar's ``100/100`` from the pipe;
- baseline: :mod:`benchmarks.loop` without MLflow, which prints ``time.time()`` at the end
  of step 100;
- the loop with MLflow (``--mlflow``: params, the loss every 10 steps, the config as an
  artifact, all in its own process), the baseline of the memory case.

Rows: launch to the end of step 100 (``startup``); launch to the end of the process, the
MLflow run closed (``startup_exit``), against the loop without MLflow; the peak resident
memory of the whole process tree (``memory``, :mod:`benchmarks.tree`: xp's composing
parent, training process and MLflow writer), against the loop with MLflow.

The note also checks that ``python -m xp --cfg job`` imports neither torch nor mlflow
and, outside ``--quick``, lists the slowest imports of one more run of each (``python -X
importtime``; the tracker's MLflow writer is a process of its own, not in that log).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, Workdir, env, interleave
from benchmarks.step import TINY, xp_overrides
from benchmarks.tree import TreeRun, run_tree

STEP = 100
XP_ARGS = [*xp_overrides(TINY), f"trainer.max_steps={STEP}"]
LOOP_ARGS = ["-m", "benchmarks.loop", "--steps", str(STEP), "--warmup", "50",
             "--mark-step", str(STEP)]  # fmt: skip


def _checked(run: TreeRun, what: str) -> TreeRun:
    if run.returncode != 0:
        raise RuntimeError(f"{what} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return run


def _xp_tracked(work: Workdir) -> dict[str, Any]:
    launch = work.fresh()
    run = _checked(
        run_tree([sys.executable, "-m", "xp", *XP_ARGS], cwd=launch, env=env()), "python -m xp"
    )
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(launch / 'outputs' / 'mlflow.db').as_posix()}")
    (found,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    history = client.get_metric_history(found.info.run_id, "train/loss")
    (point,) = [m for m in history if m.step == STEP]
    return _result(run, point.timestamp / 1000 - run.start)


def _result(run: TreeRun, step_s: float) -> dict[str, Any]:
    return {
        "step": step_s,
        "exit": run.exit_s,
        "memory": run.peak_sum_mib,
        "memory_of_sum": run.peak_of_sum_mib,
        "peaks": run.peaks,
    }


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


def _plain(work: Workdir, mlflow: bool) -> dict[str, Any]:
    args = list(LOOP_ARGS)
    if mlflow:
        store = work.fresh() / "outputs" / "mlflow.db"
        args += ["--mlflow", f"sqlite:///{store.as_posix()}"]
    run = _checked(run_tree([sys.executable, *args], cwd=REPO, env=env()), "the loop")
    line = next(line for line in reversed(run.stdout.splitlines()) if line.startswith("{"))
    return _result(run, float(json.loads(line)["mark_time"]) - run.start)


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


_cache: dict[tuple[int, bool], dict[str, Any]] = {}


def _measure(rounds: int, quick: bool) -> dict[str, Any]:
    if (rounds, quick) in _cache:
        return _cache[(rounds, quick)]
    work = Workdir()
    try:
        results: dict[str, Any] = interleave(
            rounds,
            {
                "xp": partial(_xp_tracked, work),
                "xp_untracked": partial(_xp_untracked, work),
                "loop": partial(_plain, work, False),
                "loop_mlflow": partial(_plain, work, True),
            },
            parallel=quick,
        )
        results["cfg_job"] = _cfg_job(work)
        if not quick:
            _, xp_log = _import_log(["-m", "xp", *XP_ARGS], work.fresh())
            _, loop_log = _import_log(LOOP_ARGS, REPO)
            results["xp_imports"] = _imports(xp_log)[1]
            results["loop_imports"] = _imports(loop_log)[1]
        _cache[(rounds, quick)] = results
        return results
    finally:
        work.close()


def _pick(results: dict[str, Any], key: str, baseline: str) -> dict[str, Any]:
    return {
        "raw": results,
        "xp": [r[key] for r in results["xp"]],
        "baseline": [r[key] for r in results[baseline]],
    }


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def measure(rounds: int, quick: bool) -> dict[str, Any]:
    """Seconds from launch to the end of step 100: xp (``xp``), the loop (``baseline``)."""
    return _pick(_measure(rounds, quick), "step", "loop")


def measure_exit(rounds: int, quick: bool) -> dict[str, Any]:
    """Seconds from launch to the end of the process: xp with MLflow, the loop without."""
    return _pick(_measure(rounds, quick), "exit", "loop")


def measure_memory(rounds: int, quick: bool) -> dict[str, Any]:
    """MiB, the sum of the process tree's peaks: xp with MLflow, the loop with MLflow."""
    return _pick(_measure(rounds, quick), "memory", "loop_mlflow")


def note(results: dict[str, Any]) -> str:
    raw = results["raw"]
    job = raw["cfg_job"]
    text = (
        f"without MLflow (`tracking=off`) xp reached step {STEP} after "
        f"{statistics.median(raw['xp_untracked']):.2f} s (median); the loop with MLflow "
        f"after {_median(raw['loop_mlflow'], 'step'):.2f} s. `python -m xp --cfg "
        f"job`: {job['seconds']:.2f} s under `-X importtime`, {job['import_s']:.2f} s of "
        f"imports; imports torch: {'YES' if job['torch'] else 'no'}, mlflow: "
        f"{'YES' if job['mlflow'] else 'no'}."
    )
    if "xp_imports" in raw:
        xp_top, loop_top = raw["xp_imports"], raw["loop_imports"]
        text += (
            f" Imports of one more run (`-X importtime`, seconds, cumulative): xp "
            f"{sum(s for s, _ in xp_top):.2f} ({_slowest(xp_top)}); loop "
            f"{sum(s for s, _ in loop_top):.2f} ({_slowest(loop_top)})."
        )
    return text


def exit_note(results: dict[str, Any]) -> str:
    raw = results["raw"]
    after = statistics.median(r["exit"] - r["step"] for r in raw["xp"])
    loop_after = statistics.median(r["exit"] - r["step"] for r in raw["loop"])
    return (
        f"after step {STEP}: xp {after:.2f} s to its exit (the MLflow run closed, its files "
        f"uploaded), the loop {loop_after:.2f} s (median); the loop with MLflow exits after "
        f"{_median(raw['loop_mlflow'], 'exit'):.2f} s."
    )


def memory_note(results: dict[str, Any]) -> str:
    raw = results["raw"]
    by_role: dict[str, list[float]] = {}
    for run in raw["xp"]:
        ordered = sorted(run["peaks"].items(), key=lambda kv: int(kv[0].rsplit("[", 1)[1][:-1]))
        for role, (name, peak) in zip(
            ("parent", "training", "writer"), _roles(ordered), strict=False
        ):
            by_role.setdefault(f"{role} ({name.rsplit('[', 1)[0]})", []).append(peak)
    parts = ", ".join(f"{role} {statistics.median(v):.0f}" for role, v in by_role.items())
    return (
        f"sum of each process's peak resident set (VmHWM, MiB, median): xp {parts}; the "
        f"loop without MLflow {_median(raw['loop'], 'memory'):.0f}. The peak of the sampled "
        f"sum: xp {_median(raw['xp'], 'memory_of_sum'):.0f}, the loop with MLflow "
        f"{_median(raw['loop_mlflow'], 'memory_of_sum'):.0f}."
    )


def _roles(ordered: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """xp's processes by pid: the command, then its forked training process (the largest
    of the ``xp`` ones after it), then the MLflow writer."""
    parent = ordered[:1]
    rest = ordered[1:]
    training = [max((kv for kv in rest if kv[0].startswith("xp[")), key=lambda kv: kv[1],
                    default=("?[0]", 0.0))]  # fmt: skip
    writer = [kv for kv in rest if kv[0].startswith("xp._tracking_worker")][:1]
    return parent + training + writer
