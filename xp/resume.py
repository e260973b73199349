"""Finding what to resume: a run id, ``auto``, a run directory or a checkpoint.

``python -m xp resume=<spec>`` is resolved here before Hydra composes anything, so the
resumed run composes into its own run directory, from the config it was trained with.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xp.checkpoint import (
    CORRUPT_SUFFIX,
    CheckpointCorrupt,
    Checkpointer,
    CheckpointError,
    checksum_file,
    is_complete,
    verify,
)
from xp.log import say
from xp.rundir import RESUME_ENV, RunDirLock, RunInUse, in_use
from xp.rundir import TEST_ENV as TEST_ENV  # re-exported: xp.run and xp.__main__ read it here
from xp.tracking import redact_uri

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_STEP_NAME = re.compile(r"^step_\d{8,}(\.pt)?$")
ENV = RESUME_ENV
"""Carries the resolved target from ``xp.__main__`` to ``xp.run`` (and to workers)."""


class ResumeError(ValueError):
    """What was given to resume= or load_from= cannot be used; says what to do."""


@dataclass(frozen=True)
class ResumeTarget:
    """A checkpoint to continue from, and the run it belongs to."""

    checkpoint: str
    """A complete checkpoint (file or folder)."""
    run_dir: str
    """The run directory to continue in."""
    run_id: str | None
    """The MLflow run to re-open; None when the store does not know the run."""
    experiment_name: str
    choices: dict[str, str]
    """Config group -> option the run was composed with."""
    timestamp: str | None = None
    """The timestamp the run was launched with (None for runs from before it was kept)."""
    config_dirs: tuple[str, ...] = ()
    """The ``--config-dir`` directories the run was composed with."""
    overrides: tuple[str, ...] = ()
    """The overrides given with ``resume=``/``test=`` now (applied, or refused with why)."""
    run_dir_history: tuple[str, ...] = ()
    """Where the run has lived (``host:directory``, oldest first), when it now moves to
    another directory (its recorded one is absent here): the tag ``xp.run_dir_history``."""
    named: bool = False
    """The command named this checkpoint by its path (not a run): ``test=`` evaluates it,
    not the run's best."""

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, variable: str = ENV) -> ResumeTarget | None:
        raw = os.environ.get(variable)
        if not raw:
            return None
        fields = json.loads(raw)
        fields["config_dirs"] = tuple(fields.get("config_dirs", ()))
        fields["overrides"] = tuple(fields.get("overrides", ()))
        fields["run_dir_history"] = tuple(fields.get("run_dir_history", ()))
        return cls(**fields)


def _client(tracking_uri: str) -> Any:
    from xp.tracking import client

    return client(tracking_uri)


def _meta(checkpoint: Path, run_dir: Path) -> dict[str, Any]:
    """The run facts xp keeps: experiment name and config group choices.

    ``run.json`` in the run directory has them; a checkpoint carries a copy (a sharded
    one in its small ``extra.pt``) for when only the checkpoint is left.
    """
    run_file = run_dir / "run.json"
    if run_file.is_file():
        return dict(json.loads(run_file.read_text()))
    from xp.checkpoint import load_file

    state = load_file(checkpoint / "extra.pt" if checkpoint.is_dir() else checkpoint)
    return dict(state.get("run", {}))


def _latest_in(run_dir: Path) -> Path | None:
    """The newest complete checkpoint that verifies against its recorded checksums.

    Newer incomplete ones (a save cut short) are named; newer ones that fail their
    checksums (truncated, or changed since they were saved) are named with why, and moved
    aside to ``<name>.corrupt``, so that the run's next saves and pruning (which keeps the
    newest) leave the good ones alone.
    """
    folder = run_dir / "checkpoints"
    checkpoints = Checkpointer(folder)
    latest, skipped = checkpoints.latest_verified()
    for corrupt in skipped:
        try:
            moved = f"moved aside to {checkpoints.set_aside(corrupt.path).name}"
        except OSError as e:  # a run directory this user cannot write (load_from= of another's)
            moved = f"left in place ({e.strerror})"
        say(
            f"xp: skipping checkpoint {corrupt.path.name} in {folder}: {corrupt.reason}; {moved}.",
            file=sys.stderr,
        )
    if skipped:
        say(
            f"xp: using {latest.name}, the newest checkpoint that verifies."
            if latest is not None
            else f"xp: no checkpoint in {folder} verifies.",
            file=sys.stderr,
        )
    if folder.is_dir():
        newer = sorted(
            p.name
            for p in folder.iterdir()
            if re.match(r"^\.?step_\d{8,}", p.name)
            and not is_complete(p)
            and (latest is None or p.name.lstrip(".") > latest.name)
        )
        if newer:
            say(
                f"xp: skipping incomplete checkpoint(s) {newer} in {folder} (a save was cut "
                f"short); resuming from {latest.name if latest else 'nothing'}.",
                file=sys.stderr,
            )
    return latest


