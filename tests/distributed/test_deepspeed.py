"""DeepSpeed ZeRO on 2 CPU processes over gloo: training, LR schedule, checkpoints, export."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import StepLR

from tests.extras import STRICT_ENV, installed, requires_extra
from xp.checkpoint import (
    COMPLETE_MARKER,
    Checkpointer,
    CheckpointError,
    file_digests,
    folder_files,
    verify,
    write_marker,
)
from xp.config import ClipGradConfig, OptimConfig, RandomnessConfig
from xp.model import MLP
from xp.optim import OptimSpec
from xp.randomness import seed_everything
from xp.scheduler import Phase
from xp.strategy import DeepSpeedStrategy
from xp.strategy.base import TrainingLength
from xp.strategy.deepspeed import export_model_state

pytestmark = pytest.mark.slow
# Not importorskip: the spawned ranks must import DeepSpeed the way xp does.
needs_deepspeed = requires_extra("deepspeed", "deepspeed")

ROOT = Path(__file__).resolve().parents[2]
MICRO_BATCHES = 5  # per epoch; with 2 per window the last window is short (forced boundary)
ACCUMULATION = 2
STEPS_PER_EPOCH = 3
LR = 1e-2


def _model() -> MLP:
    return MLP(in_features=8, hidden_sizes=[16], num_classes=3, dropout=0.0)


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [
        (torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
        for _ in range(MICRO_BATCHES)
    ]


def _strategy(tmp: Path, *, zero_stage: int, seed: int = 0) -> DeepSpeedStrategy:
    return DeepSpeedStrategy(
        log_dir=tmp / f"run{seed}",
        experiment_name="ds",
        randomness=RandomnessConfig(seed=seed),
        zero_stage=zero_stage,
        threads_per_process=1,
        timeout_s=120,  # a rank that fails leaves the others waiting this long, not 30 min
    )


def _prepare(strategy):
    optim = OptimSpec(
        functools.partial(torch.optim.AdamW, lr=LR, weight_decay=0.01),
        OptimConfig(
            _target_="torch.optim.AdamW",
            accumulative_counts=ACCUMULATION,
            clip_grad=ClipGradConfig(max_norm=1.0),
        ),
    )
    phase = Phase(functools.partial(StepLR, step_size=2, gamma=0.5), by_epoch=False)
    return strategy.prepare(
        _model,
        optim=optim,
        schedules=[phase],
        length=TrainingLength(epoch_length=STEPS_PER_EPOCH, total_steps=10 * STEPS_PER_EPOCH),
        batch_size=4,
    )


def _epoch(strategy, prepared, batches) -> list[float]:
    """One epoch as xp's loop runs it; returns the losses."""
    wrapper, model = prepared.optim_wrapper, prepared.model
    wrapper.initialize_count_status(inner_count=0, max_counts=len(batches))
    losses, steps = [], 0
    for batch in batches:
        inputs, targets = strategy.to_device(batch)
        with wrapper.optim_context():
            loss = F.cross_entropy(model(inputs), targets)
        wrapper.update_params(loss)
        losses.append(loss.item())
        if wrapper.should_update():
            steps += 1
            for schedule in prepared.schedules.values():
                schedule.step_iter()
    assert steps == STEPS_PER_EPOCH
    return losses


def _probe(prepared, batches) -> float:
    with torch.no_grad():
        inputs, targets = batches[0]
        return F.cross_entropy(prepared.model(inputs), targets).item()


def _train_and_save(rank: int, world_size: int, tmp: Path, zero_stage: int) -> None:
    batches = _batches(rank)
    with _strategy(tmp, zero_stage=zero_stage) as strategy:
        prepared = _prepare(strategy)
        first = _epoch(strategy, prepared, batches)
        second = _epoch(strategy, prepared, batches)
        assert sum(second) < sum(first), (first, second)
        # StepLR(step_size=2, gamma=0.5) over 6 steps: the engine's optimizer uses LR / 8.
        engine = strategy.engine
        assert engine.global_steps == 2 * STEPS_PER_EPOCH
        groups = len(engine.optimizer.param_groups)
        assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([LR / 8] * groups)
        assert engine.get_lr() == pytest.approx([LR / 8] * groups)

        path = _checkpoint_path(tmp)
        strategy.save_checkpoint(path, extra={"progress": {"epoch": 2, "step": 6}})
        assert (path / COMPLETE_MARKER).is_file() and (path / "extra.pt").is_file()
        saved = {k: v.float().clone() for k, v in strategy.model_state_dict().items()}
        if rank == 0:
            torch.save(saved, tmp / "expected.pt")
        lr = prepared.optim_wrapper.get_lr()
        # What continuing would give: an epoch of steps, then a loss after the last step.
        after = [*_epoch(strategy, prepared, batches), _probe(prepared, batches)]
        torch.save({"lr": lr, "after": after}, tmp / f"continued{rank}.pt")


