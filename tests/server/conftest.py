"""A team's MLflow setup, started the way a team starts it: PostgreSQL and ``mlflow server``.

One throwaway PostgreSQL cluster (``initdb`` in a temp dir, ``pg_ctl start`` on 127.0.0.1
at a free port) and one ``mlflow server --app-name basic-auth`` on it, with proxied
artifacts (``--serve-artifacts --artifacts-destination``), serve the whole test session:
starting them costs about 10 s. A user is created through the server's REST API and the
runs log in as that user (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``).

Where PostgreSQL is not installed (Debian: ``apt-get install postgresql``; ``.ci/run``
installs it) or cannot start, these tests skip with the reason: never a mock.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.extras import installed, missing_system

REPO = Path(__file__).resolve().parents[2]
CONF = Path(__file__).parent / "conf"
"""A user's config directory: ``model=sleepy`` (a step of a known length)."""

ADMIN = ("admin", "xp-admin-" + secrets.token_hex(6))
USER = "alice"
PASSWORD = "xp-pass-" + secrets.token_hex(8)
"""alice's password: tests grep every record of a run for it."""
SECRET_ENV = {
    "XP_TEST_API_TOKEN": "xp-token-" + secrets.token_hex(8),
    "XP_TEST_CLIENT_SECRET": "xp-secret-" + secrets.token_hex(8),
    "XP_TEST_SIGNING_KEY": "xp-key-" + secrets.token_hex(8),
}
"""Secret-named variables (TOKEN, SECRET, KEY) in the runs' environment: never recorded
either."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _postgres_bindir() -> Path | None:
    """Debian keeps PostgreSQL's programs in /usr/lib/postgresql/<version>/bin, off PATH."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(found[-1]).parent if found else None