def _from_path(path: Path, key: str = "resume") -> tuple[Path, Path]:
    """(checkpoint, run_dir) of a run directory or a checkpoint inside one.

    A run directory gives its newest checkpoint that verifies; a checkpoint given by its
    path must verify itself.
    """
    path = path.resolve()
    if not path.exists():
        raise ResumeError(
            f"{key}={path} does not exist; give a run id, a run directory or a checkpoint."
        )
    if (path / "checkpoints").is_dir() or (path / ".hydra").is_dir():
        latest = _latest_in(path)
        if latest is None:
            aside = (path / "checkpoints").glob(f"step_*{CORRUPT_SUFFIX}*")
            corrupt = sorted(p.name for p in aside)
            raise ResumeError(
                f"The run directory {path} has no complete checkpoint that verifies "
                + (
                    f"(corrupt ones were moved aside: {corrupt}); "
                    if corrupt
                    else "(it stopped before its first save); "
                )
                + "start it again instead."
            )
        return latest, path
    in_a_run = path.parent.name == "checkpoints" and _STEP_NAME.match(path.name.lstrip("."))
    if not in_a_run and key == "load_from" and path.is_file():
        try:  # weights from anywhere (a checkpoint copied out of its run), if they load
            verify(path)
        except CheckpointCorrupt as e:
            raise ResumeError(
                f"load_from={path} is not a checkpoint xp can load ({e.reason}); give a run id, "
                "a run directory or a checkpoint."
            ) from e
        return path, path.parent
    if not in_a_run:
        what = "a folder" if path.is_dir() else "a file"
        raise ResumeError(
            f"{key}={path} is {what} that is neither a run directory (with checkpoints/ or "
            ".hydra/ in it) nor a checkpoint of one (<run dir>/checkpoints/step_NNNNNNNN.pt, or "
            "a step_NNNNNNNN folder); give a run id, a run directory or a checkpoint."
        )
    if not is_complete(path):
        raise ResumeError(
            f"{key}={path}: the checkpoint is incomplete (its save was interrupted); give its "
            f"run directory ({key}={path.parent.parent}) to use the newest complete one."
        )
    try:
        verify(path)
    except CheckpointCorrupt as e:
        raise ResumeError(
            f"{key}={path}: the checkpoint is corrupt or truncated ({e.reason}). Give its run "
            f"directory ({key}={path.parent.parent}) to use the newest checkpoint that "
            f"verifies, or another checkpoint from {path.parent}."
        ) from e
    return path, path.parent.parent


_RUN_FILES = ("run.json", "config.yaml", ".hydra")
"""Downloaded beside a checkpoint: what resume= reads, and the run's Hydra record."""
HISTORY_TAG = "xp.run_dir_history"


def _download_checkpoint(client: Any, run: Any, run_dir: Path) -> Path | None:
    """Fetch the newest checkpoint of a run from its artifacts into ``run_dir``, with the
    run's config, facts, ``.hydra/`` and log (the resumed run appends to that log, so the
    uploaded log stays whole); the newest checkpoint there that verifies, or None."""
    try:
        listed = client.list_artifacts(run.info.run_id, "checkpoints")
    except Exception:  # a store without the artifact simply has nothing to offer
        return None
    names = sorted(a.path.rsplit("/", 1)[-1] for a in listed)
    names = [n for n in names if re.match(r"^step_\d{8,}(\.pt)?$", n)]
    if not names:
        return None
    target = run_dir / "checkpoints"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        local = Path(client.download_artifacts(run.info.run_id, f"checkpoints/{names[-1]}", tmp))
        final = target / local.name
        shutil.move(str(local), final)
        # Its checksum (a single file's sidecar): verified as a local checkpoint is.
        _fetch(client, run.info.run_id, f"checkpoints/{checksum_file(final).name}", tmp, run_dir)
        for name in _RUN_FILES:  # older runs may lack them; a checkpoint has run.json's facts
            _fetch(client, run.info.run_id, name, tmp, run_dir)
        _fetch(client, run.info.run_id, f"{_timestamp_of(run_dir, run)}.log", tmp, run_dir)
    if not is_complete(final):
        return None
    return _latest_in(run_dir)


