"""The optimizer wrapper: accumulation, clipping, AMP, param groups, state."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from xp.config import (
    AMP,
    ClipGradConfig,
    OptimConfig,
    ParamGroupConfig,
    ParamwiseConfig,
    SGDConfig,
)
from xp.optim import (
    OptimWrapper,
    OptimWrapperDict,
    build_optim_wrapper,
    build_optim_wrapper_dict,
    build_optimizer,
    build_param_groups,
)

OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adamw": functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.01),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _assert_same_params(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=0, msg=name)


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_accumulation_matches_one_large_batch_including_short_last_window(name: str) -> None:
    factory = OPTIMIZERS[name]
    micro, batch, counts, num_micro = 3, 3, 2, 5
    x, y = _data(micro * num_micro)

    accumulated = _model()
    wrapper = OptimWrapper(factory(accumulated.parameters()), accumulative_counts=counts)
    wrapper.initialize_count_status(inner_count=0, max_counts=num_micro)
    stepped = []
    for i in range(num_micro):
        part = slice(i * micro, (i + 1) * micro)
        with wrapper.optim_context():
            loss = _loss(accumulated, x[part], y[part])
        wrapper.update_params(loss)
        stepped.append(wrapper.should_update())
    assert stepped == [False, True, False, True, True]

    reference = _model()
    optimizer = factory(reference.parameters())
    # Windows of 2, 2 and 1 micro-batches: batches of 6, 6 and 3 samples.
    for begin, end in ((0, 2 * batch), (2 * batch, 4 * batch), (4 * batch, 5 * batch)):
        _loss(reference, x[begin:end], y[begin:end]).backward()
        optimizer.step()
        optimizer.zero_grad()

    _assert_same_params(accumulated, reference)
    assert all(p.grad is None for p in accumulated.parameters())


def test_next_epoch_restarts_the_windows() -> None:
    model = _model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    x, y = _data(3)
    pattern = []
    for _epoch in range(2):
        wrapper.initialize_count_status(inner_count=0, max_counts=3)
        for _ in range(3):
            wrapper.update_params(_loss(model, x, y))
            pattern.append(wrapper.should_update())
    assert pattern == [False, True, True] * 2


def test_more_micro_batches_than_announced_is_an_error() -> None:
    model = _model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    wrapper.initialize_count_status(inner_count=0, max_counts=1)
    x, y = _data(2)
    wrapper.update_params(_loss(model, x, y))
    with pytest.raises(RuntimeError, match="initialize_count_status"):
        wrapper.update_params(_loss(model, x, y))


def test_no_sync_only_around_micro_batches_that_do_not_step() -> None:
    entered = []

    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        entered.append(wrapper.inner_count)
        yield

    model = _model()
    wrapper = OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=3, no_sync=no_sync
    )
    wrapper.initialize_count_status(inner_count=0, max_counts=4)
    x, y = _data(2)
    for _ in range(4):
        with wrapper.optim_context():
            loss = _loss(model, x, y)
        wrapper.update_params(loss)
    # Micro-batches 0 and 1 accumulate; 2 ends a window and 3 ends the epoch.
    assert entered == [0, 1]


# --------------------------------------------------------------------------- clipping


def test_clip_by_norm_limits_the_step_and_returns_the_norm_before_clipping() -> None:
    model = _model()
    x, y = _data(8)
    probe = copy.deepcopy(model)
    (_loss(probe, x, y) * 100).backward()
    expected_norm = torch.linalg.vector_norm(
        torch.cat([p.grad.flatten() for p in probe.parameters()])
    )

    before = [p.detach().clone() for p in model.parameters()]
    wrapper = OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=1.0), clip_grad=ClipGradConfig(max_norm=0.5)
    )
    grad_norm = wrapper.update_params(_loss(model, x, y) * 100)

    assert isinstance(grad_norm, torch.Tensor)
    torch.testing.assert_close(grad_norm, expected_norm)
    after = model.parameters()
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(after, before, strict=True)])
    assert torch.linalg.vector_norm(step) <= 0.5 + 1e-6


def test_clip_by_value_limits_every_element() -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    wrapper = OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=1.0), clip_grad=ClipGradConfig(max_value=0.01)
    )
    x, y = _data(8)
    assert wrapper.update_params(_loss(model, x, y) * 100) is None
    for p, b in zip(model.parameters(), before, strict=True):
        assert (p.detach() - b).abs().max() <= 0.01 + 1e-9


# --------------------------------------------------------------------------- AMP


def _fit(amp: AMP, steps: int = 30) -> tuple[list[float], OptimWrapper, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.01), amp=amp)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    losses = []
    for _ in range(steps):
        with wrapper.optim_context():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
        wrapper.update_params(loss)
        losses.append(loss.item())
    return losses, wrapper, model


def test_bf16_autocasts_linear_layers_and_still_trains() -> None:
    model = nn.Linear(4, 3)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), amp=AMP.bf16)
    with wrapper.optim_context():
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16
    assert model(torch.randn(2, 4)).dtype == torch.float32
    assert "scaler" not in wrapper.state_dict()

    losses, _, _ = _fit(AMP.bf16)
    assert losses[-1] < 0.9 * losses[0]


def _cpu_grad_scaler_works() -> bool:
    try:
        torch.amp.GradScaler("cpu")
        with torch.autocast("cpu", dtype=torch.float16):
            nn.Linear(2, 2)(torch.randn(1, 2))
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


@pytest.mark.skipif(not _cpu_grad_scaler_works(), reason="this torch has no CPU fp16 AMP")
def test_fp16_scales_trains_and_skips_non_finite_steps() -> None:
    losses, wrapper, model = _fit(AMP.fp16)
    assert losses[-1] < 0.9 * losses[0]
    state = wrapper.state_dict()
    scale = state["scaler"]["scale"]
    assert scale > 1

    before = [p.detach().clone() for p in model.parameters()]
    with wrapper.optim_context():
        loss = model(torch.randn(2, 4)).float().sum() * float("inf")
    wrapper.update_params(loss)
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b)
    assert wrapper.state_dict()["scaler"]["scale"] < scale


# --------------------------------------------------------------------------- several optimizers


class _GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Linear(4, 4)
        self.discriminator = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(self.generator(x)).mean()


def _gan_wrappers(model: nn.Module) -> OptimWrapperDict:
    return build_optim_wrapper_dict(
        {
            "generator": functools.partial(torch.optim.SGD, lr=0.1),
            "discriminator": functools.partial(torch.optim.SGD, lr=0.01),
        },
        model,
        {
            "generator": SGDConfig(params="generator"),
            "discriminator": SGDConfig(params="discriminator"),
        },
        device_type="cpu",
    )


def test_named_optimizers_step_only_their_own_parameters() -> None:
    model = _GAN()
    wrappers = _gan_wrappers(model)
    assert wrappers.get_lr() == {"generator": [0.1], "discriminator": [0.01]}

    discriminator = copy.deepcopy(model.discriminator)
    generator = copy.deepcopy(model.generator)
    wrappers["generator"].update_params(model(torch.randn(8, 4)))
    _assert_same_params(model.discriminator, discriminator, atol=0)
    assert not torch.equal(model.generator.weight, generator.weight)

    # A loss covering both: one backward, both step.
    wrappers.update_params(model(torch.randn(8, 4)))
    assert not torch.equal(model.discriminator.weight, discriminator.weight)


def test_optimizers_sharing_parameters_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"optim\.optimizers\.a\.params=None"):
        build_optim_wrapper_dict(
            {"a": torch.optim.SGD, "b": torch.optim.SGD},
            _GAN(),
            {"a": SGDConfig(), "b": SGDConfig(params="generator")},
            device_type="cpu",
        )


def test_optimizer_dict_state_round_trip_by_name() -> None:
    model = _GAN()
    wrappers = _gan_wrappers(model)
    wrappers.update_params(model(torch.randn(8, 4)))
    state = wrappers.state_dict()
    assert set(state) == {"generator", "discriminator"}
    fresh = _gan_wrappers(_GAN())
    fresh.load_state_dict(state)
    assert fresh["generator"].inner_count == 1
    with pytest.raises(ValueError, match="generator"):
        fresh.load_state_dict({"generator": state["generator"]})


# --------------------------------------------------------------------------- param groups


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)


def _decay_of(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> tuple[float, float]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group["lr"], group["weight_decay"]
    raise AssertionError("parameter not in any group")


def test_biases_and_norm_parameters_skip_weight_decay_in_two_groups() -> None:
    net = _Net()
    paramwise = ParamwiseConfig(bias_decay_mult=0.0, norm_decay_mult=0.0)
    optimizer = build_optimizer(
        functools.partial(torch.optim.AdamW, lr=0.1, weight_decay=0.05), net, paramwise
    )
    assert len(optimizer.param_groups) == 2
    assert _decay_of(optimizer, net.head.weight) == (0.1, 0.05)
    for param in (net.head.bias, net.backbone[1].weight, net.norm.weight, net.norm.bias):
        assert _decay_of(optimizer, param) == (0.1, 0.0)
    assert {g["decay_mult"] for g in optimizer.param_groups} == {1.0, 0.0}
    assert all(g["lr_mult"] == 1.0 for g in optimizer.param_groups)


def test_custom_prefix_scales_lr_and_the_longest_prefix_wins() -> None:
    net = _Net()
    net.head.bias.requires_grad_(False)
    paramwise = ParamwiseConfig(
        custom={
            "backbone": ParamGroupConfig(lr_mult=0.1),
            "backbone.2": ParamGroupConfig(lr_mult=0.5, decay_mult=0.0),
        }
    )
    optimizer = build_optimizer(
        functools.partial(torch.optim.SGD, lr=1.0, weight_decay=0.01), net, paramwise
    )
    assert _decay_of(optimizer, net.backbone[0].weight) == pytest.approx((0.1, 0.01))
    assert _decay_of(optimizer, net.backbone[2].weight) == pytest.approx((0.5, 0.0))
    assert _decay_of(optimizer, net.head.weight) == pytest.approx((1.0, 0.01))
    assert len(optimizer.param_groups) == 3
    frozen = [p for g in optimizer.param_groups for p in g["params"] if p is net.head.bias]
    assert frozen == []


def test_custom_prefix_matching_nothing_names_the_key_and_the_modules() -> None:
    paramwise = ParamwiseConfig(custom={"backbon": ParamGroupConfig(lr_mult=0.1)})
    with pytest.raises(
        ValueError, match=r"optim\.paramwise\.custom\.backbon .*backbone, norm, head"
    ):
        build_param_groups(_Net(), paramwise, weight_decay=0.0)


def test_scale_lr_multiplies_lr_and_initial_lr() -> None:
    net = _Net()
    paramwise = ParamwiseConfig(custom={"head": ParamGroupConfig(lr_mult=0.5)})
    wrapper = OptimWrapper(
        build_optimizer(functools.partial(torch.optim.SGD, lr=0.2), net, paramwise)
    )
    torch.optim.lr_scheduler.StepLR(wrapper.optimizer, step_size=1)
    wrapper.scale_lr(4.0)
    assert sorted(wrapper.get_lr()) == pytest.approx([0.4, 0.8])
    assert sorted(g["initial_lr"] for g in wrapper.param_groups) == pytest.approx([0.4, 0.8])


# --------------------------------------------------------------------------- state


def test_state_round_trip_continues_identically() -> None:
    x, y = _data(12)
    model = _model()
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.01), accumulative_counts=2)
    wrapper.initialize_count_status(inner_count=0, max_counts=6)
    for i in range(4):
        wrapper.update_params(_loss(model, x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]))

    buffer = io.BytesIO()
    torch.save(wrapper.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = OptimWrapper(
        torch.optim.AdamW(resumed_model.parameters(), lr=0.01), accumulative_counts=2
    )
    resumed.load_state_dict(state)
    assert resumed.inner_count == 4
    resumed.initialize_count_status(inner_count=resumed.inner_count, max_counts=6)

    for m, w in ((model, wrapper), (resumed_model, resumed)):
        for i in range(4, 6):
            w.update_params(_loss(m, x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]))
    _assert_same_params(model, resumed_model, atol=0)


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accumulative_counts": 0}, r"optim\.accumulative_counts=0"),
        (
            {"clip_grad": ClipGradConfig(max_norm=1.0, max_value=1.0)},
            r"optim\.clip_grad sets both",
        ),
        ({"clip_grad": ClipGradConfig(max_norm=0.0)}, r"optim\.clip_grad\.max_norm=0\.0"),
        ({"clip_grad": ClipGradConfig(max_value=-1.0)}, r"optim\.clip_grad\.max_value=-1\.0"),
    ],
)
def test_invalid_wrapper_settings_name_their_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OptimWrapper(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), **kwargs)


def test_params_naming_no_submodule_names_its_key() -> None:
    settings = OptimConfig(_target_="torch.optim.SGD", params="generatr")
    with pytest.raises(ValueError, match=r"optim\.params='generatr'.*generator, discriminator"):
        build_optim_wrapper(
            functools.partial(torch.optim.SGD, lr=0.1), _GAN(), settings, device_type="cpu"
        )
