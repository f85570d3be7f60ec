"""A parameter-free, exact first stage: space-to-depth.

``encode`` folds each ``factor`` x ``factor`` block of pixels into channels (``pixel_unshuffle``), ``decode`` unfolds
them (``pixel_shuffle``); ``decode(encode(x)) == x`` bit for bit. A 32x32 RGB image becomes a 16x16x12 "latent" with
factor 2, so a small UNet works at a quarter of the pixel positions without any autoencoder to train.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpaceToDepthFirstStage(nn.Module):
    """``[B, C, H, W] <-> [B, C * factor**2, H / factor, W / factor]``, exactly invertible."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor}")
        self.factor = factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the space-to-depth factor {self.factor}")
        return F.pixel_unshuffle(x, self.factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(z, self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
