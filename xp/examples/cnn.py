"""A small CNN for the digits as 1x8x8 images (``data.as_images=true``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions per stage, max-pooled, then a linear classifier.

    Args:
        channels: Output channels of each stage; each stage halves the 8x8 image.
        num_classes: Number of output logits.
        dropout: Dropout before the classifier.
    """

    def __init__(
        self, channels: Sequence[int] = (16, 32), num_classes: int = 10, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if not 1 <= len(channels) <= 3:
            raise ValueError(
                f"model.channels={list(channels)} must name 1 to 3 stages (each halves 8x8)."
            )
        layers: list[nn.Module] = []
        width = 1
        for out in channels:
            layers += [
                nn.Conv2d(width, out, 3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(),
                nn.Conv2d(out, out, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            width = out
        side = 8 // 2 ** len(channels)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(width * side * side, num_classes)
        )

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1:] != (1, 8, 8):
            raise ValueError(
                f"DigitsCNN expects images of shape (N, 1, 8, 8), got {tuple(images.shape)}; "
                "set data.as_images=true."
            )
        return self.head(self.features(images))
