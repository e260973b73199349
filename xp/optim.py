"""The optimizer wrapper: gradient accumulation, clipping and mixed precision.

mmengine's ``OptimWrapper``, ``AmpOptimWrapper`` and ``OptimWrapperDict`` in one small
module. The training loop only ever does::

    with wrapper.optim_context():
        loss = model(batch)
    grad_norm = wrapper.update_params(loss)

and ``update_params`` decides whether this micro-batch ends an accumulation window,
in which case it unscales, clips, steps and zeroes the gradients.

Parameter groups follow mmengine's ``paramwise_cfg`` (bias and norm weight-decay
multipliers, per-prefix ``lr_mult``/``decay_mult``); every group carries its
``lr_mult`` and ``decay_mult`` so that schedulers and LR scaling keep them.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.optim import Optimizer

from xp.config import AMP, ClipGradConfig, OptimConfig, ParamwiseConfig

__all__ = [
    "OptimSpec",
    "OptimWrapper",
    "OptimWrapperDict",
    "build_optim_wrapper",
    "build_optim_wrapper_dict",
    "build_optimizer",
    "build_param_groups",
]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    _InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)
# RMSNorm arrived in torch 2.4; older versions simply have no such layer to match.
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)

_AUTOCAST_DTYPES = {AMP.bf16: torch.bfloat16, AMP.fp16: torch.float16}


@dataclass(frozen=True)
class OptimSpec:
    """An optimizer as configured: its factory and xp's settings of its wrapper."""

    factory: Callable[..., Optimizer]
    """``functools.partial`` of the torch optimizer class with its arguments."""
    settings: OptimConfig


# --------------------------------------------------------------------------- groups


def _matches(name: str, prefix: str) -> bool:
    """Whether ``prefix`` names ``name`` or a module above it (dotted boundaries only)."""
    return name == prefix or name.startswith(prefix + ".")


def build_param_groups(
    module: nn.Module,
    paramwise: ParamwiseConfig,
    *,
    weight_decay: float,
    key: str = "optim.paramwise",
) -> list[dict[str, Any]]:
    """Splits the trainable parameters of ``module`` into torch optimizer param groups.

    A parameter's decay multiplier is the product of what applies to it:
    ``bias_decay_mult`` when its name ends in ``bias``, ``norm_decay_mult`` when it
    belongs to a normalization layer (so a LayerNorm's bias gets both), and the
    ``decay_mult`` of the longest ``custom`` prefix that names it, whose ``lr_mult``
    it also takes. Parameters with the same multipliers share one group, since few
    groups keep torch's foreach kernels fast. Frozen parameters are left out.

    Args:
        module: The model (or the submodule this optimizer owns).
        paramwise: The multipliers.
        weight_decay: The optimizer's base weight decay.
        key: Config key of ``paramwise``, for error messages.

    Returns:
        Param groups, each with ``params``, ``weight_decay`` (base times
        ``decay_mult``), ``lr_mult`` and ``decay_mult``. ``lr`` is left to the caller
        (see `build_optimizer`).

    Raises:
        ValueError: A ``custom`` prefix names no parameter of ``module``.
    """
    custom = sorted(paramwise.custom.items(), key=lambda item: len(item[0]), reverse=True)
    matched: set[str] = set()
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    seen: set[int] = set()
    for module_name, mod in module.named_modules():
        is_norm = isinstance(mod, _NORM_TYPES)
        for param_name, param in mod.named_parameters(recurse=False):
            # A tied parameter belongs to the first module that holds it.
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            lr_mult, decay_mult = 1.0, 1.0
            for prefix, multipliers in custom:
                if _matches(name, prefix):
                    # Frozen parameters count as matched: the prefix is not a typo.
                    matched.add(prefix)
                    lr_mult, decay_mult = float(multipliers.lr_mult), float(multipliers.decay_mult)
                    break
            if not param.requires_grad:
                continue
            if param_name.endswith("bias"):
                decay_mult *= paramwise.bias_decay_mult
            if is_norm:
                decay_mult *= paramwise.norm_decay_mult
            group = groups.get((lr_mult, decay_mult))
            if group is None:
                group = groups[(lr_mult, decay_mult)] = {
                    "params": [],
                    "weight_decay": weight_decay * decay_mult,
                    "lr_mult": lr_mult,
                    "decay_mult": decay_mult,
                }
            group["params"].append(param)

    unmatched = [prefix for prefix, _ in custom if prefix not in matched]
    if unmatched:
        children = ", ".join(name for name, _ in module.named_children()) or "(none)"
        prefix = unmatched[0]
        raise ValueError(
            f"{key}.custom.{prefix} matches no parameter of the model; its top-level "
            f"modules are: {children}. Use a module name prefix such as "
            f"'<module>' or '<module>.<submodule>'."
        )
    return list(groups.values())


