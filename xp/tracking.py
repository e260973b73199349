"""MLflow tracking that stays off the training's critical path, and out of its process.

The training thread only appends to in-memory queues. A writer process of the tracker's
own (:mod:`xp._tracking_worker`, a fresh interpreter that never imports torch) imports
mlflow (about a second), creates or re-opens the run, and writes what it is handed:
every ``tracking.flush_interval_s`` a small sender thread here converts the queued
metrics to plain numbers and hands them over through a pipe, with tags and artifacts in
the order they were asked for. MLflow's Python work (~160 us per metric point into
SQLite) thus never holds the training process's GIL. A store that stops answering
mid-run costs nothing but one warning: the writer keeps the data (up to
``tracking.max_buffered_points``) and retries, and ``close()`` waits at most
``tracking.close_timeout_s`` for a store that takes nothing, then raises
:class:`TrackingIncomplete`, naming what is missing. A writer that dies mid-run (killed)
is noticed the same way: training goes on, one warning, and ``close()`` raises. If the
training process dies, the writer writes what it was handed, leaves the run RUNNING (so
it can be resumed) and exits within seconds.

No URI password or secret reaches text here: every message, tag and param goes through
:func:`redact_secrets` (:func:`redact_uri` for URIs, :func:`is_secret_name` for the
environment).

The messages on the pipes between the two processes are :class:`ToWriter`,
:class:`FromWriter` and :class:`Request`; what each side does when the other dies is in
:mod:`xp._tracking_worker`.

This module imports neither torch nor mlflow (``xp.config`` only for type checking, which
keeps omegaconf out too); the writer process is the only one that imports mlflow.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import posixpath
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsFloat

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from xp.config import TrackingConfig

__all__ = [
    "MlflowTracker",
    "TrackingError",
    "TrackingIncomplete",
    "check_tracking_uri",
    "client",
    "default_artifact_location",
    "default_tracking_uri",
    "flatten_params",
    "is_secret_name",
    "redact_environ",
    "redact_secrets",
    "redact_strings",
    "redact_uri",
    "sqlite_path",
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
_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

GIVE_UP = signal.SIGHUP
"""The signal that ends a writer stuck on a store that does not answer: one that Slurm does
not send to the processes of a job step (its TERM, INT, USR1 and USR2 are the training
process's, and the writer leaves them to it)."""

_HEALTH_TIMEOUT_S = 5.0
_RETRY_PAUSE_S = 0.5
# The writer itself gives up after tracking.close_timeout_s without progress; close()
# kills it this much later (it is stuck in a request to a store that never answers).
_CLOSE_GRACE_S = 5.0
_CLOSE_NOTICE_S = 10.0
# Points handed over but not written for this long: the store does not answer (a dead
# server fails fast and the writer says so; a hung one only stops taking writes).
_STALL_WARN_S = 30.0
# A pipe message holds at most this many metric points, so no pickle grows without bound.
_POINTS_PER_MESSAGE = 20_000
# xp retries a failed write itself on every flush, so MLflow's own per-request backoff
# (7 retries, about 4 minutes) would only delay the warning and close(). Applied with
# setdefault for http(s) stores, in the writer's environment: a value the user exported wins.
_HTTP_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}

# MLflow's rule for metric, param and tag keys on POSIX (validate_param_and_metric_name).
_KEY_CHARS = re.compile(r"^[/\w.\- :]*$")
_BAD_PARAM_KEY_CHARS = re.compile(r"[^\w.\- :]")


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached, or the run cannot be created there."""


class TrackingIncomplete(TrackingError):
    """``close()`` could not record everything: the run in the store lacks what it names.

    Raised after the run's training is over (its checkpoints are saved): the process
    should exit non-zero. ``python -m xp resume=<run id>``, once the store answers again,
    replays the missing metric points from the run's last checkpoint and uploads its
    files again.

    Attributes:
        run_id: The MLflow run (None if it was never created).
        missing_points: Metric points that are not in the store.
        missing_writes: What else is missing, e.g. ``["tags ['xp.best_step']",
            "artifact /runs/x/config.yaml"]``.
        status_recorded: Whether the run's end status reached the store (if not, the run
            still shows RUNNING there).
        first_missing_step: Every point below this step is in the store.
    """

    def __init__(
        self,
        message: str,
        *,
        run_id: str | None,
        missing_points: int,
        missing_writes: list[str],
        status_recorded: bool,
        first_missing_step: int,
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.missing_points = missing_points
        self.missing_writes = missing_writes
        self.status_recorded = status_recorded
        self.first_missing_step = first_missing_step


# --------------------------------------------------------------------------- secrets

_SECRET_WORDS = ("PASSWORD", "PASSWD", "TOKEN", "SECRET", "KEY")
REDACTED = "***"
"""What a redacted value reads in a record."""
# A URL's scheme and authority ("scheme://user:password@host:port"), and what follows up
# to whitespace or a quote. An unencoded "@" in a password: the last "@" ends the userinfo.
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s'\"<>`]*)")
_QUERY_ITEM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&#;]+)=(?P<value>[^&#;]*)")
# Secret environment values shorter than this are not scrubbed from text ("1", "yes").
_MIN_SECRET_CHARS = 4


def is_secret_name(name: str) -> bool:
    """Whether an environment variable (or a URL query parameter) named ``name`` holds a
    secret: its name contains PASSWORD, PASSWD, TOKEN, SECRET or KEY (any case)."""
    upper = name.upper()
    return any(word in upper for word in _SECRET_WORDS)


def redact_uri(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``.

    ``http://user:pass@host`` becomes ``http://user:***@host``; a userinfo without a
    password (``https://token@host``) becomes ``***``; query parameters with a secret name
    (``?password=...``, ``?access_token=...``) keep their name only. Idempotent; text
    without URLs comes back unchanged.
    """
    if "://" not in text:
        return text
    return _URL.sub(_redact_url, text)


