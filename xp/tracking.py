"""MLflow tracking that stays off the training's critical path.

The training thread only appends to in-memory queues. A daemon thread imports mlflow
(about a second, so never at import time here), creates or re-opens the run, and every
``tracking.flush_interval_s`` writes what was queued: metrics in batches, then tags and
artifacts in the order they were asked for. A store that stops answering mid-run costs
nothing but a warning: the data stays queued and is retried on later flushes, and
``close()`` reports what could not be written in the end.

This module imports neither torch nor mlflow at import time (``xp.config`` only for
type checking, which keeps omegaconf out too).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import os
import posixpath
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsFloat

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from xp.config import TrackingConfig

__all__ = [
    "MlflowTracker",
    "TrackingError",
    "default_artifact_location",
    "default_tracking_uri",
    "flatten_params",
]

# MLflow's limits (mlflow.utils.validation), copied because importing mlflow to read
# them costs a second; a unit test checks they still match the installed MLflow.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_ENTITY_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

ERROR_TAG = "xp.error"
CHECKPOINT_LOCATION_TAG = "xp.checkpoint_location"
_ERROR_TAG_CHARS = 5000
_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

_HEALTH_TIMEOUT_S = 5.0
# How long close() keeps retrying writes that fail, counted from the close() call.
_FINAL_RETRY_S = 5.0
_RETRY_PAUSE_S = 0.5
# close() stops waiting for a background thread that made no progress for this long (a
# server that accepts connections but never answers); long, because one upload of a
# large checkpoint makes no visible progress either.
_CLOSE_STALL_S = 300.0
_CLOSE_NOTICE_S = 30.0
# xp retries a failed write itself on every flush, so MLflow's own per-request backoff
# (7 retries, about 4 minutes) would only delay the warning and close(). Applied with
# setdefault for http(s) stores: a value the user exported wins.
_HTTP_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
# MLflow error codes that the same request will meet again: dropping beats retrying.
_PERMANENT_ERROR_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"}
)

# MLflow's rule for metric, param and tag keys on POSIX (validate_param_and_metric_name).
_KEY_CHARS = re.compile(r"^[/\w.\- :]*$")
_BAD_PARAM_KEY_CHARS = re.compile(r"[^\w.\- :]")


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached, or the run cannot be created there."""


# --------------------------------------------------------------------------- defaults


def default_tracking_uri(launch_dir: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a SQLite store in ``<launch_dir>/outputs``.

    Creates ``<launch_dir>/outputs`` when the SQLite default is used.
    """
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_env:
        return from_env
    outputs = Path(launch_dir).absolute() / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(outputs / 'mlflow.db').as_posix()}"


def default_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Where a new experiment keeps its artifacts, or None to let the store decide.

    A SQLite store keeps them beside its database file, in
    ``mlartifacts/<experiment_name>`` (MLflow's own default, ``./mlruns`` of whatever the
    working directory is, scatters them); a server decides for itself, and so do other
    stores.
    """
    if not tracking_uri.lower().startswith("sqlite:///"):
        return None
    database = Path(tracking_uri[len("sqlite:///") :])
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment_name).strip("._") or "experiment"
    return (database.absolute().parent / "mlartifacts" / folder).as_uri()


# --------------------------------------------------------------------------- params


def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Flatten a nested config into MLflow params with dotted keys.

    Lists of scalars stay one value (``model.hidden_sizes: "[128, 128]"``); lists that
    hold mappings or lists get index keys (``a.0.b``). Enum members become their value,
    None becomes ``"None"`` and an empty mapping ``"{}"``. Values longer than MLflow's
    limit, and keys longer than its key limit, are shortened with a trailing ``...``;
    characters MLflow rejects in a key become ``_``. Never raises for a value.

    Args:
        config: A plain nested mapping, e.g. ``OmegaConf.to_container(cfg, resolve=True)``.

    Returns:
        Flat ``{key: value}``, in the config's order.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        _flatten(value, str(key), flat)
    return flat


