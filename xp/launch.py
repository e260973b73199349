"""One run per launch: handing the claimed run directory to every rank, and starting workers.

Under a launcher every rank runs ``python -m xp`` and Hydra composes on each; rank 0
claims the run directory (:mod:`xp.rundir`) and hands the final timestamp, which names
it, to the other ranks before any of them makes a directory. Without a launcher,
``strategy.nproc_per_node > 1`` starts the workers through torch's elastic agent, the
engine of torchrun; they inherit the claim.
"""

from __future__ import annotations

import os
import sys
import uuid
from datetime import timedelta
from typing import Any

from xp.dist import Launcher, dist_info, infer_launcher
from xp.log import say

LAUNCHER_ENV = "XP_LAUNCHER_PID"
"""Set for the workers of xp's own launcher: the pid they live and die with."""
_PR_SET_PDEATHSIG = 1
_KEY = "xp/run_dir"
_REFUSED = "!refused"
_STORE: Any = None
"""The launch's store, kept for the life of the process: for srun and mpirun rank 0 hosts
it, and the other ranks may read from it after rank 0 has moved on."""


def _shared_store(timeout_s: float) -> tuple[Any, str] | None:
    """The store every rank of this launch reaches, and the key for this launch; None for
    one process."""
    global _STORE
    launcher = infer_launcher()
    if launcher is Launcher.none:
        return None
    info = dist_info(launcher)
    if info.world_size == 1:
        return None
    import torch.distributed as dist

    from xp.strategy.distributed import _export_launcher_env

    _export_launcher_env(launcher, None)
    env = os.environ
    timeout = timedelta(seconds=timeout_s)
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's workers share their agent's store; a restart is a new launch.
        attempt = (
            f"{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        )
        if _STORE is None:
            _STORE = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        return _STORE, f"{_KEY}/{attempt}"
    if _STORE is None:
        _STORE = dist.TCPStore(
            host, port + 1, info.world_size, is_master=info.rank == 0, timeout=timeout
        )
    return _STORE, _KEY


def share_claim(timestamp: str | None, timeout_s: float = 300.0) -> None:
    """Rank 0: tell the other ranks the timestamp of the directory it claimed, or (None)
    that it refused to start; nothing to do for one process."""
    shared = _shared_store(timeout_s)
    if shared is not None:
        store, key = shared
        store.set(key, _REFUSED if timestamp is None else timestamp)


def receive_claim(timeout_s: float = 300.0) -> str:
    """The other ranks: wait for rank 0's claim; its timestamp.

    Exits with status 1 when rank 0 refused the run (it printed why).
    """
    shared = _shared_store(timeout_s)
    if shared is None:
        raise RuntimeError("receive_claim() is for ranks other than 0 of a launch")
    store, key = shared
    value = store.get(key).decode()
    if value == _REFUSED:
        raise SystemExit(1)
    return value


def launch_workers(nproc_per_node: int, master_port: int | None, argv: list[str]) -> int:
    """Run ``python -m xp argv`` in ``nproc_per_node`` workers; their exit status.

    The workers inherit this process's environment, including XP_TIMESTAMP and
    XP_LAUNCH_DIR, so they compose the same run directory.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from xp.strategy.distributed import free_port

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


def die_with(parent: int, signum: int) -> None:
    """Have the kernel send ``signum`` to this process when ``parent`` dies (Linux)."""
    if sys.platform != "linux":
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def stop_with_launcher() -> None:
    """In a worker of xp's own launcher: stop when the launcher dies (``kill -9`` of it).

    The kernel sends SIGTERM, which the run takes as a stop: every rank saves and marks the
    run KILLED, and ``resume=`` continues it. Workers run in sessions of their own (torch's
    agent starts them so), so nothing else would reach them.
    """
    launcher = os.environ.get(LAUNCHER_ENV, "")
    if launcher.isdigit() and "LOCAL_RANK" in os.environ:
        import signal

        die_with(int(launcher), signal.SIGTERM)


def port_error(port: int | None) -> str | None:
    """Why ``strategy.master_port`` cannot be used, or None (null: a free port is picked)."""
    if port is None:
        return None
    if not 1 <= port <= 65535:
        return (
            f"strategy.master_port={port} is not a TCP port (1 to 65535); pick one in that "
            "range, or null for a free one."
        )
    return None


def port_in_use(port: int) -> bool:
    """Whether something already listens on ``port`` on this machine."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False
