"""``python -m xp`` / ``xp``: subcommands first, then Hydra composes and runs the experiment.

This module imports neither torch nor mlflow, so ``--help`` and ``--cfg job`` answer at
once; the run itself imports them in ``xp.run``.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from xp.log import say

CONF_DIR = next(
    p for p in (Path(__file__).parent / "conf", Path(__file__).parent.parent / "conf") if p.is_dir()
)
"""conf/ of a source checkout (editable install), or the copy a wheel ships as xp/conf."""

_LEGACY_LOCAL_RANK = re.compile(r"^--local[-_]rank(=(\d+))?$")


def _strip_legacy_local_rank(argv: list[str]) -> list[str]:
    """Drop ``--local-rank N`` that torch.distributed.launch passes (LOCAL_RANK says it too)."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        match = _LEGACY_LOCAL_RANK.match(arg)
        if match is None:
            out.append(arg)
            continue
        value = match.group(2)
        if value is None and i + 1 < len(argv) and argv[i + 1].isdigit():
            value = argv[i + 1]
            skip = True
        if value is not None:
            os.environ.setdefault("LOCAL_RANK", value)
    return out


def _prepare_environment() -> None:
    """Fix the launch directory and the launch's timestamp once per launch.

    Both travel in environment variables, so the processes a launcher starts from this
    one (and resolvers called again later) see the same values. Under torchrun, srun or
    mpirun, ranks other than 0 take the timestamp of the directory rank 0 claims
    (:mod:`xp.rundir`).
    """
    launch = Path(os.environ.get("XP_LAUNCH_DIR") or os.getcwd()).resolve()
    os.environ["XP_LAUNCH_DIR"] = str(launch)
    if os.getcwd() != str(launch):
        # A worker of a launcher that ran in its run directory (hydra.job.chdir=true):
        # paths on the command line are relative to where the command was started.
        os.chdir(launch)
    if not os.environ.get("XP_TIMESTAMP") and _rank() == 0:
        os.environ["XP_TIMESTAMP"] = time.strftime("%Y%m%d_%H%M%S")
    if not sys.stderr.isatty():
        # A log file, CI, Slurm: libraries that colour their lines (Optuna's colorlog
        # handler does on any stream) write plain text, FORCE_COLOR=1 keeps colours; and
        # MLflow's artifact transfers (resume='s downloads, the writer's uploads) draw no
        # tqdm bars, each redraw of which would be one more line. A value set wins.
        os.environ.setdefault("NO_COLOR", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _rank() -> int:
    from xp.dist import dist_info, infer_launcher

    return dist_info(infer_launcher()).rank


def _launch_size() -> int:
    """How many processes a launcher (torchrun, srun, mpirun) started for this run."""
    from xp.dist import dist_info, infer_launcher

    return dist_info(infer_launcher()).world_size


def _ui(argv: list[str]) -> int:
    from xp.ui import main as ui_main

    return ui_main(argv)


def _export(argv: list[str]) -> int:
    from xp.export import main as export_main

    return export_main(argv)


def _compare(argv: list[str]) -> int:
    from xp.compare import main as compare_main

    return compare_main(argv)


SUBCOMMANDS = {"ui": _ui, "export": _export, "compare": _compare}


def _value(args: list[str], key: str) -> str | None:
    found = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
    return found[-1] if found else None


def choice_overrides(choices: dict[str, str | None]) -> list[str]:
    """Overrides that select these group options again; ``+group=`` for groups that the
    primary config does not list (``+experiment=...``), so Hydra appends them."""
    import yaml

    listed = {
        str(next(iter(entry)))
        for entry in yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]
        if isinstance(entry, dict)
    }
    return [
        f"{group}={option}" if group in listed else f"+{group}={option}"
        for group, option in choices.items()
        if option is not None
    ]


