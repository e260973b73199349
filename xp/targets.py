"""What a restored config may build: every ``_target_`` is checked before anything imports.

A run's config comes back from disk on ``resume=`` and ``test=`` (its ``config.yaml``, or the
copy inside a checkpoint): data that anyone who could write the run directory may have
changed. Hydra's ``instantiate`` imports and calls whatever a ``_target_`` names, so a
restored config is checked first, at every depth (dicts, lists, nested), by what each target
really is; xp does not rely on Hydra's own blocklist:

1. The dotted path must begin with a trusted package (``torch``, ``xp``, or an entry of the
   command's ``target_allowlist``) before anything is imported: importing a module runs
   its code.
2. The object it resolves to must be a class or a function defined in a trusted module:
   ``torch.nn``, ``torch.optim``, ``torch.utils.data``, the xp modules that hold what xp
   builds (:data:`XP_MODULES`), or a module under ``target_allowlist``. So ``torch.load``
   (defined in ``torch.serialization``) and ``torch.os.system`` (``posix``) are refused,
   though their paths begin with ``torch.``, and so is ``mypkg.os.system`` with
   ``target_allowlist=[mypkg.]``.

Hydra's keys that change how it calls a target (``_args_``, ``_partial_``,
``_recursive_``, ``_convert_``) are allowed on purpose: they only pass values, and every
value they pass that Hydra would build is a ``_target_`` checked the same way. Any other
key that starts and ends with ``_`` is refused, as is an interpolation (``${...}``): a
saved config is resolved, so one was put there by hand, and a resolver could read the
environment. The command's own config files and overrides are the user's and are not
checked; ``target_allowlist`` itself is read from them, never from the saved config.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from typing import Any

TRUSTED_PACKAGES = ("torch", "xp")
TORCH_MODULES = ("torch.nn", "torch.optim", "torch.utils.data")
XP_MODULES = ("xp.model", "xp.data", "xp.metric", "xp.strategy", "xp.examples", "xp.callback")
"""The xp modules whose classes and functions a config builds."""
HYDRA_CALL_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


class UntrustedTarget(ValueError):
    """A restored config names something xp will not build; says how to allow it."""


def check_restored(config: Any, allowlist: Iterable[str] = ()) -> None:
    """Check every ``_target_`` of a restored config (a plain, resolved container).

    Args:
        config: ``OmegaConf.to_container(cfg, resolve=True)`` of the restored config.
        allowlist: The command's ``target_allowlist`` (module names or prefixes such as
            ``mypkg.``, or exact ``module.Name`` paths).

    Raises:
        UntrustedTarget: a target outside what is trusted, or a special key Hydra would
            act on that xp does not allow; the message names the key.
    """
    allowed = tuple(str(a).rstrip(".") for a in allowlist if str(a).strip("."))
    for key, value in _walk(config, ""):
        leaf = key.rsplit(".", 1)[-1]
        if leaf.startswith("_") and leaf.endswith("_") and leaf not in HYDRA_CALL_KEYS:
            raise UntrustedTarget(
                f"{key} in the restored config is a key Hydra would act on, and xp builds "
                f"only with {', '.join(HYDRA_CALL_KEYS)}; remove it from the run's config.yaml."
            )
        if leaf == "_target_":
            _check_target(key, value, allowed)


def targets_in(config: Any) -> list[str]:
    """Every ``_target_`` path of a plain config (this command's own, as it composed it,
    unresolved: an interpolation is no path, and resolving could need what is not set)."""
    return [
        str(v)
        for k, v in _walk(config, "")
        if k.rsplit(".", 1)[-1] == "_target_" and isinstance(v, str) and v and "${" not in v
    ]


def check_saved(saved: Any) -> None:
    """Refuse interpolations in a saved config (the plain tree read from its YAML).

    Raises:
        UntrustedTarget: a value holds ``${...}``, naming its key.
    """
    for key, value in _walk(saved, ""):
        if isinstance(value, str) and "${" in value:
            raise UntrustedTarget(
                f"{key}={value!r} in the saved config is an interpolation; a saved config "
                "is resolved, so it was written by hand. Remove it from the run's config.yaml."
            )


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key, v
            yield from _walk(v, key)
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            key = f"{prefix}[{i}]"
            yield key, v
            yield from _walk(v, key)


def _check_target(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    path = str(value) if isinstance(value, str) else ""
    fix = (
        f"If you trust it, add target_allowlist=[{path.split('.')[0] or 'mypkg'}.] to the "
        "command (only for code you trust: it will be imported and called)."
    )
    if not path or not _under(path, (*TRUSTED_PACKAGES, *allowed)):
        raise UntrustedTarget(
            f"{key}={value!r} in the restored config is not under torch, xp or "
            f"target_allowlist, so it is not built. {fix}"
        )
    from hydra._internal.utils import _locate

    try:
        obj = _locate(path)
    except Exception as e:  # ImportError, AttributeError: hydra wraps them variously
        raise UntrustedTarget(f"{key}={path!r} in the restored config does not import: {e}") from e
    where = _defined_in(obj)
    trusted = (*TORCH_MODULES, *XP_MODULES, *allowed)
    if where is None or not (_under(where, trusted) or _under(_qualified(obj, where), allowed)):
        raise UntrustedTarget(
            f"{key}={path!r} in the restored config is {where or 'an object'}."
            f"{getattr(obj, '__qualname__', type(obj).__name__)}, which xp does not build "
            f"from a saved config (it builds classes and functions of {', '.join(trusted)}). "
            f"{fix}"
        )


def _defined_in(obj: Any) -> str | None:
    """The module that defines ``obj``, for a class or a function; None for anything else."""
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        return None
    module = getattr(obj, "__module__", None)
    return module if isinstance(module, str) else None


def _qualified(obj: Any, module: str) -> str:
    return f"{module}.{getattr(obj, '__qualname__', '')}"


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)
