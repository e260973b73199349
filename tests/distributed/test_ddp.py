"""DDP on 2 CPU processes over gloo: one run per launch, same curve as one process."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from xp.config import RandomnessConfig, SGDConfig
from xp.model import MLP
from xp.optim import OptimSpec
from xp.strategy import DDPStrategy, SingleDeviceStrategy

pytestmark = pytest.mark.slow

FINISHED = re.compile(r"xp: rank (\d)/(\d) finished; log_dir (\S+); MLflow run (\S+)")


def run_cli(workdir: Path, *args: str, torchrun: bool = False) -> subprocess.CompletedProcess[str]:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        if torchrun
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [*launcher, "-m", "xp", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def store(workdir: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{(workdir / 'outputs' / 'mlflow.db').as_posix()}")


@pytest.fixture
def workdir(tmp_path: Path, _empty_mlflow_db: Path) -> Path:
    import shutil

    (tmp_path / "outputs").mkdir()
    shutil.copyfile(_empty_mlflow_db, tmp_path / "outputs" / "mlflow.db")
    return tmp_path


@pytest.mark.parametrize("form", ["torchrun", "self-launched"])
def test_one_launch_is_one_run(form: str, workdir: Path, store) -> None:
    args = ["strategy=ddp", "trainer.max_epochs=2", "experiment_name=ddp"]
    if form == "self-launched":
        args.append("strategy.nproc_per_node=2")
    result = run_cli(workdir, *args, torchrun=form == "torchrun")
    assert result.returncode == 0, result.stderr[-3000:]
    if form == "self-launched":
        # The run's story, told once by rank 0: no warning of xp's or a library's per rank,
        # no "MLflow run None" from rank 1, the schedule's note once.
        noise = [line for line in result.stderr.splitlines() if " INFO xp: " not in line]
        assert noise == [], result.stderr[-3000:]
        said = [line.split(" INFO xp: ", 1)[1] for line in result.stderr.splitlines()]
        assert len(said) == len(set(said)), result.stderr[-3000:]  # nothing twice (per rank)
        assert "MLflow run None" not in result.stdout + result.stderr

    run_dirs = list((workdir / "outputs" / "ddp").iterdir())
    assert len(run_dirs) == 1
    (log_dir,) = run_dirs
    assert [p.name for p in log_dir.glob("*.log")] == [f"{log_dir.name}.log"]
    assert (log_dir / ".hydra" / "config.yaml").exists()

    reports = {m.group(1): m.groups() for m in FINISHED.finditer(result.stdout)}
    assert set(reports) == {"0", "1"}, result.stdout
    assert {r[2] for r in reports.values()} == {str(log_dir)}
    run_ids = {r[3] for r in reports.values()}
    assert len(run_ids) == 1

    experiment = store.get_experiment_by_name("ddp")
    (run,) = store.search_runs([experiment.experiment_id])
    assert run.info.run_id in run_ids
    assert run.info.status == "FINISHED"
    assert run.data.tags["xp.world_size"] == "2"
    assert run.data.tags["xp.strategy"] == "DDPStrategy"
    # Throughput is summed over the ranks, the loss averaged.
    assert run.data.metrics["train/samples_per_s"] > 0

    checkpoint = torch.load(sorted((log_dir / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert len(checkpoint["rng"]) == 2  # every rank's RNG state
    assert checkpoint["meta"]["world_size"] == 2


def test_two_ranks_follow_one_process_with_twice_the_batch(workdir: Path, store) -> None:
    common = [
        "data.drop_last=true",
        "model.dropout=0",
        "trainer.max_epochs=2",
        "trainer.log_interval_steps=1",
        "tracking.flush_interval_s=0.2",
    ]
    ddp = run_cli(
        workdir, "strategy=ddp", "strategy.nproc_per_node=2", "data.batch_size=32",
        "experiment_name=two", *common,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_cli(workdir, "data.batch_size=64", "experiment_name=one", *common)
    assert single.returncode == 0, single.stderr[-3000:]

    def history(name: str, key: str) -> list[tuple[int, float]]:
        experiment = store.get_experiment_by_name(name)
        (run,) = store.search_runs([experiment.experiment_id])
        return [(m.step, m.value) for m in store.get_metric_history(run.info.run_id, key)]

    two, one = history("two", "train/loss"), history("one", "train/loss")
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 39))  # 19 steps an epoch
    for (step, a), (_, b) in zip(two, one, strict=True):
        assert a == pytest.approx(b, abs=2e-5), f"step {step}"
    assert history("two", "val/acc") == history("one", "val/acc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["strategy.nproc_per_node=0"], "strategy.nproc_per_node=0 must be >= 1"),
        (["strategy.backend=nccl"], "strategy.backend=nccl needs CUDA"),
        (
            ["strategy.backend=nccl", "strategy.nproc_per_node=2"],
            "strategy.backend=nccl needs CUDA",
        ),
    ],
)
def test_bad_setting_fails_before_training_and_leaves_nothing(
    workdir: Path, store, args: list[str], message: str
) -> None:
    if torch.cuda.is_available():
        pytest.skip("nccl works here")
    result = run_cli(workdir, "strategy=ddp", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (workdir / "outputs" / "default").exists()
    assert [e.name for e in store.search_experiments()] == ["Default"]


def test_port_in_use_is_named(workdir: Path, store) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            workdir, "strategy=ddp", "strategy.nproc_per_node=2", f"strategy.master_port={port}"
        )
    assert result.returncode != 0
    assert f"strategy.master_port={port} is already in use" in result.stderr
    assert not (workdir / "outputs" / "default").exists()


def prepare(strategy):
    return strategy.prepare(
        lambda: MLP(8, [16], 3, dropout=0.0),
        optim=OptimSpec(partial(torch.optim.SGD, lr=0.1), SGDConfig(lr=0.1)),
    )


def _train_and_save(rank: int, world_size: int, tmp: Path) -> None:
    strategy = DDPStrategy(
        log_dir=tmp / "exp" / "run", experiment_name="exp", randomness=RandomnessConfig(seed=3)
    )
    prepared = prepare(strategy)
    wrapper = prepared.optim_wrapper
    g = torch.Generator().manual_seed(rank)  # each rank its own data
    for _ in range(3):
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        with wrapper.optim_context():
            loss = torch.nn.functional.cross_entropy(prepared.model(x), y)
        wrapper.update_params(loss)
    weights = strategy.all_gather_object(prepared.model.module.head.weight.detach().clone())
    assert torch.equal(weights[0], weights[1]), "DDP replicas diverged"
    strategy.save_checkpoint(tmp / "ddp.pt")
    if rank == 0:
        torch.save(strategy.model_state_dict(), tmp / "expected.pt")
    strategy.teardown()


def _resume_on(rank: int, world_size: int, tmp: Path) -> None:
    strategy = DDPStrategy(log_dir=tmp / "exp" / "again", experiment_name="exp")
    prepare(strategy)
    strategy.resume(tmp / "ddp.pt")
    expected = torch.load(tmp / "expected.pt", weights_only=True)
    for key, value in strategy.model_state_dict().items():
        assert torch.equal(value, expected[key]), key
    strategy.teardown()


def test_ddp_checkpoint_resumes_at_any_world_size(spawn, tmp_path: Path) -> None:
    spawn(_train_and_save, 2, tmp_path)
    spawn(_resume_on, 1, tmp_path)  # DDP on one rank
    single = SingleDeviceStrategy(log_dir=tmp_path / "exp" / "single", experiment_name="exp")
    prepare(single)
    single.resume(tmp_path / "ddp.pt")  # and without DDP at all
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    for key, value in single.model_state_dict().items():
        assert torch.equal(value, expected[key]), key


# --------------------------------------------------------------------------- rank 0's initial model


class Noisy(torch.nn.Module):
    """Draws its parameters and a buffer from the RNG when built."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(8, [16], 3, dropout=0.0)
        self.register_buffer("offset", torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.offset)