def _redact_url(match: re.Match[str]) -> str:
    rest = match["rest"]
    stops = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i != -1]
    end = min(stops, default=len(rest))
    at = rest.rfind("@", 0, end)
    if at == -1:
        # A password with an unencoded "/", "?" or "#" ends the authority early
        # ("user:pa/ss@host"): a colon not followed by a port, then an "@" further on.
        user, colon, after = rest[:end].partition(":")
        later = rest.find("@", end)
        if colon and not after.isdigit() and later != -1 and not any(c.isspace() for c in user):
            at = later
    if at != -1:
        userinfo, host_and_tail = rest[:at], rest[at + 1 :]
        if userinfo != REDACTED:
            user, colon, _ = userinfo.partition(":")
            userinfo = f"{user}:{REDACTED}" if colon and user != REDACTED else REDACTED
        rest = f"{userinfo}@{host_and_tail}"
    if "=" in rest:
        rest = _QUERY_ITEM.sub(_redact_query_item, rest)
    return f"{match['scheme']}{rest}"


def _redact_query_item(match: re.Match[str]) -> str:
    if not is_secret_name(match["name"]):
        return match.group(0)
    return f"{match['sep']}{match['name']}={REDACTED}"


def redact_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` fit to record: secret-named values become ``***``
    (:func:`is_secret_name`), and URLs in the others lose their credentials."""
    return {
        name: REDACTED if is_secret_name(name) else redact_uri(value)
        for name, value in environ.items()
    }


def redact_secrets(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` fit to print or record: :func:`redact_uri`, and the value of every
    secret-named variable of ``environ`` (default: ``os.environ``) replaced by ``***``.

    Use it on anything that may hold a URI or a value taken from the environment (an
    error, a resolved config, a command line).
    """
    return _without(redact_uri(text), _secret_values(os.environ if environ is None else environ))


def redact_strings(data: Any) -> Any:
    """``data`` (plain nested dicts and lists, a loaded YAML document) with every string
    passed through :func:`redact_secrets`: a value that was a secret stays a value of its
    own when dumped again (``key: '***'``), where replacing it in the YAML text would write
    ``key: ***``, which YAML reads as an alias and refuses."""
    if isinstance(data, str):
        return redact_secrets(data)
    if isinstance(data, dict):
        return {redact_strings(k): redact_strings(v) for k, v in data.items()}
    if isinstance(data, list):
        return [redact_strings(v) for v in data]
    return data


def _secret_values(environ: Mapping[str, str]) -> list[str]:
    """The values of the secret-named variables, longest first (a secret that holds a
    shorter one is replaced whole)."""
    return sorted(
        {v for k, v in environ.items() if len(v) >= _MIN_SECRET_CHARS and is_secret_name(k)},
        key=len,
        reverse=True,
    )


def _without(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


# --------------------------------------------------------------------------- defaults


_STORE_SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "postgres", "mysql", "mssql",
                  "databricks", "databricks-uc", "uc")  # fmt: skip
"""The schemes MLflow 3 has a tracking store for (a plugin may add more)."""


def check_tracking_uri(tracking_uri: str) -> None:
    """Fail at once, naming the fix, for a URI no MLflow store takes.

    Raises:
        TrackingError: its scheme is neither MLflow's nor a plugin's
            (entry point group ``mlflow.tracking_store``).
    """
    scheme, sep, _ = tracking_uri.partition(":")
    if not sep or not re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*$", scheme):
        return  # a plain path: MLflow takes it as a file store
    name = scheme.lower().split("+", 1)[0]  # postgresql+psycopg2
    if name in _STORE_SCHEMES or len(scheme) == 1:  # C:\ on Windows
        return
    from importlib.metadata import entry_points

    if name in {ep.name for ep in entry_points(group="mlflow.tracking_store")}:
        return
    raise TrackingError(
        f"tracking.tracking_uri={redact_uri(tracking_uri)!r} has the scheme {scheme!r}, which "
        "no MLflow store takes; use sqlite:///<path>/mlflow.db, http(s)://<server>:<port>, "
        "postgresql://..., or unset it (and $MLFLOW_TRACKING_URI) for outputs/mlflow.db."
    )


def quiet_store_creation() -> None:
    """MLflow's INFO lines as it creates or migrates a SQLite store ("Creating initial MLflow
    database tables...", "Updating database tables") only where the user asked for MLflow's
    INFO (``MLFLOW_LOGGING_LEVEL``): a first run's log is the run's story, and these lines
    say nothing the user can act on. Failures are logged at WARNING and above, as before."""
    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` for this process's own queries (resume, sweeps, compare).

    Against a server it fails in seconds, not after MLflow's minutes of retries, when the
    server does not answer (a value of ``MLFLOW_HTTP_REQUEST_*`` the user exported wins).
    """
    from mlflow import MlflowClient

    quiet_store_creation()
    if _is_http(tracking_uri):
        for name, value in _HTTP_RETRY_ENV.items():
            os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri)


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


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (without its query), or None."""
    if not tracking_uri.lower().startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0])


def default_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Where a new experiment keeps its artifacts, or None to let the store decide.

    A SQLite store keeps them beside its database file, in
    ``mlartifacts/<experiment_name>`` (MLflow's own default, ``./mlruns`` of whatever the
    working directory is, scatters them); a server decides for itself, and so do other
    stores.
    """
    database = sqlite_path(tracking_uri)
    if database is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment_name).strip("._") or "experiment"
    return (database.absolute().parent / "mlartifacts" / folder).as_uri()


# --------------------------------------------------------------------------- params


def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Flatten a nested config into MLflow params with dotted keys.

    Lists of scalars stay one value (``model.hidden_sizes: "[128, 128]"``); lists that
    hold mappings or lists get index keys (``a.0.b``). Enum members become their value,
    None becomes ``"None"`` and an empty mapping ``"{}"``. URLs lose their credentials
    (:func:`redact_uri`). Values longer than MLflow's limit, and keys longer than its key
    limit, are shortened with a trailing ``...``; characters MLflow rejects in a key
    become ``_``. Never raises for a value.

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
        out[_param_key(key)] = _shorten(redact_uri(_render(node)), MAX_PARAM_VAL_LENGTH)


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


