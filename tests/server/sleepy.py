"""A model whose training step takes a known time, like a step on an accelerator.

The outage test measures whether the step pace changes while the tracking server is
down; a step that waits a fixed time makes that pace independent of how busy the two
cores are (the server restarting beside the run uses them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

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
