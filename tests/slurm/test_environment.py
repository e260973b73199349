"""What xp reads from Slurm's environment, as srun, sbatch and a two-node allocation set it
(the variables copied from the local cluster's jobs); no cluster needed."""

from __future__ import annotations

import pytest

from xp.dist import Launcher, default_threads, dist_info, infer_launcher, tasks_per_node
from xp.launch import workers_error

# A batch script of `sbatch --ntasks=2`: Slurm sets the job's task count and PROCID=0 there
# too, but no task was started; srun's tasks have a step id.
BATCH = {
    "ENVIRONMENT": "BATCH",
    "SLURM_JOB_ID": "7",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_TASKS_PER_NODE": "2",
    "SLURM_CPUS_ON_NODE": "2",
}
# Task 3 of `srun -N 2 -n 4` (the second task on the second node).
TWO_NODES = {
    **BATCH,
    "SLURM_STEP_ID": "0",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_CPUS_ON_NODE": "8",
}


def test_the_batch_script_is_one_process_not_rank_0_of_two() -> None:
    # Before: rank 0 of 2, waiting forever for a rank 1 that nobody starts.
    assert infer_launcher(BATCH) is Launcher.none
    assert dist_info(infer_launcher(BATCH), BATCH).world_size == 1


def test_a_task_of_a_two_node_step_knows_its_node_and_its_neighbours() -> None:
    info = dist_info(infer_launcher(TWO_NODES), TWO_NODES)
    assert info.launcher is Launcher.slurm
    assert (info.rank, info.local_rank, info.node_rank) == (3, 1, 1)
    assert (info.world_size, info.local_world_size) == (4, 2)


def test_srun_n_1_inside_a_job_of_two_tasks_is_one_process() -> None:
    step = {**TWO_NODES, "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1"}
    step.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    info = dist_info(infer_launcher(step), step)
    assert (info.world_size, info.local_world_size) == (1, 1)


def test_the_ranks_stay_slurms_once_copied_for_torch() -> None:
    copied = {**TWO_NODES, "RANK": "3", "WORLD_SIZE": "4", "XP_RANKS_FROM": "slurm"}
    assert infer_launcher(copied) is Launcher.slurm  # not torchrun's: no agent, no store


@pytest.mark.parametrize(
    ("spec", "counts"),
    [("2", [2]), ("2(x3)", [2, 2, 2]), ("2(x2),1", [2, 2, 1]), ("4,3(x2)", [4, 3, 3])],
)
def test_tasks_per_node(spec: str, counts: list[int]) -> None:
    assert tasks_per_node(spec) == counts


def test_threads_divide_the_cpus_the_job_holds_on_the_node(monkeypatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    info = dist_info(Launcher.slurm, TWO_NODES)
    assert default_threads(info, TWO_NODES) == 4  # 8 CPUs of the job, 2 tasks here
    one_cpu_job = {**BATCH, "SLURM_CPUS_ON_NODE": "1"}  # a sweep's job on a shared node
    assert default_threads(dist_info(Launcher.none), one_cpu_job) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {5, 6, 7})  # bound to its cores
    assert default_threads(info, TWO_NODES) == 3
    assert default_threads(info, {**TWO_NODES, "OMP_NUM_THREADS": "2"}) == 2


def test_workers_are_not_started_inside_a_launchers_processes(monkeypatch) -> None:
    monkeypatch.delenv("XP_LAUNCHER_PID", raising=False)
    info = dist_info(Launcher.slurm, TWO_NODES)
    error = workers_error(2, info)
    assert error is not None
    assert "srun already started 4 processes (SLURM_NTASKS=4)" in error
    assert "would make 8" in error and "leave strategy.nproc_per_node at 1" in error.lower()
    assert workers_error(1, info) is None
    assert workers_error(2, dist_info(Launcher.none)) is None  # xp's own launcher starts them
