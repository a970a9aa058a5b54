"""A small click-conditioned refiner: FocalClick's idea of re-deciding only the region around a click, learned.

Use: :mod:`napari_robustmedsam.engine.learned_refinement` runs it inside the click refinement's disk (the
``learned`` method of ``engine/click_refinement.py``); ``python -m training.fit_refiner`` trains it.

Input, one window around the click resized to ``INPUT_SIZE`` squared (:data:`INPUT_CHANNELS` channels):
the image's three channels standardised over the window, the current mask (-1 / +1), the disk that may change,
and a positive and a negative click map. Output: foreground logits over the window. The network adds its output
to the current mask's own log-odds, so that a refiner which has learned nothing keeps the mask as it is.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SIZE = 64
INPUT_CHANNELS = 7
#: the log-odds the current mask starts from (the network's output is added to it)
MASK_PRIOR_LOGIT = 3.0
#: channels of the first level when a command does not say (a checkpoint records its own width)
DEFAULT_WIDTH = 16


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class ClickRefinerNet(nn.Module):
    """A three-level U-Net (``width``, 2 x and 4 x ``width`` channels) over the click's window."""

    def __init__(self, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        self.width = width
        self.enc1 = _block(INPUT_CHANNELS, width)
        self.enc2 = _block(width, 2 * width)
        self.enc3 = _block(2 * width, 4 * width)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = _block(6 * width, 2 * width)
        self.dec1 = _block(3 * width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, INPUT_CHANNELS, S, S) -> (B, 1, S, S) foreground logits (S divisible by 4)."""
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up(d2), e1], dim=1))
        return self.head(d1) + MASK_PRIOR_LOGIT * x[:, 3:4]


def build_click_refiner(width: int = DEFAULT_WIDTH) -> ClickRefinerNet:
    return ClickRefinerNet(width=width)