@dataclass
class Postgres:
    """A running throwaway cluster; ``url(db)`` is what ``mlflow server`` gets."""

    bindir: Path
    root: Path
    port: int
    as_user: list[str] = field(default_factory=list)

    def run(self, program: str, *args: str) -> None:
        command = [*self.as_user, str(self.bindir / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def createdb(self, name: str) -> str:
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def url(self, db: str) -> str:
        # +psycopg: psycopg 3 on SQLAlchemy 2.0 and 2.1 alike (plain postgresql:// means
        # psycopg2 on 2.0).
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session, on 127.0.0.1 at a free port."""
    bindir = _postgres_bindir()
    if bindir is None:
        missing_system(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
            "apt-get install postgresql (.ci/run does)"
        )
    assert bindir is not None
    if not installed("psycopg"):
        missing_system("the PostgreSQL driver psycopg is missing: pip install -e '.[test]'")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing_system("running as root without a 'postgres' user to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
    # /tmp: a TMPDIR of root's own (mode 700) would keep the postgres user out.
    root = Path(tempfile.mkdtemp(prefix="xp-postgres-", dir="/tmp" if as_user else None))
    if as_user:
        shutil.chown(root, "postgres")
    cluster = Postgres(bindir, root, free_port(), as_user)
    data = root / "data"
    try:
        cluster.run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                    "--no-sync")  # fmt: skip
        options = f"-h 127.0.0.1 -p {cluster.port} -k {root} -F -c max_connections=200"
        cluster.run("pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w",
                    "-t", "60", "start")  # fmt: skip
    except (RuntimeError, OSError) as e:  # installed, yet it does not start: a real failure
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {e}")
    try:
        yield cluster
    finally:
        with contextlib.suppress(RuntimeError, OSError):
            cluster.run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def stop_tree(pid: int, timeout_s: float = 20) -> None:
    """Stop a process and every process it started (MLflow's server starts workers)."""
    import psutil

    try:
        top = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    tree = [top, *top.children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=timeout_s)


class MlflowServer:
    """``mlflow server`` as a process: started, waited for on /health, stopped by pid."""

    def __init__(self, command: list[str], port: int, env: dict[str, str], log: Path) -> None:
        self.command = command
        self.port = port
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"mlflow server did not start:\n{tail}")
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_tree(self.process.pid)
            self.process.wait(timeout=30)
            self.process = None


@dataclass
class Server:
    """The session's server and how to reach it."""

    server: MlflowServer
    artifacts: Path
    backend_uri: str

    @property
    def uri(self) -> str:
        return self.server.uri

    @property
    def env(self) -> dict[str, str]:
        """What a user of the team exports."""
        return {
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_TRACKING_USERNAME": USER,
            "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        }

    def api(
        self, path: str, body: dict[str, Any] | None = None, method: str = "GET", raw: bool = False
    ) -> Any:
        """A REST call as the admin (``path`` under /api/2.0/): its JSON, or its bytes."""
        request = urllib.request.Request(
            f"{self.uri}/api/2.0/{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method if body is None else "POST",
            headers={"Authorization": _basic(*ADMIN), "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
        return data if raw else json.loads(data)

    def client(self) -> Any:
        """An MlflowClient logged in as the admin (it reads every user's runs), by the
        credentials in its URI: the environment stays as the test set it."""
        from mlflow import MlflowClient

        return MlflowClient(self.uri.replace("http://", f"http://{ADMIN[0]}:{ADMIN[1]}@"))


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="session")
def mlflow_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``mlflow server --app-name basic-auth`` on PostgreSQL, artifacts served by it; the
    user alice created through its API."""
    if not installed("flask_wtf"):
        missing_system("MLflow's basic-auth app needs Flask-WTF: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("mlflow-server")
    backend = postgres.createdb("mlflow")
    auth_ini = root / "basic_auth.ini"
    auth_ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {postgres.createdb('mlflow_auth')}\n"
        f"admin_username = {ADMIN[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each request's password check is a PBKDF2 hash (a quarter second of CPU): cached.
        "auth_cache_ttl_seconds = 600\n"
    )
    artifacts = root / "artifacts"
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        # No background job runner (seven more processes), one worker: on 2 cores it starts
        # in seconds instead of half a minute.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
        "--app-name", "basic-auth",
    ]  # fmt: skip
    server = MlflowServer(command, port, env, root / "server.log")
    try:
        server.start()
    except RuntimeError as e:
        pytest.fail(str(e))
    setup = Server(server, artifacts, backend)
    try:
        # A plain user: she manages the experiments she creates, reads the others.
        setup.api("mlflow/users/create", {"username": USER, "password": PASSWORD})
        yield setup
    finally:
        server.stop()


@pytest.fixture
def team(mlflow_server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """The session's server, up (a test that stopped it started it again)."""
    if mlflow_server.server.process is None:
        mlflow_server.server.start()
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return mlflow_server


def xp_env(server: Server, **extra: str) -> dict[str, str]:
    """A user's environment for ``python -m xp`` against the server."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "XP_")) and k != "_MLFLOW_SERVER_ARTIFACT_ROOT"
    }
    return {
        **env,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        **server.env,
        **SECRET_ENV,
        **extra,
    }


def start_xp(
    cwd: Path, *args: str, env: dict[str, str], log: Path | None = None
) -> subprocess.Popen[str]:
    """``python -m xp ARGS`` in ``cwd``, its own process group (a signal reaches all of it)."""
    cwd.mkdir(parents=True, exist_ok=True)
    out = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "xp", *args],
        cwd=cwd,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run_xp(
    cwd: Path, *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "xp", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def rest_artifact(server: Server, run_id: str, path: str) -> bytes:
    """A run's artifact as a colleague gets it: through the server's artifact proxy."""
    run = server.api(f"mlflow/runs/get?run_id={run_id}")["run"]
    root = run["info"]["artifact_uri"]  # mlflow-artifacts:/<experiment>/<run>/artifacts
    assert root.startswith("mlflow-artifacts:/"), root
    relative = root.removeprefix("mlflow-artifacts:/").lstrip("/")
    return bytes(server.api(f"mlflow-artifacts/artifacts/{relative}/{path}", raw=True))
