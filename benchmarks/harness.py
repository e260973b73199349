"""What the cases share: a clean environment, subprocesses that answer in JSON, rounds."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
"""glibc's thresholds that the allocator case compares against its defaults."""


def env(**extra: str) -> dict[str, str]:
    """This environment with one torch thread, no store or run of the caller's, no malloc tuning."""
    out = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "XP_TIMESTAMP", "XP_LAUNCH_DIR"):
        out.pop(var, None)
    for var in MALLOC_ENV:
        if var not in extra:
            out.pop(var, None)
    return out


def run_json(args: list[str], *, cwd: Path | None = None, **extra_env: str) -> dict[str, Any]:
    """Run ``python ARGS`` and return the last JSON line it printed."""
    out = subprocess.run(
        [sys.executable, *args],
        cwd=cwd or REPO,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    line = next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{"))
    return json.loads(line)


_template: Path | None = None


def _empty_store() -> Path:
    """An empty MLflow store, created once per ``python -m benchmarks`` (~2 s of migrations)."""
    global _template
    if _template is None:
        folder = Path(tempfile.mkdtemp(prefix="xp-bench-store-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        store = folder / "mlflow.db"
        subprocess.run(
            [sys.executable, "-c", "import sys; from mlflow import MlflowClient; "
             "MlflowClient(sys.argv[1]).search_experiments(max_results=1)",
             f"sqlite:///{store.as_posix()}"],
            env=env(), capture_output=True, check=True, timeout=300,
        )  # fmt: skip
        _template = store
    return _template


class Workdir:
    """A temporary folder of launch directories, each with an empty MLflow store at
    ``outputs/mlflow.db``, as a user's second run finds it (copied, not migrated again)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="xp-bench-"))

    def fresh(self) -> Path:
        """A new launch directory with a copy of the empty store."""
        launch = Path(tempfile.mkdtemp(prefix="launch", dir=self.root))
        (launch / "outputs").mkdir()
        shutil.copyfile(_empty_store(), launch / "outputs" / "mlflow.db")
        return launch

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def interleave(
    rounds: int, variants: dict[str, Callable[[], Any]], *, parallel: bool = False
) -> dict[str, list[Any]]:
    """Each variant once per round; each round starts one variant later (A B C, B C A, ...),
    so neither the order in a round nor a drift of the machine favours one.

    ``parallel`` runs two at a time: for ``--quick``, which only checks that things run.
    """
    names = list(variants)
    order = [n for r in range(rounds) for n in names[r % len(names) :] + names[: r % len(names)]]
    if parallel:
        with ThreadPoolExecutor(max_workers=2) as pool:
            done = list(pool.map(lambda name: (name, variants[name]()), order))
    else:
        done = [(name, variants[name]()) for name in order]
    out: dict[str, list[Any]] = {name: [] for name in names}
    for name, value in done:
        out[name].append(value)
    return out
