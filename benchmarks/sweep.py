"""Cases: sweeps of short jobs, xp beside the hand-written Hydra + MLflow glue.

The glue is :mod:`benchmarks.glue`: a Hydra app that trains the same one-epoch job (xp's
default experiment: digits MLP, AdamW, 20 steps, validation, a checkpoint) and records a
parent run with a child run per job (params, metrics, the config and the checkpoint as
artifacts). xp's side is ``python -m xp -m optim.lr=<N values> trainer.max_epochs=1``,
which also writes the sweep's summary and records the parent's.

Each round, each side runs sweeps of 8, 32 and 100 jobs (``--quick``: one of 2 jobs, for
every row) one after the other in one launch directory that starts with an empty MLflow store, so
each sweep finds the runs of the ones before it in its experiment (the per-job cost must
not grow with them). The sides take turns going first. Measured, per sweep:

- the whole command, launch to exit (imports, parent run, jobs, summary, exit): the rows;
- the steady time per job: from the start of the second child run to the start of the
  last (MLflow's start times), over the jobs in between; start-up, the first job (which
  pays for what the later ones reuse: imports, the MLflow writer) and the end are left
  out. A sweep of 2 jobs has no such interval: its second job's start less the first's.

With Hydra's basic launcher the jobs run one after the other in the command's process;
with ``hydra/launcher=joblib hydra.launcher.n_jobs=2`` two at a time in joblib's workers.
Distributed jobs (``strategy=ddp strategy.nproc_per_node=2``: each job starts two worker
processes) are compared per job with launching the hand-written DDP script
(:mod:`benchmarks.ddp_plain`, no MLflow) through torchrun once per job.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, Workdir, env, interleave

SIZES = (8, 32, 100)
QUICK_SIZES = (2,)
JOBLIB = ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
DDP_JOBS = 4
QUICK_DDP_JOBS = 2

_cache: dict[tuple[str, int, bool], dict[str, Any]] = {}


def _values(jobs: int) -> str:
    return ",".join(f"{0.001 * (i + 1):.3g}" for i in range(jobs))


def _command(side: str, jobs: int, launcher: tuple[str, ...]) -> list[str]:
    sweep = [f"optim.lr={_values(jobs)}", *launcher]
    if side == "xp":
        return [sys.executable, "-m", "xp", "-m", *sweep, "trainer.max_epochs=1",
                "experiment_name=bench"]  # fmt: skip
    return [sys.executable, "-m", "benchmarks.glue", "-m", *sweep, "experiment_name=bench"]


def _children(launch: Path, since_ms: int) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(launch / 'outputs' / 'mlflow.db').as_posix()}")
    experiment = client.get_experiment_by_name("bench")
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    return [
        r
        for r in runs
        if "mlflow.parentRunId" in r.data.tags and int(r.info.start_time) >= since_ms
    ]


def _sweep(side: str, launch: Path, jobs: int, launcher: tuple[str, ...]) -> dict[str, float]:
    """One sweep of ``jobs`` jobs in ``launch``: its wall seconds and steady seconds per job."""
    since_ms = int(time.time() * 1000)
    load = os.getloadavg()[0]
    began = time.perf_counter()
    out = subprocess.run(
        _command(side, jobs, launcher),
        cwd=launch,
        env=env(
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        ),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    wall = time.perf_counter() - began
    if out.returncode != 0:
        raise RuntimeError(
            f"{side} sweep of {jobs} jobs failed ({out.returncode}):\n{out.stderr[-3000:]}"
        )
    children = _children(launch, since_ms)
    finished = [c for c in children if c.info.status == "FINISHED"]
    if len(finished) != jobs:
        raise RuntimeError(f"{side}: {len(finished)} of {jobs} child runs FINISHED in MLflow")
    return {"wall": wall, "per_job": _steady(children), "load": load}


def _steady(children: list[Any]) -> float:
    starts = sorted(int(c.info.start_time) for c in children)
    first = 1 if len(starts) > 2 else 0
    return (starts[-1] - starts[first]) / 1000 / max(1, len(starts) - 1 - first)


def _sizes(
    side: str, work: Workdir, sizes: tuple[int, ...], launcher: tuple[str, ...]
) -> dict[int, dict[str, float]]:
    launch = work.fresh()
    return {jobs: _sweep(side, launch, jobs, launcher) for jobs in sizes}


def _measure_sweeps(launcher: str, rounds: int, quick: bool) -> dict[str, Any]:
    key = (launcher, rounds, quick)
    if key not in _cache:
        sizes = QUICK_SIZES if quick else SIZES
        args = JOBLIB if launcher == "joblib" else ()
        work = Workdir()
        try:
            _cache[key] = interleave(
                rounds,
                {side: partial(_sizes, side, work, sizes, args) for side in ("xp", "glue")},
                parallel=quick,
            )
        finally:
            work.close()
    return _cache[key]


def _rows(launcher: str, index: int, rounds: int, quick: bool) -> dict[str, Any]:
    measured = _measure_sweeps(launcher, rounds, quick)
    sizes = QUICK_SIZES if quick else SIZES
    jobs = sizes[min(index, len(sizes) - 1)]
    return {
        "xp": [r[jobs]["wall"] for r in measured["xp"]],
        "baseline": [r[jobs]["wall"] for r in measured["glue"]],
        "jobs": jobs,
        "all": measured,
    }


def measure(launcher: str, index: int, rounds: int, quick: bool) -> dict[str, Any]:
    """Wall seconds of the ``index``-th sweep size: xp (``xp``), the glue (``baseline``)."""
    return _rows(launcher, index, rounds, quick)


def note(results: dict[str, Any]) -> str:
    measured, jobs = results["all"], results["jobs"]
    sizes = sorted(measured["xp"][0])
    per_job = {
        side: {n: statistics.median(r[n]["per_job"] for r in measured[side]) for n in sizes}
        for side in ("xp", "glue")
    }
    walls = {
        side: statistics.median(r[jobs]["wall"] for r in measured[side]) for side in ("xp", "glue")
    }
    loads = [r[n]["load"] for side in ("xp", "glue") for r in measured[side] for n in sizes]
    steady = ", ".join(
        f"{n} jobs: xp {per_job['xp'][n]:.2f} s, glue {per_job['glue'][n]:.2f} s" for n in sizes
    )
    fixed = {side: walls[side] - jobs * per_job[side][jobs] for side in ("xp", "glue")}
    return (
        f"steady time per job (between the starts of the second and the last child run, "
        f"median): {steady}. The rest of the {jobs}-job sweep (start-up, the first job's "
        f"own start-up, the end): xp {fixed['xp']:.1f} s, glue {fixed['glue']:.1f} s. The "
        f"sweeps of each round ran in that order in one store. Load average (1 min) at each "
        f"sweep's launch: {min(loads):.1f}-{max(loads):.1f}."
    )


# --------------------------------------------------------------------------- distributed


def _xp_ddp_jobs(work: Workdir, jobs: int) -> dict[str, float]:
    for attempt in (1, 2):
        launch = work.fresh()
        since_ms = int(time.time() * 1000)
        load = os.getloadavg()[0]
        began = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "xp", "-m", f"optim.lr={_values(jobs)}", "strategy=ddp",
             "strategy.nproc_per_node=2", "trainer.max_epochs=1", "experiment_name=bench"],
            cwd=launch, env=env(), capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        wall = time.perf_counter() - began
        if out.returncode == 0:
            break
        _failed(f"xp's sweep of {jobs} ddp jobs", out, attempt)
    children = _children(launch, since_ms)
    if sum(c.info.status == "FINISHED" for c in children) != jobs:
        raise RuntimeError(f"xp ddp sweep: not every one of {jobs} child runs FINISHED")
    return {"wall": wall, "per_job": _steady(children), "load": load}


def _torchrun_jobs(jobs: int) -> dict[str, float]:
    load = os.getloadavg()[0]
    walls = []
    for _ in range(jobs):
        for attempt in (1, 2):
            began = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", str(REPO / "benchmarks" / "ddp_plain.py"),
                 "--steps", "10", "--warmup", "5"],
                cwd=REPO, env=env(), capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if out.returncode == 0:
                walls.append(time.perf_counter() - began)
                break
            _failed("torchrun ddp_plain.py", out, attempt)
    return {"wall": sum(walls), "per_job": statistics.median(walls), "load": load}


def _failed(what: str, out: subprocess.CompletedProcess[str], attempt: int) -> None:
    """Report a failed 2-process launch; the first time, it is tried again (a gloo
    rendezvous on a busy 2-core machine fails now and then: a round is not lost)."""
    message = f"{what} failed (exit {out.returncode}, attempt {attempt}):\n{out.stderr[-3000:]}"
    if attempt > 1:
        raise RuntimeError(message)
    print(f"benchmarks: {message}", file=sys.stderr, flush=True)


def measure_ddp(rounds: int, quick: bool) -> dict[str, Any]:
    """Steady seconds per distributed job: xp's sweep (``xp``), a torchrun launch of the
    hand-written DDP script (``baseline``)."""
    jobs = QUICK_DDP_JOBS if quick else DDP_JOBS
    work = Workdir()
    try:
        measured = interleave(
            rounds,
            {"xp": partial(_xp_ddp_jobs, work, jobs), "torchrun": partial(_torchrun_jobs, jobs)},
            parallel=quick,
        )
    finally:
        work.close()
    return {
        "xp": [r["per_job"] for r in measured["xp"]],
        "baseline": [r["per_job"] for r in measured["torchrun"]],
        "jobs": jobs,
        "all": measured,
    }


def ddp_note(results: dict[str, Any]) -> str:
    measured = results["all"]
    loads = [r["load"] for side in measured.values() for r in side]
    return (
        f"{results['jobs']} jobs a sweep; xp's whole sweep took "
        f"{statistics.median(r['wall'] for r in measured['xp']):.1f} s (median). A "
        "distributed job starts its two workers (a fresh interpreter each, torch imported, "
        "the process group joined) and a writer for its MLflow run, each job anew. Load "
        f"average (1 min) at each launch: {min(loads):.1f}-{max(loads):.1f}."
    )