def _factory_defaults(factory: Callable[..., Optimizer]) -> dict[str, Any]:
    """The keyword arguments ``factory`` will pass, its own defaults included."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return dict(getattr(factory, "keywords", {}))
    return {
        name: p.default
        for name, p in parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def build_optimizer(
    factory: Callable[..., Optimizer],
    module: nn.Module,
    paramwise: ParamwiseConfig,
    *,
    key: str = "optim",
) -> Optimizer:
    """Builds ``factory(param_groups)`` with each group's lr and weight decay multiplied.

    Args:
        factory: The optimizer class or a ``functools.partial`` of it (lr, weight_decay
            and the rest bound as keywords). The base lr and weight decay are read from
            its keywords, else from the optimizer's own defaults.
        module: The model (or the submodule this optimizer owns).
        paramwise: Per-parameter multipliers (see `build_param_groups`).
        key: Config key of the optimizer, for error messages.

    Returns:
        The optimizer; each group's ``lr`` is base lr times ``lr_mult``.

    Raises:
        ValueError: The module has no trainable parameter, a ``custom`` prefix matches
            nothing, or ``lr_mult`` is set for an optimizer without an ``lr`` argument.
    """
    defaults = _factory_defaults(factory)
    lr = defaults.get("lr")
    weight_decay = defaults.get("weight_decay")
    groups = build_param_groups(
        module, paramwise, weight_decay=weight_decay or 0.0, key=f"{key}.paramwise"
    )
    if not groups:
        raise ValueError(
            f"{key}: the model has no trainable parameter to optimize (all are frozen or "
            f"there are none); unfreeze some, or point {key}.params at a trainable submodule."
        )
    if lr is None and any(g["lr_mult"] != 1.0 for g in groups):
        raise ValueError(
            f"{key}.paramwise.custom sets lr_mult, but {factory!r} has no lr argument to "
            f"multiply; set {key}.lr explicitly."
        )
    if weight_decay is None and any(g["decay_mult"] != 1.0 for g in groups):
        warnings.warn(
            f"{key}.paramwise sets decay multipliers, but {factory!r} takes no "
            f"weight_decay; they are ignored.",
            stacklevel=2,
        )
    for group in groups:
        if lr is not None:
            group["lr"] = lr * group["lr_mult"]
        if weight_decay is None:
            del group["weight_decay"]
    return factory(groups)


# --------------------------------------------------------------------------- wrapper


@contextlib.contextmanager
def _stacked(
    outer: AbstractContextManager[Any], inner: AbstractContextManager[Any]
) -> Iterator[None]:
    with outer, inner:
        yield


class OptimWrapper:
    """One optimizer with gradient accumulation, clipping and mixed precision.

    Gradient accumulation counts micro-batches in ``inner_count``: the optimizer steps
    when ``inner_count % accumulative_counts == 0`` or when ``inner_count`` reaches
    ``max_counts`` (set per epoch by `initialize_count_status`), so the last, shorter
    window of an epoch steps too. Each loss is divided by the size of its window, which
    makes k micro-batches of b samples give the gradient of one batch of k*b samples
    under a mean loss.

    Args:
        optimizer: The torch optimizer.
        accumulative_counts: Micro-batches per optimizer step.
        clip_grad: Gradient clipping; None or an empty config turns it off.
        amp: off, bf16 (autocast only) or fp16 (autocast and a GradScaler).
        device_type: The device type autocast and the GradScaler run on ("cuda", "cpu").
        no_sync: Returns a context in which the model skips its gradient all-reduce
            (DDP's ``no_sync``, given by the strategy); entered around the forward of
            micro-batches that do not step.
        sync_grads: Averages the given parameters' gradients over every rank; called
            before each step, where no DDP wrapper does it during backward (a model with
            its own ``train_step``).
        key: Config key of the optimizer, for error messages.

    Raises:
        ValueError: ``accumulative_counts`` < 1, or ``clip_grad`` sets both limits or a
            non-positive one.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        accumulative_counts: int = 1,
        clip_grad: ClipGradConfig | None = None,
        amp: AMP = AMP.off,
        device_type: str = "cpu",
        no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
        sync_grads: Callable[[list[Tensor]], None] | None = None,
        key: str = "optim",
    ) -> None:
        if accumulative_counts < 1:
            raise ValueError(
                f"{key}.accumulative_counts={accumulative_counts} must be at least 1; "
                f"use 1 to step after every batch."
            )
        self.optimizer = optimizer
        self._key = key
        self._accumulative_counts = accumulative_counts
        self._inner_count = 0
        self._max_counts: int | None = None
        self._divisible_counts = 0
        self._remainder_counts = 0
        self._no_sync = no_sync
        self._sync_grads = sync_grads
        self._device_type = device_type
        self._amp = AMP(amp)
        self._autocast_dtype = _AUTOCAST_DTYPES.get(self._amp)
        self._scaler = torch.amp.GradScaler(device_type) if self._amp is AMP.fp16 else None
        self._max_norm: float | None = None
        self._norm_type = 2.0
        self._max_value: float | None = None
        if clip_grad is not None:
            self._set_clip_grad(clip_grad)

    def _set_clip_grad(self, clip_grad: ClipGradConfig) -> None:
        key = f"{self._key}.clip_grad"
        if clip_grad.max_norm is not None and clip_grad.max_value is not None:
            raise ValueError(
                f"{key} sets both max_norm={clip_grad.max_norm} and "
                f"max_value={clip_grad.max_value}; set only one of them."
            )
        for name in ("max_norm", "max_value", "norm_type"):
            value = getattr(clip_grad, name)
            if value is not None and not value > 0:
                raise ValueError(
                    f"{key}.{name}={value} must be positive; use null to turn clipping off."
                )
        self._max_norm = clip_grad.max_norm
        self._norm_type = clip_grad.norm_type
        self._max_value = clip_grad.max_value

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups."""
        return self.optimizer.param_groups

    @property
    def accumulative_counts(self) -> int:
        """Micro-batches per optimizer step."""
        return self._accumulative_counts

    @property
    def device_type(self) -> str:
        return self._device_type

    @property
    def key(self) -> str:
        """The config key of this optimizer, for messages."""
        return self._key

    @property
    def max_norm(self) -> float | None:
        """The gradient-norm clip, or None."""
        return self._max_norm

    @property
    def inner_count(self) -> int:
        """Micro-batches backpropagated so far in this epoch."""
        return self._inner_count

    def initialize_count_status(self, *, inner_count: int, max_counts: int | None) -> None:
        """Sets the micro-batch position; call at the start of every epoch.

        Args:
            inner_count: Micro-batches of the epoch already done (0, or where a resumed
                run restarts).
            max_counts: Micro-batches in the epoch; its last window steps even when
                shorter. None when unknown: every window is full.

        Raises:
            ValueError: ``inner_count`` is negative or beyond ``max_counts``.
        """
        if inner_count < 0 or (max_counts is not None and not 0 <= inner_count <= max_counts):
            raise ValueError(f"inner_count={inner_count} must lie in [0, max_counts={max_counts}].")
        if inner_count % self._accumulative_counts != 0:
            warnings.warn(
                f"Starting at micro-batch {inner_count}, inside an accumulation window of "
                f"{self._key}.accumulative_counts={self._accumulative_counts}; the "
                f"gradients of its earlier micro-batches are lost.",
                stacklevel=2,
            )
        self._inner_count = inner_count
        self._max_counts = max_counts
        if max_counts is not None:
            self._remainder_counts = max_counts % self._accumulative_counts
            self._divisible_counts = max_counts - self._remainder_counts

    def should_update(self) -> bool:
        """Whether the micro-batch just backpropagated ends a window (so it stepped)."""
        return (
            self._inner_count % self._accumulative_counts == 0
            or self._inner_count == self._max_counts
        )

    def _will_update(self) -> bool:
        """Whether the next micro-batch will end a window."""
        count = self._inner_count + 1
        return count % self._accumulative_counts == 0 or count == self._max_counts

    def optim_context(self) -> AbstractContextManager[Any]:
        """The context for the forward pass: autocast, and ``no_sync`` inside a window.

        Only the forward goes inside; call `update_params` after leaving it, since
        torch recommends running backward outside autocast.
        """
        if self._autocast_dtype is None:
            if self._no_sync is None or self._will_update():
                return nullcontext()
            return self._no_sync()
        autocast = torch.autocast(self._device_type, dtype=self._autocast_dtype)
        if self._no_sync is None or self._will_update():
            return autocast
        return _stacked(self._no_sync(), autocast)

    def scale_loss(self, loss: Tensor) -> Tensor:
        """Divides ``loss`` by the size of its accumulation window; call before `backward`.

        Raises:
            RuntimeError: The epoch has more micro-batches than ``max_counts`` said.
        """
        counts = self._accumulative_counts
        if counts == 1:
            return loss
        if self._max_counts is not None and self._inner_count >= self._divisible_counts:
            if self._inner_count >= self._max_counts:
                raise RuntimeError(
                    f"Micro-batch {self._inner_count + 1} of an epoch that "
                    f"initialize_count_status said has max_counts={self._max_counts}; "
                    f"call initialize_count_status at the start of every epoch."
                )
            return loss / self._remainder_counts
        return loss / counts

    def backward(self, loss: Tensor) -> None:
        """Backpropagates ``loss`` (through the GradScaler under fp16) and counts it."""
        if self._scaler is None:
            loss.backward()
        else:
            self._scaler.scale(loss).backward()
        self._inner_count += 1

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self) -> Tensor | None:
        """Unscales (fp16), clips and steps; the GradScaler skips inf/nan steps.

        Returns:
            The total gradient norm before clipping when clipping by norm, else None.
        """
        scaler = self._scaler
        grad_norm = None
        if self._sync_grads is not None:
            self._sync_grads(self._all_params())
        if self._max_norm is not None or self._max_value is not None:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            if self._max_norm is not None:
                grad_norm = nn.utils.clip_grad_norm_(
                    self._all_params(), self._max_norm, norm_type=self._norm_type
                )
            else:
                assert self._max_value is not None
                nn.utils.clip_grad_value_(self._all_params(), self._max_value)
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
            scaler.update()
        return grad_norm

    def zero_grad(self) -> None:
        """Drops the gradients (set to None, which frees their memory)."""
        self.optimizer.zero_grad(set_to_none=True)

    def update_params(self, loss: Tensor) -> Tensor | None:
        """Backpropagates one micro-batch's loss; at the end of a window, steps.

        Afterwards `should_update` tells whether it stepped.

        Returns:
            The gradient norm before clipping when it stepped and clips by norm, else
            None. A tensor, so that logging it costs no device sync until read.
        """
        self.backward(self.scale_loss(loss))
        if not self.should_update():
            return None
        grad_norm = self.step()
        self.zero_grad()
        return grad_norm

    def skip_micro_batch(self) -> None:
        """Count a micro-batch whose loss is dropped (NaN/inf): no backward.

        Its window still ends where it would have; the step then uses the gradients of the
        window's other micro-batches, and is skipped when there are none.
        """
        self._inner_count += 1
        if not self.should_update():
            return
        if any(p.grad is not None for p in self._all_params()):
            self.step()
        self.zero_grad()

    def get_lr(self) -> list[float]:
        """The current lr of every param group."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def scale_lr(self, ratio: float) -> None:
        """Multiplies every group's lr (and ``initial_lr``, which schedulers start from).

        Raises:
            ValueError: ``ratio`` is not positive.
        """
        if not ratio > 0:
            raise ValueError(f"scale_lr(ratio={ratio}): the ratio must be positive.")
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state, GradScaler state (fp16) and ``inner_count``; weights_only-safe."""
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "inner_count": self._inner_count,
        }
        if self._scaler is not None:
            state["scaler"] = self._scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what `state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self._inner_count = int(state["inner_count"])
        scaler_state = state.get("scaler")
        if self._scaler is not None and scaler_state is not None:
            self._scaler.load_state_dict(scaler_state)
        elif self._scaler is not None:
            warnings.warn(
                f"{self._key}.amp=fp16, but the checkpoint has no GradScaler state; "
                f"the loss scale starts afresh.",
                stacklevel=2,
            )
        elif scaler_state is not None:
            warnings.warn(
                f"The checkpoint has a GradScaler state, but {self._key}.amp="
                f"{self._amp.value}; it is ignored.",
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.optimizer).__name__}, "
            f"accumulative_counts={self._accumulative_counts}, amp={self._amp.value})"
        )


class OptimWrapperDict(Mapping[str, OptimWrapper]):
    """Several named optimizer wrappers, e.g. a GAN's generator and discriminator.

    Usually each is used by name (``wrappers["generator"].update_params(g_loss)``).
    For a plain supervised model whose one loss covers every optimizer's parameters,
    `optim_context`, `update_params` and `should_update` act on all of them at once:
    one backward, then every wrapper steps. That needs the wrappers to agree on
    ``accumulative_counts`` and ``amp``, and rules out fp16, whose GradScalers each
    need their own scaled loss.

    Args:
        wrappers: Name -> wrapper.
    """

    def __init__(self, wrappers: Mapping[str, OptimWrapper]) -> None:
        if not wrappers:
            raise ValueError("OptimWrapperDict needs at least one optimizer wrapper.")
        self._wrappers = dict(wrappers)
        self._first = next(iter(self._wrappers.values()))
        # Checked once here rather than on every training step.
        self._joint_reason = self._joint_error()

    def __getitem__(self, name: str) -> OptimWrapper:
        return self._wrappers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._wrappers)

    def __len__(self) -> int:
        return len(self._wrappers)

    def _joint_error(self) -> str | None:
        """Why the wrappers cannot step together on one loss, or None if they can."""
        first = self._first
        for wrapper in self._wrappers.values():
            for attr, name in (("_accumulative_counts", "accumulative_counts"), ("_amp", "amp")):
                mine, theirs = getattr(wrapper, attr), getattr(first, attr)
                if mine != theirs:
                    return (
                        f"{wrapper._key}.{name}={mine} differs from {first._key}.{name}="
                        f"{theirs}; stepping all optimizers on one loss needs them equal "
                        f"(or step each optimizer by name)."
                    )
            if wrapper._amp is AMP.fp16:
                return (
                    f"{wrapper._key}.amp=fp16 cannot step several optimizers on one loss "
                    f"(each GradScaler scales its own loss); use amp=bf16, or step each "
                    f"optimizer by name."
                )
        return None

    def _joint(self) -> OptimWrapper:
        """The first wrapper, which leads when all step together on one loss."""
        if self._joint_reason is not None:
            raise ValueError(self._joint_reason)
        return self._first

    def initialize_count_status(self, *, inner_count: int, max_counts: int | None) -> None:
        """Forwards to every wrapper."""
        for wrapper in self._wrappers.values():
            wrapper.initialize_count_status(inner_count=inner_count, max_counts=max_counts)

    def optim_context(self) -> AbstractContextManager[Any]:
        """The forward context shared by all wrappers (see `OptimWrapper.optim_context`)."""
        return self._joint().optim_context()

    def should_update(self) -> bool:
        """Whether the last joint `update_params` stepped."""
        return self._joint().should_update()

    def update_params(self, loss: Tensor) -> dict[str, Tensor] | None:
        """One backward of ``loss``, then, at the end of a window, every wrapper steps.

        Only for a loss that covers all optimizers' parameters; otherwise step each
        wrapper by name.

        Returns:
            None when no step was taken, else name -> gradient norm before clipping
            for the wrappers that clip by norm.
        """
        first = self._joint()
        first.backward(first.scale_loss(loss))
        for wrapper in self._wrappers.values():
            if wrapper is not first:
                wrapper._inner_count += 1
        if not first.should_update():
            return None
        grad_norms = {}
        for name, wrapper in self._wrappers.items():
            grad_norm = wrapper.step()
            wrapper.zero_grad()
            if grad_norm is not None:
                grad_norms[name] = grad_norm
        return grad_norms

    def zero_grad(self) -> None:
        """Drops every wrapper's gradients."""
        for wrapper in self._wrappers.values():
            wrapper.zero_grad()

    def skip_micro_batch(self) -> None:
        """`OptimWrapper.skip_micro_batch` on every wrapper (a joint update's dropped loss)."""
        for wrapper in self._wrappers.values():
            wrapper.skip_micro_batch()

    def get_lr(self) -> dict[str, list[float]]:
        """Name -> the lr of each of its param groups."""
        return {name: wrapper.get_lr() for name, wrapper in self._wrappers.items()}

    def scale_lr(self, ratio: float) -> None:
        """Multiplies every wrapper's lr by ``ratio``."""
        for wrapper in self._wrappers.values():
            wrapper.scale_lr(ratio)

    def state_dict(self) -> dict[str, Any]:
        """Name -> that wrapper's state."""
        return {name: wrapper.state_dict() for name, wrapper in self._wrappers.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what `state_dict` returned.

        Raises:
            ValueError: The checkpoint's optimizer names differ from these.
        """
        if set(state) != set(self._wrappers):
            raise ValueError(
                f"The checkpoint holds optimizers {sorted(state)}, but this run has "
                f"{sorted(self._wrappers)}; resume with the same optim.optimizers names."
            )
        for name, wrapper in self._wrappers.items():
            wrapper.load_state_dict(state[name])

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={wrapper!r}" for name, wrapper in self._wrappers.items())
        return f"{type(self).__name__}({inner})"


# --------------------------------------------------------------------------- builders


def _owned_module(module: nn.Module, settings: OptimConfig, key: str) -> nn.Module:
    if settings.params is None:
        return module
    try:
        return module.get_submodule(settings.params)
    except AttributeError:
        children = ", ".join(name for name, _ in module.named_children()) or "(none)"
        raise ValueError(
            f"{key}.params={settings.params!r} names no submodule of the model; its "
            f"top-level modules are: {children}."
        ) from None


def build_optim_wrapper(
    factory: Callable[..., Optimizer],
    module: nn.Module,
    settings: OptimConfig,
    *,
    device_type: str,
    no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
    sync_grads: Callable[[list[Tensor]], None] | None = None,
    key: str = "optim",
) -> OptimWrapper:
    """Builds the optimizer over ``module`` (or its ``settings.params`` submodule) and wraps it.

    Args:
        factory: The optimizer partial instantiated from the same config node.
        module: The model, unwrapped (``custom`` prefixes and ``params`` name its
            submodules as ``named_modules`` does).
        settings: xp's settings of the optimizer.
        device_type: Where the model runs, for autocast and the GradScaler.
        no_sync: DDP's ``no_sync``; None on a single device.
        sync_grads: See :class:`OptimWrapper`.
        key: Config key of ``settings``, for error messages.
    """
    owned = _owned_module(module, settings, key)
    if settings.accumulative_counts > 1 and any(isinstance(m, _BatchNorm) for m in owned.modules()):
        warnings.warn(
            f"{key}.accumulative_counts={settings.accumulative_counts} with BatchNorm: "
            f"its statistics still see one micro-batch at a time, so results differ "
            f"from one large batch.",
            stacklevel=2,
        )
    optimizer = build_optimizer(factory, owned, settings.paramwise, key=key)
    return OptimWrapper(
        optimizer,
        accumulative_counts=settings.accumulative_counts,
        clip_grad=settings.clip_grad,
        amp=settings.amp,
        device_type=device_type,
        no_sync=no_sync,
        sync_grads=sync_grads,
        key=key,
    )


def build_optim_wrapper_dict(
    factories: Mapping[str, Callable[..., Optimizer]],
    module: nn.Module,
    settings: Mapping[str, OptimConfig],
    *,
    device_type: str,
    no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
    sync_grads: Callable[[list[Tensor]], None] | None = None,
    key: str = "optim.optimizers",
) -> OptimWrapperDict:
    """Builds one wrapper per name, each over its own ``params`` submodule.

    Args:
        factories: Name -> optimizer partial.
        module: The model, unwrapped.
        settings: Name -> xp's settings of that optimizer (same names as ``factories``).
        device_type: Where the model runs.
        no_sync: DDP's ``no_sync``; None on a single device.
        sync_grads: See :class:`OptimWrapper`.
        key: Config key of the mapping, for error messages.

    Raises:
        ValueError: Two optimizers own the same parameter.
    """
    assert set(factories) == set(settings), "factories and settings come from one config node"
    wrappers = {
        name: build_optim_wrapper(
            factories[name],
            module,
            settings[name],
            device_type=device_type,
            no_sync=no_sync,
            sync_grads=sync_grads,
            key=f"{key}.{name}",
        )
        for name in settings
    }
    owner: dict[int, str] = {}
    for name, wrapper in wrappers.items():
        for group in wrapper.param_groups:
            for param in group["params"]:
                other = owner.setdefault(id(param), name)
                if other != name:
                    raise ValueError(
                        f"{key}.{other}.params={settings[other].params!r} and "
                        f"{key}.{name}.params={settings[name].params!r} share parameters; "
                        f"give each optimizer a disjoint submodule."
                    )
    orphans = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in owner]
    if orphans:
        warnings.warn(
            f"No optimizer under {key} owns {len(orphans)} trainable parameters "
            f"(e.g. {orphans[0]}); they will not train.",
            stacklevel=2,
        )
    return OptimWrapperDict(wrappers)