def _fetch(client: Any, run_id: str, name: str, tmp: str, run_dir: Path) -> None:
    """Download the artifact ``name`` to ``run_dir/name`` unless it is there, if it exists."""
    if (run_dir / name).exists():
        return
    with contextlib.suppress(Exception):  # absent from the run's artifacts: nothing to fetch
        shutil.move(client.download_artifacts(run_id, name, tmp), run_dir / name)


def _timestamp_of(run_dir: Path, run: Any) -> str:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return str(json.loads((run_dir / "run.json").read_text())["timestamp"])
    return str(run.info.run_name)


def _host_dir(entry: str) -> tuple[str, str]:
    host, sep, directory = entry.partition(":")
    return (host, directory) if sep else ("", entry)


def _where_it_lives(
    client: Any, run: Any, experiment: str, outputs: Path
) -> tuple[Path, tuple[str, ...]]:
    """The directory a run continues in on this machine, and the history to record.

    Its recorded directory (tag ``xp.run_dir``) if that exists here; else the newest
    directory of its history that does (a run that came back to a machine it was resumed
    on); else one in this machine's ``outputs/<experiment>/<its name>`` (``_2``, ``_3``...
    after the name where another run of the store lives), e.g. for a run started on
    another machine. The history (``host:directory`` lines, oldest first) is returned
    only when the run moves.
    """
    tags = run.data.tags
    recorded = Path(tags.get("xp.run_dir") or outputs / experiment / run.info.run_name)
    past = [e for e in tags.get(HISTORY_TAG, "").splitlines() if e.strip()]
    if not past:
        past = [f"{tags.get('xp.hostname', '')}:{recorded}"]
    if recorded.is_dir():
        return recorded, ()
    here = socket.gethostname()
    for entry in reversed(past):
        lived = Path(_host_dir(entry)[1])
        if lived.is_dir() and lived.is_absolute():
            return lived, (*past, f"{here}:{lived}")
    local = outputs.absolute() / experiment / recorded.name
    if local == recorded:  # its own directory, deleted here: filled again, not a move
        return recorded, ()
    n = 2
    while _lived_in_by_another(client, run, local):
        local = outputs.absolute() / experiment / f"{recorded.name}_{n}"
        n += 1
    return local, (*past, f"{here}:{local}")


def _lived_in_by_another(client: Any, run: Any, directory: Path) -> bool:
    """Whether another run of the experiment records ``directory`` as its own (a folder
    that ``load_from=`` of this run filled earlier is free to use again)."""
    if not directory.exists() or not any(directory.iterdir()):
        return False
    quoted = str(directory).replace("'", "\\'")
    others = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`xp.run_dir` = '{quoted}'"
    )
    return any(other.info.run_id != run.info.run_id for other in others)


