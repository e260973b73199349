"""Several nodes, simulated on this host: torchrun with two node agents (static and c10d
rendezvous), the tasks of a two-node srun allocation (their SLURM_* variables), Open MPI's
mpirun, and a run directory that the second node cannot see. Each launch is one run
directory and one MLflow run, every process knows its global rank, local rank and node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.extras import missing_system, requires_extra
from xp.dist import free_port

pytestmark = pytest.mark.slow

SHORT = ("trainer.max_steps=20", "tracking.flush_interval_s=0.2")


def start(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen[bytes]], timeout: float = 300) -> list[int]:
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return codes


def output(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)


def the_run(workdir: Path, store: Any, experiment: str = "default") -> tuple[Path, Any]:
    (run_dir,) = (workdir / "outputs" / experiment).iterdir()
    (run,) = store.search_runs([store.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["xp.run_dir"] == str(run_dir)
    return run_dir, run


def places(run_dir: Path) -> list[tuple[int, int, int]]:
    ranks = json.loads((run_dir / "env.json").read_text())["runtime"]["ranks"]
    return [(r["rank"], r["local_rank"], r["node_rank"]) for r in ranks]


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_torchrun_on_two_nodes(workdir: Path, store: Any, tmp_path: Path, rendezvous: str) -> None:
    """Item 6: torchrun --nnodes 2, one agent per node; c10d with FSDP, whose sharded
    checkpoints every node writes and marks COMPLETE."""
    port = free_port()
    strategy = "strategy=ddp" if rendezvous == "static" else "strategy=fsdp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, logs = [], []
    for node in (0, 1):
        if rendezvous == "static":
            how = ["--node_rank", str(node), "--master_addr", "127.0.0.1", f"--master_port={port}"]
        else:
            how = ["--rdzv-backend", "c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=job"]
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        argv += ["--nproc_per_node", "1", *how, "-m", "xp", strategy, *SHORT]
        logs.append(tmp_path / f"node{node}.log")
        procs.append(start(argv, workdir, env, logs[-1]))
    assert finish(procs) == [0, 0], output(logs)
    run_dir, run = the_run(workdir, store)
    assert run.data.tags["xp.world_size"] == "2"
    # The c10d rendezvous numbers the nodes in the order they join.
    assert sorted(places(run_dir)) == [(0, 0, 0), (1, 0, 1)]
    if rendezvous == "c10d":
        checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
        assert checkpoints and all((c / "COMPLETE").is_file() for c in checkpoints)
        assert all(len(list(c.glob("__*_0.distcp"))) == 2 for c in checkpoints)


def slurm_task(rank: int, tasks_per_node: int, nodes: int, port: int) -> dict[str, str]:
    """The variables that srun sets for task ``rank`` of ``srun -N nodes -n N*tasks``."""
    node, local = divmod(rank, tasks_per_node)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_"))}
    return {
        **env,
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(local),
        "SLURM_NODEID": str(node),
        "SLURM_NNODES": str(nodes),
        "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})",
        "SLURM_NODELIST": "node[1-2]",
        "SLURM_CPUS_ON_NODE": str(len(os.sched_getaffinity(0))),
        "MASTER_ADDR": "127.0.0.1",  # both "nodes" are this host
        "MASTER_PORT": str(port),
    }


def launch_slurm_tasks(
    dirs: list[Path], args: tuple[str, ...], tasks_per_node: int, logs_dir: Path
) -> tuple[list[int], list[Path]]:
    port = free_port()
    procs, logs = [], []
    for rank in range(len(dirs) * tasks_per_node):
        env = slurm_task(rank, tasks_per_node, len(dirs), port)
        logs.append(logs_dir / f"task{rank}.log")
        argv = [sys.executable, "-m", "xp", *args, *SHORT]
        procs.append(start(argv, dirs[rank // tasks_per_node], env, logs[-1]))
    return finish(procs), logs


def test_srun_tasks_on_two_nodes_without_a_shared_directory(
    workdir: Path, store: Any, tmp_path: Path
) -> None:
    """Items 6 and 8: four tasks of a two-node allocation, their node and local ids not their
    global rank, threads dividing each node's cores between its two tasks; node 1 starts in
    a directory of its own (outputs/ not shared): DDP trains, rank 0 writing alone and
    saying so, one run directory and one MLflow run."""
    elsewhere = tmp_path / "node1"
    elsewhere.mkdir()
    codes, logs = launch_slurm_tasks([workdir, elsewhere], ("strategy=ddp",), 2, tmp_path)
    assert codes == [0, 0, 0, 0], output(logs)
    run_dir, run = the_run(workdir, store)
    assert run.data.tags["xp.world_size"] == "4"
    assert places(run_dir) == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    runtime = json.loads((run_dir / "env.json").read_text())["runtime"]
    assert runtime["launcher"] == "slurm" and runtime["slurm_job_id"] == "4242"
    cores = len(os.sched_getaffinity(0))
    assert {r["threads"] for r in runtime["ranks"]} == {max(1, cores // 2)}
    assert [r["sees_run_dir"] for r in runtime["ranks"]] == [True, True, False, False]
    log = logs[0].read_text()
    assert "Ranks [2, 3] (on" in log and "do not see the run directory" in log
    assert not list(elsewhere.glob("outputs/default/*/*"))  # node 1 wrote nothing


def test_mpirun(workdir: Path, store: Any, tmp_path: Path) -> None:
    """Item 7: Open MPI's mpirun, which xp infers like torchrun and srun."""
    if shutil.which("mpirun") is None:
        missing_system("no mpirun (apt-get install openmpi-bin)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    argv = ["mpirun", "-np", "2", "--allow-run-as-root", sys.executable, "-m", "xp"]
    log = tmp_path / "mpirun.log"
    assert finish([start([*argv, "strategy=ddp", *SHORT], workdir, env, log)]) == [0]
    run_dir, run = the_run(workdir, store)
    assert run.data.tags["xp.world_size"] == "2"
    assert json.loads((run_dir / "env.json").read_text())["runtime"]["launcher"] == "mpi"


@pytest.mark.parametrize(
    "strategy",
    ["fsdp", pytest.param("deepspeed", marks=requires_extra("deepspeed", "deepspeed"))],
)
def test_sharded_checkpoints_need_a_shared_directory(
    workdir: Path, store: Any, tmp_path: Path, strategy: str
) -> None:
    """Item 8: FSDP and DeepSpeed, whose checkpoints every rank writes, stop before training
    when node 1 cannot see the run directory, naming the fix; nothing hangs, nothing is
    left behind."""
    elsewhere = tmp_path / "node1"
    elsewhere.mkdir()
    codes, logs = launch_slurm_tasks([workdir, elsewhere], (f"strategy={strategy}",), 1, tmp_path)
    assert all(code != 0 for code in codes), output(logs)
    for log in logs:
        errors = [line for line in log.read_text().splitlines() if line.startswith("xp: error:")]
        assert errors and "not shared between the nodes" in errors[0], output(logs)
        assert "file system every node mounts" in errors[0]
    assert not list((workdir / "outputs").glob("default/*"))
