"""The single-device strategy: environment, prepare, LR scaling, checkpoints and resume."""

from __future__ import annotations

import random
import resource
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xp.checkpoint import Checkpointer, CheckpointError, atomic_save, load_file
from xp.config import AdamWConfig, AutoScaleLRConfig, RandomnessConfig
from xp.model import MLP
from xp.optim import OptimSpec, OptimWrapper
from xp.randomness import rng_state, set_rng_state
from xp.scheduler import Phase
from xp.strategy import SingleDeviceStrategy, TrainingLength


def make_strategy(tmp_path: Path, seed: int | None = 1, **kwargs) -> SingleDeviceStrategy:
    return SingleDeviceStrategy(
        log_dir=tmp_path / "exp" / "20260101_000000",
        experiment_name="exp",
        randomness=RandomnessConfig(seed=seed),
        threads_per_process=1,
        **kwargs,
    )


def prepare(strategy: SingleDeviceStrategy, lr: float = 1e-2):
    return strategy.prepare(
        lambda: MLP(in_features=8, hidden_sizes=[16], num_classes=3, dropout=0.5),
        optim=OptimSpec(partial(torch.optim.AdamW, lr=lr), AdamWConfig(lr=lr)),
        schedules=[
            Phase(partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5), by_epoch=False)
        ],
        length=TrainingLength(epoch_length=4, total_steps=20),
        batch_size=16,
    )


