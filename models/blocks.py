"""The small blocks the U-Net, the Johnson network, the critic and the DeViSE head share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm, weight_norm


def icnr_(weight: torch.Tensor, scale: int = 2, init=nn.init.kaiming_normal_) -> torch.Tensor:
    """ICNR (Aitken et al. 2017): init a conv that feeds PixelShuffle(scale) so that, at the start,
    the shuffle acts as nearest-neighbour upsampling: no checkerboard artifacts.

    Each of the ``scale**2`` sub-kernels that PixelShuffle interleaves gets the same weights.
    """
    out_c, in_c, kh, kw = weight.shape
    sub = init(torch.empty(out_c // scale**2, in_c, kh, kw))
    # (o/s^2, i, k, k) -> (o, i, k, k), each sub-kernel repeated s^2 times in PixelShuffle's order
    with torch.no_grad():
        weight.copy_(sub.repeat_interleave(scale**2, dim=0))
    return weight


def conv_layer(ni: int, nf: int, ks: int = 3, stride: int = 1, *, norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
               act: bool = True, weight_normed: bool = False, padding_mode: str = "zeros",
               init: Callable[[torch.Tensor], Any] | None = None) -> nn.Sequential:
    """conv -> norm -> ReLU, with the paper-default padding ``ks // 2`` (zeros, or ``reflect``...).
    ``init``: the conv weight's init (e.g. ``nn.init.kaiming_normal_``, fastai's; None: torch's default)."""
    conv = nn.Conv2d(ni, nf, ks, stride=stride, padding=ks // 2, bias=norm_layer is None, padding_mode=padding_mode)
    if init is not None:
        init(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    layers: list[nn.Module] = [weight_norm(conv) if weight_normed else conv]
    if norm_layer is not None:
        layers.append(norm_layer(nf))
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PixelShuffleUp(nn.Module):
    """Upsample x``scale``: 1x1 conv (ICNR) -> ReLU -> PixelShuffle -> blur.

    The blur (replication pad + 2x2 average, stride 1) removes what checkerboard the shuffle still
    makes (Sugawara et al. 2018, as in fastai's PixelShuffle_ICNR).
    """

    def __init__(self, ni: int, nf: int, scale: int = 2, blur: bool = True, weight_normed: bool = False):
        super().__init__()
        conv = nn.Conv2d(ni, nf * scale**2, 1)
        icnr_(conv.weight, scale)
        nn.init.zeros_(conv.bias)
        self.conv = weight_norm(conv) if weight_normed else conv
        self.shuffle = nn.PixelShuffle(scale)
        self.blur = nn.Sequential(nn.ReplicationPad2d((1, 0, 1, 0)), nn.AvgPool2d(2, stride=1)) if blur else nn.Identity()

    def forward(self, x):
        return self.blur(self.shuffle(F.relu(self.conv(x))))


def _sn_conv1d(ni: int, nf: int) -> nn.Module:
    """A 1x1 Conv1d, kaiming-normal init, spectral-normed (fastai's ``conv1d`` for self-attention)."""
    conv = nn.Conv1d(ni, nf, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight)
    return spectral_norm(conv)


class SelfAttention(nn.Module):
    """SAGAN self-attention over positions (Zhang et al. 2019, as fastai's: spectral-normed 1x1 convs);
    starts as the identity (gamma = 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = _sn_conv1d(channels, max(channels // 8, 1))
        self.key = _sn_conv1d(channels, max(channels // 8, 1))
        self.value = _sn_conv1d(channels, channels)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.shape
        flat = x.view(b, c, h * w)  # (B, C, H, W) -> (B, C, N)
        attn = torch.softmax(self.query(flat).transpose(1, 2) @ self.key(flat), dim=1)  # (B, N, N)
        out = self.value(flat) @ attn
        return x + self.gamma * out.view(b, c, h, w)


class ResBlock(nn.Module):
    """x + conv-norm-ReLU-conv-norm(x) (``final_act``: a ReLU after the second conv too, as fastai's
    ``res_block`` with weight norm)."""

    def __init__(self, nf: int, *, norm_layer: type[nn.Module] | None = nn.BatchNorm2d, weight_normed: bool = False,
                 padding_mode: str = "zeros", final_act: bool = False,
                 init: Callable[[torch.Tensor], Any] | None = None):
        super().__init__()
        conv = dict(norm_layer=norm_layer, weight_normed=weight_normed, padding_mode=padding_mode, init=init)
        self.convs = nn.Sequential(conv_layer(nf, nf, **conv), conv_layer(nf, nf, act=final_act, **conv))

    def forward(self, x):
        return x + self.convs(x)


class SigmoidRange(nn.Module):
    """Squash outputs into (low, high)."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x):
        return torch.sigmoid(x) * (self.high - self.low) + self.low


class ConcatPool(nn.Module):
    """Average and max pooling side by side: (B, C, H, W) -> (B, 2C) (fastai's AdaptiveConcatPool2d)."""

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class LinearBlock(nn.Sequential):
    """BatchNorm -> Dropout -> Linear (-> ReLU): one layer of a classifier/regression head."""

    def __init__(self, ni: int, nf: int, *, dropout: float = 0.0, act: bool = True):
        layers: list[nn.Module] = [nn.BatchNorm1d(ni), nn.Dropout(dropout), nn.Linear(ni, nf)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
