"""A resumed run's config: the saved values come back, each typed override is applied or
refused with why, and a saved config never builds what xp does not trust."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from xp.restore import plain, restore_config
from xp.resume import ResumeError, ResumeTarget
from xp.targets import UntrustedTarget, check_restored

CHOICES = {
    "strategy": "single", "optim": "adamw", "scheduler": "warmup_cosine",
    "randomness": "default", "model": "mlp", "data": "digits", "task": "classification",
    "trainer": "default", "checkpoint": "default", "tracking": "mlflow",
}  # fmt: skip


def _saved_run(compose, tmp_path: Path, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose(list(overrides))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


def _target(run_dir: Path, *overrides: str, choices=CHOICES) -> ResumeTarget:
    return ResumeTarget(
        checkpoint=str(run_dir / "checkpoints" / "step_00000010.pt"),
        run_dir=str(run_dir),
        run_id=None,
        experiment_name="default",
        choices=dict(choices),
        overrides=tuple(overrides),
    )


def _resume(compose, run_dir: Path, *overrides: str, choices=CHOICES):
    cfg = compose([f"{g}={o}" for g, o in choices.items() if g in CHOICES] + list(overrides))
    return restore_config(cfg, _target(run_dir, *overrides, choices=choices), choices)


def test_saved_values_come_back(compose, tmp_path: Path) -> None:
    run_dir = _saved_run(compose, tmp_path, "optim.lr=0.01", "trainer.log_interval_steps=10")
    restored, accepted = _resume(compose, run_dir)
    assert restored.optim.lr == 0.01 and restored.trainer.log_interval_steps == 10
    assert accepted == {}


def test_an_override_equal_to_the_default_is_applied(compose, tmp_path: Path) -> None:
    """resume=<id> trainer.log_interval_steps=5 (the default) on a run that logged every 10."""
    run_dir = _saved_run(
        compose, tmp_path, "trainer.log_interval_steps=10", "strategy=ddp",
        "strategy.nproc_per_node=2",
    )  # fmt: skip
    choices = {**CHOICES, "strategy": "ddp"}
    restored, accepted = _resume(
        compose, run_dir, "trainer.log_interval_steps=5", "strategy.nproc_per_node=1",
        choices=choices,
    )  # fmt: skip
    assert restored.trainer.log_interval_steps == 5
    assert restored.strategy.nproc_per_node == 1
    assert accepted == {"trainer.log_interval_steps": 5, "strategy.nproc_per_node": 1}


def test_the_runs_own_group_option_changes_nothing(compose, tmp_path: Path) -> None:
    run_dir = _saved_run(compose, tmp_path, "optim.lr=0.01")
    restored, accepted = _resume(compose, run_dir, "optim=adamw")
    assert restored.optim.lr == 0.01 and accepted == {}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim=sgd", "optim._target_"),
        ("model.hidden_sizes=[8]", "model.hidden_sizes"),
        ("data.batch_size=7", "data.batch_size"),
        ("randomness.seed=99", "randomness.seed"),
    ],
)
def test_an_override_that_changes_the_saved_states_meaning_is_refused(
    compose, tmp_path: Path, override: str, named: str
) -> None:
    run_dir = _saved_run(compose, tmp_path, "randomness.seed=1")
    with pytest.raises(ResumeError, match="change what the saved state means") as e:
        _resume(compose, run_dir, override)
    assert named in str(e.value)


def test_a_preset_given_on_resume_is_refused_not_ignored(compose, tmp_path: Path) -> None:
    run_dir = _saved_run(compose, tmp_path)
    with pytest.raises(ResumeError, match=r"\+experiment=digits_cnn sets nothing"):
        _resume(compose, run_dir, "+experiment=digits_cnn")


def test_the_users_own_model_comes_back_without_its_config_dir(compose, tmp_path: Path) -> None:
    """A model option from the user's --config-dir: its saved values come back whole."""
    run_dir = _saved_run(compose, tmp_path)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["model"] = {"_target_": "torch.nn.Linear", "in_features": 64, "out_features": 10}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    choices = {**CHOICES, "model": "mine", "experiment": "mine"}
    cfg = compose([f"{g}={o}" for g, o in CHOICES.items()])
    restored, _ = restore_config(cfg, _target(run_dir, choices=choices), CHOICES)
    assert plain(restored.model) == saved["model"]  # MLP's hidden_sizes are not left behind


