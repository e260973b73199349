"""The process that writes an :class:`xp.tracking.MlflowTracker`'s run into MLflow.

Started by the tracker as ``python -m xp._tracking_worker READ_FD WRITE_FD PARENT_PID``
in a session of its own. It imports mlflow (about a second), creates or re-opens the
run and writes what the training process hands over, so neither mlflow's import nor
SQLAlchemy's work (~160 us of Python per metric point) ever holds the training
process's GIL. It imports neither torch nor omegaconf: only this module, ``xp.tracking``
(standard library only) and mlflow.

The protocol: the pipes carry pickled tuples, the kind first. The messages are defined
once, in :mod:`xp.tracking`: :class:`~xp.tracking.ToWriter` (``SETUP``, then ``METRICS``
and ``OP`` (a :class:`~xp.tracking.Request`) as often as there is something to hand
over, last ``CLOSE``) and :class:`~xp.tracking.FromWriter` (``READY`` or ``FAILED``;
then any of ``LOG``, ``STORE``, ``PROGRESS``; last ``REPORT``, once the run's end is
written or given up on). Each run is a whole exchange from ``SETUP`` to ``REPORT``;
between runs a kept writer (``CLOSE`` with ``keep``, a sweep's jobs one after the other
in one process: its imports and its store connection are paid once) holds no run and no
lock, and leaves when its pipe closes or its parent dies.

When either side dies:

- The training process goes away without ``close`` (killed, crashed): the pipe closes,
  or the parent pid changes (a data loader worker may hold the pipe open). The worker
  writes what it was handed, leaves the run RUNNING so that ``resume=`` continues it, and
  exits: after at most a few seconds without progress, even in the middle of a request
  to a store that does not answer. A kept writer between runs has nothing to write: it
  exits at once. Every run it closed before is complete in the store (the tracker's
  ``close()`` returned only after its ``report``).
- The worker dies (killed): the tracker's pipe closes; it warns once, training goes on,
  and its ``close()`` raises :class:`xp.tracking.TrackingIncomplete`.
- Signals meant for the training process reach the worker too (Slurm signals every
  process of a job step): it ignores SIGINT, SIGUSR1 and SIGUSR2, and SIGTERM while the
  training process lives, which ends the run through it. The tracker gives up on a store
  that does not answer with SIGHUP (``GIVE_UP``): the worker leaves at once.

A worker holds a lock on its run while it lives (``xp-mlflow-writer-<run id>.lock`` in
the temp directory, removed when it ends); a worker that re-opens the run (resume,
test=) takes that lock first, so it reads what is stored only once a leftover worker of
the same run has finished. Only a worker that is killed leaves its file behind; the next
worker (of any run) removes it.

No text leaves this process unredacted (:func:`xp.tracking.redact_secrets`): its
messages, and what mlflow prints to its stderr.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import os
import queue
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from xp.tracking import (
    CHECKPOINT_LOCATION_TAG,
    ERROR_TAG,
    GIVE_UP,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    FromWriter,
    Request,
    ToWriter,
    TrackingError,
    _first_line,
    quiet_store_creation,
    redact_secrets,
    redact_uri,
    sqlite_path,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

_ERROR_TAG_CHARS = 5000
# How long the last writes are retried without progress once the training process went
# away (close() says how long for itself).
_FINAL_RETRY_S = 5.0
_RETRY_PAUSE_S = 0.5
# How often the writer looks whether its parent is still there.
_POLL_S = 0.5
# How long a writer whose training process is gone may take to create or re-open the run.
_OPEN_PATIENCE_S = 30.0
# How long a re-opening writer waits for a leftover writer of the same run to finish.
_LOCK_WAIT_S = 120.0
# MLflow error codes that the same request will meet again: dropping beats retrying.
_PERMANENT_ERROR_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"}
)
_Point = tuple[str, float, int, int]
"""A metric point as it travels: key, value, timestamp in ms, step."""


class _ParentLog:
    """Sends messages to the training process, whose logger writes them (its run log)."""

    def __init__(self, send: Callable[..., bool]) -> None:
        self._send = send

    def log(self, level: int, msg: str, *args: Any) -> None:
        text = redact_secrets(msg % args if args else msg)
        if not self._send(FromWriter.LOG, level, text):
            print(f"xp.tracking: {text}", file=sys.stderr, flush=True)

    def info(self, msg: str, *args: Any) -> None:
        self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        self.log(logging.ERROR, msg, *args)


class _Writer:
    """Opens the run, then writes metrics and ops in the order they arrive.

    Two threads: the reader takes what the pipe brings into ``_unsent``/``_ops`` (under
    ``_lock``; the oldest points go beyond ``max_buffered_points``) and wakes the main
    thread, which writes. Control messages (close, gone) reach the main thread through
    ``inbox`` after everything sent before them was taken.
    """

    def __init__(self, setup: Mapping[str, Any], outbox: Connection, parent_pid: int) -> None:
        self.tracking_uri: str = setup["tracking_uri"]
        self.shown_uri = redact_uri(self.tracking_uri)
        self.experiment_name: str = setup["experiment_name"]
        self.run_name: str = setup["run_name"]
        self.tags: dict[str, str] = setup["tags"]
        self.params: dict[str, str] = setup["params"]
        self.artifact_location: str | None = setup["artifact_location"]
        self.reopen_id: str | None = setup["run_id"]
        self.system_metrics: bool = setup["system_metrics"]
        self.flush_interval_s: float = setup["flush_interval_s"]
        self.start_time_ms: int | None = setup.get("start_time_ms")
        self.max_buffered_points: int = setup.get("max_buffered_points", 1_000_000)
        self.parent_pid = parent_pid
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._outbox = outbox
        self._outbox_open = True
        self._send_lock = threading.Lock()
        self.log = _ParentLog(self.send)
        self.orphaned = threading.Event()

        self.run_id: str | None = None
        self._early_close: tuple[Any, ...] | None = None  # arrived while opening the run
        self._close_since = 0.0
        self._lock = threading.Lock()  # guards the five fields below (reader and main thread)
        self._unsent: collections.deque[_Point] = collections.deque()
        self._ops: collections.deque[tuple[str, tuple[Any, ...]]] = collections.deque()
        self._received_through = -1
        self._overflow_points = 0
        self._first_overflow_step: int | None = None
        self._overflow_warned = False

        self._stored_steps: dict[str, set[int]] = {}  # a re-opened run's points in the store
        self._written_through = -1
        self._done_points = 0  # written, or already in the store (a resumed run's steps)
        self._refused_points = 0
        self._written_ops = 0
        self._handled_ops = 0
        self._store_down = False
        self._next_attempt = 0.0
        self._last_error: BaseException | None = None
        self._monitor: Any = None
        self._reported: tuple[int, ...] | None = None
        self.last_progress = time.monotonic()
        self._run_lock: IO[str] | None = None
        self._run_lock_path: Path | None = None

    # ------------------------------------------------------------------- messages

    def send(self, *message: Any) -> bool:
        if not self._outbox_open:
            return False
        try:
            with self._send_lock:  # the reader thread warns too
                self._outbox.send(message)
        except OSError:  # the training process is gone
            self._outbox_open = False
            return False
        return True

    def read(self, inbox: Connection) -> None:
        """The reader thread: keeps the pipe drained whatever the writer is doing, until
        ``close`` (nothing of this run follows it; a kept writer's next ``setup`` is read
        by :func:`main`) or end-of-file (the training process is gone)."""
        try:
            while True:
                message = inbox.recv()
                kind = message[0]
                if kind == ToWriter.METRICS:
                    self._take_points(message[1], message[2])
                elif kind == ToWriter.OP:
                    with self._lock:
                        self._ops.append((message[1], message[2]))
                elif kind == ToWriter.CLOSE:
                    self.inbox.put(message)
                    return
                self.inbox.put(("data",))
        except (EOFError, OSError):
            pass
        self.inbox.put(("gone",))

    def _take_points(self, points: list[_Point], through: int) -> None:
        with self._lock:
            self._unsent.extend(points)
            self._received_through = max(self._received_through, through)
            self._drop_oldest()
        self._warn_overflow()

    def _drop_oldest(self) -> None:
        """Keep at most ``max_buffered_points`` unsent points (call with ``_lock`` held)."""
        excess = len(self._unsent) - self.max_buffered_points
        for _ in range(excess):
            step = self._unsent.popleft()[3]
            if self._first_overflow_step is None or step < self._first_overflow_step:
                self._first_overflow_step = step
        self._overflow_points += max(excess, 0)

    def _warn_overflow(self) -> None:
        if self._overflow_points and not self._overflow_warned:
            self._overflow_warned = True
            self.log.warning(
                "MLflow store %s has not taken metrics for so long that "
                "tracking.max_buffered_points=%d points wait in memory; from now on the "
                "oldest are dropped (the run's checkpoints keep them: `python -m xp "
                "resume=%s` restores them).",
                self.shown_uri,
                self.max_buffered_points,
                self.run_id or "<run id>",
            )

    # ------------------------------------------------------------------- main loop

    def run(self) -> tuple[bool, int]:
        """Serve this run from its setup to its report.

        Returns:
            (whether this writer takes the next run's setup; the exit status if not).
        """
        try:
            client = self._open_patiently()
        except Exception as exc:
            self.send(
                FromWriter.FAILED,
                self._describe_failure(exc),
                redact_secrets(traceback.format_exc()),
            )
            return False, 1
        if client is None:  # the server never answered: the run does not exist there
            error = _first_line(self._last_error) if self._last_error else None
            self.send(FromWriter.REPORT, False, error, False)
            return False, 0
        self.send(FromWriter.READY, self.run_id)
        terminated = keep = False
        try:
            close = self._early_close or self._serve(client)
            if close is None:
                # The training process is gone: the run stays RUNNING, for resume= to end.
                self._flush_patiently(client, _FINAL_RETRY_S)
                self._stop_monitor()
                return False, 0
            _, status, end_time_ms, patience_s, keep = close
            terminated = self._flush_patiently(client, patience_s, status, end_time_ms)
        except Exception:
            keep = False  # what state it left is unknown: the next run gets a fresh writer
            self.log.error(
                "The MLflow writer failed; run %s:\n%s", self.run_id, traceback.format_exc()
            )
        self._stop_monitor()
        self._report_progress()
        stays = bool(keep) and not self.orphaned.is_set()
        error = _first_line(self._last_error) if self._last_error else None
        self.send(FromWriter.REPORT, terminated, error, stays)
        return stays and self._outbox_open, 0

    def _serve(self, client: MlflowClient) -> tuple[Any, ...] | None:
        """Write what arrives until close (returned) or until the training process is gone."""
        while True:
            try:
                message: tuple[Any, ...] | None = self.inbox.get(timeout=_POLL_S)
            except queue.Empty:
                message = None
            while message is not None:
                if message[0] == "gone":
                    return None
                if message[0] == ToWriter.CLOSE:
                    return message
                message = self._next()
            if self.orphaned.is_set():
                return None
            if time.monotonic() >= self._next_attempt:
                self._flush_once(client)

    def _next(self) -> tuple[Any, ...] | None:
        try:
            return self.inbox.get_nowait()
        except queue.Empty:
            return None

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            # Its last samples go through its own client; a dead store fails them fast.
            _try(self._monitor.finish)
            self._monitor = None

    # ------------------------------------------------------------------- the run

    def _open_patiently(self) -> MlflowClient | None:
        """Create or re-open the run; while an http(s) server does not answer, retry every
        ``flush_interval_s`` (what the training hands over waits). None: given up, once the
        training process went away, or closed the run and the server took nothing for the
        close's patience."""
        while True:
            try:
                client = self._open_run()
            except Exception as exc:
                if not _may_answer_later(self.tracking_uri, exc):
                    raise
                self._last_error = exc
                if not self._store_down:
                    self._store_down = True
                    self.send(FromWriter.STORE, False, f"does not answer ({_first_line(exc)})")
                if not self._wait_to_open_again():
                    return None
                continue
            if self._store_down:
                self._store_down = False
                self.send(FromWriter.STORE, True, "")
            return client

    def _wait_to_open_again(self) -> bool:
        """Wait ``flush_interval_s``, taking ``close`` from the inbox; False to give up."""
        until = time.monotonic() + self.flush_interval_s
        while True:
            if self.orphaned.is_set():
                return False
            close = self._early_close
            if close is not None and time.monotonic() - self._close_since >= close[3]:
                return False
            if time.monotonic() >= until:
                return True
            try:
                message = self.inbox.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if message[0] == "gone":
                return False
            if message[0] == ToWriter.CLOSE:
                self._early_close, self._close_since = message, time.monotonic()

    def _open_run(self) -> MlflowClient:
        from mlflow.entities import Param

        client = _client(self.tracking_uri)
        if self.reopen_id is not None:
            if self._run_lock is None:  # a retry holds it already
                self._hold_run_lock(self.reopen_id)
            run = client.get_run(self.reopen_id)
            if run.info.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"run_id={self.reopen_id!r} is deleted in {self.shown_uri}; HINT: "
                    f"restore it with `mlflow runs restore --run-id {self.reopen_id}`, "
                    "or start a new run."
                )
            run_id = run.info.run_id
            _load_hdfs_support(run.info.artifact_uri)
            client.update_run(run_id, status="RUNNING")
            _log_tags(client, run_id, self.tags)
            params = self._params_missing_from(run.data.params)
            # Points of a killed run's writer, or of an earlier outage that resume= now
            # replays from a checkpoint: each (key, step) is written once.
            self._stored_steps = {
                key: {m.step for m in client.get_metric_history(run_id, key)}
                for key in run.data.metrics
            }
        else:
            experiment_id = self._experiment_id(client)
            run = client.create_run(
                experiment_id,
                start_time=self.start_time_ms,
                run_name=self.run_name,
                tags=self.tags,
            )
            run_id = run.info.run_id
            _load_hdfs_support(run.info.artifact_uri)
            self._hold_run_lock(run_id)
            params = self.params
        try:
            items = [Param(key, value) for key, value in params.items()]
            for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                chunk = items[start : start + MAX_PARAMS_TAGS_PER_BATCH]
                client.log_batch(run_id, params=chunk)
        except Exception:
            if self.reopen_id is None:
                _try(lambda: client.set_terminated(run_id, "FAILED"))
            raise
        self.run_id = run_id
        if self.system_metrics:
            self._start_monitor(run_id)
        return client

    def _hold_run_lock(self, run_id: str) -> None:
        """Lock ``run_id`` for this writer's life (the OS frees it when the process ends).

        A writer of a killed training process may still be writing its last points when
        the run is resumed; reading the stored steps before it finished would let both
        write the same steps. The file is removed when the writer ends
        (:meth:`release_run_lock`); a holder removes it while it holds it, so a waiter
        that got the lock checks that its file is still the one on disk.
        """
        try:
            import fcntl
        except ImportError:  # not POSIX: no leftover writers to wait for
            return
        path = Path(tempfile.gettempdir()) / f"xp-mlflow-writer-{run_id}.lock"
        deadline = time.monotonic() + _LOCK_WAIT_S
        told = False
        while True:
            handle = open(path, "a+")  # noqa: SIM115  (held for the process's life)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                if time.monotonic() > deadline:
                    self.log.warning(
                        "Run %s: its previous writer is still busy after %.0f s; writing anyway.",
                        run_id,
                        _LOCK_WAIT_S,
                    )
                    return
                if not told:
                    self.log.info(
                        "Run %s: waiting for the writer of its killed process to finish.", run_id
                    )
                    told = True
                time.sleep(0.1)
                continue
            if _same_file(handle, path):
                self._run_lock, self._run_lock_path = handle, path
                _remove_leftover_locks(path.parent, fcntl)
                return
            handle.close()  # its holder removed it meanwhile: lock the new one

    def release_run_lock(self) -> None:
        """Remove the run's lock file (while still holding it), then let it go."""
        handle, path = self._run_lock, self._run_lock_path
        self._run_lock = self._run_lock_path = None
        if handle is None or path is None:
            return
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()

    def _experiment_id(self, client: MlflowClient) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                return client.create_experiment(
                    self.experiment_name, artifact_location=self.artifact_location
                )
            except MlflowException as exc:
                # Another process of a multirun created it first.
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(self.experiment_name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"experiment_name={self.experiment_name!r} names a deleted experiment in "
                f"{self.shown_uri}; HINT: restore it with `mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}`, or pick another experiment_name."
            )
        return str(experiment.experiment_id)

    def _params_missing_from(self, existing: Mapping[str, str]) -> dict[str, str]:
        changed = sorted(k for k, v in self.params.items() if k in existing and existing[k] != v)
        if changed:
            shown = ", ".join(f"{k}: {existing[k]!r} -> {self.params[k]!r}" for k in changed[:5])
            more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
            self.log.warning(
                "Run %s keeps its logged params; MLflow cannot change them, so these new "
                "values are not recorded: %s%s.",
                self.reopen_id,
                shown,
                more,
            )
        return {k: v for k, v in self.params.items() if k not in existing}

    def _start_monitor(self, run_id: str) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run_id,
                resume_logging=self.reopen_id is not None,
                tracking_uri=self.tracking_uri,
            )
            monitor.start()
        except Exception as exc:
            self.log.warning(
                "tracking.system_metrics=true is ignored: MLflow's system metrics monitor "
                "did not start (%s). HINT: it needs psutil (and pynvml for GPUs).",
                exc,
            )
            return
        self._monitor = monitor

    def _describe_failure(self, exc: BaseException) -> str:
        if isinstance(exc, TrackingError):
            return redact_secrets(str(exc))
        if self.reopen_id is not None:
            return (
                f"MLflow run_id={self.reopen_id!r} could not be re-opened in "
                f"{self.shown_uri}: {_first_line(exc)}. HINT: check the run id "
                "(`mlflow runs list --experiment-id ...`) and that the store is the one "
                "the run was created in."
            )
        return (
            f"The MLflow run for experiment_name={self.experiment_name!r} could not be "
            f"created in {self.shown_uri}: {_first_line(exc)}. HINT: check "
            "tracking.tracking_uri (or $MLFLOW_TRACKING_URI), or unset both to use the "
            "local SQLite store under outputs/."
        )

    # ------------------------------------------------------------------- writing

    def _flush_patiently(
        self,
        client: MlflowClient,
        patience_s: float,
        status: str | None = None,
        end_time_ms: int | None = None,
    ) -> bool:
        """Write everything (and end the run with ``status``), giving up once the store has
        taken nothing for ``patience_s``. True when all of it is done."""
        since = time.monotonic()
        while True:
            before = self._progress_state()
            if self._flush_once(client):
                if status is None:
                    return True
                outcome = self._attempt(
                    f"status {status}",
                    client.set_terminated,
                    self.run_id,
                    status,
                    end_time=end_time_ms,
                )
                if outcome is not None:
                    return outcome
            if self._progress_state() != before:
                since = time.monotonic()
            if time.monotonic() - since + _RETRY_PAUSE_S >= patience_s:
                return False
            time.sleep(_RETRY_PAUSE_S)

    def _flush_once(self, client: MlflowClient) -> bool:
        """Write what was handed over; True when nothing is left (False: the store is down)."""
        from mlflow.entities import Metric

        run_id = self.run_id
        assert run_id is not None
        try:
            while True:
                chunk, skipped = self._next_chunk()
                self._done_points += skipped
                if not chunk:
                    break
                metrics = [Metric(key, value, ts, step) for key, value, ts, step in chunk]
                outcome = self._attempt("metrics", client.log_batch, run_id, metrics=metrics)
                if outcome is None:
                    with self._lock:
                        self._unsent.extendleft(reversed(chunk))
                        self._drop_oldest()
                    self._warn_overflow()
                    return False
                if outcome:
                    self._done_points += len(chunk)
                else:
                    self._refused_points += len(chunk)
                self._report_progress()
            while True:
                with self._lock:
                    if not self._ops:
                        break
                    what, request = self._ops[0]
                outcome = self._attempt(what, _apply, client, run_id, request, self.log)
                if outcome is None:
                    return False
                self._written_ops += bool(outcome)
                self._handled_ops += 1
                with self._lock:
                    self._ops.popleft()
                self._report_progress()
            return True
        finally:
            self._report_progress()

    def _next_chunk(self) -> tuple[list[_Point], int]:
        """Up to one batch of unsent points, and how many were skipped (already stored).

        Once nothing is left, every point received so far is written: the written-through
        step moves up to what was received (never past a point dropped for the buffer's
        bound, so the training's checkpoints keep those)."""
        chunk: list[_Point] = []
        skipped = 0
        stored = self._stored_steps
        with self._lock:
            unsent = self._unsent
            while unsent and len(chunk) < MAX_METRICS_PER_BATCH:
                point = unsent.popleft()
                if stored and point[3] in stored.get(point[0], ()):
                    skipped += 1
                else:
                    chunk.append(point)
            if not chunk:
                through = self._received_through
                if self._first_overflow_step is not None:
                    through = min(through, self._first_overflow_step - 1)
                self._written_through = max(self._written_through, through)
        return chunk, skipped

    def _attempt(
        self, what: str, write: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> bool | None:
        """Run one write: True when done, False when it can never succeed, None to retry."""
        try:
            write(*args, **kwargs)
        except Exception as exc:
            self._last_error = exc
            if _is_permanent(exc):
                self.log.error(
                    "MLflow run %s refused %s, which is dropped: %s",
                    self.run_id,
                    what,
                    _first_line(exc),
                )
                return False
            self._next_attempt = time.monotonic() + self.flush_interval_s
            if not self._store_down:
                self._store_down = True
                self.send(FromWriter.STORE, False, f"did not take {what} ({_first_line(exc)})")
            return None
        if self._store_down:
            self._store_down = False
            self.send(FromWriter.STORE, True, "")
        return True

    def _progress_state(self) -> tuple[int, ...]:
        return (
            self._done_points,
            self._written_through,
            self._written_ops,
            self._handled_ops,
            self._refused_points,
            self._overflow_points,
        )

    def _report_progress(self) -> None:
        state = self._progress_state()
        if state != self._reported:
            self._reported = state
            self.last_progress = time.monotonic()
            self.send(FromWriter.PROGRESS, *state)


# --------------------------------------------------------------------------- writes


def _apply(client: MlflowClient, run_id: str, request: tuple[Any, ...], log: _ParentLog) -> None:
    """Carry out one queued write other than metrics (see ``MlflowTracker._enqueue``)."""
    kind = request[0]
    if kind == Request.TAGS:
        _log_tags(client, run_id, request[1])
    elif kind == Request.ARTIFACT:
        client.log_artifact(run_id, request[1], request[2])
    elif kind == Request.ARTIFACTS:
        client.log_artifacts(run_id, request[1], request[2])
    elif kind == Request.CHECKPOINT:
        _, path, max_mb, sidecar = request
        local = Path(path)
        size_mb = _size_bytes(local) / 2**20
        if size_mb <= max_mb:
            if sidecar is not None:  # first: a checkpoint listed has its checksum beside it
                client.log_artifact(run_id, sidecar, "checkpoints")
            client.log_artifact(run_id, path, "checkpoints")
            return
        _log_tags(client, run_id, {CHECKPOINT_LOCATION_TAG: path})
        log.info(
            "Checkpoint %s (%.1f MB) is over tracking.checkpoint_artifact_max_mb=%g, so "
            "its location is recorded as tag %s instead of uploading it.",
            path,
            size_mb,
            max_mb,
            CHECKPOINT_LOCATION_TAG,
        )
    elif kind == Request.ERROR:
        error = request[1]
        _log_tags(client, run_id, {ERROR_TAG: error[:_ERROR_TAG_CHARS]})
    elif kind == Request.ERROR_TEXT:
        client.log_text(run_id, request[1], "error.txt")
    else:
        raise AssertionError(f"unknown write {kind!r}")


def _log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(key, value) for key, value in tags.items()]
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])