class NoisyOwnStep(Noisy):
    """The same, stepping its optimizer itself (so DDP does not wrap it)."""

    def train_step(self, batch, optim_wrapper) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        optim_wrapper.update_params(loss)
        return {"loss": loss}


def _starts_from_rank_0(rank: int, world_size: int, tmp: Path, model: type[Noisy]) -> None:
    from xp.randomness import seed_everything

    strategy = DDPStrategy(
        log_dir=tmp / "exp" / model.__name__,
        experiment_name="exp",
        randomness=RandomnessConfig(seed=3, diff_rank_seed=True),
    )
    assert strategy.seed == 3 + rank  # each rank initializes its own model differently
    strategy.prepare(model, optim=OptimSpec(partial(torch.optim.SGD, lr=0.1), SGDConfig(lr=0.1)))
    states = strategy.all_gather_object(
        {k: v.detach().clone() for k, v in strategy.model_state_dict().items()}
    )
    seed_everything(3)
    rank_0 = model().state_dict()
    seed_everything(4)
    assert not torch.equal(model().state_dict()["offset"], rank_0["offset"])
    for saw in states:
        assert set(saw) == set(rank_0)
        for key, value in rank_0.items():
            assert torch.equal(saw[key], value), (rank, key)
    strategy.teardown()


@pytest.mark.parametrize("model", [Noisy, NoisyOwnStep], ids=["wrapped", "own-train-step"])
def test_every_rank_starts_from_rank_0s_model(spawn, tmp_path: Path, model: type[Noisy]) -> None:
    spawn(_starts_from_rank_0, 2, tmp_path, model)