def test_a_typed_group_from_a_missing_config_dir_names_that_dir(compose, tmp_path: Path) -> None:
    run_dir = _saved_run(compose, tmp_path)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["optim"]["my_setting"] = 3
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    choices = {**CHOICES, "optim": "mine"}
    target = _target(run_dir, choices=choices)
    target = ResumeTarget(**{**target.__dict__, "config_dirs": ("/somewhere/myconf",)})
    cfg = compose([f"{g}={o}" for g, o in CHOICES.items()])
    with pytest.raises(ResumeError, match="--config-dir /somewhere/myconf") as e:
        restore_config(cfg, target, CHOICES)
    assert "optim=mine" in str(e.value)


# ---------------------------------------------------------------- what a saved config builds


class _WritesMarker:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _payloads(tmp_path: Path) -> dict[str, dict]:
    """Configs that run code when built: the ``torch.load`` ones even past Hydra 1.3.8's own
    blocklist (which stops ``os.system``, but is not what xp relies on)."""
    marker = tmp_path / "marker"
    pickled = tmp_path / "evil.pkl"
    pickled.write_bytes(pickle.dumps(_WritesMarker(str(marker))))
    (tmp_path / "mypkg").mkdir(exist_ok=True)
    (tmp_path / "mypkg" / "__init__.py").write_text("import os\nimport torch\n")
    touch = {"_args_": [f"touch {marker}"]}
    load = {"_target_": "torch.load", "f": str(pickled), "weights_only": False}
    return {
        "torch.os.system": {"model": {"_target_": "torch.os.system", **touch}},
        "torch.load of a pickle": {"model": load},
        "torch.serialization.os.system": {
            "model": {"_target_": "torch.serialization.os.system", **touch}
        },
        "xp.model.torch.load": {"model": {**load, "_target_": "xp.model.torch.load"}},
        "in a list": {"model": {"_target_": "torch.nn.Sequential", "_args_": [load]}},
        "nested in a dict": {"data": {"_target_": "xp.data.Datasets", "train": load}},
        "an xp module's import of torch": {
            "model": {**load, "_target_": "xp.checkpoint.torch.load"}
        },
        "the allowlisted package's import of torch": {
            "model": {**load, "_target_": "mypkg.torch.load"}
        },
        "the allowlisted package's import of os": {
            "model": {"_target_": "mypkg.os.system", **touch}
        },
    }


PAYLOADS = [
    "torch.os.system",
    "torch.load of a pickle",
    "torch.serialization.os.system",
    "xp.model.torch.load",
    "in a list",
    "nested in a dict",
    "an xp module's import of torch",
    "the allowlisted package's import of torch",
    "the allowlisted package's import of os",
]


def _build_like_xp(config: dict, allowlist: list[str]) -> object:
    """What xp does with a restored config: check it, then build it."""
    check_restored(config, allowlist)
    return instantiate(config)


@pytest.mark.parametrize("name", PAYLOADS)
def test_a_saved_config_never_runs_code(tmp_path: Path, monkeypatch, name: str) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UntrustedTarget):
        _build_like_xp(_payloads(tmp_path)[name], ["mypkg."])
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize(
    "name", ["torch.load of a pickle", "in a list", "nested in a dict", "xp.model.torch.load"]
)
def test_the_payloads_run_code_when_built_unchecked(tmp_path: Path, name: str) -> None:
    """The proof that the payloads above are live: Hydra alone would run them."""
    with contextlib.suppress(Exception):
        instantiate(_payloads(tmp_path)[name])
    assert (tmp_path / "marker").exists()


def test_xp_and_torch_targets_and_the_users_allowlist_build(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mynets").mkdir()
    (tmp_path / "mynets" / "__init__.py").write_text("class Net:\n    pass\n")
    check_restored(
        {
            "model": {"_target_": "xp.model.MLP", "hidden_sizes": [8]},
            "optim": {"_target_": "torch.optim.AdamW", "_partial_": True},
            "scheduler": {"w": {"_target_": "torch.optim.lr_scheduler.LinearLR"}},
            "task": {"metrics": {"acc": {"_target_": "xp.metric.Accuracy"}}},
            "mine": [{"_target_": "mynets.Net", "_recursive_": False, "_convert_": "all"}],
        },
        ["mynets."],
    )


def test_a_key_hydra_acts_on_that_xp_does_not_allow_is_refused() -> None:
    with pytest.raises(UntrustedTarget, match="_set_"):
        check_restored({"model": {"_target_": "xp.model.MLP", "_set_": 1}})


def test_an_interpolation_in_a_saved_config_is_refused(compose, tmp_path: Path) -> None:
    run_dir = _saved_run(compose, tmp_path)
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(
        text.replace("experiment_name: default", "experiment_name: ${oc.env:HOME}")
    )
    with pytest.raises(ResumeError, match="interpolation"):
        _resume(compose, run_dir)