def _create_sqlite_store_atomically(uri: str) -> None:
    """Create a new SQLite store under a temporary name, then link it into place.

    MLflow's ~2 s of migrations, cut short by a kill, would leave a store that no later
    run can open; a store that appears under its final name is always complete.
    """
    database = sqlite_path(uri)
    if database is None or database.exists():
        return
    from mlflow import MlflowClient

    database.parent.mkdir(parents=True, exist_ok=True)
    tmp = database.with_name(f".{database.name}.{os.getpid()}.tmp")
    try:
        MlflowClient(f"sqlite:///{tmp.as_posix()}").search_experiments(max_results=1)
        # Fails if another process created it meanwhile: then theirs is used.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, database)
    finally:
        tmp.unlink(missing_ok=True)


def _may_answer_later(tracking_uri: str, exc: BaseException) -> bool:
    """Whether creating the run failed because an http(s) server did not answer (down,
    unreachable, overloaded), not because it said no (credentials, a bad request)."""
    if not tracking_uri.lower().startswith(("http://", "https://")):
        return False
    if isinstance(exc, TrackingError):
        return False
    refused = {"UNAUTHENTICATED", "PERMISSION_DENIED", *_PERMANENT_ERROR_CODES}
    return getattr(exc, "error_code", None) not in refused


