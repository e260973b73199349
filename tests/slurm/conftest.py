"""A real one-node Slurm cluster for the tests in this folder (``cluster.sh``), and helpers
to submit, signal and wait for its jobs the way a user does (sbatch, srun, scancel,
scontrol). Where the cluster cannot start (Slurm not installed, not root), its tests skip
with the reason; nothing is faked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.extras import missing_system
from tests.integration.conftest import store, workdir

# The jobs' working directory and MLflow store: those of the CLI tests (tests/integration).
_ = (store, workdir)

CLUSTER = Path(__file__).with_name("cluster.sh")
INSTALL = "apt-get install -y --no-install-recommends slurm-wlm munge (.ci/run does it)"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="session")
def slurm() -> Iterator[dict[str, str]]:
    """The local cluster, started once per session (left running if it was already); the
    environment its commands need (``SLURM_CONF``)."""
    daemon = shutil.which("slurmctld", path="/usr/sbin:/usr/bin")
    if shutil.which("sbatch") is None or daemon is None:
        missing_system(f"Slurm is not installed: {INSTALL}")
    if os.geteuid() != 0:
        missing_system("the local Slurm cluster runs its daemons as root; run the tests as root")
    result = subprocess.run(
        [str(CLUSTER), "start"], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        missing_system(f"the local Slurm cluster did not start: {result.stderr.strip()}")
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    started = values.get("STARTED", "").split()
    yield {"SLURM_CONF": values["SLURM_CONF"]}
    if started:
        subprocess.run([str(CLUSTER), "stop", *started], check=False, timeout=60)


@dataclass
class Job:
    """What ``scontrol show job`` says of a job now."""

    id: str
    state: str
    restarts: int
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class Cluster:
    """Commands on the cluster, run from ``cwd`` with the test's environment."""

    env: dict[str, str]
    cwd: Path
    submitted: list[str] = field(default_factory=list)

    def run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def sbatch(self, script: str, *options: str) -> str:
        """Submit ``script`` (written to the working directory); the job's id."""
        path = self.cwd / f"job{len(self.submitted)}.sh"
        path.write_text(script)
        out = f"--output={self.cwd}/%j.out"
        result = self.run("sbatch", "--parsable", "--open-mode=append", out, *options, str(path))
        assert result.returncode == 0, result.stderr
        job = result.stdout.strip().split(";")[0]
        self.submitted.append(job)
        return job

    def job(self, job: str) -> Job:
        result = self.run("scontrol", "show", "job", "-o", job)
        assert result.returncode == 0, result.stderr
        fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
        return Job(job, fields["JobState"], int(fields.get("Restarts", "0")), fields)

    def output(self, job: str) -> str:
        path = self.cwd / f"{job}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, job: str, until: Callable[[Job], bool], what: str, timeout: float = 180) -> Job:
        deadline = time.monotonic() + timeout
        while True:
            now = self.job(job)
            if until(now):
                return now
            if now.state in FINAL_STATES or time.monotonic() > deadline:
                pytest.fail(
                    f"job {job} is {now.state} after {timeout} s, not {what}:\n"
                    + self.output(job)[-4000:]
                )
            time.sleep(0.2)

    def wait_done(self, job: str, timeout: float = 240) -> Job:
        return self.wait(job, lambda j: j.state in FINAL_STATES, "its end", timeout)


@pytest.fixture
def cluster(slurm: dict[str, str], workdir: Path) -> Iterator[Cluster]:
    """The cluster, its commands run in ``workdir`` (where ``python -m xp`` finds its
    store); jobs a test leaves behind are cancelled."""
    env = {**os.environ, **slurm, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # xp divides the cores among the tasks of a node
    handle = Cluster(env, workdir)
    yield handle
    if handle.submitted:
        handle.run("scancel", *handle.submitted)


def xp_command(*args: str) -> str:
    """``python -m xp ARGS`` as a line of a job script, with this test's python."""
    return " ".join([sys.executable, "-m", "xp", *args])
