"""A small base classifier for the demo and tests: maps float32 [N, C, H, W] in [0, 1]
to logits [N, num_classes]. Normalization is inside the model (after the DSSN noise)."""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool stages, then a two-layer linear head.

    Works for any image_size >= 4 (e.g. 1x8x8 digits, 3x32x32 CIFAR). No batch-norm or
    dropout, so the forward pass of one input never depends on the rest of its batch.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8,
                 width: int = 32, hidden: int = 128):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4 (two 2x2 poolings), got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - 0.5) / 0.5))
