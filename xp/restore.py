"""A resumed run's config: the one it was trained with, plus what the command says now.

``python -m xp resume=<run>`` (and ``test=``) composes from the config group options the
run was started with (``xp.__main__``); :func:`restore_config` then puts back every value
the run was trained with (its ``config.yaml``, or the copy inside its checkpoint) and
takes each override typed on the command line now, one by one:

- one that would change what the saved state means (the model, the optimizer's or a
  schedule's class, the batch size, the seed) is refused, with the values it differs by;
- every other one is applied, also where it equals a default (``trainer.log_interval_steps=5``
  resuming a run that logged every 10 steps), and the run records them all (the MLflow tag
  ``xp.resume_overrides``);
- a group option (``optim=sgd``) that is the run's own changes nothing; another one puts
  that option's values in place, which the first rule may refuse.

The saved config is data (anyone who can write the run directory can change it): its
``_target_``s are checked by :mod:`xp.targets` before anything is built, and it may hold
no interpolation. Options from the user's own ``--config-dir`` need not be found again:
the model's and the data's values come back whole (their nodes are open); for a group
with a typed schema the error names the directory the run was composed with.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xp.checkpoint import load_file
from xp.resume import ResumeError, ResumeTarget
from xp.targets import UntrustedTarget, check_saved
from xp.tracking import REDACTED

STATE_MEANING = re.compile(
    r"^(model\..*|strategy\._target_|data\.(_target_|batch_size|drop_last)|randomness\.seed"
    r"|optim\.(_target_|params)|optim\.optimizers\.[^.]+\.(_target_|params)"
    r"|scheduler\..*\._target_)$"
)
"""Keys whose change on resume would change what the saved state means."""
NOT_RESTORED = ("tracking.tracking_uri",)
"""Where the run is recorded is the command's to say (and a saved URI lost its password)."""
OPEN_GROUPS = ("model", "data")
"""Groups whose node is open (any keyword arguments): a run's values come back whole."""
_MISSING = object()


def plain(node: DictConfig) -> dict[str, Any]:
    """A resolved plain dict: lists stay lists and enums become strings."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` for a nested mapping; an empty mapping is a leaf of its own."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def saved_config(target: ResumeTarget) -> str:
    """The YAML a run was trained with: its ``config.yaml``, else its checkpoint's copy."""
    config = Path(target.run_dir) / "config.yaml"
    if config.is_file():
        return config.read_text()
    checkpoint = Path(target.checkpoint)
    return str(load_file(checkpoint / "extra.pt" if checkpoint.is_dir() else checkpoint)["config"])


def restore_config(
    cfg: DictConfig, target: ResumeTarget, choices_now: Mapping[str, str | None]
) -> tuple[DictConfig, dict[str, Any]]:
    """The config the resumed run was trained with, plus the overrides typed now.

    Args:
        cfg: The config composed for this command (the run's options and the overrides).
        target: The run; ``target.overrides`` are the overrides typed now.
        choices_now: The group options ``cfg`` was composed with (Hydra's runtime choices).

    Returns:
        The restored config, and the overrides that change a value (key -> new value).

    Raises:
        ResumeError: an override would change what the saved state means, or a saved value
            no longer fits the config (an option of a config directory not given).
    """
    import yaml

    tree = yaml.safe_load(saved_config(target)) or {}
    try:
        check_saved(tree)
    except UntrustedTarget as e:
        raise ResumeError(str(e)) from None
    saved = flat(tree)
    given, deleted, typed_groups = _typed(cfg, target)
    refused = [
        f"{k}: saved {saved.get(k)!r}, given {v!r}"
        for k, v in given.items()
        if STATE_MEANING.match(k) and saved.get(k, _MISSING) != v
    ]
    if refused:
        raise ResumeError(
            "resume: these overrides change what the saved state means: "
            + "; ".join(refused)
            + ". Resume without them, or start a new run from the weights with load_from=."
        )
    dropped = {
        group
        for group, option in target.choices.items()
        if option is not None and choices_now.get(group) != option and group not in typed_groups
    }
    restored = cfg.copy()
    for group in dropped & set(OPEN_GROUPS):
        if isinstance(tree.get(group), dict):
            OmegaConf.update(restored, group, tree[group], merge=False)
    for key, value in saved.items():
        if key in given or key in NOT_RESTORED:
            continue
        if value == REDACTED:  # a secret: this command's value (its environment), never ***
            continue
        if any(key == d or key.startswith(d + ".") for d in deleted):
            continue
        top = key.split(".", 1)[0]
        try:
            if OmegaConf.select(restored, key, default=_MISSING) is _MISSING:
                if top in dropped:
                    raise ResumeError(_needs_config_dir(target, top, key))
                logging.getLogger("xp").warning(
                    "resume: %s is no longer in the config; ignored.", key
                )
                continue
            OmegaConf.update(restored, key, value, merge=False)
        except OmegaConfBaseException as e:
            if top in dropped:
                raise ResumeError(_needs_config_dir(target, top, key)) from None
            raise ResumeError(
                f"resume: the saved {key}={value!r} no longer fits the config "
                f"({str(e).splitlines()[0]}); resume with the xp version the run was trained "
                "with, or start a new run from its weights with load_from=."
            ) from None
    return restored, {k: v for k, v in given.items() if saved.get(k, _MISSING) != v}


def _typed(cfg: DictConfig, target: ResumeTarget) -> tuple[dict[str, Any], list[str], set[str]]:
    """What the overrides typed now set: key -> value (as composed), the keys they delete,
    and the groups whose option they change.

    Raises:
        ResumeError: a preset (``+experiment=...``) or an override Hydra cannot parse.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(target.overrides))
    except HydraException as e:
        raise ResumeError(f"resume: {e}") from None
    now = flat(plain(cfg))
    given: dict[str, Any] = {}
    deleted: list[str] = []
    groups: set[str] = set()
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra"):
            continue
        if override.is_delete():
            deleted.append(key)
            continue
        value = {k: v for k, v in now.items() if k == key or k.startswith(key + ".")}
        is_group = key in target.choices and "." not in key
        if is_group and target.choices.get(key) == override.value():
            continue  # the run's own option: nothing changes
        if not value:
            raise ResumeError(
                f"resume: {override.input_line} sets nothing of the run's config (a preset, "
                "or a key it does not have); start a new run from its weights with load_from= "
                "instead."
            )
        if is_group:
            groups.add(key)
        given.update(value)
    return given, deleted, groups


def _needs_config_dir(target: ResumeTarget, group: str, key: str) -> str:
    option = target.choices.get(group)
    where = (
        f"the run was composed with --config-dir {target.config_dirs[0]}"
        if target.config_dirs
        else "the run was composed from a config directory that is not on the search path"
    )
    return (
        f"resume: the saved {key} needs {group}={option}, which is not among xp's options: "
        f"{where}; give it again (--config-dir <dir>)."
    )
