"""GAN modules and losses (lesson 7, 2019; fastai v1 ``vision/gan.py``): the critic that judges
restored images, the loss that expands its target to the critic's grid, and the DCGAN generator
and critic of the WGAN (Arjovsky et al. 2017; Radford et al. 2016).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from models.blocks import SelfAttention

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def sn_conv(ni: int, nf: int, ks: int = 3, stride: int = 1, *, padding: int | None = None, bias: bool = True,
            act: bool = True) -> nn.Sequential:
    """Spectral-normed conv (Miyato et al. 2018), then LeakyReLU(0.2): fastai's critic ``_conv``."""
    conv = spectral_norm(nn.Conv2d(ni, nf, ks, stride=stride, padding=(ks - 1) // 2 if padding is None else padding,
                                   bias=bias))
    return nn.Sequential(conv, nn.LeakyReLU(0.2, inplace=True)) if act else nn.Sequential(conv)


class DenseResBlock(nn.Module):
    """x -> concat(x, conv(conv(x))): twice the channels out (fastai's ``res_block(dense=True)``)."""

    def __init__(self, nf: int):
        super().__init__()
        self.convs = nn.Sequential(sn_conv(nf, nf), sn_conv(nf, nf))

    def forward(self, x):
        return torch.cat([x, self.convs(x)], dim=1)


class Critic(nn.Module):
    """fastai's ``gan_critic``: images in [0, 1] -> a grid of logits (B, h*w), no global pooling.

    conv 4x4/2 -> dropout -> dense res block, then ``n_blocks`` x (dropout -> conv 4x4/2, self-attention
    after the first), then a 4x4 conv to one channel. Spectral norm on every conv, LeakyReLU(0.2).
    It runs in float32 whatever autocast says: spectral norm's power iteration and the loss on its
    logits are not safe in bf16.
    """

    def __init__(self, in_channels: int = 3, nf: int = 128, n_blocks: int = 3, p: float = 0.15):
        super().__init__()
        layers: list[nn.Module] = [sn_conv(in_channels, nf, 4, 2), nn.Dropout2d(p / 2), DenseResBlock(nf)]
        nf *= 2
        for i in range(n_blocks):
            layers += [nn.Dropout2d(p), sn_conv(nf, nf * 2, 4, 2)]
            if i == 0:
                layers.append(SelfAttention(nf * 2))
            nf *= 2
        layers.append(sn_conv(nf, 1, 4, padding=0, bias=False, act=False))
        self.layers = nn.Sequential(*layers)
        self.register_buffer("mean", IMAGENET_MEAN.clone())
        self.register_buffer("std", IMAGENET_STD.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):
            x = (images.float() - self.mean) / self.std
            return self.layers(x).flatten(1)  # (B, 1, h, w) -> (B, h*w)


def adaptive_bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """BCE-with-logits against a target of 1 (real) or 0 (fake) expanded to the critic's grid
    (fastai's ``AdaptiveLoss(nn.BCEWithLogitsLoss())``), in float32."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))


class CriticLoss(nn.Module):
    """Loss for pretraining the critic as a classifier: labels (B,) of 1 (real) or 0 (fake), expanded."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = logits.float()
        target = labels.float().view(-1, 1).expand_as(logits)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        accuracy = ((logits > 0).float() == target).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}


def critic_accuracy(logits: torch.Tensor, real: bool) -> float:
    """Share of grid cells the critic gets right (fastai's ``accuracy_thresh_expand`` at 0.5)."""
    return float(((logits > 0) == real).float().mean())


# --- WGAN (DCGAN architecture) ---------------------------------------------------------------


def dcgan_init_(module: nn.Module) -> nn.Module:
    """Radford et al. (2016): every conv weight from N(0, 0.02), BatchNorm scales from N(1, 0.02),
    biases 0 (torch's default fan-in init gives a WGAN critic weights that clipping at 0.01 crushes)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


class DCGANGenerator(nn.Module):
    """Noise (B, nz) -> images (B, 3, size, size) in [-1, 1]: transposed 4x4 convs with BN and ReLU,
    doubling the side from 4 to ``size`` (a power of 2), tanh out (Radford et al. 2016)."""

    def __init__(self, size: int = 64, nz: int = 100, nf: int = 64, channels: int = 3):
        super().__init__()
        steps = size.bit_length() - 3  # 4 -> size in x2 steps
        if size < 8 or 2 ** (steps + 2) != size:
            raise ValueError(f"DCGAN images are a power of 2 of at least 8 pixels; got {size}")
        width = nf * 2 ** (steps - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(True)]
        for _ in range(steps - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.nz, self.net = nz, dcgan_init_(nn.Sequential(*layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(len(z), self.nz, 1, 1))


class DCGANCritic(nn.Module):
    """Images (B, 3, size, size) in [-1, 1] -> one unbounded score each (no sigmoid: a Wasserstein
    critic): strided 4x4 convs with LeakyReLU(0.2) (BN after the first), down to 4x4, then a 4x4 conv."""

    def __init__(self, size: int = 64, nf: int = 64, channels: int = 3):
        super().__init__()
        steps = size.bit_length() - 3
        if size < 8 or 2 ** (steps + 2) != size:
            raise ValueError(f"DCGAN images are a power of 2 of at least 8 pixels; got {size}")
        layers: list[nn.Module] = [nn.Conv2d(channels, nf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        width = nf
        for _ in range(steps - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2),
                       nn.LeakyReLU(0.2, True)]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 0, bias=False))
        self.net = dcgan_init_(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(len(x))
