"""One run per launch: agreeing on the timestamp across ranks, and starting workers.

Under a launcher every rank runs ``python -m xp`` and Hydra composes on each; so rank 0
decides the run's timestamp (and with it the run directory) and hands it to the other
ranks before any of them composes. Without a launcher, ``strategy.nproc_per_node > 1``
starts the workers through torch's elastic agent, the engine of torchrun.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta

from xp.dist import Launcher, dist_info, infer_launcher
from xp.log import say

_KEY = "xp/timestamp"


def agree_on_timestamp(candidate: Callable[[], str], timeout_s: float = 300.0) -> str:
    """Rank 0's ``candidate()`` on every rank of this launch (``candidate()`` alone on one).

    torchrun's workers share their agent's store; for srun and mpirun, rank 0 hosts a
    small store on MASTER_PORT + 1.
    """
    launcher = infer_launcher()
    if launcher is Launcher.none:
        return candidate()
    info = dist_info(launcher)
    if info.world_size == 1:
        return candidate()
    import torch.distributed as dist

    from xp.strategy.distributed import _export_launcher_env

    _export_launcher_env(launcher, None)
    env = os.environ
    timeout = timedelta(seconds=timeout_s)
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        run, restart = (
            env.get("TORCHELASTIC_RUN_ID", ""),
            env.get("TORCHELASTIC_RESTART_COUNT", "0"),
        )
        attempt = f"{run}/{restart}"
        key = f"{_KEY}/{attempt}"
    else:
        store = dist.TCPStore(
            host, port + 1, info.world_size, is_master=info.rank == 0, timeout=timeout
        )
        key = _KEY
    if info.rank == 0:
        store.set(key, candidate())
    return store.get(key).decode()


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


def port_in_use(port: int) -> bool:
    """Whether something already listens on ``port`` on this machine."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False
