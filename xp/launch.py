"""One run per launch: handing the claimed run directory to every rank, and starting workers.

Under a launcher every rank runs ``python -m xp`` and Hydra composes on each; rank 0
claims the run directory (:mod:`xp.rundir`) and hands the final timestamp, which names
it, to the other ranks before any of them makes a directory. Without a launcher,
``strategy.nproc_per_node > 1`` starts the workers through torch's elastic agent, the
engine of torchrun; they inherit the claim.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

from xp.dist import (
    DistInfo,
    Launcher,
    free_port,
    port_error,
    port_in_use,
)
from xp.log import say

LAUNCHER_ENV = "XP_LAUNCHER_PID"
"""Set for the workers of xp's own launcher: the pid they live and die with."""

RESULT_ENV = "XP_RESULT_FILE"
"""Set for the workers of xp's own launcher: where rank 0 leaves the run's objective."""


def hand_back(objective: float | None) -> None:
    """Rank 0 of xp's own workers: the objective this launch computed, for its launcher.

    A file of this launch alone (never the run directory's ``metrics.json``, which a
    resumed job's earlier attempt wrote): what a sweeper gets is what the run logged.
    """
    path = os.environ.get(RESULT_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        Path(path).write_text(json.dumps(objective))


def run_workers(run_dir: Path, nproc: int, port: int | None) -> float | None:
    """Start ``nproc`` workers of this same command; they train and write the run.

    Returns:
        The run's ``objective`` as rank 0 computed it (see :func:`hand_back`), for sweepers.

    Raises:
        SystemExit: bad settings (one error line), or the workers' failure status.
    """
    from xp.rundir import discard, holds_no_run
    from xp.sweep import worker_launch

    error = port_error(port)
    if nproc < 1:
        error = (
            f"strategy.nproc_per_node={nproc} must be >= 1 (the number of worker processes "
            "on this machine)."
        )
    elif error is None and port is not None and port_in_use(port):
        error = (
            f"strategy.master_port={port} is already in use on this machine; pick another "
            "port, or null for a free one."
        )
    if error is not None:
        discard(run_dir)
        say(f"xp: error: {error}", file=sys.stderr)
        raise SystemExit(1)
    # A sweep's job gives its workers its own overrides and directory, not the whole sweep.
    with tempfile.TemporaryDirectory(prefix="xp-result-") as handed:
        result = Path(handed) / "objective.json"
        previous = os.environ.get(RESULT_ENV)
        os.environ[RESULT_ENV] = str(result)
        try:
            with worker_launch(run_dir, nproc) as argv:
                status = launch_workers(nproc, port, argv)
        finally:
            if previous is None:
                os.environ.pop(RESULT_ENV, None)
            else:
                os.environ[RESULT_ENV] = previous
        if status != 0:
            if holds_no_run(run_dir):
                discard(run_dir)
            raise SystemExit(status)
        value = json.loads(result.read_text()) if result.exists() else None
    return None if value is None else float(value)


_STARTED_BY = {
    Launcher.pytorch: ("torchrun", "WORLD_SIZE", "--nproc_per_node"),
    Launcher.slurm: ("srun", "SLURM_NTASKS", "--ntasks (or --ntasks-per-node)"),
    Launcher.mpi: ("mpirun", "OMPI_COMM_WORLD_SIZE", "-np"),
}


def workers_error(nproc_per_node: int, info: DistInfo) -> str | None:
    """Why ``strategy.nproc_per_node`` cannot start workers here, or None.

    Under a launcher (srun's tasks, torchrun's or mpirun's processes) every process is a
    rank already: each starting ``nproc_per_node`` workers of its own would make
    world_size x nproc_per_node processes that never agree on one run. The workers of
    xp's own launcher carry the setting too, and are fine.
    """
    if nproc_per_node == 1 or info.launcher is Launcher.none or os.environ.get(LAUNCHER_ENV):
        return None
    name, variable, option = _STARTED_BY[info.launcher]
    return (
        f"strategy.nproc_per_node={nproc_per_node} asks xp to start {nproc_per_node} workers, "
        f"but {name} already started {info.world_size} "
        f"{'processes' if info.world_size > 1 else 'process'} ({variable}={info.world_size}): "
        f"every process {name} starts is one rank, and "
        f"{nproc_per_node} workers in each would make "
        f"{nproc_per_node * info.world_size}. Leave strategy.nproc_per_node at 1 and set the "
        f"number of processes with {name}'s {option}, or start xp without {name}."
    )


def launch_workers(nproc_per_node: int, master_port: int | None, argv: list[str]) -> int:
    """Run ``python -m xp argv`` in ``nproc_per_node`` workers; their exit status.

    The workers inherit this process's environment, including XP_TIMESTAMP and
    XP_LAUNCH_DIR, so they compose the same run directory.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = master_port or free_port()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_configs={"is_host": True},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    # torchrun does the same: N workers of several threads each would oversubscribe.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "xp", *argv)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {r} exit {f.exitcode}" for r, f in sorted(e.failures.items()))
        say(f"xp: workers failed ({failures}); see their messages above.", file=sys.stderr)
        return 1
    except SignalException as e:
        # The agent passed the signal on; the workers saved a checkpoint and stopped.
        say(f"xp: stopped by {e.sigval.name}; the workers saved where they were.", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


def stop_with_launcher() -> None:
    """In a worker of xp's own launcher: stop when the launcher dies (``kill -9`` of it).

    The kernel sends SIGTERM, which the run takes as a stop: every rank saves and marks the
    run KILLED, and ``resume=`` continues it. Workers run in sessions of their own (torch's
    agent starts them so), so nothing else would reach them.
    """
    launcher = os.environ.get(LAUNCHER_ENV, "")
    if launcher.isdigit() and "LOCAL_RANK" in os.environ:
        import signal

        from xp.prefork import die_with

        die_with(int(launcher), signal.SIGTERM)
