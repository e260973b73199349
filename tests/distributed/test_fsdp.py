"""FSDP2 on CPU processes over gloo: same training as one process, resharded resumes, export."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
)
from torch.utils.data import TensorDataset

from xp.checkpoint import (
    COMPLETE_MARKER,
    CheckpointCorrupt,
    Checkpointer,
    CheckpointError,
    file_digests,
    folder_files,
    is_complete,
    verify,
    write_marker,
)
from xp.config import AdamWConfig, CheckpointConfig, DType, RandomnessConfig, TrainerConfig
from xp.data import EpochLoader
from xp.model import MLP
from xp.optim import OptimSpec
from xp.randomness import seed_everything
from xp.resume import _from_path
from xp.strategy import FSDPStrategy
from xp.strategy.fsdp import export_model_state
from xp.trainer import Progress, Trainer, training_length

pytestmark = pytest.mark.slow

LR = 1e-2
GLOBAL_BATCH = 16


def make_strategy(tmp: Path, name: str, **kwargs: Any) -> FSDPStrategy:
    options: dict[str, Any] = {"shard_modules": ["Linear"], **kwargs}
    return FSDPStrategy(
        log_dir=tmp / "exp" / name,
        experiment_name="exp",
        randomness=RandomnessConfig(seed=3),
        threads_per_process=1,
        timeout_s=60,
        **options,
    )


def teardown(strategies: list[FSDPStrategy]) -> None:
    """Leave the process group once, at the end.

    Joining a second group on the same port in a process that used DTensors on the first
    hangs now and then on gloo (torch 2.13), so each process keeps one group.
    """
    for strategy in reversed(strategies):
        strategy.teardown()


def prepare(strategy: FSDPStrategy, *, accumulative_counts: int = 1):
    return strategy.prepare(
        lambda: MLP(8, [16, 16], 3, dropout=0.0),
        optim=OptimSpec(
            partial(torch.optim.AdamW, lr=LR),
            AdamWConfig(lr=LR, accumulative_counts=accumulative_counts),
        ),
    )


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    inputs = torch.randn(GLOBAL_BATCH, 8, generator=g)
    return inputs, torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def my_share(batch: tuple[torch.Tensor, ...], rank: int, world_size: int) -> list[torch.Tensor]:
    return [t.chunk(world_size)[rank] for t in batch]


def train_step(strategy: FSDPStrategy, prepared, step: int, micro_batches: int = 1) -> float:
    """One optimizer step on this rank's share of the global batch; the mean loss over ranks."""
    wrapper = prepared.optim_wrapper
    inputs, targets = my_share(global_batch(step), strategy.rank, strategy.world_size)
    total = torch.zeros(())
    for x, y in zip(inputs.chunk(micro_batches), targets.chunk(micro_batches), strict=True):
        with wrapper.optim_context():
            loss = nn.functional.cross_entropy(prepared.model(x), y)
        wrapper.update_params(loss)
        total += loss.detach() / micro_batches
        if not wrapper.should_update():
            # Gradient sync is off: FSDP keeps the unsharded gradients to itself.
            assert all(p.grad is None for p in prepared.model.parameters())
    assert wrapper.should_update()
    return float(strategy.all_reduce(total))


def full_model(prepared) -> dict[str, torch.Tensor]:
    """The whole model state, gathered from every rank's shards."""
    return get_model_state_dict(prepared.model, options=StateDictOptions(full_state_dict=True))


def full_state(prepared) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole model and optimizer state (this initialises a fresh optimizer's state)."""
    return get_state_dict(
        prepared.model,
        prepared.optim_wrapper.optimizer,
        options=StateDictOptions(full_state_dict=True),
    )


def assert_same(actual: Any, expected: Any, where: str = "", atol: float = 0.0) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.allclose(actual, expected, rtol=0, atol=atol), (where, actual, expected)
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}", atol)
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]", atol)
    else:
        assert actual == expected, where


# --------------------------------------------------------------------------- same as one process