def train_steps(prepared, n: int, data_seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(data_seed)
    losses = []
    wrapper = prepared.optim_wrapper
    for _ in range(n):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        with wrapper.optim_context():
            loss = nn.functional.cross_entropy(prepared.model(x), y)  # dropout draws global RNG
        wrapper.update_params(loss)
        for schedule in prepared.schedules.values():
            schedule.step_iter()
        losses.append(loss.item())
    return losses


def test_run_identity_comes_from_the_run_directory(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    assert strategy.log_dir == (tmp_path / "exp" / "20260101_000000").resolve()
    assert strategy.timestamp == "20260101_000000"
    assert strategy.work_dir == (tmp_path / "exp").resolve()
    assert strategy.experiment_name == "exp"
    assert (strategy.log_dir / "20260101_000000.log").exists()
    assert not strategy.distributed and strategy.world_size == 1 and strategy.rank == 0
    assert torch.get_num_threads() == 1


def test_open_file_limit_is_raised(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, soft + 16) if hard != resource.RLIM_INFINITY else soft + 16
    make_strategy(tmp_path, resource_limit=wanted)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= wanted


def test_null_seed_is_drawn_and_reported(tmp_path: Path) -> None:
    a = make_strategy(tmp_path / "a", seed=None)
    b = make_strategy(tmp_path / "b", seed=None)
    assert a.seed != b.seed
    assert a.collect_env()[1]["randomness"]["seed_in_force"] == a.seed


def test_same_seed_same_initial_weights(tmp_path: Path) -> None:
    w1 = prepare(make_strategy(tmp_path / "a", seed=7)).model.head.weight
    w2 = prepare(make_strategy(tmp_path / "b", seed=7)).model.head.weight
    w3 = prepare(make_strategy(tmp_path / "c", seed=8)).model.head.weight
    assert torch.equal(w1, w2)
    assert not torch.equal(w1, w3)


def test_auto_scale_lr_scales_by_real_batch(tmp_path: Path) -> None:
    strategy = make_strategy(
        tmp_path, auto_scale_lr=AutoScaleLRConfig(enabled=True, base_batch_size=8)
    )
    prepared = prepare(strategy, lr=1e-2)
    assert isinstance(prepared.optim_wrapper, OptimWrapper)
    # batch 16 on 1 process over a base of 8: twice the lr, and the schedule starts there.
    assert prepared.optim_wrapper.get_lr() == pytest.approx([2e-2])
    train_steps(prepared, 2)
    assert prepared.optim_wrapper.get_lr() == pytest.approx([1e-2])


def test_checkpoint_resume_restores_everything_and_continues_identically(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path / "a")
    prepared = prepare(strategy)
    train_steps(prepared, 3)
    path = strategy.save_checkpoint(
        strategy.checkpoint_dir / "step_00000003.pt", extra={"progress": {"step": 3}}
    )
    live = rng_state()
    after_save = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(live)
    continued = train_steps(prepared, 3, data_seed=1)
    final = {k: v.clone() for k, v in prepared.model.state_dict().items()}
    lr = prepared.optim_wrapper.get_lr()

    # Another seed: everything must come from the file.
    other = make_strategy(tmp_path / "b", seed=99)
    resumed = prepare(other)
    checkpoint = other.resume(path)
    assert checkpoint["progress"] == {"step": 3}
    assert torch.equal(torch.rand(3), after_save[0])
    assert random.random() == after_save[1]
    assert np.random.rand() == after_save[2]
    other.resume(path)  # again, since the draws above moved the RNGs
    assert train_steps(resumed, 3, data_seed=1) == continued
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, final[key]), key
    assert resumed.optim_wrapper.get_lr() == lr


def test_checkpoint_holds_plain_data_only(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    prepare(strategy)
    path = strategy.save_checkpoint(tmp_path / "c.pt", extra={"config": "a: 1\n"})
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"model", "optim", "schedulers", "rng", "meta", "config"}
    assert state["meta"]["world_size"] == 1


def test_load_checkpoint_rewrites_module_prefix(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    prepared = prepare(strategy)
    wrapped = {
        f"module.{k}": torch.full_like(v, 0.5) for k, v in prepared.model.state_dict().items()
    }
    atomic_save({"model": wrapped}, tmp_path / "ddp.pt")
    strategy.load_checkpoint(tmp_path / "ddp.pt")
    assert torch.all(prepared.model.head.weight == 0.5)


def test_load_checkpoint_of_another_model_names_the_mismatch(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    prepare(strategy)
    other = MLP(in_features=8, hidden_sizes=[32, 32], num_classes=3)
    atomic_save({"model": other.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as e:
        strategy.load_checkpoint(tmp_path / "other.pt")
    message = str(e.value)
    assert message.startswith(f"Checkpoint {tmp_path / 'other.pt'} does not fit this model: ")
    assert "1 of the model's 6 tensors match" in message  # head.bias only
    assert "shape mismatch [backbone.1.weight: checkpoint (32, 8) vs model (16, 8)" in message
    assert (
        "unexpected [backbone.5.bias, backbone.5.weight, backbone.6.bias, backbone.6.weight]"
        in (message)
    )
    assert "set load_from_strict=false" in message


def test_a_partial_load_asked_for_loads_what_matches_and_logs_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strategy = make_strategy(tmp_path)
    prepared = prepare(strategy)
    other = MLP(in_features=8, hidden_sizes=[32], num_classes=3)
    atomic_save({"model": other.state_dict()}, tmp_path / "other.pt")
    strategy.load_checkpoint(tmp_path / "other.pt", strict=False)
    assert torch.equal(prepared.model.head.bias, other.head.bias)
    logged = capsys.readouterr().err
    assert "Loaded 1 of the model's 6 tensors from checkpoint" in logged
    assert "not loaded: shape mismatch [backbone.1.weight" in logged


def test_load_or_resume_finds_the_latest_checkpoint_of_the_experiment(tmp_path: Path) -> None:
    first = make_strategy(tmp_path)
    prepare(first)
    old = first.save_checkpoint(Checkpointer(first.checkpoint_dir).path_for(4))
    second = SingleDeviceStrategy(
        log_dir=tmp_path / "exp" / "20260101_000001",
        experiment_name="exp",
        randomness=RandomnessConfig(seed=1),
    )
    prepare(second)
    assert second.find_latest_checkpoint() == old.resolve()
    assert second.load_or_resume(resume=True) is not None
    assert second.load_or_resume() is None


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    prepare(strategy)
    path = strategy.save_checkpoint(tmp_path / "c.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"is corrupt \(truncated"):
        strategy.resume(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        strategy.resume(tmp_path / "missing.pt")


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        load_file(path)


def test_atomic_save_keeps_previous_file_when_writing_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"v": torch.tensor(1)}, path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load_file(path)["v"].item() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt.pt.sha256"]


def test_checkpointer_keeps_the_newest(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (5, 10, 15):
        atomic_save({"step": step}, ckpt.path_for(step))
    (tmp_path / ".step_00000020.pt.999999999.tmp").write_bytes(b"dead writer")
    ckpt.prune()
    assert [p.name for p in ckpt.list()] == ["step_00000010.pt", "step_00000015.pt"]
    assert ckpt.latest() == ckpt.path_for(15)
    assert not list(tmp_path.glob(".*.tmp"))


def test_collect_env_reports_system_and_runtime(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    system, runtime = strategy.collect_env()
    assert system["torch"] == torch.__version__
    assert {"python", "os", "mlflow", "hydra-core", "omegaconf", "cuda_available"} <= set(system)
    assert runtime["launcher"] == "none" and runtime["world_size"] == 1
    assert runtime["threads"] == 1


def test_single_strategy_refuses_a_multi_process_launch(tmp_path: Path, monkeypatch) -> None:
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="strategy=ddp"):
        make_strategy(tmp_path)


def test_cuda_device_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from xp.config import Device

    with pytest.raises(ValueError, match="strategy.device=cuda"):
        make_strategy(tmp_path, device=Device.cuda)


def test_deterministic_sets_torch_and_cublas_before_cuda(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        SingleDeviceStrategy(
            log_dir=tmp_path / "exp" / "run",
            experiment_name="exp",
            randomness=RandomnessConfig(seed=0, deterministic=True),
            cudnn_benchmark=True,
        )
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark  # deterministic wins over cudnn_benchmark
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_diff_rank_seed_offsets_by_rank(tmp_path: Path) -> None:
    strategy = SingleDeviceStrategy(
        log_dir=tmp_path / "exp" / "run",
        experiment_name="exp",
        randomness=RandomnessConfig(seed=10, diff_rank_seed=True),
    )
    assert strategy.seed == 10 + strategy.rank


@pytest.mark.slow
def test_compiled_forward_matches_eager(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    eager = prepare(strategy).model
    compiled = make_strategy(tmp_path / "c").prepare(
        lambda: MLP(in_features=8, hidden_sizes=[16], num_classes=3, dropout=0.0), compile=True
    )
    compiled.model.load_state_dict(eager.state_dict())
    eager.eval()
    compiled.model.eval()
    x = torch.randn(4, 8)
    assert "compile" in type(compiled.model.forward).__module__ or hasattr(
        compiled.model.forward, "_torchdynamo_orig_callable"
    )
    assert torch.allclose(compiled.model(x), eager(x), atol=1e-5)
