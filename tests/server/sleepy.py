"""A model whose training step takes a known time, like a step on an accelerator, and a
callback that ends a run when a file appears.

The outage test measures whether the step pace changes while the tracking server is
down; a step that waits a fixed time makes that pace independent of how busy the two
cores are (the server restarting beside the run uses them). The test ends the run (by
the file) once it has measured enough after the outage, however long the server took to
come back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from xp.callback import Callback
from xp.model import MLP


class SleepyMLP(MLP):
    """xp's MLP whose forward pass in training mode also waits ``step_s`` seconds."""

    def __init__(
        self, in_features: int, hidden_sizes: Sequence[int], num_classes: int, step_s: float
    ) -> None:
        super().__init__(in_features, hidden_sizes, num_classes)
        self.step_s = step_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.step_s)
        return super().forward(x)


class FinishOnFile(Callback):
    """Ends the run (FINISHED, at the next step) once ``path`` exists."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_step_end(self, trainer: Any, step: int, values: Mapping[str, Any]) -> None:
        if self.path.exists():
            trainer.request_finish(f"{self.path} appeared")
