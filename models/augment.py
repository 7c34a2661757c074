"""Augmentation for restoration pairs: one random geometric transform applied to both images.

A crappified input and its original are the same picture at two resolutions; a crop-zoom or a flip
must move both alike or the model learns to undo a shift it cannot see. The transform is an affine
map in normalised coordinates (``affine_grid``), so it is the same map at any resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class PairAugment:
    """Random crops with zoom in [1, ``max_zoom``] (a window of 1/zoom of the side, anywhere in the
    image, resized back) and left-right flips with probability ``flip``, as fastai's
    ``get_transforms(max_zoom=2.)`` for the super-resolution lesson (its rotations and lighting left out:
    they would have to be undone identically in the crappified input, which is not stored that way)."""

    max_zoom: float = 2.0
    flip: float = 0.5

    def __call__(self, low: torch.Tensor, high: torch.Tensor, generator: torch.Generator):
        """``low`` (B, C, h, w) and ``high`` (B, C, H, W); the random draws come from ``generator`` (CPU)."""
        b = low.shape[0]
        zoom = 1 + torch.rand(b, generator=generator) * (self.max_zoom - 1)
        side = 1 / zoom  # the window's side, as a fraction of the image's
        tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - side)
        ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - side)
        sign = torch.where(torch.rand(b, generator=generator) < self.flip, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = side * sign, tx
        theta[:, 1, 1], theta[:, 1, 2] = side, ty
        return self._warp(low, theta), self._warp(high, theta)

    @staticmethod
    def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