def _split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags with their values (``--config-dir DIR``), and the overrides."""
    flags: list[str] = []
    overrides: list[str] = []
    expects_value = False
    for arg in args:
        if arg.startswith("-"):
            flags.append(arg)
            expects_value = "=" not in arg
        elif expects_value and "=" not in arg and not arg.startswith("~"):
            flags.append(arg)
            expects_value = False
        else:
            overrides.append(arg)
            expects_value = False
    return flags, overrides


def _resume_arguments(args: list[str]) -> list[str]:
    """Turn ``resume=<spec>`` (or ``test=<spec>``) into that run's directory, config choices
    and target.

    The run composes again from the config group options it was started with; xp.run
    then restores the exact values it was trained with (see xp.resume).
    """
    key = "resume"
    spec = _value(args, "resume")
    test = _value(args, "test")
    if spec is not None and test is not None:
        say(
            "xp: error: resume= and test= were both given; resume trains on, test= only "
            "evaluates. Give one of them.",
            file=sys.stderr,
        )
        raise SystemExit(1)
    if test is not None and test not in ("", "null"):
        key, spec = "test", test
    if spec == "null":
        spec = None
    if spec is not None and not spec.strip():
        say(
            f"xp: error: {key}= has no value; give a run id, {'auto, ' if key == 'resume' else ''}"
            "a run directory or a checkpoint (python -m xp ui lists the runs).",
            file=sys.stderr,
        )
        raise SystemExit(1)
    requeued = os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")
    on_requeue = spec is None and test is None and requeued and "SLURM_JOB_ID" in os.environ
    if spec is None and not on_requeue:
        return args
    import_training_stack()  # finding the run's checkpoints takes torch
    from xp.resume import ENV, TEST_ENV, ResumeError, ResumeTarget, resolve
    from xp.rundir import RunDirError, receive_claim, share_claim
    from xp.stop import ALREADY_FINISHED, requeued_target
    from xp.tracking import TrackingError, check_tracking_uri, default_tracking_uri

    variable = TEST_ENV if key == "test" else ENV
    shared = _launch_size() > 1
    if shared and _rank() != 0:
        # Rank 0 resolves for the launch and hands the run on: the tasks start together,
        # and one that looked for itself could find the run locked by rank 0 already.
        value = receive_claim()  # exits 1 when rank 0 refused (it said why)
        if value == ALREADY_FINISHED:
            raise SystemExit(0)
        if not value.startswith("{"):  # a requeued job's new run: its directory's timestamp
            os.environ["XP_TIMESTAMP"] = value
            return args
        os.environ[variable] = value
        target = ResumeTarget.from_env(variable)
        assert target is not None
    else:
        launch = Path(os.environ["XP_LAUNCH_DIR"])
        uri = _value(args, "tracking.tracking_uri") or default_tracking_uri(launch)
        try:
            check_tracking_uri(uri)
            if on_requeue:
                overrides = _split_flags(args)[1]
                found = requeued_target(
                    [o for o in overrides if not o.lstrip("+~").startswith("hydra")],
                    tracking_uri=uri,
                    outputs=launch / "outputs",
                )
            else:
                found = resolve(
                    spec or "",
                    tracking_uri=uri,
                    experiment_name=_value(args, "experiment_name"),
                    outputs=launch / "outputs",
                    key=key,
                )
        except (ResumeError, RunDirError, TrackingError) as e:
            if shared:
                share_claim(None)
            say(f"xp: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except SystemExit as e:  # the requeued job's run FINISHED already
            if shared:
                share_claim(ALREADY_FINISHED if e.code == 0 else None)
            raise
        if found is None:  # a requeued job's command with no run yet: it starts anew
            return args  # (rank 0 hands on its run directory's timestamp as it claims it)
        target = found
        if shared:
            share_claim(target.to_env())
    flags, overrides = _split_flags(args)
    kept = [
        a
        for a in overrides
        if not a.startswith(("resume=", "test=")) and not a.startswith("experiment_name=")
    ]
    # What the user typed now: xp.run applies each (or refuses it) and records it.
    target = replace(target, overrides=tuple(kept))
    os.environ[TEST_ENV if key == "test" else ENV] = target.to_env()
    os.environ["XP_TIMESTAMP"] = target.timestamp or Path(target.run_dir).name
    given = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    # An option of the user's own --config-dir, not given again, is left out: the run's
    # saved values restore it (xp.restore), or the error there names the directory.
    choices = choice_overrides(
        {
            g: o
            for g, o in target.choices.items()
            if not g.startswith("hydra") and g not in given and _findable(g, o, flags)
        }
    )
    return [
        *flags,  # Hydra's own flags (--config-dir ...) before every override
        *choices,
        *kept,
        f"experiment_name={target.experiment_name}",
        *([f"test={spec}"] if key == "test" else []),
        f"hydra.run.dir={target.run_dir}",
        "hydra.output_subdir=null",  # keep the .hydra/ the run was started with
    ]


def _findable(group: str, option: str | None, flags: list[str]) -> bool:
    """Whether composing can find ``group=option``: one of xp's options, or the command
    gives a config directory (which may hold it)."""
    if option is None or any(f.split("=")[0] in ("--config-dir", "-cd") for f in flags):
        return True
    return (CONF_DIR / group / f"{option}.yaml").is_file()


# Hydra flags after which the command does not train here: it prints, or it sweeps (each
# job starts its own tracker).
_NO_TRAINING_FLAGS = ("-m", "--multirun", "-h", "--help", "--hydra-help", "-c", "--cfg",
                      "-i", "--info", "-sc", "--shell-completion", "--version")  # fmt: skip


def _no_training(args: list[str]) -> bool:
    """Whether a flag makes this command print or sweep instead of training here."""
    return any(a in _NO_TRAINING_FLAGS or a.startswith("--shell-completion") for a in args)


def _trains_here(args: list[str]) -> bool:
    """Whether this process will train a tracked run (as far as the command line tells)."""
    if _no_training(args):
        return False
    if {"tracking=off", "tracking.enabled=false", "tracking.enabled=False"} & set(args):
        return False
    nproc = _value(args, "strategy.nproc_per_node")
    if nproc not in (None, "1") and "RANK" not in os.environ:
        return False  # it starts the workers; rank 0 among them trains
    return _rank() == 0


def _forks_training(args: list[str]) -> bool:
    """Whether to train in a process forked now, which imports torch while Hydra composes.

    Only for one process training here: not a sweep, a print-and-exit flag, a launcher's
    worker or the launcher of several, nor ``resume=``/``test=`` (they import torch before
    Hydra to find the run). See :mod:`xp.prefork`.
    """
    from xp.prefork import enabled

    if not enabled() or "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return False
    if _no_training(args):
        return False
    if _value(args, "resume") is not None or _value(args, "test") is not None:
        return False
    return _value(args, "strategy.nproc_per_node") in (None, "1") and _rank() == 0


def _prepare_training(tracked: bool, composed_fd: int) -> None:
    """In the forked training process, while the parent composes: what training imports."""
    if tracked:
        from xp.tracking import start_early_writer

        # It imports mlflow on the other core once the parent has composed.
        start_early_writer(after_fd=composed_fd)
    from xp.rundir import register_resolvers

    register_resolvers()
    import_training_stack()


def import_training_stack() -> None:
    """torch, the ``torch._dynamo`` that torch.optim's first optimizer imports anyway, and
    xp's training modules, the garbage collector held back (:func:`xp.prefork.imports_frozen`)."""
    from xp.prefork import imports_frozen

    with imports_frozen():
        import torch._dynamo  # noqa: F401

        import xp.run  # noqa: F401


