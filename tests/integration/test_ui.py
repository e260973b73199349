"""``python -m xp ui``: the address it prints opens on the runs (in a real browser), and a
stop signal stops all of MLflow's server, leaving its port free."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.extras import missing_system
from tests.procs import alive, children

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN_NAME = "20260102_030405"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class UI:
    """A running ``python -m xp ui`` and what it printed so far."""

    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    """Every process of the server seen so far: the test's clean-up stops them."""

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, what: str, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert self.process.poll() is None, "xp ui exited:\n" + "\n".join(self.lines)
            assert time.monotonic() < deadline, f"no {what}:\n" + "\n".join(self.lines)
            time.sleep(0.1)

    def server(self) -> list[int]:
        """The live processes xp ui started: mlflow ui, uvicorn, a job runner, its consumers."""
        found, todo = [], children(self.process.pid)
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children(pid))
        self.seen.update(found)
        return found


def start_ui(cwd: Path, **env: str) -> UI:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "XP_"))}
    clean["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), clean.get("PYTHONPATH")) if p)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "xp", "ui", "--port", str(port)],
        cwd=cwd, env={**clean, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    ui = UI(process, port)
    threading.Thread(target=ui.read, daemon=True).start()
    return ui


def kill_all(ui: UI) -> None:
    """Whatever the test left running: xp ui and every process of its server it saw."""
    ui.server()
    for pid in [ui.process.pid, *ui.seen]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    ui.process.wait(timeout=30)


def stopped(ui: UI, signum: int) -> float:
    """Send ``signum`` to xp ui; seconds until it exited with every process of its server."""
    members = ui.server()
    sent = time.monotonic()
    ui.process.send_signal(signum)
    assert ui.process.wait(timeout=60) == 0, "\n".join(ui.lines)
    took = time.monotonic() - sent
    left = [pid for pid in members if alive(pid)]
    assert not left, f"left running: {left}"
    with socket.socket() as s:  # nothing listens on the port
        assert s.connect_ex(("127.0.0.1", ui.port)) != 0
    with socket.socket() as s:  # and a new server may take it (as uvicorn binds)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", ui.port))
    return took


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, _empty_mlflow_db: Path) -> Path:
    """A project whose default store (outputs/mlflow.db) holds one FINISHED run."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("project")
    outputs = root / "outputs"
    outputs.mkdir()
    shutil.copyfile(_empty_mlflow_db, outputs / "mlflow.db")
    client = MlflowClient(f"sqlite:///{(outputs / 'mlflow.db').as_posix()}")
    experiment = client.create_experiment(
        "default", artifact_location=(outputs / "mlartifacts" / "default").as_uri()
    )
    run = client.create_run(experiment, run_name=RUN_NAME)
    client.log_metric(run.info.run_id, "val/acc", 0.97, step=400)
    client.set_terminated(run.info.run_id)
    return root


@pytest.fixture(scope="module")
def ui(project: Path) -> Iterator[UI]:
    """One ``xp ui`` for the module (it takes seconds to start); the last test stops it."""
    ui = start_ui(project)
    try:
        ui.wait_for(lambda: any("ready after" in line for line in ui.lines), "ready line")
        yield ui
    finally:
        kill_all(ui)


def test_the_address_it_prints_opens_on_the_runs_table(
    ui: UI, project: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(project / 'outputs' / 'mlflow.db').as_posix()}")
    experiment = client.get_experiment_by_name("default")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    page = (
        f"http://127.0.0.1:{ui.port}/#/experiments/{experiment.experiment_id}/runs"
        "?workflowType=machine_learning"
    )
    assert re.search(rf"^  default  {re.escape(page)}$", "\n".join(ui.lines), re.M), ui.lines

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        missing_system("no Chromium installed (Debian: apt-get install chromium)")
    browser = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=15000", "--window-size=1600,1000",
    ]  # fmt: skip
    shot = tmp_path / "runs.png"
    subprocess.run([*browser, f"--screenshot={shot}", page], capture_output=True, timeout=180)
    dom = subprocess.run(
        [*browser, "--dump-dom", page], capture_output=True, text=True, timeout=180
    ).stdout
    # The runs table: its Run Name column, and the run's name linking to the run.
    assert 'data-testid="sort-header-Run Name"' in dom, dom[-3000:]
    link = f'href="#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"'
    assert re.search(rf"{re.escape(link)}[^>]*><span[^>]*>{RUN_NAME}</span>", dom), dom[-3000:]
    assert "No data available" not in dom  # not MLflow 3's GenAI overview
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_sigterm_stops_the_whole_server_and_frees_its_port(ui: UI) -> None:
    assert len(ui.server()) >= 2, "expected mlflow ui and its uvicorn"
    assert stopped(ui, signal.SIGTERM) < 15


def test_ctrl_c_while_it_starts_stops_mlflow_and_its_job_runner(project: Path) -> None:
    """With MLflow's job runner on (xp ui leaves it off unless told), Ctrl-C before the
    server answers stops mlflow ui, uvicorn and the job runner."""
    ui = start_ui(project, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="true")
    try:

        def started() -> bool:
            commands = [_command(pid) for pid in ui.server()]
            return any("_job_runner" in c for c in commands) and any(
                "uvicorn" in c for c in commands
            )

        ui.wait_for(started, "job runner and uvicorn")
        assert stopped(ui, signal.SIGINT) < 15
    finally:
        kill_all(ui)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
