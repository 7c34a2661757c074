"""Artistic style: the loss network seen through forward hooks, the content and style (gram) losses,
and the fast style network (Gatys et al. 2016; Johnson et al. 2016; lessons 8, 9 and 13).

The loss network is a pretrained VGG (models/backbones: VGG16-bn from a local torchvision file,
else the bundled VGG19). Forward hooks on the last layer before each max-pool (the lesson's
``block_ends``: 5, 12, 22, 32, 42 of VGG16-bn; relu1_2, relu2_2, relu3_4, relu4_4, relu5_4 =
3, 8, 17, 26, 35 of VGG19) keep each block's activations as one forward pass computes them.

Two scalings of the terms (``scaling``):

- ``relative`` (the default): each term is a relative squared error, MSE(a, b) / mean(b^2), of the
  content block's activations and of each block's gram matrix G = F F^T / (C H W). It is 0 for
  equal features and about 1 for unrelated photos (0.6-2 per block, measured over pairs of the
  sample photos at 256 and 384 px) whatever the network, the block or the image size, so one set of
  weights (content 1, style 1 per block...) means the same on VGG16-bn and on the bundled VGG19.
- ``lesson``: lesson 13's formulas: style = sum_l w_l MSE(G_l * 1e6), content = 1e6 MSE at the
  content block. Its 1e6 balances VGG16-bn's batch-normalised activations; the bundled Caffe
  VGG19's are divided to a mean of about 1 per block first (87, 94, 420, 39 and 1.2 on the sample
  photos at 288 px; Gatys et al. normalise their VGG19 so, per filter), which keeps the terms in
  the same range, not the same balance: its weights need retuning per network and size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from models.backbones import LOSS_NETWORKS, best_available, build_loss_network
from models.blocks import ResBlock, conv_layer
from models.losses import gram_matrix
from models.superres import IMAGENET_MEAN, IMAGENET_STD

# per block: mean activation on natural photos (see the module docstring)
BLOCK_SCALES = {"vgg16_bn": (1.0, 1.0, 1.0, 1.0, 1.0), "vgg19_caffe": (90.0, 95.0, 420.0, 40.0, 1.2)}
BLOCK_NAMES = {"vgg16_bn": ("block1", "block2", "block3", "block4", "block5"),
               "vgg19_caffe": ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4")}


def block_ends(features: nn.Sequential) -> list[int]:
    """Index of the last layer before each max-pool, and the last layer (the lesson's block_ends)."""
    ends = [i - 1 for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    last = len(features) - 1
    return ends + ([last] if not isinstance(features[last], nn.MaxPool2d) and last not in ends else [])


class BlockFeatures(nn.Module):
    """A pretrained VGG whose five block ends are read by forward hooks: ``self(images)`` ->
    the activations of ``blocks`` (indices 0-4), each divided by its block's scale.

    Images are in [0, 1]; the network's own input convention (BGR 0-255 for Caffe) is applied here.
    Only the layers up to the deepest block asked for run. Weights are frozen.
    """

    def __init__(self, network: str = "auto", *, pretrained: bool = True):
        super().__init__()
        if network == "auto":
            network = best_available(LOSS_NETWORKS) if pretrained else "vgg19_caffe"
        if network not in BLOCK_SCALES:
            raise ValueError(f"unknown style network {network!r}; choose auto or one of {sorted(BLOCK_SCALES)}")
        net = build_loss_network(network, pretrained=pretrained)
        self.network, self.source = network, net.source
        self.features, self.to_input = net.features, net.renormalize
        self.ends = block_ends(self.features)
        if len(self.ends) != 5:
            raise ValueError(f"{network}: expected 5 blocks, found block ends at {self.ends}")
        self.scales = BLOCK_SCALES[network]
        self.register_buffer("mean", IMAGENET_MEAN.clone())
        self.register_buffer("std", IMAGENET_STD.clone())
        self._saved: dict[int, torch.Tensor] = {}
        self._hooks = [self.features[i].register_forward_hook(self._save(i)) for i in self.ends]

    def _save(self, index: int):
        def hook(module, inputs, output):
            self._saved[index] = output
        return hook

    def close(self) -> None:
        """Remove the hooks (the lesson's ``SaveFeatures.close``)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # frozen: BN statistics never move
        return self

    def forward(self, images: torch.Tensor, blocks: Sequence[int] = (0, 1, 2, 3, 4)) -> list[torch.Tensor]:
        if not self._hooks:
            raise RuntimeError("the hooks were removed (close()); build a new BlockFeatures")
        bad = [b for b in blocks if not 0 <= b < 5]
        if bad:
            raise ValueError(f"block {bad[0]} does not exist; blocks are 0-4 (the five VGG blocks)")
        self._saved.clear()
        x = self.to_input((images - self.mean) / self.std)
        self.features[: self.ends[max(blocks)] + 1](x)
        out = [self._saved[self.ends[b]] / self.scales[b] for b in blocks]
        self._saved.clear()  # the graph is held by ``out``, not by this module
        return out


DEFAULT_STYLE_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0)


SCALINGS = ("relative", "lesson")
LESSON_SCALE = 1e6


def relative_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE(a, b) / mean(b^2): 0 when equal, about 1 for unrelated features."""
    return F.mse_loss(a, b) / b.pow(2).mean().clamp_min(1e-12)


class StyleLoss(nn.Module):
    """Content + style loss against one style image (its grams computed once) and, per call, the
    content images: ``self(images, content_images)`` -> ``{"loss", "content", "style_0".."style_4"}``.

    ``content_block``: the block whose activations carry the content (the lesson's block_ends[3]).
    A zero ``content_weight`` or zero style weights drop those terms (style only, or content only,
    the lesson's two reconstructions). ``tv_weight``: total variation, against high-frequency noise.
    """

    def __init__(self, features: BlockFeatures, style: torch.Tensor, *, content_block: int = 3,
                 content_weight: float = 1.0, style_weights: Sequence[float] = DEFAULT_STYLE_WEIGHTS,
                 scaling: str = "relative", tv_weight: float = 0.0):
        super().__init__()
        if len(style_weights) != 5:
            raise ValueError(f"style_weights needs one weight per VGG block (5), got {len(style_weights)}")
        if not 0 <= content_block < 5:
            raise ValueError(f"content_block must be 0-4, got {content_block}")
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {scaling!r}; choose one of {list(SCALINGS)}")
        self.features, self.scaling = features, scaling
        self.content_block, self.content_weight, self.tv_weight = content_block, content_weight, tv_weight
        self.style_weights = tuple(float(w) for w in style_weights)
        self.style_blocks = [i for i, w in enumerate(self.style_weights) if w]
        with torch.no_grad():
            grams = [self._gram(f) for f in features(style[None] if style.dim() == 3 else style, self.style_blocks)] \
                if self.style_blocks else []
        for i, g in zip(self.style_blocks, grams):
            self.register_buffer(f"gram_{i}", g)

    def _gram(self, f: torch.Tensor) -> torch.Tensor:
        return gram_matrix(f) * (LESSON_SCALE if self.scaling == "lesson" else 1.0)

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return relative_mse(a, b) if self.scaling == "relative" else F.mse_loss(a, b)

    def blocks(self) -> list[int]:
        return sorted(set(self.style_blocks) | ({self.content_block} if self.content_weight else set()))

    def content_targets(self, content: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.features(content, [self.content_block])[0]

    def forward(self, images: torch.Tensor, content: torch.Tensor | None = None, *,
                content_target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``content``: the content images (B, 3, H, W), or ``content_target``: their block
        activations computed once (an optimisation of one image)."""
        blocks = self.blocks()
        feats = {b: f.float() for b, f in zip(blocks, self.features(images, blocks))}  # grams in fp32 under autocast
        terms: dict[str, torch.Tensor] = {}
        if self.content_weight:
            if content_target is None:
                if content is None:
                    raise ValueError("a content term needs the content images or their activations")
                content_target = self.content_targets(content)
            distance = self._distance(feats[self.content_block], content_target)
            terms["content"] = self.content_weight * distance * (LESSON_SCALE if self.scaling == "lesson" else 1.0)
        for i in self.style_blocks:
            g = self._gram(feats[i])
            terms[f"style_{i}"] = self.style_weights[i] * self._distance(g, getattr(self, f"gram_{i}").expand_as(g))
        if self.tv_weight:
            terms["tv"] = self.tv_weight * total_variation(images)
        terms["loss"] = sum(terms.values())
        return terms


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (horizontal + vertical)."""
    return ((images[..., 1:, :] - images[..., :-1, :]).abs().mean()
            + (images[..., :, 1:] - images[..., :, :-1]).abs().mean())


# --- the fast style network ------------------------------------------------------------------


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True)


class StyleNet(nn.Module):
    """Johnson et al.'s image transformation network, images in [0, 1] -> images in [0, 1]:
    9x9 conv 32, two stride-2 3x3 convs (64, 128), ``n_res`` residual blocks, two x2 steps (nearest
    upsampling then a 3x3 conv, not transposed convs: no checkerboard, Odena et al. 2016), a 9x9
    conv to RGB. Reflection padding everywhere (the paper pads the input by 40 px and uses valid
    convolutions, for the same reason: no black borders inside the network) and instance norm
    (Ulyanov et al. 2016, which the paper's authors adopted since). Fully convolutional: any size
    whose sides are multiples of 4 (others are padded by reflection and cropped back)."""

    def __init__(self, n_res: int = 5, nf: int = 32):
        super().__init__()
        conv = dict(norm_layer=_norm, padding_mode="reflect")
        self.down = nn.Sequential(conv_layer(3, nf, 9, **conv), conv_layer(nf, nf * 2, 3, 2, **conv),
                                  conv_layer(nf * 2, nf * 4, 3, 2, **conv))
        self.res = nn.Sequential(*[ResBlock(nf * 4, **conv) for _ in range(n_res)])
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv_layer(nf * 4, nf * 2, **conv),
                                nn.Upsample(scale_factor=2, mode="nearest"), conv_layer(nf * 2, nf, **conv))
        self.out = nn.Conv2d(nf, 3, 9, padding=4, padding_mode="reflect")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        ph, pw = -h % 4, -w % 4
        x = F.pad(images, (0, pw, 0, ph), mode="reflect") if ph or pw else images
        x = (x - 0.5) / 0.25  # centre the input
        y = torch.sigmoid(self.out(self.up(self.res(self.down(x)))))
        return y[..., :h, :w]