def _follow_one_process(rank: int, world_size: int, tmp: Path) -> None:
    strategies = []
    for micro_batches in (1, 2):
        strategies.append(make_strategy(tmp, f"acc{micro_batches}"))
        prepared = prepare(strategies[-1], accumulative_counts=micro_batches)
        reference = MLP(8, [16, 16], 3, dropout=0.0)
        reference.load_state_dict(full_model(prepared))
        optimizer = torch.optim.AdamW(reference.parameters(), lr=LR)
        for step in range(4):
            loss = train_step(strategies[-1], prepared, step, micro_batches)
            x, y = global_batch(step)
            expected = nn.functional.cross_entropy(reference(x), y)
            expected.backward()
            optimizer.step()
            optimizer.zero_grad()
            assert loss == pytest.approx(expected.item(), abs=1e-6), (micro_batches, step)
        assert_same(full_model(prepared), reference.state_dict(), "model", atol=1e-5)
    teardown(strategies)


def test_two_ranks_follow_one_process_with_twice_the_batch(spawn, tmp_path: Path) -> None:
    spawn(_follow_one_process, 2, tmp_path)


# --------------------------------------------------------------------------- checkpoints


def _save(strategy: FSDPStrategy, prepared, tmp: Path, name: str) -> None:
    """Save checkpoint ``name``, with what it holds and what its next step gives."""
    strategy.save_checkpoint(tmp / name, extra={"progress": {"step": 3}})
    model, optim = copy.deepcopy(full_state(prepared))  # the step counts are the live ones
    loss = train_step(strategy, prepared, 3)
    after = full_model(prepared)
    if strategy.is_main_process:
        expected = {"model": model, "optim": optim, "loss": loss, "after": after}
        torch.save(expected, tmp / f"{name}.pt")


def _train_and_save(rank: int, world_size: int, tmp: Path, name: str) -> None:
    strategy = make_strategy(tmp, f"saved-by-{world_size}")
    prepared = prepare(strategy)
    for step in range(3):
        train_step(strategy, prepared, step)
    _save(strategy, prepared, tmp, name)
    strategy.teardown()


def _resume_and_check(rank: int, world_size: int, tmp: Path, name: str) -> FSDPStrategy:
    strategy = make_strategy(tmp, f"resumed-on-{world_size}")
    prepared = prepare(strategy)
    checkpoint = strategy.resume(tmp / name)
    assert checkpoint["progress"] == {"step": 3}
    expected = torch.load(tmp / f"{name}.pt", weights_only=True)
    model, optim = full_state(prepared)
    assert_same(model, expected["model"], "model")
    assert_same(optim, expected["optim"], "optim")  # moments, step and param groups
    assert optim["state"]["head.weight"]["step"].item() == 3
    assert train_step(strategy, prepared, 3) == pytest.approx(expected["loss"], abs=1e-6)
    assert_same(full_model(prepared), expected["after"], "after", atol=1e-5)
    return strategy


def _resume_only(rank: int, world_size: int, tmp: Path, name: str) -> None:
    teardown([_resume_and_check(rank, world_size, tmp, name)])


def _resume_then_save(rank: int, world_size: int, tmp: Path, name: str, new_name: str) -> None:
    checked = _resume_and_check(rank, world_size, tmp, name)
    strategy = make_strategy(tmp, f"resaved-on-{world_size}")
    prepared = prepare(strategy)
    strategy.resume(tmp / name)
    _save(strategy, prepared, tmp, new_name)
    teardown([checked, strategy])


def test_checkpoint_resumes_at_another_world_size(spawn, tmp_path: Path) -> None:
    spawn(_train_and_save, 2, tmp_path, "by2")
    assert is_complete(tmp_path / "by2")
    spawn(_resume_then_save, 1, tmp_path, "by2", "by1")  # 2 ranks -> 1
    spawn(_resume_only, 2, tmp_path, "by1")  # 1 rank -> 2

    # Exported without any process group, the weights load into a plain module.
    exported = tmp_path / "exported.pt"
    torch.save(export_model_state(tmp_path / "by2"), exported)
    plain = MLP(8, [16, 16], 3, dropout=0.0)
    plain.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    assert_same(plain.state_dict(), torch.load(tmp_path / "by2.pt", weights_only=True)["model"])