def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return True  # the local file went away; it will not come back for a retry
    return getattr(exc, "error_code", None) in _PERMANENT_ERROR_CODES


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


_CLIENTS: dict[str, MlflowClient] = {}
"""One client per store for the writer's life: a kept writer's next run reuses its store
object (SQL stores verify their schema when they are made: tens of milliseconds)."""


def _client(tracking_uri: str) -> MlflowClient:
    _import_mlflow()
    _create_sqlite_store_atomically(tracking_uri)
    client = _CLIENTS.get(tracking_uri)
    if client is None:
        from mlflow import MlflowClient

        client = _CLIENTS[tracking_uri] = MlflowClient(tracking_uri)
    return client


def _try(action: Callable[[], Any]) -> None:
    """Best effort for clean-up steps whose failure must not hide the real outcome."""
    try:
        action()
    except Exception:
        logging.getLogger(__name__).debug("clean-up step failed", exc_info=True)


class _Without:
    """Import hook: ``import`` of these top-level packages fails as if they were absent."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


_LEFT_OUT = ("pandas", "pyarrow")
"""What mlflow imports but a writer does without (:func:`_import_mlflow`)."""


def _import_mlflow() -> None:
    """``import mlflow`` without pandas and pyarrow, as mlflow-skinny (which has neither)
    goes.

    mlflow imports pandas (and scipy with it) only to register its pandas and numpy
    dataset types, and pyarrow only for its HDFS artifact store; without them it skips
    both. A writer never logs datasets, and a run whose artifacts are on HDFS gets pyarrow
    (:func:`_load_hdfs_support`). Left out, the writer starts 0.5 s sooner and holds 85 MiB
    less (benchmarks/, memory case). They are hidden only while mlflow imports; should an
    mlflow release need one of them to import at all, it imports as usual.
    """
    if "mlflow" in sys.modules:
        return
    hide = _Without(*_LEFT_OUT)
    sys.meta_path.insert(0, hide)
    try:
        import mlflow
    except ImportError:
        pass  # this mlflow cannot do without them: imported with them, below
    finally:
        sys.meta_path.remove(hide)
    import mlflow  # noqa: F401

    quiet_store_creation()


def _load_hdfs_support(artifact_uri: str) -> None:
    """A run whose artifacts live on HDFS: mlflow's HDFS repository gets the pyarrow that
    :func:`_import_mlflow` left out (its module imports it when it can, so it runs again)."""
    from urllib.parse import urlparse

    if urlparse(artifact_uri).scheme not in ("hdfs", "viewfs"):
        return
    module = sys.modules.get("mlflow.store.artifact.hdfs_artifact_repo")
    if module is not None and "HadoopFileSystem" not in vars(module):
        importlib.reload(module)


def _warm_up() -> None:
    """Import what writing the run needs while the training process gets ready."""
    _import_mlflow()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http:", "https:", "databricks")):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (a local store's)


def _take_environ(environ: Mapping[str, str]) -> None:
    """The training process's MLflow settings when its tracker started (an early writer
    was started before the run's config could set them)."""
    for name in [n for n in os.environ if n.startswith("MLFLOW_") and n not in environ]:
        del os.environ[name]
    os.environ.update(environ)


