"""Super-resolution generators: a U-Net on a ResNet-34 encoder (lesson 7, 2019) and the
Johnson-style residual network (lesson 9, 2017; Johnson et al. 2016).

Both take a low-resolution batch in [0, 1] and return it ``scale`` times larger. The U-Net works
at the output size: its input is the bicubic upsampling of the low-resolution image, which it
learns to correct (any scale factor); the Johnson network upsamples inside (x2 steps).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from models.blocks import PixelShuffleUp, ResBlock, SelfAttention, SigmoidRange, conv_layer
from models.weights import load_pretrained

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class UnetBlock(nn.Module):
    """Upsample the path from below, BN the skip from the encoder, concat, two convs."""

    def __init__(self, up_c: int, skip_c: int, out_c: int, *, self_attention: bool = False, blur: bool = True):
        super().__init__()
        self.up = PixelShuffleUp(up_c, up_c // 2, blur=blur, weight_normed=True)
        self.bn = nn.BatchNorm2d(skip_c)
        self.conv1 = conv_layer(up_c // 2 + skip_c, out_c, norm_layer=None, weight_normed=True)
        self.conv2 = conv_layer(out_c, out_c, norm_layer=None, weight_normed=True)
        self.attn = SelfAttention(out_c) if self_attention else nn.Identity()

    def forward(self, x, skip):
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:  # odd input sizes
            x = F.interpolate(x, skip.shape[-2:], mode="nearest")
        x = torch.cat([x, self.bn(skip)], dim=1)
        return self.attn(self.conv2(self.conv1(F.relu(x))))


class ResNetUnet(nn.Module):
    """U-Net on a torchvision ResNet-34 encoder (hooks at each size change), same size in and out.

    ``pretrained``: load ImageNet weights for the encoder from local disk (models/weights.py).
    """

    def __init__(self, *, pretrained: bool = True, self_attention: bool = True, blur: bool = True,
                 y_range: tuple[float, float] = (-3.0, 3.0)):
        super().__init__()
        resnet = torchvision.models.resnet34(weights=None)
        self.pretrained = pretrained and load_pretrained(resnet, torchvision.models.ResNet34_Weights.IMAGENET1K_V1)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu)  # /2, 64
        self.encoder = nn.ModuleList([nn.Sequential(resnet.maxpool, resnet.layer1),  # /4, 64
                                      resnet.layer2, resnet.layer3, resnet.layer4])  # /8 128, /16 256, /32 512
        self.middle = nn.Sequential(nn.BatchNorm2d(512), nn.ReLU(), conv_layer(512, 1024), conv_layer(1024, 512))
        self.decoder = nn.ModuleList([
            UnetBlock(512, 256, 384, blur=blur),
            UnetBlock(384, 128, 256, blur=blur, self_attention=self_attention),
            UnetBlock(256, 64, 96, blur=blur),
            UnetBlock(96, 64, 96, blur=blur),
        ])
        self.up_final = PixelShuffleUp(96, 96, blur=blur, weight_normed=True)  # /2 -> /1
        self.res = ResBlock(96 + 3, norm_layer=None, weight_normed=True)
        self.head = nn.Sequential(nn.Conv2d(96 + 3, 3, 1), SigmoidRange(*y_range))

    @property
    def encoder_modules(self) -> nn.Module:
        """The pretrained part (to freeze, or to train at a lower learning rate)."""
        return nn.ModuleList([self.stem, self.encoder])

    def forward(self, x):
        # x: (B, 3, H, W) normalised with ImageNet statistics
        skips = [self.stem(x)]
        for stage in self.encoder:
            skips.append(stage(skips[-1]))
        y = self.middle(skips.pop())
        for block in self.decoder:
            y = block(y, skips.pop())
        y = self.up_final(y)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, x.shape[-2:], mode="nearest")
        return self.head(self.res(torch.cat([y, x], dim=1)))


class UnetUpscaler(nn.Module):
    """Low-res [0, 1] -> bicubic x``scale`` -> U-Net -> high-res [0, 1] (predicted in normalised space)."""

    def __init__(self, scale: float, **unet_kwargs):
        super().__init__()
        self.scale = scale
        self.unet = ResNetUnet(**unet_kwargs)

    def forward(self, low):
        up = F.interpolate(low, scale_factor=self.scale, mode="bicubic", align_corners=False)
        mean, std = IMAGENET_MEAN.to(low.device, low.dtype), IMAGENET_STD.to(low.device, low.dtype)
        out = self.unet((up - mean) / std)
        return (out * std + mean).clamp(0, 1)


class JohnsonNet(nn.Module):
    """9x9 conv 64 -> residual blocks -> x2 (upsample + conv) steps -> 9x9 conv -> sigmoid (72 -> 288)."""

    def __init__(self, scale: int = 4, n_res: int = 5, nf: int = 64):
        super().__init__()
        steps = scale.bit_length() - 1
        if 2**steps != scale:
            raise ValueError(f"the Johnson network upsamples by powers of 2; got scale {scale}")
        self.scale = scale
        self.stem = conv_layer(3, nf, 9)
        self.res = nn.Sequential(*[ResBlock(nf) for _ in range(n_res)])
        self.up = nn.Sequential(*[nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv_layer(nf, nf))
                                  for _ in range(steps)])
        self.out = nn.Conv2d(nf, 3, 9, padding=4)

    def forward(self, low):
        return torch.sigmoid(self.out(self.up(self.res(self.stem(low)))))


ARCHITECTURES = {"unet": UnetUpscaler, "johnson": JohnsonNet}


def make_generator(arch: str, scale: int, *, pretrained: bool = True) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown super-resolution architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if arch == "unet":
        return UnetUpscaler(scale, pretrained=pretrained)
    return JohnsonNet(scale)