def _flatten(node: Any, key: str, out: dict[str, str]) -> None:
    if isinstance(node, Mapping):
        if not node:
            out[_param_key(key)] = "{}"
        for child_key, child in node.items():
            _flatten(child, f"{key}.{child_key}", out)
    elif isinstance(node, list | tuple) and any(
        isinstance(item, Mapping | list | tuple) for item in node
    ):
        for index, item in enumerate(node):
            _flatten(item, f"{key}.{index}", out)
    else:
        out[_param_key(key)] = _shorten(_render(node), MAX_PARAM_VAL_LENGTH)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _render(value: Any) -> str:
    if isinstance(value, list | tuple):
        return str([_plain(item) for item in value])
    return str(_plain(value))


def _param_key(key: str) -> str:
    # Slashes go too: in a param key they would only let MLflow read it as a path.
    key = _BAD_PARAM_KEY_CHARS.sub("_", key)
    if not _valid_key_shape(key):
        key = f"_{key}"  # "", "." and "..x" are the only names left that MLflow refuses
    return _shorten(key, MAX_ENTITY_KEY_LENGTH)


def _valid_key(key: object) -> bool:
    return isinstance(key, str) and len(key) <= MAX_ENTITY_KEY_LENGTH and _valid_key_shape(key)


def _valid_key_shape(key: str) -> bool:
    if not _KEY_CHARS.match(key):
        return False
    normalized = posixpath.normpath(key)
    return normalized == key and normalized != "." and not normalized.startswith(("..", "/"))


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- tracker


@dataclass
class _Op:
    """A queued write other than metrics, applied in order by the background thread."""

    what: str
    """Names the write in messages, e.g. "artifact /path/model.pt"."""
    apply: Callable[[MlflowClient, str], None]