def resolve(
    spec: str,
    *,
    tracking_uri: str,
    experiment_name: str | None,
    outputs: Path,
    key: str = "resume",
) -> ResumeTarget:
    """Turn ``resume=<spec>`` into a checkpoint, its run directory and its MLflow run.

    ``key`` names the argument in errors (``test=`` resolves the same way).

    Raises:
        ResumeError: unknown run id, a run of another experiment, no checkpoint, ...
    """
    run = None
    history: tuple[str, ...] = ()
    named = False
    if RUN_ID.match(spec):
        from mlflow.exceptions import MlflowException

        client = _client(tracking_uri)
        try:
            run = client.get_run(spec)
        except MlflowException as e:
            if e.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                raise ResumeError(
                    f"{key}={spec}: the MLflow server {redact_uri(tracking_uri)} refuses these "
                    f"credentials ({e.error_code}); set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to yours."
                ) from e
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise ResumeError(
                    f"{key}={spec}: the MLflow store {redact_uri(tracking_uri)} does not answer "
                    f"({str(e).strip().splitlines()[0][:200]}); check tracking.tracking_uri / "
                    "MLFLOW_TRACKING_URI, or that the server is up."
                ) from e
            raise ResumeError(
                f"{key}={spec}: no such MLflow run in {redact_uri(tracking_uri)}; check the id "
                "(`python -m xp ui` lists the runs) or MLFLOW_TRACKING_URI."
            ) from e
        experiment = client.get_experiment(run.info.experiment_id).name
        if experiment_name is not None and experiment != experiment_name:
            raise ResumeError(
                f"{key}={spec} is a run of experiment {experiment!r}, not {experiment_name!r}; "
                f"drop experiment_name={experiment_name} or give a run of that experiment."
            )
        run_dir, history = _where_it_lives(client, run, experiment, outputs)
        if history:
            say(
                f"xp: {key}={spec}: the run's directory {run.data.tags.get('xp.run_dir')} is "
                f"not on this machine; using {run_dir} (its checkpoint and config come from "
                f"MLflow {redact_uri(tracking_uri)}).",
                file=sys.stderr,
            )
        checkpoint = _latest_in(run_dir) or _download_checkpoint(client, run, run_dir)
        if checkpoint is None:
            raise ResumeError(
                f"{key}={spec}: the run has no complete checkpoint, neither in {run_dir} nor in "
                "its MLflow artifacts (it stopped before its first save); start it again."
            )
    elif spec == "auto":
        return resolve_auto(
            tracking_uri=tracking_uri, experiment_name=experiment_name, outputs=outputs
        )
    else:
        checkpoint, run_dir = _from_path(Path(spec), key)
        named = Path(spec).resolve() == checkpoint.resolve()
    # test= of a live run is refused too: it would re-open the run's MLflow record and end it.
    holder = RunDirLock(run_dir).holder(wait_s=2.0) if key in ("resume", "test") else None
    if holder is not None:
        raise RunInUse(f"{key}={spec}: {in_use(run_dir, holder, key)}")
    try:
        meta = _meta(checkpoint, run_dir)
    except CheckpointError as e:
        raise ResumeError(f"{key}={spec}: {e}") from e
    run_id = run.info.run_id if run is not None else _run_id_of(run_dir, tracking_uri)
    return ResumeTarget(
        checkpoint=str(checkpoint),
        run_dir=str(run_dir),
        run_id=run_id,
        experiment_name=meta.get("experiment_name") or run_dir.parent.name,
        choices=dict(meta.get("choices", {})),
        timestamp=meta.get("timestamp"),
        config_dirs=tuple(meta.get("config_dirs", ())),
        # load_from= starts a new run: the run it reads from stays where it was recorded.
        run_dir_history=history if key in ("resume", "test") else (),
        named=named,
    )


def _run_id_of(run_dir: Path, tracking_uri: str) -> str | None:
    """The MLflow run recorded for ``run_dir`` (tag ``xp.run_dir``), if the store has one."""
    try:
        client = _client(tracking_uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, filter_string=f"tags.`xp.run_dir` = '{run_dir}'")
    except Exception:  # no store, or not reachable: resume into a new MLflow run
        return None
    return runs[0].info.run_id if runs else None


def resolve_auto(*, tracking_uri: str, experiment_name: str | None, outputs: Path) -> ResumeTarget:
    """The newest unfinished run of the experiment (of this Slurm job, when requeued)."""
    name = experiment_name or "default"
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise ResumeError(
            f"resume=auto: there is no experiment {name!r} in {redact_uri(tracking_uri)}."
        )
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        runs = sorted(runs, key=lambda r: r.data.tags.get("xp.slurm_job_id") != job)
    training: list[str] = []
    for candidate in runs:
        try:
            return resolve(
                candidate.info.run_id,
                tracking_uri=tracking_uri,
                experiment_name=name,
                outputs=outputs,
            )
        except RunInUse:
            training.append(candidate.info.run_id)
        except ResumeError:
            continue
    live = f" ({len(training)} still training: {', '.join(training)})" if training else ""
    raise ResumeError(
        f"resume=auto: experiment {name!r} has no stopped run with a checkpoint{live}; "
        "start a new run."
    )


def checkpoint_for_load(
    spec: str, *, tracking_uri: str, outputs: Path, key: str = "load_from"
) -> Path:
    """``load_from=<run id | run dir | checkpoint>``: the checkpoint whose weights to load
    (``key`` names the argument in errors: ``xp export ckpt=`` resolves the same way)."""
    if RUN_ID.match(spec):
        target = resolve(
            spec, tracking_uri=tracking_uri, experiment_name=None, outputs=outputs, key=key
        )
        return Path(target.checkpoint)
    checkpoint, _ = _from_path(Path(spec), key="load_from" if key == "ckpt" else key)
    return checkpoint