# --------------------------------------------------------------------------- one process, here


@pytest.fixture
def one_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A factory of FSDP strategies on this process alone; the group goes at the end."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)  # and whatever the strategy sets is undone
    monkeypatch.delenv("MASTER_PORT", raising=False)
    made: list[FSDPStrategy] = []

    def make(**kwargs: Any) -> FSDPStrategy:
        made.append(make_strategy(tmp_path, f"run{len(made)}", **kwargs))
        return made[-1]

    yield make
    for strategy in reversed(made):
        strategy.teardown()


def test_incomplete_checkpoint_is_refused_and_not_listed(one_rank, tmp_path: Path) -> None:
    strategy = one_rank()
    prepared = prepare(strategy)
    train_step(strategy, prepared, 0)
    checkpoints = Checkpointer(tmp_path / "checkpoints", sharded=True)
    strategy.save_checkpoint(checkpoints.path_for(1))
    strategy.save_checkpoint(checkpoints.path_for(2))
    (checkpoints.path_for(2) / COMPLETE_MARKER).unlink()  # as if killed before the marker

    assert checkpoints.list() == [checkpoints.path_for(1)]
    with pytest.raises(CheckpointError, match="incomplete: it has no COMPLETE marker"):
        strategy.resume(checkpoints.path_for(2))
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        export_model_state(checkpoints.path_for(2))
    strategy.resume(checkpoints.path_for(1))


def test_unknown_module_class_names_the_key_and_the_real_classes(one_rank) -> None:
    with pytest.raises(ValueError) as e:
        prepare(one_rank(shard_modules=["Block"]))
    message = str(e.value)
    assert "strategy.shard_modules=['Block']" in message
    for real in ("MLP", "Sequential", "Linear", "LayerNorm"):
        assert real in message

    with pytest.raises(ValueError, match=r"strategy.activation_checkpointing=\['Blok'\]"):
        prepare(one_rank(activation_checkpointing=["Blok"]))


def test_cpu_offload_on_a_cpu_run_says_what_to_do(one_rank) -> None:
    with pytest.raises(ValueError, match="set strategy.cpu_offload=false"):
        prepare(one_rank(cpu_offload=True))


# --------------------------------------------------------------------------- the trainer