class _RedactingStream:
    """A text stream that forwards what is written with secrets redacted (mlflow's own
    warnings and tracebacks may quote the tracking URI, credentials included)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_secrets(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _Serving:
    """The run a writer serves now (None between the runs of a kept writer)."""

    writer: _Writer | None = None


def _watch_parent(serving: _Serving, parent_pid: int) -> None:
    """A thread: once the training process is gone, the writer has a few seconds without
    progress to finish (it writes what it was handed); then this ends the process, even
    in the middle of a request to a store that does not answer. The run stays RUNNING.
    A kept writer between runs has nothing left to write: it leaves at once."""
    while os.getppid() == parent_pid:
        time.sleep(_POLL_S)
    writer = serving.writer
    if writer is None:
        _leave(0)
        return
    writer.orphaned.set()
    writer.inbox.put(("gone",))
    gone_at = time.monotonic()
    while True:
        time.sleep(_POLL_S)
        # Creating the run may wait for a leftover writer of the same run (itself bounded
        # by this rule), so it gets longer.
        patience_s = _FINAL_RETRY_S + _POLL_S if writer.run_id is not None else _OPEN_PATIENCE_S
        if time.monotonic() - max(gone_at, writer.last_progress) > patience_s:
            break
    writer.release_run_lock()
    _leave(0)


def _leave(code: int) -> None:
    """Exit without the interpreter's teardown of mlflow and SQLAlchemy (half a second),
    which the training process would wait for."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _remove_leftover_locks(folder: Path, fcntl: Any) -> None:
    """Remove the lock files of killed writers (of any run): those nobody holds.

    Each is removed while locked here, as its own writer would: a writer that opened it
    meanwhile finds its file gone from disk and locks a new one (see ``_hold_run_lock``).
    """
    for path in folder.glob("xp-mlflow-writer-*.lock"):
        try:
            handle = open(path)  # noqa: SIM115
        except OSError:
            continue  # removed meanwhile, or not ours to read
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            if _same_file(handle, path):
                with contextlib.suppress(OSError):
                    path.unlink()


