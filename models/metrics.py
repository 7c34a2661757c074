"""Image quality against a reference: PSNR and SSIM on images in [0, 1]."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image of a (B, C, H, W) batch (peak 1.0)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2) ** 2).float() / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] @ g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 .01, K2 .03),
    per image, averaged over channels and positions (valid windows only)."""
    x, y = x.float(), y.float()
    c = x.shape[1]
    w = _gaussian(window, sigma).to(x.device).expand(c, 1, window, window)

    def blur(t):
        return F.conv2d(t, w, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def hit_at_k(scores: torch.Tensor, truth: torch.Tensor, ks=(1, 2, 5, 10, 20)) -> dict[int, float]:
    """Flat hit@k: the share of rows whose true column is among the ``k`` highest scores.

    ``scores`` (N, C), ``truth`` (N,) column indices. Ties count against the truth: a column
    scoring the same ranks above it (no credit for a constant model).
    """
    if len(truth) == 0:
        raise ValueError("hit@k of no rows")
    true_scores = scores.gather(1, truth[:, None])  # (N, 1)
    rank = (scores >= true_scores).sum(dim=1) - 1  # 0 = the true class alone is first
    return {k: float((rank < k).float().mean()) for k in ks}
