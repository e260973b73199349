"""``xp ui``: the MLflow UI over the store xp's runs were written to.

``mlflow ui`` starts uvicorn (and, unless it is turned off, a job runner with seven huey
consumers), so a signal to it alone can leave processes that keep the port. ``xp ui``
starts it in a session of its own and, on SIGINT (Ctrl-C), SIGTERM or SIGHUP, stops every
process of that session: SIGTERM, then SIGKILL to what is left after a grace period.

Once the server answers, it prints the address of each experiment's runs table: MLflow 3
opens on its GenAI overview (traces, "No data available"), where no training run shows;
``#/experiments/<id>/runs?workflowType=machine_learning`` opens on the runs.

Start-up, measured on 2 busy CPU cores (README, ``xp ui``): the ``mlflow ui`` process
imports MLflow's server and opens the store (migrations), then starts uvicorn, which
imports it all again; MLflow's job runner (GenAI judges and trace jobs, which xp's runs
never use) would add a process and seven huey consumers importing MLflow beside them, so
it is off unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says otherwise; one worker
(``--workers``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from xp.log import say

RUNS_PAGE = "{address}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
"""An experiment's runs table in MLflow 3's UI (the "Model training" view)."""
EXPERIMENTS_PAGE = "{address}/#/experiments?workflowType=machine_learning"
LISTED = 10
"""Experiments whose runs pages are printed (those with the newest runs first)."""
STOP_GRACE_S = 10.0
"""After SIGTERM, how long the server's processes get before SIGKILL."""

_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main(argv: list[str]) -> int:
    """``xp ui``: the MLflow UI on 127.0.0.1, on the store the runs were written to."""
    parser = argparse.ArgumentParser(prog="xp ui", description=main.__doc__)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else ./outputs/mlflow.db",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes (default 1: one person's UI starts in seconds; MLflow's is 4)",
    )
    args = parser.parse_args(argv)
    from xp.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(Path(os.environ["XP_LAUNCH_DIR"]))
    if not uri.startswith("sqlite:") and "://" in uri and not uri.startswith("file:"):
        say(f"xp ui: runs live on the server {uri}; open it in a browser instead.")
        return 0
    cmd = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri,
        # Artifacts logged through this server (mlflow-artifacts:/) land beside the store,
        # not in ./mlartifacts of wherever `xp ui` was started: another `xp ui` finds them.
        "--artifacts-destination", str(artifacts_beside(uri)),
        "--host", args.host,
        "--port", str(args.port),
        "--workers", str(args.workers),
    ]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    address = f"http://{_local(args.host)}:{args.port}"
    say(f"xp ui: the MLflow UI for {uri}, starting on {address} (Ctrl-C stops it)")
    return _serve(cmd, env, address)


def artifacts_beside(uri: str) -> Path:
    """``mlartifacts/`` beside a SQLite database or a file store (outputs/mlartifacts for
    xp's default store), where xp's own runs keep their artifacts too."""
    if uri.lower().startswith("sqlite:///"):
        store = Path(uri[len("sqlite:///") :])
    else:
        from urllib.parse import unquote, urlsplit

        store = Path(unquote(urlsplit(uri).path) if uri.startswith("file:") else uri)
    return store.absolute().parent / "mlartifacts"


def _local(host: str) -> str:
    """The host to open in a browser here for a server listening on ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _Stop(Exception):
    """A stop signal reached ``xp ui``."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def _serve(cmd: list[str], env: dict[str, str], address: str) -> int:
    """Run the server until it exits, or stop all of it on a stop signal; its exit status
    (0 when stopped by a signal)."""
    started = time.monotonic()
    previous = {signum: signal.getsignal(signum) for signum in _STOPS}
    # Held back until the server's pid is known, so that no signal can leave it behind.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        for signum in _STOPS:
            signal.signal(signum, _raise_stop)
        server = subprocess.Popen(
            cmd, env=env, start_new_session=True, preexec_fn=_in_server(os.getpid())
        )
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
        _restore(previous)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # one that came meanwhile: here
        if _answers(server, address):
            _say_pages(address, time.monotonic() - started)
        return server.wait()
    except (_Stop, KeyboardInterrupt):
        hurry: list[int] = []
        for signum in _STOPS:  # another Ctrl-C while it stops: SIGKILL at once
            signal.signal(signum, lambda signum, frame: hurry.append(signum))
        stop_session(server, hurry)
        return 0
    finally:
        _restore(previous)


def _in_server(parent: int) -> Any:
    """What the server's process does before it runs ``mlflow ui``."""

    def prepare() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # the mask survives exec
        from xp.prefork import die_with

        # `kill -9` of xp ui: mlflow ui gets SIGTERM, and stops uvicorn and its job runner.
        die_with(parent, signal.SIGTERM)

    return prepare


def _restore(previous: dict[signal.Signals, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def stop_session(server: subprocess.Popen[bytes], hurry: list[int] | None = None) -> None:
    """SIGTERM to every process of ``server``'s session (its process group); SIGKILL to
    those left after :data:`STOP_GRACE_S`, or once ``hurry`` is not empty; returns once
    none is left."""
    group = server.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _alive(group, server):
        if time.monotonic() > deadline or hurry:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            server.wait()
            break
        time.sleep(0.05)


def _alive(group: int, server: subprocess.Popen[bytes]) -> bool:
    server.poll()  # reaps it once it exits (a zombie still counts as a member)
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _answers(server: subprocess.Popen[bytes], address: str) -> bool:
    """Wait until the server answers ``/health``; False if it exited first."""
    while server.poll() is None:
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _say_pages(address: str, seconds: float) -> None:
    """Print the runs page of each experiment with runs, newest runs first."""
    try:
        pages = runs_pages(address)
    except (OSError, ValueError, KeyError) as e:
        say(f"xp ui: ready after {seconds:.1f} s at {address} (the experiments could not be "
            f"listed: {e})")  # fmt: skip
        return
    if not pages:
        listing = EXPERIMENTS_PAGE.format(address=address)
        say(f"xp ui: ready after {seconds:.1f} s; no runs in this store yet: {listing}")
        return
    say(f"xp ui: ready after {seconds:.1f} s; the runs of each experiment:")
    width = max(len(name) for name, _ in pages[:LISTED])
    for name, page in pages[:LISTED]:
        say(f"  {name:<{width}}  {page}")
    if len(pages) > LISTED:
        listing = EXPERIMENTS_PAGE.format(address=address)
        say(f"  ... and {len(pages) - LISTED} more experiments: {listing}")


def runs_pages(address: str) -> list[tuple[str, str]]:
    """(experiment name, its runs page) of each experiment with runs on the server at
    ``address``, the one with the newest run first."""
    experiments = _post(address, "experiments/search", {"max_results": 1000})
    newest = []
    for experiment in experiments.get("experiments", []):
        runs = _post(
            address,
            "runs/search",
            {
                "experiment_ids": [experiment["experiment_id"]],
                "max_results": 1,
                "order_by": ["attributes.start_time DESC"],
            },
        ).get("runs", [])
        if runs:
            newest.append((int(runs[0]["info"]["start_time"]), experiment))
    newest.sort(key=lambda found: -found[0])
    return [
        (e["name"], RUNS_PAGE.format(address=address, experiment_id=e["experiment_id"]))
        for _, e in newest
    ]


def _post(address: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{address}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.loads(response.read()))