def _resume(rank: int, world_size: int, tmp: Path, zero_stage: int) -> None:
    batches = _batches(rank)
    expected = torch.load(tmp / "expected.pt", weights_only=True)
    continued = torch.load(tmp / f"continued{rank}.pt", weights_only=True)
    # Other seeds, so other initial weights: the resume must overwrite them all.
    with _strategy(tmp, zero_stage=zero_stage, seed=1) as strategy:
        prepared = _prepare(strategy)
        # Weights only (load_from) first: gathered from the files, loaded into the engine.
        strategy.load_checkpoint(_checkpoint_path(tmp))
        for key, value in strategy.model_state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
        checkpoint = strategy.resume(_checkpoint_path(tmp))
        assert checkpoint["progress"] == {"epoch": 2, "step": 6}
        assert prepared.optim_wrapper.get_lr() == continued["lr"]
        for key, value in strategy.model_state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
        resumed = [*_epoch(strategy, prepared, batches), _probe(prepared, batches)]
        assert resumed == pytest.approx(continued["after"], rel=1e-6, abs=1e-7)

        # The engine steps with the lr of the param groups the LR schedule writes: at 0,
        # an epoch of steps leaves every weight as it was.
        for group in prepared.optim_wrapper.optimizer.param_groups:
            group["lr"] = 0.0
        frozen = {k: v.clone() for k, v in strategy.model_state_dict().items()}
        _epoch(strategy, prepared, batches)
        assert set(strategy.engine.get_lr()) == {0.0}
        for key, value in strategy.model_state_dict().items():
            torch.testing.assert_close(value, frozen[key], rtol=0, atol=0, msg=key)


def _checkpoint_path(tmp: Path) -> Path:
    return Checkpointer(tmp / "checkpoints", sharded=True).path_for(2 * STEPS_PER_EPOCH)


