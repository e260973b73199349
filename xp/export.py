"""``xp export``: a plain, full model state dict from any xp checkpoint (or its EMA)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from xp.checkpoint import COMPLETE_MARKER, Checkpointer, CheckpointError, atomic_save, load_file
from xp.log import say
from xp.resume import ResumeError


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file or folder, or the newest complete one of a run directory that
    verifies (newer ones that fail their checksums are named on stderr)."""
    if not path.exists():
        raise CheckpointError(f"ckpt={path} does not exist; give a checkpoint or a run directory.")
    if path.is_dir() and (path / "checkpoints").is_dir():
        latest, skipped = Checkpointer(path / "checkpoints").latest_verified()
        for corrupt in skipped:
            print(f"xp export: skipping {corrupt.path.name}: {corrupt.reason}.", file=sys.stderr)
        if latest is None:
            raise CheckpointError(
                f"The run directory {path} has no complete checkpoint"
                + (" that verifies" if skipped else "")
                + "; give a checkpoint of it (ckpt=<run dir>/checkpoints/step_XXXXXXXX)."
            )
        return latest
    return path


def export_model_state(path: Path, *, ema: bool | str = False) -> dict[str, torch.Tensor]:
    """The full model state dict of a single-file, FSDP or DeepSpeed checkpoint, on the CPU.

    Sharded checkpoints are gathered from their files, without a process group. Every
    file is verified against its recorded checksum and read without running its pickles.

    Args:
        path: A checkpoint, or a run directory (its newest complete checkpoint).
        ema: The parameters of the EMA callback's average instead of the training
            weights (the model's buffers with them): True for the run's one EMA, or the
            callback's name (``ema`` for ``callbacks.ema``).

    Raises:
        CheckpointError: The checkpoint is missing, incomplete, corrupt or refused, or
            holds no such average.
    """
    path = resolve_checkpoint(path)
    callbacks: Mapping[str, Any] = {}
    if path.is_file():
        state = load_file(path)
        if "model" not in state:
            raise CheckpointError(f"{path} has no model state; it was not written by xp.")
        model = state["model"]
        callbacks = state.get("callbacks") or {}
    elif not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"Checkpoint folder {path} has no {COMPLETE_MARKER} marker: its save was "
            "interrupted; export an earlier checkpoint."
        )
    elif (path / ".metadata").is_file():
        from xp.strategy.fsdp import export_model_state as export_fsdp
        from xp.strategy.fsdp import read_sharded_entries

        model = export_fsdp(path)
        if ema:  # the average is sharded like the model (already verified above)
            callbacks = read_sharded_entries(path, ("callbacks",), check=False).get("callbacks", {})
    else:
        from xp.strategy.deepspeed import EXTRA_FILE
        from xp.strategy.deepspeed import export_model_state as export_deepspeed

        model = export_deepspeed(path)
        if ema:
            callbacks = load_file(path / EXTRA_FILE).get("callbacks") or {}
    if ema:
        model = {**model, **_ema_average(callbacks, ema, path)}
    return {
        re.sub(r"^(module\.|_orig_mod\.)+", "", k): v.detach().cpu().contiguous()
        for k, v in model.items()
        if isinstance(v, torch.Tensor)
    }


def _ema_average(callbacks: Mapping[str, Any], which: bool | str, path: Path) -> dict[str, Any]:
    """The averaged parameters of the EMA callback named ``which`` (True: the only one)."""
    averages = {
        name: state["average"]
        for name, state in callbacks.items()
        if isinstance(state, Mapping) and isinstance(state.get("average"), Mapping)
    }
    if which is True:
        if len(averages) == 1:
            return dict(next(iter(averages.values())))
        if not averages:
            raise CheckpointError(
                f"ema=true: {path} holds no EMA average (its run had no xp.callback.EMA "
                "callback, e.g. +callbacks=ema); export it without ema=true."
            )
        raise CheckpointError(
            f"ema=true: {path} holds the averages of callbacks {sorted(averages)}; name one, "
            f"e.g. ema={sorted(averages)[0]}."
        )
    if which not in averages:
        raise CheckpointError(
            f"ema={which}: {path} holds no average of callbacks.{which} (averages: "
            f"{sorted(averages) or 'none'}); name one of them, or ema=true."
        )
    return dict(averages[str(which)])


def _checkpoint(spec: str) -> Path:
    """``ckpt=``: a run id (as ``resume=`` takes), a run directory or a checkpoint."""
    from xp.resume import RUN_ID, checkpoint_for_load
    from xp.tracking import default_tracking_uri

    if not RUN_ID.match(spec):
        return Path(spec)
    launch = Path(os.environ.get("XP_LAUNCH_DIR") or os.getcwd())
    return checkpoint_for_load(
        spec, tracking_uri=default_tracking_uri(launch), outputs=launch / "outputs", key="ckpt"
    )


def main(argv: list[str]) -> int:
    """``xp export ckpt=<checkpoint, folder or run dir> out=<file> [ema=true|<name>]``."""
    parser = argparse.ArgumentParser(prog="xp export", description=main.__doc__)
    parser.add_argument("assignments", nargs="+", metavar="key=value")
    args = parser.parse_args(argv)
    values = dict(a.split("=", 1) for a in args.assignments if "=" in a)
    unknown = sorted(set(values) - {"ckpt", "out", "ema"}) + [
        a for a in args.assignments if "=" not in a
    ]
    if unknown or "ckpt" not in values or "out" not in values:
        parser.error(
            "usage: xp export ckpt=<run id | run dir | checkpoint> out=<file.pt> "
            "[ema=true | <callback name>]"
        )
    flag = values.get("ema", "false")
    ema: bool | str = flag
    if flag.lower() in ("true", "false"):
        ema = flag.lower() == "true"
    try:
        state = export_model_state(_checkpoint(values["ckpt"]), ema=ema)
    except (CheckpointError, ResumeError) as e:
        say(f"xp export: error: {e}", file=sys.stderr)
        return 1
    out = Path(values["out"])
    atomic_save(state, out, checksum=False)  # one file, as asked for
    count = sum(v.numel() for v in state.values())
    print(f"Wrote {len(state)} tensors ({count:,} values) to {out}")
    return 0