def _train_with_trainer(rank: int, world_size: int, tmp: Path) -> None:
    strategy = make_strategy(
        tmp,
        "trainer",
        activation_checkpointing=["Sequential"],
        param_dtype=DType.bf16,
        reduce_dtype=DType.fp32,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(385, 8, generator=g)
    y = (x[:, :3] * torch.tensor([1.0, 2.0, 3.0])).argmax(dim=1)
    common = {"batch_size": 64, "seed": 0, "rank": rank, "world_size": world_size}
    train = EpochLoader(TensorDataset(x[:256], y[:256]), shuffle=True, **common)
    # 129 samples: rank 0 gets 65 (2 batches), rank 1 64 (1 batch) unless the loader evens
    # them out; FSDP needs every rank to run the same number of forwards.
    val = EpochLoader(TensorDataset(x[256:], y[256:]), shuffle=False, pad=False, **common)
    settings = TrainerConfig(max_epochs=4, log_interval_steps=1)
    length = training_length(settings, batches_per_epoch=len(train), accumulative_counts=1)
    prepared = strategy.prepare(
        lambda: MLP(8, [32], 3, dropout=0.0),
        optim=OptimSpec(partial(torch.optim.AdamW, lr=3e-2), AdamWConfig(lr=3e-2)),
    )
    assert any("CheckpointWrapper" in type(m).__name__ for m in prepared.model.modules())
    trainer = Trainer(
        strategy,
        prepared,
        train_loader=train,
        val_loader=val,
        settings=settings,
        length=length,
        checkpointer=Checkpointer(tmp / "checkpoints", sharded=True),
        checkpoint=CheckpointConfig(interval_epochs=0),
    )
    before = trainer.validate(Progress())["val/loss"]
    after = trainer.fit()["val/loss"]
    assert after < 0.7 * before, (before, after)
    strategy.teardown()


def test_activation_checkpointing_and_bf16_train_through_the_trainer(spawn, tmp_path: Path) -> None:
    spawn(_train_with_trainer, 2, tmp_path)


# --------------------------------------------------------------------------- rank 0's initial model


class Noisy(nn.Module):
    """Draws its parameters and a buffer from the RNG when built."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(8, [16, 16], 3, dropout=0.0)
        self.register_buffer("offset", torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.offset)


def _starts_from_rank_0_and_records_every_shard(rank: int, world_size: int, tmp: Path) -> None:
    strategy = FSDPStrategy(
        log_dir=tmp / "exp" / "init",
        experiment_name="exp",
        randomness=RandomnessConfig(seed=3, diff_rank_seed=True),
        shard_modules=["Linear"],
        threads_per_process=1,
        timeout_s=60,
    )
    assert strategy.seed == 3 + rank  # each rank initializes its own model differently
    prepared = strategy.prepare(
        Noisy, optim=OptimSpec(partial(torch.optim.AdamW, lr=LR), AdamWConfig(lr=LR))
    )
    full = full_model(prepared)
    seed_everything(3)
    rank_0 = Noisy().state_dict()
    seed_everything(4)
    assert not torch.equal(Noisy().state_dict()["offset"], rank_0["offset"])
    assert set(full) == set(rank_0)
    for key, value in rank_0.items():
        assert torch.equal(full[key], value), (rank, key)

    # Each rank hashes the shards it wrote, synchronously and on DCP's thread.
    checkpoints = Checkpointer(tmp / "checkpoints", sharded=True)
    strategy.save_checkpoint(checkpoints.path_for(1))
    strategy.use_async_checkpoints()
    strategy.save_checkpoint(checkpoints.path_for(2))
    strategy.wait_for_checkpoints()
    strategy.barrier()
    for step in (1, 2):
        path = checkpoints.path_for(step)
        files = json.loads((path / COMPLETE_MARKER).read_text())["files"]
        assert sorted(files) == [".metadata", "__0_0.distcp", "__1_0.distcp", "extra.pt"], files
        assert verify(path, share=(rank, world_size))
    teardown([strategy])


def test_every_rank_starts_from_rank_0s_model(spawn, tmp_path: Path) -> None:
    """diff_rank_seed=true used to shard rank 0's rows of one layer with rank 1's of another."""
    spawn(_starts_from_rank_0_and_records_every_shard, 2, tmp_path)


# --------------------------------------------------------------------------- checksums, payloads


class Payload:
    """Unpickled without restriction, it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def reseal(folder: Path) -> None:
    """Rewrite the marker's checksums for the folder as it now is (as an attacker can)."""
    write_marker(folder, file_digests(folder, folder_files(folder)), kind="fsdp")


def test_a_corrupt_shard_is_named_and_resume_falls_back(one_rank, tmp_path: Path) -> None:
    strategy = one_rank()
    prepare(strategy)
    run_dir = tmp_path / "run"
    checkpoints = Checkpointer(run_dir / "checkpoints", sharded=True)
    for step in (1, 2):
        strategy.save_checkpoint(checkpoints.path_for(step), extra={"progress": {"step": step}})
    shard = checkpoints.path_for(2) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))

    for load in (strategy.resume, strategy.load_checkpoint):
        with pytest.raises(CheckpointCorrupt, match=r"checksum mismatch in __0_0\.distcp"):
            load(checkpoints.path_for(2))
    with pytest.raises(CheckpointError, match=r"checksum mismatch in __0_0\.distcp"):
        export_model_state(checkpoints.path_for(2))
    assert _from_path(run_dir) == (checkpoints.path_for(1), run_dir)
    assert strategy.resume(checkpoints.path_for(1))["progress"] == {"step": 1}