# --------------------------------------------------------------------------- the pipes


class ToWriter(str, enum.Enum):
    """What the tracker sends its writer process (:mod:`xp._tracking_worker`): pickled
    tuples of plain values, the message's kind first. A run is one exchange from
    ``SETUP`` to the writer's ``REPORT``."""

    SETUP = "setup"
    """``(SETUP, dict)``: the store, the run to create or re-open, its start time
    (:meth:`MlflowTracker._setup`)."""
    METRICS = "metrics"
    """``(METRICS, [(key, value, timestamp_ms, step), ...], through_step)``."""
    OP = "op"
    """``(OP, what, request)``: a write other than metrics, in the order asked for;
    ``request`` starts with a :class:`Request`."""
    CLOSE = "close"
    """``(CLOSE, status, end_time_ms, patience_s, keep)``: write the rest, giving up after
    ``patience_s`` without progress, end the run with ``status``; ``keep``: then wait for
    the next run's ``SETUP`` instead of exiting (a sweep's jobs share one writer)."""


class Request(str, enum.Enum):
    """The writes an ``OP`` carries (``xp._tracking_worker._apply`` carries them out)."""

    TAGS = "tags"  # (TAGS, {key: value})
    ARTIFACT = "artifact"  # (ARTIFACT, local path, artifact path or None)
    ARTIFACTS = "artifacts"  # (ARTIFACTS, local folder, artifact path or None)
    CHECKPOINT = "checkpoint"  # (CHECKPOINT, local path, max MB to upload (else a tag), sidecar)
    ERROR = "error"  # (ERROR, text): the run's error tag
    ERROR_TEXT = "error_text"  # (ERROR_TEXT, text): error.txt


class FromWriter(str, enum.Enum):
    """What the writer process sends back, the message's kind first."""

    READY = "ready"
    """``(READY, run_id)``: the run exists; or else ``FAILED``."""
    FAILED = "failed"
    """``(FAILED, message, detail)``: the run could not be created or re-opened."""
    LOG = "log"
    """``(LOG, level, text)``: a line for the run's log (the tracker's logger)."""
    STORE = "store"
    """``(STORE, up, reason)``: the store stopped, or started again, taking writes."""
    PROGRESS = "progress"
    """``(PROGRESS, done_points, written_through_step, written_ops, handled_ops,
    refused_points, overflow_points)``."""
    REPORT = "report"
    """``(REPORT, terminated, last_error, stays)``, last, once the run's end is written
    (or given up on); ``stays``: the writer takes the next ``SETUP`` on the same pipes."""


# --------------------------------------------------------------------------- tracker


@dataclass
class _Op:
    """A queued write other than metrics, carried out in order by the writer process."""

    what: str
    """Names the write in messages, e.g. "artifact /path/model.pt"."""
    request: tuple[Any, ...]
    """A :class:`Request` and plain values that say what to write."""


_WriterHandle = tuple["subprocess.Popen[bytes]", "Connection", "Connection"]
"""A writer process, the pipe to it and the pipe from it."""

_SPARE_WRITER: _WriterHandle | None = None
"""A writer that serves no run yet: started early (:func:`start_early_writer`), or kept
from this process's last run (:func:`keep_writers`). The next tracker started here takes it."""

_KEEP_WRITERS = False


