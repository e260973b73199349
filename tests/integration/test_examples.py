"""The bundled examples train to their stated quality through the CLI, on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cli import only_run

pytestmark = pytest.mark.slow


def test_digits_cnn_classifies_images(xp, workdir: Path, store) -> None:
    result = xp("+experiment=digits_cnn")
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(store, "digits_cnn")
    assert run.data.params["model._target_"] == "xp.examples.cnn.DigitsCNN"
    assert run.data.params["data.as_images"] == "True"
    assert run.data.metrics["val/acc"] >= 0.95


def test_addition_transformer_adds_held_out_numbers(xp, workdir: Path, store) -> None:
    """>= 95 % exact match on sums never seen in training, in 500 steps on one CPU thread."""
    result = xp("+experiment=addition_transformer", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(store, "addition_transformer")
    assert run.data.metrics["val/exact_match"] >= 0.95
    assert run.data.metrics["val/token_acc"] >= run.data.metrics["val/exact_match"]
    assert run.data.tags["xp.best_metric"] == "val/exact_match"
    tested = xp(f"test={run.info.run_id}")
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert only_run(store, "addition_transformer").data.metrics["test/exact_match"] >= 0.95


def test_gan_steps_two_optimizers_and_covers_the_modes(xp, workdir: Path, store) -> None:
    result = xp("+experiment=gan_2d")
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(store, "gan_2d")
    for key in ("train/loss_d", "train/loss_g", "train/lr/generator", "train/lr/discriminator"):
        assert len(store.get_metric_history(run.info.run_id, key)) > 10, key
    # A generator that collapsed onto one mode would score modes 0.125.
    assert run.data.metrics["val/modes"] >= 0.75
    assert run.data.metrics["val/quality"] >= 0.4