def _same_file(handle: IO[str], path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def main(argv: list[str] | None = None) -> int:
    """Serve a tracker's run (or, kept, the runs of a sweep's jobs in turn): ``READ_FD
    WRITE_FD PARENT_PID [--early] [--after-fd=FD]``.

    ``--early``: started by :func:`xp.tracking.start_early_writer` before the run is known;
    imports mlflow while it waits for the run's setup. ``--after-fd``: first waits for FD
    to read end-of-file.
    """
    sys.stdout = _RedactingStream(sys.stdout)
    sys.stderr = _RedactingStream(sys.stderr)
    args = list(argv or sys.argv[1:])
    early = "--early" in args
    after = [int(a.split("=", 1)[1]) for a in args if a.startswith("--after-fd=")]
    read_fd, write_fd, parent_pid = (int(a) for a in args if not a.startswith("--"))
    serving = _Serving()
    _leave_signals_to_training(serving, parent_pid)  # Slurm's may come while this starts
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    for fd in after:  # the go-ahead: end-of-file once xp's parent process has composed
        with contextlib.suppress(OSError):
            while os.read(fd, 4096):
                pass
        os.close(fd)
        if os.getppid() != parent_pid:
            return 0  # the command ended before it trained (Hydra refused it)
    if early:
        from xp.prefork import imports_frozen

        with imports_frozen():  # mlflow's import, 0.1-0.2 s sooner
            _warm_up()
    threading.Thread(
        target=_watch_parent, args=(serving, parent_pid), name="xp-tracking-watchdog", daemon=True
    ).start()
    while True:  # one run, or the runs of a sweep's jobs one after the other
        setup = _next_setup(inbox, parent_pid)
        if setup is None:
            _leave(0)
            return 0
        _take_environ(setup.get("environ", {}))
        writer = serving.writer = _Writer(setup, outbox, parent_pid)
        threading.Thread(
            target=writer.read, args=(inbox,), name="xp-tracking-reader", daemon=True
        ).start()
        try:
            stays, code = writer.run()
        finally:
            writer.release_run_lock()
            serving.writer = None
        if not stays:
            _leave(code)
            return code


def _leave_signals_to_training(serving: _Serving, parent_pid: int) -> None:
    """Leave the stop signals meant for the training process to it.

    Slurm signals every process of a job step, this one too: SIGTERM (scancel, a requeue,
    the time limit), SIGUSR1 (``--signal=USR1@...``), SIGUSR2 (submitit's), SIGINT (srun's
    Ctrl-C), whenever they come: while this writer still imports, after the training
    process already asked it to close the run. The training process got them as well and
    ends the run through this writer; if it dies instead, the watchdog notices. A SIGTERM
    once the training process is gone, and the tracker's own SIGHUP (:data:`GIVE_UP`: it
    gave up on a store that does not answer), make the writer leave at once, without its
    lock file.
    """

    def leave(signum: int, frame: object) -> None:
        if signum == signal.SIGTERM and os.getppid() == parent_pid:
            return  # meant for the training process
        writer = serving.writer
        if writer is not None:
            writer.release_run_lock()
        _leave(1)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(GIVE_UP, leave)
    for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def _next_setup(inbox: Connection, parent_pid: int) -> dict[str, Any] | None:
    """The next run's setup; None once the training process has gone (or closed the pipe)."""
    try:
        # A forked child of the training process (a data loader worker) may hold the pipe
        # open after the training process is gone: the parent pid tells.
        while not inbox.poll(_POLL_S):
            if os.getppid() != parent_pid:
                return None
        kind, setup = inbox.recv()
    except (EOFError, OSError):
        return None  # the training process went away before it said anything (or never used it)
    assert kind == ToWriter.SETUP, kind
    return dict(setup)


if __name__ == "__main__":
    raise SystemExit(main())
