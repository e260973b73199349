"""Models bundled with xp. Any ``torch.nn.Module`` named by ``model._target_`` works too."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """A multi-layer perceptron classifier: ``backbone`` (hidden layers) then ``head``.

    Args:
        in_features: Size of a flattened input.
        hidden_sizes: Width of each hidden layer.
        num_classes: Number of output logits.
        dropout: Dropout after each hidden layer.
        norm: LayerNorm after each hidden linear layer.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        num_classes: int,
        dropout: float = 0.1,
        norm: bool = True,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden_sizes):
            raise ValueError(
                f"model: in_features={in_features}, hidden_sizes={list(hidden_sizes)} and "
                f"num_classes={num_classes} must all be >= 1."
            )
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden in hidden_sizes:
            layers.append(nn.Linear(width, hidden))
            if norm:
                layers.append(nn.LayerNorm(hidden))
            layers.append(nn.GELU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