@needs_deepspeed
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_train_save_resume_and_export(spawn, tmp_path: Path, zero_stage: int) -> None:
    spawn(_train_and_save, 2, tmp_path, zero_stage)
    # Fresh processes, as a resumed run has.
    spawn(_resume, 2, tmp_path, zero_stage)

    path = Checkpointer(tmp_path / "checkpoints", sharded=True).latest()
    assert path == _checkpoint_path(tmp_path)
    state = export_model_state(path)  # no process group in this process
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    model = _model()
    model.load_state_dict(state, strict=True)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

    # DeepSpeed's own tool, as a user runs it from the run directory, finds the checkpoint
    # through `latest` and converts it to what xp exports.
    assert (tmp_path / "checkpoints" / "latest").read_text() == path.name
    if not installed("huggingface_hub") and os.environ.get(STRICT_ENV) != "1":
        pytest.skip("DeepSpeed's zero_to_fp32.py needs huggingface_hub (pip install it)")
    converted = subprocess.run(
        [sys.executable, "checkpoints/zero_to_fp32.py", "checkpoints", "out"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert converted.returncode == 0, converted.stdout[-3000:] + converted.stderr[-3000:]
    tool = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    assert set(tool) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(tool[key].float(), value, rtol=0, atol=0, msg=key)

    # Every file's checksum is in the marker (each rank's own files included)...
    files = json.loads((path / COMPLETE_MARKER).read_text())["files"]
    assert {"extra.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(files)
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in files
    assert verify(path)
    tampered = tmp_path / "tampered" / path.name
    shutil.copytree(path, tampered)
    victim = next(tampered.glob("*optim_states.pt"))
    torch.save({"payload": PurePosixPath("anything")}, victim)
    with pytest.raises(CheckpointError, match=f"(truncated|checksum mismatch).*{victim.name}"):
        export_model_state(tampered)
    # ...and DeepSpeed, which unpickles its files unrestricted, gets none that xp's
    # restricted load refuses (the checksums rewritten too, as an attacker would)...
    write_marker(tampered, file_digests(tampered, folder_files(tampered)), kind="deepspeed")
    with pytest.raises(CheckpointError, match="pathlib.PurePosixPath"):
        export_model_state(tampered)
    # ...nor folders whose save did not finish.
    (tampered / COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match=COMPLETE_MARKER):
        export_model_state(tampered)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE"))}
    env.update(
        OMP_NUM_THREADS="1",
        XP_LAUNCH_DIR=str(tmp_path),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    env.pop("XP_TIMESTAMP", None)
    env.pop("LOCAL_RANK", None)
    env.pop("MASTER_PORT", None)
    env.update(extra)
    return env


def test_missing_deepspeed_fails_before_training_with_the_install_command(
    tmp_path: Path,
) -> None:
    fake = tmp_path / "fake" / "deepspeed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named deepspeed')\n")
    env = _env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), env["PYTHONPATH"]])
    result = subprocess.run(
        [sys.executable, "-m", "xp", "strategy=deepspeed", "tracking.enabled=false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert (
        "strategy=deepspeed needs DeepSpeed, which is not installed: pip install 'xp[deepspeed]' "
        "(build it against your torch: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not any(p.is_dir() for p in outputs.glob("*/*"))


@needs_deepspeed
def test_cli_run_on_two_processes_writes_complete_checkpoints(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xp",
            "strategy=deepspeed",
            "strategy.nproc_per_node=2",
            "trainer.max_epochs=2",
            "tracking.enabled=false",
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    # A library's deprecation notice (DeepSpeed calls torch's all_gather_into_tensor) is the
    # same on every rank: rank 0 shows it, once.
    for category in ("FutureWarning", "DeprecationWarning"):
        assert result.stderr.count(category) <= 1, result.stderr[-5000:]
    runs = [p for p in (tmp_path / "outputs" / "default").iterdir() if p.is_dir()]
    assert len(runs) == 1
    checkpoints = Checkpointer(runs[0] / "checkpoints", sharded=True).list()
    assert checkpoints, sorted(p.name for p in (runs[0] / "checkpoints").iterdir())
    for path in checkpoints:
        assert (path / COMPLETE_MARKER).is_file() and (path / "extra.pt").is_file()


# --------------------------------------------------------------------------- rank 0's initial model


class Noisy(torch.nn.Module):
    """Draws its parameters and a buffer from the RNG when built."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()
        self.register_buffer("offset", torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.offset)


def _starts_from_rank_0(rank: int, world_size: int, tmp: Path, zero_stage: int) -> None:
    strategy = DeepSpeedStrategy(
        log_dir=tmp / "init",
        experiment_name="ds",
        randomness=RandomnessConfig(seed=3, diff_rank_seed=True),
        zero_stage=zero_stage,
        threads_per_process=1,
        timeout_s=120,
    )
    with strategy:
        assert strategy.seed == 3 + rank  # each rank initializes its own model differently
        strategy.prepare(
            Noisy,
            optim=OptimSpec(
                functools.partial(torch.optim.AdamW, lr=LR),
                OptimConfig(_target_="torch.optim.AdamW"),
            ),
            batch_size=4,
        )
        state = {k: v.detach().float().clone() for k, v in strategy.model_state_dict().items()}
        states = strategy.all_gather_object(state)
        seed_everything(3)
        rank_0 = Noisy().state_dict()
        seed_everything(4)
        assert not torch.equal(Noisy().state_dict()["offset"], rank_0["offset"])
        for saw in states:
            assert set(saw) == set(rank_0)
            for key, value in rank_0.items():
                torch.testing.assert_close(saw[key], value, rtol=0, atol=0, msg=(rank, key))


@needs_deepspeed
def test_every_rank_starts_from_rank_0s_model(spawn, tmp_path: Path) -> None:
    spawn(_starts_from_rank_0, 2, tmp_path, 3)