def _run_task(cfg: Any) -> float | None:
    """Hydra's job: the run (xp.run); in a sweep, a failed job does not end the sweep."""
    import_training_stack()
    from xp.run import run
    from xp.sweep import job_errors

    with job_errors():
        return run(cfg)


def _skip_mode_compose(args: list[str]) -> None:
    """Spare Hydra a whole compose of the config made only to read ``hydra.mode``.

    Before a run, Hydra 1.2+ composes the config once just to learn whether
    ``hydra.mode`` asks for a multirun, then composes it again for the run: 0.2-0.3 s of
    every start (benchmarks/, start-up case). xp's config never sets ``hydra.mode``, so
    ``-m`` decides, as in Hydra 1.1; where the command sets it, Hydra asks as usual.
    """
    if any("hydra.mode" in a for a in args):
        return
    from hydra._internal.hydra import Hydra

    if getattr(Hydra.get_mode, "__name__", "") == "get_mode":
        Hydra.get_mode = _no_mode  # type: ignore[method-assign]


def _no_mode(self: Any, config_name: str | None, overrides: list[str]) -> None:
    return None  # _run_app then takes RUN, or MULTIRUN for -m


def _hide_schema_groups() -> None:
    """``--help`` lists the groups a user picks from, not ``schema/*``, which holds the
    typed schemas the options build on (``- /schema/optim/adamw@_here_``)."""
    from hydra._internal.hydra import Hydra

    listed = Hydra.format_config_groups
    if getattr(listed, "__name__", "") != "format_config_groups":
        return

    def format_config_groups(self: Any, predicate: Any, compact: bool = True) -> str:
        def shown(group: str) -> bool:
            return predicate(group) and group.split("/")[0] != "schema"

        return listed(self, shown, compact)

    Hydra.format_config_groups = format_config_groups  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    """The ``xp`` command; returns its exit status."""
    os.environ.setdefault("XP_START_MS", str(int(time.time() * 1000)))  # the run's start
    args = _strip_legacy_local_rank(list(sys.argv[1:] if argv is None else argv))
    from xp.launch import stop_with_launcher

    stop_with_launcher()  # a worker of xp's own launcher stops when the launcher dies
    _prepare_environment()
    if args and args[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args[0]](args[1:])
    from xp.stop import hold_warnings

    hold_warnings()  # Slurm's warning while this starts up is for the loop, not fatal
    training = None
    if argv is None and _forks_training(args):
        from xp.prefork import fork_training

        # The child imports torch while this process composes; it never returns here.
        training = fork_training(partial(_prepare_training, _trains_here(args)), _run_task)
    elif _trains_here(args):
        from xp.tracking import start_early_writer

        start_early_writer()  # imports mlflow on another core while this process starts
    from xp.sweep import sweep_arguments

    try:
        args = sweep_arguments(args)  # a sweep that cannot start fails before Hydra composes
    except ValueError as e:
        say(f"xp: error: {e}", file=sys.stderr)
        return 1
    args = _resume_arguments(args)

    import hydra

    from xp.config import register_schemas
    from xp.rundir import register_resolvers

    register_resolvers()
    register_schemas()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(cfg: Any) -> float | None:
        nonlocal training
        if training is not None:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            if HydraConfig.get().mode != RunMode.MULTIRUN:
                return training.train(cfg, sys.argv)
            training.cancel()  # hydra.mode=MULTIRUN in a config file: the jobs train here
            training = None
        return _run_task(cfg)  # xp.run.run; in a sweep, a failed job does not end the sweep

    if _rank() != 0:
        # Rank 0 writes the run directory's .hydra/; the others only compose.
        args.append("hydra.output_subdir=null")
    sys.argv = [sys.argv[0], *args]
    _skip_mode_compose(args)
    if "--help" in args or "-h" in args:
        _hide_schema_groups()
    task()  # the objective it returns is for Hydra's sweepers, not the exit status
    from xp.sweep import exit_status

    return exit_status()  # 1 when a job of a multirun failed


if __name__ == "__main__":
    sys.exit(main())