def _spawn_writer(
    env: dict[str, str], *, early: bool = False, after_fd: int | None = None
) -> _WriterHandle:
    """Start a writer: a fresh interpreter (never a fork of a torch-loaded process).

    ``after_fd``: an early writer waits for it to read end-of-file before it imports.
    """
    from multiprocessing import Pipe

    writer_reads, to_writer = Pipe(duplex=False)
    from_writer, writer_writes = Pipe(duplex=False)
    fds = (writer_reads.fileno(), writer_writes.fileno())
    passed = fds if after_fd is None else (*fds, after_fd)
    # The writer finds this very xp, installed or not.
    root = str(Path(__file__).resolve().parent.parent)
    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "xp._tracking_worker", *map(str, fds), str(os.getpid())]
    if early:
        command.append("--early")
    if after_fd is not None:
        command.append(f"--after-fd={after_fd}")
    try:
        # A session of its own: a Ctrl-C or a SIGTERM to the job's process group stops
        # training, whose close() then ends the run; the writer leaves when its pipe
        # closes (this process exited, however it died), after writing what it has.
        process = subprocess.Popen(
            command, pass_fds=passed, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    except OSError as exc:
        to_writer.close()
        from_writer.close()
        raise TrackingError(
            f"The MLflow writer process could not start ({exc}); HINT: set "
            "tracking.enabled=false to train without MLflow."
        ) from exc
    finally:
        writer_reads.close()
        writer_writes.close()
    return process, to_writer, from_writer


def keep_writers(keep: bool = True) -> None:
    """Keep each run's writer process for the next run this process tracks (a sweep's jobs).

    A writer costs a second or two before it writes anything (a fresh interpreter, mlflow's
    imports, the store's schema check): once per run is fine, once per job of a sweep of
    short jobs is most of each job. Kept, a tracker's :meth:`MlflowTracker.close` still
    returns only once the writer has recorded the run's end; the writer then waits for the
    next run's setup. It leaves when this process exits or :func:`drop_early_writer` lets
    it go.
    """
    global _KEEP_WRITERS
    _KEEP_WRITERS = keep


def start_early_writer(after_fd: int | None = None) -> None:
    """Start the writer of the run this process is about to train, before it knows the run.

    ``python -m xp`` calls this first thing: the writer imports mlflow and its SQLAlchemy
    store (2 s or so) on another core while this process composes the config and imports
    torch, instead of after training, where the process would wait for it to finish. The
    first :class:`MlflowTracker` started in this process takes it; one that is never
    taken (a config with tracking off) leaves when this process exits. With ``after_fd``
    it starts importing once that descriptor reads end-of-file (:mod:`xp.prefork`: once the
    parent process has composed the config).
    """
    global _SPARE_WRITER
    if _SPARE_WRITER is None:
        try:
            _SPARE_WRITER = _spawn_writer(dict(os.environ), early=True, after_fd=after_fd)
        except TrackingError:
            return  # the tracker starts its own, and reports if that fails too


def drop_early_writer() -> None:
    """Let the spare writer (started early, or kept from the last run) go unused: it
    leaves once its pipe closes."""
    _release(_take_spare_writer())


def _release(writer: _WriterHandle | None) -> None:
    if writer is not None:
        writer[1].close()
        writer[2].close()
        # Reaped when it has gone, not left a zombie.
        threading.Thread(target=writer[0].wait, name="xp-mlflow-reaper", daemon=True).start()


def _take_spare_writer() -> _WriterHandle | None:
    global _SPARE_WRITER
    writer, _SPARE_WRITER = _SPARE_WRITER, None
    if writer is not None and writer[0].poll() is not None:  # it died: start another
        writer[1].close()
        writer[2].close()
        return None
    return writer


def _keep_spare_writer(writer: _WriterHandle) -> None:
    global _SPARE_WRITER
    if _SPARE_WRITER is None:
        _SPARE_WRITER = writer
    else:  # an early writer nobody took meanwhile: one spare is enough
        _release(writer)


class MlflowTracker:
    """Records one MLflow run through a writer process of its own.

    Every method but ``start()`` may be called before the run exists: writes queue up
    and ``run_id`` waits for it. Values handed to ``log_metrics`` are read later, in
    a background thread: pass tensors that are not modified in place afterwards
    (``loss.detach()`` is fine, an accumulator updated with ``+=`` is not).

    Tags, params and errors are recorded through :func:`redact_secrets`: no URI password
    and no value of a secret-named environment variable reaches the store.

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
        logger: Where warnings go, the writer's included; defaults to ``xp.tracking``.
        start_time_ms: When the run started (Unix time in ms), recorded as the new run's
            start time; defaults to now. The writer creates the run a second or more
            later, so pass the time the training process started. A re-opened run keeps
            its own start time.
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
        start_time_ms: int | None = None,
    ) -> None:
        _check_settings(settings)
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.shown_uri = redact_uri(tracking_uri)
        """The store's URI as it may be printed: without a password."""
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.start_time_ms = int(time.time() * 1000) if start_time_ms is None else start_time_ms
        self._tags = _recordable(tags or {}, MAX_TAG_VAL_LENGTH)
        self._params = _recordable(params or {}, MAX_PARAM_VAL_LENGTH)
        self._artifact_location = artifact_location
        self._reopen_id = run_id
        self._log = logger or logging.getLogger(__name__)

        # Filled by the training thread, drained by the sender thread. deque's append and
        # popleft are atomic, so neither side takes a lock.
        self._metrics: collections.deque[tuple[int, int, dict[str, Any]]] = collections.deque()
        self._ops: collections.deque[_Op] = collections.deque()

        self._process: subprocess.Popen[bytes] | None = None
        self._environ: dict[str, str] = {}
        self._to_writer: Connection | None = None
        self._from_writer: Connection | None = None
        self._sender: threading.Thread | None = None
        self._receiver: threading.Thread | None = None
        self._ready = threading.Event()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        self._close_request: tuple[Any, ...] = (ToWriter.CLOSE, "FINISHED", 0, 0.0, False)
        self._writer_stays = False  # it serves the next run of this process (keep_writers)
        self._run_id: str | None = None
        self._failure: BaseException | None = None
        self._failure_message = ""
        self._failure_surfaced = False
        self._warned_after_close = False

        # Owned by the sender thread.
        self._known_keys: set[str] = set()
        self._bad_keys: set[str] = set()
        self._handed_through = -1
        self._sent_points = 0
        self._sent_ops: list[str] = []  # what each op sent says, in order
        self._refused_points = 0  # a bad key or value: never written, said at the time
        self._lost_points = 0  # the writer was gone
        self._lost_ops: list[str] = []
        self._writer_gone = False
        self._busy_since = time.monotonic()

        # Owned by the receiver thread: what the writer process says.
        self.written_through_step = -1
        """Every metric point up to this step is in the store (read by the training thread)."""
        self._done_points = 0  # written, or already in the store
        self._writer_refused_points = 0
        self._overflow_points = 0  # dropped beyond tracking.max_buffered_points
        self._written_ops = 0
        self._handled_ops = 0  # written, or refused by the store
        self._terminated = False
        self._last_error: str | None = None
        self._last_progress = time.monotonic()
        self._store_down = False  # warned about, until the writer reports it back
        self._store_lock = threading.Lock()  # the sender and the receiver both change it
        self._stalled = False  # the stall watch (not the writer) said the store is down
        self._writer_died = False
        self._gave_up = False
        self._result: TrackingIncomplete | None = None
        self._report: tuple[int, int] | None = None  # (metric points, other writes) unwritten

    # ------------------------------------------------------------------- public

    def start(self) -> None:
        """Start the writer process and return at once (it opens the run meanwhile).

        For an http(s) store, first checks that the server answers and takes this
        process's credentials, so wrong ones fail before anything trains. A server that
        does not answer is warned about once and the run is created when it answers
        (``tracking.server_down_at_start=buffer``), or it stops the run (``stop``).

        Raises:
            TrackingError: the MLflow server refuses the credentials, or does not answer
                and ``tracking.server_down_at_start=stop``; or no writer process starts.
            RuntimeError: ``start()`` was already called.
        """
        if self._process is not None:
            raise RuntimeError("MlflowTracker.start() was already called; call it once per run.")
        env = dict(os.environ)
        unwritable = _sqlite_unwritable(self.tracking_uri)
        if unwritable:
            raise TrackingError(
                f"The MLflow store {self.shown_uri} cannot be written: {unwritable}. HINT: "
                "make it writable, point tracking.tracking_uri (or $MLFLOW_TRACKING_URI) at "
                "another store, or run with tracking=off."
            )
        if _is_http(self.tracking_uri):
            self._check_server()
            for name, value in _HTTP_RETRY_ENV.items():
                env.setdefault(name, value)
        self._environ = {k: v for k, v in env.items() if k.startswith("MLFLOW_")}
        self._launch(env)
        self._sender = threading.Thread(
            target=self._send_loop, name="xp-mlflow-sender", daemon=True
        )
        self._receiver = threading.Thread(
            target=self._receive_loop, name="xp-mlflow-receiver", daemon=True
        )
        self._sender.start()
        self._receiver.start()

    def _check_server(self) -> None:
        try:
            _check_server(self.tracking_uri)
        except _NoAnswer as e:
            setting = getattr(self.settings, "server_down_at_start", "buffer")
            if str(getattr(setting, "value", setting)) == "stop":
                raise TrackingError(
                    f"{e} (tracking.server_down_at_start=stop; =buffer trains meanwhile and "
                    "records the run once the server answers)"
                ) from None
            self._store_down_changed(
                False,
                f"does not answer as the run starts ({_shorten(e.reason, 200)}), so the run "
                "is created there once it answers (tracking.server_down_at_start=stop would "
                "stop instead)",
            )
            return
        _check_credentials(self.tracking_uri)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the run exists.

        Raises:
            TrackingError: the run could not be created or re-opened, or it was not
                ready within ``timeout`` seconds.
        """
        if self._process is None:
            raise RuntimeError("MlflowTracker.wait_ready() needs start() first.")
        if not self._ready.wait(timeout):
            raise TrackingError(
                f"The MLflow run in {self.shown_uri} was not ready after {timeout:g} s. "
                "HINT: a busy or slow store can take longer; wait longer or check the store."
            )
        self._raise_if_failed()

    @property
    def run_id(self) -> str | None:
        """The run's id; blocks until the run exists (see :meth:`wait_ready`). None while
        the server has not answered to create it (``tracking.server_down_at_start=buffer``),
        and after ``close()`` if it never did."""
        if self._process is None:
            raise RuntimeError("MlflowTracker.run_id needs start() first.")
        while not self._ready.wait(_RETRY_PAUSE_S):
            if self._store_down:
                return None
        self._raise_if_failed()
        return self._run_id

    @property
    def unwritten_metrics(self) -> int:
        """Metric points that did not reach the store, refused ones included (final after
        ``close()``)."""
        if self._report is not None:
            return self._report[0]
        return self._count_unwritten()[0]

    @property
    def incomplete(self) -> TrackingIncomplete | None:
        """After ``close()``: what the store lacks (what close() raised), or None."""
        return self._result

    def log_metrics(self, metrics: Mapping[str, SupportsFloat], step: int) -> None:
        """Queue metric values for ``step``; costs a microsecond.

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

        Handed to the writer at once, not at the next flush: tags set right after
        ``start()`` reach the store even if this process is killed a moment later.

        Raises:
            TrackingError: the run could not be created.
        """
        from_caller = _recordable(tags, MAX_TAG_VAL_LENGTH)
        self._enqueue(_Op(f"tags {sorted(from_caller)}", (Request.TAGS, from_caller)), "set_tags")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Queue a file (or a directory, under its own name) for upload.

        The file is read later, by the writer process: leave it in place until ``close()``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            TrackingError: the run could not be created.
        """
        local = _existing(path, "log_artifact")
        request = (Request.ARTIFACT, str(local), artifact_path)
        self._enqueue(_Op(f"artifact {local}", request), "log_artifact")

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
        request = (Request.ARTIFACTS, str(local), artifact_path)
        self._enqueue(_Op(f"artifacts {local}", request), "log_artifacts")

    def log_checkpoint(self, path: Path) -> None:
        """Queue a checkpoint file or directory for the run's ``checkpoints/`` artifacts.

        One larger than ``tracking.checkpoint_artifact_max_mb`` (measured when it is
        uploaded) is not copied: its absolute location is recorded as the tag
        ``xp.checkpoint_location`` instead. A single file's checksum sidecar
        (``<name>.sha256``, :mod:`xp.checkpoint`) goes with it, so that a checkpoint
        downloaded by ``resume=`` is verified as a local one is.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            TrackingError: the run could not be created.
        """
        local = _existing(path, "log_checkpoint")
        sidecar = local.with_name(local.name + ".sha256")  # xp.checkpoint.checksum_file
        request = (
            Request.CHECKPOINT,
            str(local),
            float(self.settings.checkpoint_artifact_max_mb),
            str(sidecar) if local.is_file() and sidecar.is_file() else None,
        )
        self._enqueue(_Op(f"checkpoint {local}", request), "log_checkpoint")

    def close(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Write everything queued, record ``error``, end the run with ``status``.

        Waits for the writer process to write and exit (kept by :func:`keep_writers`:
        until it has written the run's end); while the store takes nothing (down, or not
        answering), at most ``tracking.close_timeout_s``. The run's end time is the time
        of this call. Idempotent; before ``start()`` it only marks the tracker closed.

        Args:
            status: FINISHED, FAILED or KILLED.
            error: Recorded as tag ``xp.error`` (its first 5000 characters) and in
                full as the artifact ``error.txt``.

        Raises:
            ValueError: ``status`` is not one of the three.
            TrackingIncomplete: the store lacks metric points, tags or artifacts, or the
                run's status (the store did not answer, or the writer process died);
                the message says what and how to complete the run. Points and writes the
                store refused for good (a bad key, said when it happened) do not count.
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
        end_time_ms = int(time.time() * 1000)
        process, receiver, sender = self._process, self._receiver, self._sender
        if process is None or receiver is None or sender is None:
            return
        if error is not None:
            error = redact_secrets(error)
            self._ops.append(_Op("error tag", (Request.ERROR, error)))
            self._ops.append(_Op("error.txt", (Request.ERROR_TEXT, error)))
        patience_s = float(self.settings.close_timeout_s)
        self._close_request = (ToWriter.CLOSE, status, end_time_ms, patience_s, _KEEP_WRITERS)
        self._last_progress = time.monotonic()
        self._closing.set()
        self._wake.set()
        noticed = False
        # The receiver ends with the writer's report (a kept writer), or when the writer
        # closes its pipe, i.e. when it exits.
        while receiver.is_alive():
            receiver.join(_RETRY_PAUSE_S)
            idle_s = time.monotonic() - self._last_progress
            if idle_s > _CLOSE_NOTICE_S and not noticed:
                noticed = True
                self._log.info(
                    "Still writing run %s to %s (tracking.close_timeout_s=%g)...",
                    self._run_id,
                    self.shown_uri,
                    patience_s,
                )
            if idle_s > patience_s + _CLOSE_GRACE_S:
                # The writer gives up by itself after close_timeout_s: this one is stuck
                # in a request to a store that never answers.
                self._gave_up = True
                _stop(process)
                break
        receiver.join()
        sender.join()
        if self._writer_stays:
            # It recorded the run's end (its report says how far it got) and waits for
            # this process's next run.
            assert self._to_writer is not None and self._from_writer is not None
            _keep_spare_writer((process, self._to_writer, self._from_writer))
            code = 0
        else:
            if self._to_writer is not None:
                self._to_writer.close()  # asked to stay, it did not: it exits
            code = process.wait()
        if self._failure is not None:
            if not self._failure_surfaced:
                self._raise_if_failed()
            return
        if code != 0 and self._last_error is None:
            self._last_error = f"the MLflow writer process exited with {_exit_text(code)}"
        self._report = self._count_unwritten()
        self._result = self._incomplete(status)
        if self._result is not None:
            raise self._result

    # ------------------------------------------------------------------- training side

    def _enqueue(self, op: _Op, method: str) -> None:
        if self._failure is not None:
            self._raise_if_failed()
        if self._closed:
            self._warn_after_close(method)
            return
        self._ops.append(op)
        self._wake.set()  # handed over now: a kill -9 a moment later must not lose it

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

    def _missing(self) -> tuple[int, list[str]]:
        """Metric points and other writes not in the store that a store that answers would
        have taken (refused ones are not counted)."""
        # list() copies the deques in one step under the GIL, safe beside the sender.
        queued = sum(len(metrics) for _, _, metrics in list(self._metrics))
        pending = self._sent_points - self._done_points - self._writer_refused_points
        points = queued + self._lost_points + pending
        writes = [*self._sent_ops[self._handled_ops :], *self._lost_ops]
        writes += [op.what for op in list(self._ops)]
        return points, writes

    def _count_unwritten(self) -> tuple[int, int]:
        points, writes = self._missing()
        refused_ops = self._handled_ops - self._written_ops
        return (
            points + self._refused_points + self._writer_refused_points,
            len(writes) + refused_ops,
        )

    def _incomplete(self, status: str) -> TrackingIncomplete | None:
        points, writes = self._missing()
        if not points and not writes and self._terminated:
            return None
        first_missing = self.written_through_step + 1
        what = []
        if points:
            what.append(f"{points} metric points (from step {first_missing} on)")
        if writes:
            shown = ", ".join(writes[:5]) + (
                f" and {len(writes) - 5} more" if len(writes) > 5 else ""
            )
            what.append(f"{len(writes)} other writes ({shown})")
        missing = " and ".join(what) + " are missing there" if what else "every write is there"
        state = (
            f"the run ended {status}"
            if self._terminated
            else f"the run still shows RUNNING there, not {status}"
            if self._run_id is not None
            else "the run was never created there"
        )
        causes = []
        if self._writer_died:
            causes.append(f"the MLflow writer process died mid-run ({self._last_error})")
        if self._overflow_points:
            causes.append(
                f"{self._overflow_points} points were dropped while the store was down, "
                f"beyond tracking.max_buffered_points={self.settings.max_buffered_points}"
            )
        if not self._writer_died and (
            not self._terminated or writes or points > self._overflow_points
        ):
            waited = (
                f"the store took nothing for tracking.close_timeout_s="
                f"{self.settings.close_timeout_s:g} s"
            )
            if self._last_error and not self._gave_up:
                waited += f"; last error: {self._last_error}"
            causes.append(waited)
        cause = "; ".join(causes)
        run = self._run_id or "(not created)"
        # A run the store never created is resumed from its directory (it holds it all).
        spec = self._run_id or self._tags.get("xp.run_dir") or "<run directory>"
        when, longer = (
            ("", "")
            if self._writer_died
            else (
                " once the store answers again",
                "; raise tracking.close_timeout_s to wait longer for a slow store",
            )
        )
        message = redact_secrets(
            f"MLflow run {run} in {self.shown_uri} is incomplete: {missing}, and {state} "
            f"({cause}). HINT: run `python -m xp resume={spec}`{when}: it replays the missing "
            "metric points from the run's last checkpoint, uploads its files again and "
            f"records its end{longer}."
        )
        return TrackingIncomplete(
            message,
            run_id=self._run_id,
            missing_points=points,
            missing_writes=writes,
            status_recorded=self._terminated,
            first_missing_step=first_missing,
        )

    # ------------------------------------------------------------------- background side

    def _launch(self, env: dict[str, str]) -> None:
        """Take the early writer of this process, if it started one, else start a writer."""
        self._process, self._to_writer, self._from_writer = _take_spare_writer() or _spawn_writer(
            env
        )

    def _setup(self) -> dict[str, Any]:
        return {
            # An early writer started before these were known; it takes them from here.
            "environ": self._environ,
            "tracking_uri": self.tracking_uri,
            "experiment_name": self.experiment_name,
            "run_name": self.run_name,
            "tags": self._tags,
            "params": self._params,
            "artifact_location": self._artifact_location,
            "run_id": self._reopen_id,
            "system_metrics": bool(self.settings.system_metrics),
            "flush_interval_s": float(self.settings.flush_interval_s),
            "start_time_ms": self.start_time_ms,
            "max_buffered_points": int(self.settings.max_buffered_points),
        }

    def _send(self, message: tuple[Any, ...]) -> bool:
        if self._writer_gone:
            return False
        assert self._to_writer is not None
        try:
            self._to_writer.send(message)
        except OSError:  # the writer exited (it failed, or it was killed)
            self._writer_gone = True
            return False
        return True

    def _send_loop(self) -> None:
        kept_open = False
        try:
            self._send((ToWriter.SETUP, self._setup()))
            while True:
                closing = self._closing.is_set()
                self._hand_over()
                if closing:
                    # Asked to stay, the writer reads the next run's setup from this pipe.
                    kept_open = self._send(self._close_request) and bool(self._close_request[4])
                    return
                self._watch_for_stall()
                self._wake.wait(self.settings.flush_interval_s)
                self._wake.clear()
        except Exception:
            self._log.exception("The MLflow sender thread failed; run %s", self._run_id)
        finally:
            assert self._to_writer is not None
            if not kept_open:
                self._to_writer.close()  # the writer's signal that no more will come

    def _outstanding(self) -> bool:
        points = self._sent_points - self._done_points - self._writer_refused_points
        return points > 0 or len(self._sent_ops) > self._handled_ops

    def _watch_for_stall(self) -> None:
        """Warn once when handed-over writes wait long: a store that stopped answering
        (a dead one fails fast, and the writer reports that itself)."""
        if self._store_down or self._writer_gone or not self._ready.is_set():
            return
        if not self._outstanding():
            self._busy_since = time.monotonic()
            return
        waited_s = time.monotonic() - max(self._busy_since, self._last_progress)
        if waited_s > _STALL_WARN_S:
            self._stalled = True
            self._store_down_changed(
                False,
                f"took no writes for {waited_s:.0f} s (it does not answer, or a large upload "
                "is under way)",
            )

    def _hand_over(self) -> None:
        """Convert what is queued to plain numbers and send it to the writer."""
        points: list[tuple[str, float, int, int]] = []
        through = self._handed_through
        pending = self._metrics
        while pending:
            timestamp, step, metrics = pending.popleft()
            step = int(step)
            through = max(through, step)
            for key, value in metrics.items():
                if key not in self._known_keys and not self._accept_key(key):
                    self._refused_points += 1
                    continue
                try:
                    number = float(value.item() if hasattr(value, "item") else value)
                except Exception as exc:  # any object can arrive here; none may stop the thread
                    self._refused_points += 1
                    self._warn_bad_value(key, value, exc)
                    continue
                points.append((key, number, timestamp, step))
            if len(points) >= _POINTS_PER_MESSAGE:
                self._send_points(points, through)
                points = []
        if points or through > self._handed_through:
            self._send_points(points, through)
        while self._ops:
            op = self._ops.popleft()
            if self._send((ToWriter.OP, op.what, op.request)):
                self._sent_ops.append(op.what)
            else:
                self._lost_ops.append(op.what)

    def _send_points(self, points: list[tuple[str, float, int, int]], through: int) -> None:
        if not self._outstanding():
            self._busy_since = time.monotonic()
        if self._send((ToWriter.METRICS, points, through)):
            self._sent_points += len(points)
            self._handed_through = through
        else:
            self._lost_points += len(points)

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

    def _warn_bad_value(self, key: str, value: object, exc: Exception) -> None:
        if key not in self._bad_keys:
            self._bad_keys.add(key)
            self._log.warning(
                "Metric %r got a %s that cannot be read as a number (%s); such "
                "values are dropped. HINT: log a float or a 0-dim tensor.",
                key,
                type(value).__name__,
                _first_line(exc),
            )

    def _store_down_changed(self, up: bool, reason: str) -> None:
        """One warning per outage, whoever notices it first (the writer, or the stall watch)."""
        with self._store_lock:
            changed = self._store_down is up
            self._store_down = not up
        if not changed:
            return
        if not up:
            self._log.warning(
                "%s",
                redact_secrets(
                    f"MLflow store {self.shown_uri} {reason}; training goes on, and xp keeps "
                    f"the run's metrics (up to tracking.max_buffered_points="
                    f"{self.settings.max_buffered_points}, the checkpoints keep them all) and "
                    f"retries every {self.settings.flush_interval_s:g} s."
                ),
            )
        else:
            self._log.info("MLflow store %s takes writes again.", self.shown_uri)

    def _writer_saw_store(self, up: bool, reason: str) -> None:
        if up:  # a write went through: the stall watch counts from here, not the outage's start
            self._last_progress = time.monotonic()
            self._stalled = False
        self._store_down_changed(up, reason)

    def _receive_loop(self) -> None:
        assert self._from_writer is not None
        try:
            while True:
                message = self._from_writer.recv()
                kind = message[0]
                if kind == FromWriter.PROGRESS:
                    (
                        self._done_points,
                        self.written_through_step,
                        self._written_ops,
                        self._handled_ops,
                        self._writer_refused_points,
                        self._overflow_points,
                    ) = message[1:]
                    self._last_progress = time.monotonic()
                    if self._stalled:  # the writer never saw an error: it says nothing
                        self._stalled = False
                        self._store_down_changed(True, "")
                elif kind == FromWriter.STORE:
                    self._writer_saw_store(message[1], message[2])
                elif kind == FromWriter.LOG:
                    self._log.log(message[1], "%s", redact_secrets(message[2]))
                elif kind == FromWriter.READY:
                    self._run_id = message[1]
                    self._last_progress = time.monotonic()  # the stall watch starts here
                    self._ready.set()
                elif kind == FromWriter.FAILED:
                    self._fail(message[1], message[2])
                elif kind == FromWriter.REPORT:
                    self._terminated, error, stays = message[1], message[2], message[3]
                    self._last_error = error or self._last_error
                    self._ready.set()  # never created, if not before: the store never answered
                    if stays:  # the run is over; the pipes stay open for the next one
                        self._writer_stays = True
                        return
        except (EOFError, OSError):
            pass  # the writer exited
        except Exception:
            self._log.exception("The MLflow receiver thread failed; run %s", self._run_id)
        self._writer_exited()

    def _writer_exited(self) -> None:
        """The receiver's end: the writer closed its pipe (it exited, or it died)."""
        assert self._from_writer is not None
        self._from_writer.close()
        self._writer_gone = True
        if not self._ready.is_set():
            code = self._exit_code()
            hint = (
                "HINT: run it again; set tracking.enabled=false to train without MLflow."
                if code is not None and code < 0
                else "Its own error, if any, is printed above. HINT: check that mlflow is "
                f"installed in {sys.executable}, or set tracking.enabled=false."
            )
            self._fail(
                f"The MLflow writer process for {self.shown_uri} exited with "
                f"{_exit_text(code)} before the run was created. {hint}",
                "",
            )
        elif self._failure is None and not self._closing.is_set():
            self._writer_died = True
            code = self._exit_code()
            self._last_error = f"it exited with {_exit_text(code)}"
            self._log.warning(
                "The MLflow writer process of run %s exited with %s while the run "
                "trains; training goes on, but from now on nothing reaches %s (the "
                "checkpoints keep the metrics). The run will be reported incomplete: "
                "`python -m xp resume=%s` completes it.",
                self._run_id,
                _exit_text(code),
                self.shown_uri,
                self._run_id,
            )

    def _exit_code(self) -> int | None:
        assert self._process is not None
        try:
            return self._process.wait(timeout=_HEALTH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None

    def _fail(self, message: str, detail: str) -> None:
        self._failure = _WriterError(redact_secrets(detail.strip() or message))
        self._failure_message = redact_secrets(message)
        self._ready.set()


class _WriterError(RuntimeError):
    """What went wrong in the writer process (its traceback, as text)."""


# --------------------------------------------------------------------------- helpers


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _sqlite_unwritable(uri: str) -> str | None:
    """Why a SQLite store's file cannot take writes (read-only, or a folder SQLite cannot
    write its journal into), or None. Checked before training: MLflow would fail only when
    it creates the run, in the writer, after steps that then are recorded nowhere."""
    database = sqlite_path(uri)
    if database is None:
        return None
    folder = database.absolute().parent
    if not folder.is_dir():
        return f"its folder {folder} does not exist (mkdir -p {folder})"
    if database.exists() and not os.access(database, os.W_OK):
        return f"{database} is read-only (chmod u+w {database})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"its folder {folder} is read-only, and SQLite writes its journal there"
    return None


def _check_server(uri: str) -> None:
    """Raise TrackingError unless the MLflow server at ``uri`` answers /health."""
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    # /health needs no credentials, and urllib takes "user:pass@host" for a host name.
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    url = urllib.parse.urlunsplit(bare).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=_HEALTH_TIMEOUT_S) as response:
            response.read(64)
        return
    except urllib.error.HTTPError as exc:
        # It answers: auth or a proxy's routing is the store's business, not a dead server.
        if exc.code < 500:
            return
        reason = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:  # URLError, refused connections, timeouts, bad ports
        reason = str(getattr(exc, "reason", exc))
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        port = 5000
    raise _NoAnswer(
        f"tracking_uri={redact_uri(uri)!r}: the MLflow server does not answer "
        f"({redact_secrets(reason)}). HINT: start it "
        f"with `mlflow server --host {parts.hostname or '127.0.0.1'} --port {port}`, or unset "
        "MLFLOW_TRACKING_URI / tracking.tracking_uri to use the local SQLite store.",
        redact_secrets(reason),
    )


class _NoAnswer(TrackingError):
    """The server did not answer /health; ``reason`` says how (no secrets in it)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_credentials(uri: str) -> None:
    """Raise TrackingError if the MLflow server at ``uri`` refuses this process's
    credentials (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``,
    ``MLFLOW_TRACKING_TOKEN``, or a ``user:password@`` in the URI). Any other answer is
    the writer's business."""
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), None
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        given = "MLFLOW_TRACKING_TOKEN"
    else:
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if user is None and parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
        given = f"user {user!r}" if user else "no credentials"
        if user is not None:
            pair = f"{user}:{password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="")
    url = urllib.parse.urlunsplit(bare).rstrip("/") + "/api/2.0/mlflow/experiments/search"
    request = urllib.request.Request(f"{url}?max_results=1", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=_HEALTH_TIMEOUT_S) as response:
            response.read(64)
        return
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            return
        code = exc.code
    except (OSError, ValueError):  # it answered /health a moment ago: the writer will see
        return
    shown = redact_uri(uri)
    if code == 401:
        raise TrackingError(
            f"tracking_uri={shown!r}: the MLflow server refuses {given} (HTTP 401), before "
            "anything trains. HINT: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(or MLFLOW_TRACKING_TOKEN) to credentials the server's admin created for you."
        )
    raise TrackingError(
        f"tracking_uri={shown!r}: the MLflow server lets {given} in but not read experiments "
        "(HTTP 403). HINT: ask its admin for READ permission (and EDIT on your experiment)."
    )


def _check_settings(settings: TrackingConfig) -> None:
    for key in ("flush_interval_s", "close_timeout_s", "max_buffered_points"):
        value = getattr(settings, key)
        if not value > 0:
            raise ValueError(
                f"tracking.{key}={value!r} must be greater than 0; HINT: leave it out to "
                "use the default."
            )


def _recordable(values: Mapping[str, Any], limit: int) -> dict[str, str]:
    """Tag or param values as MLflow gets them: no secrets, at most ``limit`` characters."""
    secrets = _secret_values(os.environ)  # once for all the values (a config's hundreds)
    return {
        str(k): _shorten(_without(redact_uri(str(v)), secrets), limit) for k, v in values.items()
    }


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End a writer stuck in a request; its signal for this (not a SIGTERM, which Slurm
    sends every process of a job step) lets it remove its lock file first."""
    process.send_signal(GIVE_UP)
    try:
        process.wait(timeout=_HEALTH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit yet"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _existing(path: Path, method: str) -> Path:
    local = Path(path).absolute()
    if not local.exists():
        raise FileNotFoundError(
            f"{method} got {local}, which does not exist; HINT: log it after it is written."
        )
    return local


def _first_line(exc: BaseException | None, limit: int = 300) -> str:
    text = redact_secrets(str(exc)).strip()
    return _shorten(text.splitlines()[0], limit) if text else type(exc).__name__