def test_crafted_checkpoints_run_no_code_on_resume_test_or_load_from(
    one_rank, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    strategy = one_rank()
    prepared = prepare(strategy)
    real = tmp_path / "real"
    strategy.save_checkpoint(real, extra={"progress": {"step": 1}})

    # DCP's .metadata is a pickle (pickle.load in DCP's own reader).
    metadata = tmp_path / "metadata"
    shutil.copytree(real, metadata)
    (metadata / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(metadata)
    # A non-tensor entry of a shard (DCP reads those with torch.load(weights_only=False)).
    entry = tmp_path / "entry"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is")
        model = {k: v.clone() for k, v in full_model(prepared).items()}
        dcp.save({"model": {**model, "evil": Payload(marker)}}, checkpoint_id=entry, no_dist=True)
    shutil.copy(real / "extra.pt", entry / "extra.pt")
    reseal(entry)

    for crafted in (metadata, entry):
        with pytest.raises(CheckpointError, match="is refused"):
            strategy.resume(crafted)  # resume=
        with pytest.raises(CheckpointError, match="is refused"):
            strategy.load_checkpoint(crafted)  # test=
        with pytest.raises(CheckpointError, match="is refused"):
            strategy.load_checkpoint(crafted, strict=False)  # load_from=
        with pytest.raises(CheckpointError, match="is refused"):
            export_model_state(crafted)  # xp export
        assert not marker.exists()
    strategy.resume(real)  # a real checkpoint still loads


# --------------------------------------------------------------------------- the CLI


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "xp", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of one FSDP run on 2 processes, from the command line."""
    cwd = tmp_path_factory.mktemp("fsdp-cli")
    result = run_cli(
        cwd, "strategy=fsdp", "strategy.nproc_per_node=2", "strategy.shard_modules=[Linear]",
        "trainer.max_epochs=2", "tracking.enabled=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (cwd / "outputs" / "default").iterdir()
    return run_dir


def test_cli_run_writes_complete_sharded_checkpoints(cli_run: Path) -> None:
    folders = sorted((cli_run / "checkpoints").iterdir())
    assert folders and all(p.is_dir() and is_complete(p) for p in folders), folders
    assert all((p / "extra.pt").is_file() and (p / ".metadata").is_file() for p in folders)
    for folder in folders:  # every file's checksum, both ranks' shards included
        assert verify(folder)
        files = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "extra.pt"} <= set(files)


def test_cli_resume_and_export_of_a_crafted_checkpoint_run_no_code(
    cli_run: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    crafted = tmp_path / "outputs" / "default" / cli_run.name
    shutil.copytree(cli_run, crafted)
    for folder in Checkpointer(crafted / "checkpoints", sharded=True).list():
        (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        reseal(folder)

    resumed = run_cli(tmp_path, f"resume={crafted}")
    assert resumed.returncode != 0
    assert "is refused" in resumed.stderr, resumed.stderr[-3000:]
    exported = run_cli(tmp_path, "export", f"ckpt={crafted}", f"out={tmp_path / 'model.pt'}")
    assert exported.returncode == 1
    assert "is refused" in exported.stderr, exported.stderr[-3000:]
    assert not marker.exists()
    assert not (tmp_path / "model.pt").exists()


def test_cli_load_from_another_model_stops_before_training(cli_run: Path, tmp_path: Path) -> None:
    args = ["strategy=fsdp", "model.hidden_sizes=[32]", "tracking.enabled=false"]
    refused = run_cli(tmp_path, *args, f"load_from={cli_run}")
    assert refused.returncode == 1, refused.stderr[-3000:]
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("xp: error: Checkpoint ") and "does not fit this model" in error
    assert "shape mismatch [backbone.1.weight: checkpoint (128, 64) vs model (32, 64)" in error
    assert "unexpected [backbone." in error and "load_from_strict=false" in error
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "outputs" / "default").exists()  # no run dir left behind

    partial_load = run_cli(tmp_path, *args, "trainer.max_epochs=1", f"load_from={cli_run}",
                           "load_from_strict=false")  # fmt: skip
    assert partial_load.returncode == 0, partial_load.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "default").iterdir()
    log = (run_dir / f"{run_dir.name}.log").read_text()
    assert "not loaded: shape mismatch [backbone.1.weight" in log