class MlflowTracker:
    """Records one MLflow run from a background thread.

    Every method but ``start()`` may be called before the run exists: writes queue up
    and ``run_id`` waits for it. Values handed to ``log_metrics`` are read later, in
    the background: pass tensors that are not modified in place afterwards
    (``loss.detach()`` is fine, an accumulator updated with ``+=`` is not).

    Args:
        settings: The ``tracking`` config group.
        tracking_uri: The store, e.g. from :func:`default_tracking_uri`.
        experiment_name: Created on first use.
        run_name: Shown in the MLflow UI.
        tags: Set when the run is created (or re-opened).
        params: Logged once, e.g. from :func:`flatten_params`. A re-opened run only
            gets the keys it lacks; changed values are reported, not written.
        artifact_location: Where a new experiment keeps artifacts, e.g. from
            :func:`default_artifact_location`; ignored for an existing experiment.
        run_id: Re-open this run (status back to RUNNING) instead of creating one.
        logger: Where warnings go; defaults to ``xp.tracking``.
    """

    def __init__(
        self,
        settings: TrackingConfig,
        *,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        artifact_location: str | None = None,
        run_id: str | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self._tags = {str(k): _shorten(str(v), MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()}
        self._params = {
            str(k): _shorten(str(v), MAX_PARAM_VAL_LENGTH) for k, v in (params or {}).items()
        }
        self._artifact_location = artifact_location
        self._reopen_id = run_id
        self._log = logger or logging.getLogger(__name__)

        # Filled by the training thread, drained by the background thread. deque's
        # append and popleft are atomic, so neither side takes a lock.
        self._metrics: collections.deque[tuple[int, int, dict[str, Any]]] = collections.deque()
        self._ops: collections.deque[_Op] = collections.deque()

        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        self._final_status = "FINISHED"
        self._run_id: str | None = None
        self._failure: BaseException | None = None
        self._failure_message = ""
        self._failure_surfaced = False
        self._warned_after_close = False

        # Owned by the background thread.
        self._unsent: list[Any] = []  # mlflow.entities.Metric, converted, not yet written
        self._known_keys: set[str] = set()
        self._logged_until: dict[str, int] = {}
        self._converted_through = -1
        self.written_through_step = -1
        """Every metric point up to this step is in the store (read by the training thread)."""
        self._bad_keys: set[str] = set()
        self._store_down = False
        self._last_error: BaseException | None = None
        self._lost_points = 0
        self._lost_ops = 0
        self._last_progress = time.monotonic()
        self._monitor: Any = None
        self._report: tuple[int, int] | None = None  # (metric points, other writes) unwritten

    # ------------------------------------------------------------------- public

    def start(self) -> None:
        """Start the background thread and return at once.

        For an http(s) store, first checks that the server answers, so a wrong URI
        fails before anything trains.

        Raises:
            TrackingError: the MLflow server does not answer.
            RuntimeError: ``start()`` was already called.
        """
        if self._thread is not None:
            raise RuntimeError("MlflowTracker.start() was already called; call it once per run.")
        if _is_http(self.tracking_uri):
            _check_server(self.tracking_uri)
            for name, value in _HTTP_RETRY_ENV.items():
                os.environ.setdefault(name, value)
        self._thread = threading.Thread(target=self._work, name="xp-mlflow-tracker", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the run exists.

        Raises:
            TrackingError: the run could not be created or re-opened, or it was not
                ready within ``timeout`` seconds.
        """
        if self._thread is None:
            raise RuntimeError("MlflowTracker.wait_ready() needs start() first.")
        if not self._ready.wait(timeout):
            raise TrackingError(
                f"The MLflow run in {self.tracking_uri} was not ready after {timeout:g} s. "
                "HINT: a busy or slow store can take longer; wait longer or check the store."
            )
        self._raise_if_failed()

    @property
    def run_id(self) -> str:
        """The run's id; blocks until the run exists (see :meth:`wait_ready`)."""
        self.wait_ready()
        assert self._run_id is not None
        return self._run_id

    @property
    def unwritten_metrics(self) -> int:
        """Metric points that did not reach the store (final after ``close()``)."""
        if self._report is not None:
            return self._report[0]
        return self._count_unwritten()[0]

    def log_metrics(self, metrics: Mapping[str, SupportsFloat], step: int) -> None:
        """Queue metric values for ``step``; costs a few microseconds.

        Values may be Python numbers or 0-dim tensors; they are converted in the
        background, so a GPU sync never stalls training. Keys like ``train/loss`` are
        kept as given; a key MLflow refuses is dropped with a warning.

        Raises:
            TrackingError: the run could not be created (raised here, once known).
        """
        if self._failure is not None:
            self._raise_if_failed()
        if self._closed:
            self._warn_after_close("log_metrics")
            return
        # A copy: callers often refill one dict every step.
        self._metrics.append((time.time_ns() // 1_000_000, step, dict(metrics)))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Queue tags for the run (values longer than MLflow's limit are shortened).

        Raises:
            TrackingError: the run could not be created.
        """
        from_caller = {str(k): _shorten(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}

        def apply(client: MlflowClient, run_id: str) -> None:
            _log_tags(client, run_id, from_caller)

        self._enqueue(_Op(f"tags {sorted(from_caller)}", apply), "set_tags")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Queue a file (or a directory, under its own name) for upload.

        The file is read later, in the background: leave it in place until ``close()``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            TrackingError: the run could not be created.
        """
        local = _existing(path, "log_artifact")

        def apply(client: MlflowClient, run_id: str) -> None:
            client.log_artifact(run_id, str(local), artifact_path)

        self._enqueue(_Op(f"artifact {local}", apply), "log_artifact")

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        """Queue the contents of ``directory`` for upload under ``artifact_path``.

        Raises:
            NotADirectoryError: ``directory`` is not a directory.
            TrackingError: the run could not be created.
        """
        local = _existing(directory, "log_artifacts")
        if not local.is_dir():
            raise NotADirectoryError(
                f"log_artifacts got {local}, which is a file; "
                "HINT: use log_artifact for a single file."
            )

        def apply(client: MlflowClient, run_id: str) -> None:
            client.log_artifacts(run_id, str(local), artifact_path)

        self._enqueue(_Op(f"artifacts {local}", apply), "log_artifacts")

    def log_checkpoint(self, path: Path) -> None:
        """Queue a checkpoint file or directory for the run's ``checkpoints/`` artifacts.

        One larger than ``tracking.checkpoint_artifact_max_mb`` (measured when it is
        uploaded) is not copied: its absolute location is recorded as the tag
        ``xp.checkpoint_location`` instead.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            TrackingError: the run could not be created.
        """
        local = _existing(path, "log_checkpoint")
        max_mb = self.settings.checkpoint_artifact_max_mb

        def apply(client: MlflowClient, run_id: str) -> None:
            size_mb = _size_bytes(local) / 2**20
            if size_mb <= max_mb:
                client.log_artifact(run_id, str(local), "checkpoints")
                return
            _log_tags(client, run_id, {CHECKPOINT_LOCATION_TAG: str(local)})
            self._log.info(
                "Checkpoint %s (%.1f MB) is over tracking.checkpoint_artifact_max_mb=%g, so "
                "its location is recorded as tag %s instead of uploading it.",
                local,
                size_mb,
                max_mb,
                CHECKPOINT_LOCATION_TAG,
            )

        self._enqueue(_Op(f"checkpoint {local}", apply), "log_checkpoint")

    def close(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Write everything queued, record ``error``, end the run with ``status``.

        Idempotent; before ``start()`` it only marks the tracker closed. Writes that
        fail are retried for a few seconds; what still could not be written is reported
        as a warning (and in :attr:`unwritten_metrics`), never raised.

        Args:
            status: FINISHED, FAILED or KILLED.
            error: Recorded as tag ``xp.error`` (its first 5000 characters) and in
                full as the artifact ``error.txt``.

        Raises:
            ValueError: ``status`` is not one of the three.
            TrackingError: the run could not be created, and no earlier call said so.
        """
        if status not in _TERMINAL_STATUSES:
            raise ValueError(
                f"close(status={status!r}) is not a terminal MLflow status; "
                f"use one of {', '.join(_TERMINAL_STATUSES)}."
            )
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        if error is not None:
            self._ops.append(_Op("error tag", _error_tag_writer(error)))
            self._ops.append(_Op("error.txt", _error_text_writer(error)))
        self._final_status = status
        self._last_progress = time.monotonic()
        self._closing.set()
        self._wake.set()
        noticed = False
        while thread.is_alive():
            thread.join(_RETRY_PAUSE_S)
            idle_s = time.monotonic() - self._last_progress
            if idle_s > _CLOSE_NOTICE_S and not noticed:
                noticed = True
                self._log.info("Still writing run %s to %s...", self._run_id, self.tracking_uri)
            if idle_s > _CLOSE_STALL_S:
                self._log.warning(
                    "MLflow store %s made no progress for %.0f s; giving up on the rest of run %s.",
                    self.tracking_uri,
                    _CLOSE_STALL_S,
                    self._run_id,
                )
                break
        if self._failure is not None:
            if not self._failure_surfaced:
                self._raise_if_failed()
            return
        if self._report is None:  # the thread is stuck: count from here
            self._report = self._count_unwritten()
            self._report_unwritten(terminated=False)

    # ------------------------------------------------------------------- training side

    def _enqueue(self, op: _Op, method: str) -> None:
        if self._failure is not None:
            self._raise_if_failed()
        if self._closed:
            self._warn_after_close(method)
            return
        self._ops.append(op)

    def _raise_if_failed(self) -> None:
        if self._failure is None:
            return
        self._failure_surfaced = True
        raise TrackingError(self._failure_message) from self._failure

    def _warn_after_close(self, method: str) -> None:
        if not self._warned_after_close:
            self._warned_after_close = True
            self._log.warning(
                "MlflowTracker.%s() after close() is ignored; HINT: close the tracker last.",
                method,
            )

    def _count_unwritten(self) -> tuple[int, int]:
        # list() copies the deques in one step under the GIL, safe beside the worker.
        queued = sum(len(metrics) for _, _, metrics in list(self._metrics))
        return queued + len(self._unsent) + self._lost_points, len(self._ops) + self._lost_ops

    # ------------------------------------------------------------------- background side

    def _work(self) -> None:
        try:
            client = self._open_run()
        except Exception as exc:
            self._failure = exc
            self._failure_message = self._describe_failure(exc)
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._closing.is_set():
                self._flush_once(client)
                self._wake.wait(self.settings.flush_interval_s)
                self._wake.clear()
            # Everything queued before close() set the flag is in the queues now.
            drained = self._flush_until(time.monotonic() + _FINAL_RETRY_S, client)
            self._terminate(client, drained)
        except Exception:
            self._log.exception("The MLflow tracking thread failed; run %s", self._run_id)
            self._report = self._count_unwritten()

    def _open_run(self) -> MlflowClient:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        _create_sqlite_store_atomically(self.tracking_uri)
        client = MlflowClient(self.tracking_uri)
        if self._reopen_id is not None:
            run = client.get_run(self._reopen_id)
            if run.info.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"run_id={self._reopen_id!r} is deleted in {self.tracking_uri}; HINT: "
                    f"restore it with `mlflow runs restore --run-id {self._reopen_id}`, "
                    "or start a new run."
                )
            run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
            _log_tags(client, run_id, self._tags)
            params = self._params_missing_from(run.data.params)
            # A resumed run recomputes the steps after its checkpoint; those already in
            # the store are not written twice, so each metric's history stays continuous.
            self._logged_until = {
                key: max(m.step for m in client.get_metric_history(run_id, key))
                for key in run.data.metrics
            }
        else:
            experiment_id = self._experiment_id(client)
            run = client.create_run(experiment_id, run_name=self.run_name, tags=self._tags)
            run_id = run.info.run_id
            params = self._params
        try:
            items = [Param(key, value) for key, value in params.items()]
            for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                chunk = items[start : start + MAX_PARAMS_TAGS_PER_BATCH]
                client.log_batch(run_id, params=chunk)
        except Exception:
            if self._reopen_id is None:
                _try(lambda: client.set_terminated(run_id, "FAILED"))
            raise
        self._run_id = run_id
        if self.settings.system_metrics:
            self._start_monitor(run_id)
        return client

    def _experiment_id(self, client: MlflowClient) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                return client.create_experiment(
                    self.experiment_name, artifact_location=self._artifact_location
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
                f"{self.tracking_uri}; HINT: restore it with `mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}`, or pick another experiment_name."
            )
        return str(experiment.experiment_id)

    def _params_missing_from(self, existing: Mapping[str, str]) -> dict[str, str]:
        changed = sorted(k for k, v in self._params.items() if k in existing and existing[k] != v)
        if changed:
            shown = ", ".join(f"{k}: {existing[k]!r} -> {self._params[k]!r}" for k in changed[:5])
            more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
            self._log.warning(
                "Run %s keeps its logged params; MLflow cannot change them, so these new "
                "values are not recorded: %s%s.",
                self._reopen_id,
                shown,
                more,
            )
        return {k: v for k, v in self._params.items() if k not in existing}

    def _start_monitor(self, run_id: str) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run_id,
                resume_logging=self._reopen_id is not None,
                tracking_uri=self.tracking_uri,
            )
            monitor.start()
        except Exception as exc:
            self._log.warning(
                "tracking.system_metrics=true is ignored: MLflow's system metrics monitor "
                "did not start (%s). HINT: it needs psutil (and pynvml for GPUs).",
                exc,
            )
            return
        self._monitor = monitor

    def _flush_until(self, deadline: float, client: MlflowClient) -> bool:
        while True:
            if self._flush_once(client):
                return True
            if time.monotonic() + _RETRY_PAUSE_S >= deadline:
                return False
            time.sleep(_RETRY_PAUSE_S)

    def _flush_once(self, client: MlflowClient) -> bool:
        """Write what is queued; True when nothing is left (False: the store is down)."""
        run_id = self._run_id
        assert run_id is not None
        self._convert_metrics()
        while self._unsent:
            chunk = self._unsent[:MAX_METRICS_PER_BATCH]
            outcome = self._attempt("metrics", client.log_batch, run_id, metrics=chunk)
            if outcome is None:
                return False
            if outcome is False:
                self._lost_points += len(chunk)
            del self._unsent[: len(chunk)]
        self.written_through_step = self._converted_through
        while self._ops:
            op = self._ops[0]
            outcome = self._attempt(op.what, op.apply, client, run_id)
            if outcome is None:
                return False
            if outcome is False:
                self._lost_ops += 1
            self._ops.popleft()
        return True

    def _attempt(
        self, what: str, write: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> bool | None:
        """Run one write: True when done, False when it can never succeed, None to retry."""
        try:
            write(*args, **kwargs)
        except Exception as exc:
            self._last_error = exc
            if _is_permanent(exc):
                self._log.error(
                    "MLflow run %s refused %s, which is dropped: %s", self._run_id, what, exc
                )
                return False
            if not self._store_down:
                self._store_down = True
                self._log.warning(
                    "MLflow store %s did not take %s (%s); xp keeps everything queued and "
                    "retries every %g s.",
                    self.tracking_uri,
                    what,
                    _first_line(exc),
                    self.settings.flush_interval_s,
                )
            return None
        self._last_progress = time.monotonic()
        if self._store_down:
            self._store_down = False
            self._log.info("MLflow store %s takes writes again.", self.tracking_uri)
        return True

    def _convert_metrics(self) -> None:
        from mlflow.entities import Metric

        pending = self._metrics
        while pending:
            timestamp, step, metrics = pending.popleft()
            self._converted_through = max(self._converted_through, int(step))
            for key, value in metrics.items():
                if step <= self._logged_until.get(key, -1):
                    continue
                if key not in self._known_keys and not self._accept_key(key):
                    self._lost_points += 1
                    continue
                try:
                    number = float(value.item() if hasattr(value, "item") else value)
                except Exception as exc:  # any object can arrive here; none may stop the thread
                    self._lost_points += 1
                    if key not in self._bad_keys:
                        self._bad_keys.add(key)
                        self._log.warning(
                            "Metric %r got a %s that cannot be read as a number (%s); such "
                            "values are dropped. HINT: log a float or a 0-dim tensor.",
                            key,
                            type(value).__name__,
                            _first_line(exc),
                        )
                    continue
                self._unsent.append(Metric(key, number, timestamp, int(step)))

    def _accept_key(self, key: str) -> bool:
        if _valid_key(key):
            self._known_keys.add(key)
            return True
        if key not in self._bad_keys:
            self._bad_keys.add(key)
            self._log.warning(
                "Metric key %r is not valid in MLflow, so its values are dropped. HINT: use "
                "letters, digits, spaces and _ - . : / only, at most %d characters, "
                "like 'train/loss'.",
                key,
                MAX_ENTITY_KEY_LENGTH,
            )
        return False

    def _terminate(self, client: MlflowClient, drained: bool) -> None:
        if self._monitor is not None:
            # Its last samples go through its own client; a dead store fails them fast.
            _try(self._monitor.finish)
        terminated = False
        if drained:  # else the store is down: a status write would only fail slowly
            terminated = bool(
                self._attempt(
                    f"status {self._final_status}",
                    client.set_terminated,
                    self._run_id,
                    self._final_status,
                )
            )
        self._report = self._count_unwritten()
        self._report_unwritten(terminated=terminated)

    def _report_unwritten(self, *, terminated: bool) -> None:
        assert self._report is not None
        points, others = self._report
        if not points and not others and terminated:
            return
        cause = f" (last error: {_first_line(self._last_error)})" if self._last_error else ""
        status = (
            "" if terminated else f"; the run still shows RUNNING there, not {self._final_status}"
        )
        self._log.warning(
            "MLflow run %s in %s: %d metric points and %d tag/artifact writes could not be "
            "written%s%s.",
            self._run_id,
            self.tracking_uri,
            points,
            others,
            cause,
            status,
        )

    def _describe_failure(self, exc: BaseException) -> str:
        if isinstance(exc, TrackingError):
            return str(exc)
        if self._reopen_id is not None:
            return (
                f"MLflow run_id={self._reopen_id!r} could not be re-opened in "
                f"{self.tracking_uri}: {_first_line(exc)}. HINT: check the run id "
                "(`mlflow runs list --experiment-id ...`) and that the store is the one "
                "the run was created in."
            )
        return (
            f"The MLflow run for experiment_name={self.experiment_name!r} could not be "
            f"created in {self.tracking_uri}: {_first_line(exc)}. HINT: check "
            "tracking.tracking_uri (or $MLFLOW_TRACKING_URI), or unset both to use the "
            "local SQLite store under outputs/."
        )


# --------------------------------------------------------------------------- helpers


def _create_sqlite_store_atomically(uri: str) -> None:
    """Create a new SQLite store under a temporary name, then link it into place.

    MLflow's ~2 s of migrations, cut short by a kill, would leave a store that no later
    run can open; a store that appears under its final name is always complete.
    """
    if not uri.lower().startswith("sqlite:///"):
        return
    database = Path(uri[len("sqlite:///") :])
    if database.exists():
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


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _check_server(uri: str) -> None:
    """Raise TrackingError unless the MLflow server at ``uri`` answers /health."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=_HEALTH_TIMEOUT_S) as response:
            response.read(64)
        return
    except urllib.error.HTTPError as exc:
        # It answers: auth or a proxy's routing is the store's business, not a dead server.
        if exc.code < 500:
            return
        reason = f"HTTP {exc.code}"
    except OSError as exc:  # URLError, refused connections and timeouts
        reason = str(getattr(exc, "reason", exc))
    parts = urllib.parse.urlsplit(uri)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    raise TrackingError(
        f"tracking_uri={uri!r}: the MLflow server does not answer ({reason}). HINT: start it "
        f"with `mlflow server --host {parts.hostname or '127.0.0.1'} --port {port}`, or unset "
        "MLFLOW_TRACKING_URI / tracking.tracking_uri to use the local SQLite store."
    )


def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return True  # the local file went away; it will not come back for a retry
    return getattr(exc, "error_code", None) in _PERMANENT_ERROR_CODES


def _log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(key, value) for key, value in tags.items()]
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])


def _error_tag_writer(error: str) -> Callable[[MlflowClient, str], None]:
    def apply(client: MlflowClient, run_id: str) -> None:
        _log_tags(client, run_id, {ERROR_TAG: error[:_ERROR_TAG_CHARS]})

    return apply


def _error_text_writer(error: str) -> Callable[[MlflowClient, str], None]:
    def apply(client: MlflowClient, run_id: str) -> None:
        client.log_text(run_id, error, "error.txt")

    return apply


def _existing(path: Path, method: str) -> Path:
    local = Path(path).absolute()
    if not local.exists():
        raise FileNotFoundError(
            f"{method} got {local}, which does not exist; HINT: log it after it is written."
        )
    return local


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _first_line(exc: BaseException | None, limit: int = 300) -> str:
    text = str(exc).strip()
    return _shorten(text.splitlines()[0], limit) if text else type(exc).__name__


def _try(action: Callable[[], Any]) -> None:
    """Best effort for clean-up steps whose failure must not hide the real outcome."""
    try:
        action()
    except Exception:
        logging.getLogger(__name__).debug("clean-up step failed", exc_info=True)
