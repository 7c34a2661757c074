"""Feature (perceptual) loss for image restoration (lesson 7, 2019; Johnson et al. 2016; Gatys et al.).

loss = L1(pixels) + sum_i w_i * L1(VGG features before max-pools #3, #4, #5)
                  + sum_i w_i^2 * 5e3 * L1(gram matrices of those features),
with w = [5, 15, 2] and gram = F F^T / (c h w). The loss network is pretrained: VGG16-bn (the lesson's,
layers 22, 32, 42) from a local torchvision file, else the bundled VGG19 (the same places: relu3_4,
relu4_4, relu5_4), whose Caffe-scale activations are divided to O(1) per layer
(models/backbones.VGG19_CAFFE_SCALES) so that the lesson's weights keep their balance. A random
loss network is noise, not a perceptual loss: without weights the loss refuses to be built, unless
``pretrained=False`` is asked for (tests).

As fastai computes it, the pixel term is the L1 distance of the *normalised* images (the lesson's
data is normalised with ImageNet statistics, targets included): per channel |x - y| / std.
Every term is returned, so each can be logged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.backbones import LOSS_NETWORKS, best_available, build_loss_network
from models.superres import IMAGENET_MEAN, IMAGENET_STD

LAYER_WEIGHTS = (5.0, 15.0, 2.0)
GRAM_SCALE = 5e3


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C), divided by C*H*W; in float32 whatever autocast says (a bf16 sum
    over H*W products keeps ~3 significant digits: the gram terms would be mostly rounding)."""
    b, c, h, w = x.shape
    with torch.autocast(x.device.type, enabled=False):
        f = x.float().reshape(b, c, h * w)
        return f @ f.transpose(1, 2) / (c * h * w)


def resolve_loss_network(name: str, pretrained: bool) -> str:
    """``auto``: VGG16-bn from a local file, else the bundled VGG19; any other name is kept."""
    if name != "auto":
        return name
    return best_available(LOSS_NETWORKS) if pretrained else "vgg19_caffe"


class FeatureLoss(nn.Module):
    """The perceptual loss on images in [0, 1]; ``forward`` returns ``{"loss", "pixel", "feat_i", "gram_i"}``."""

    def __init__(self, network: str = "auto", layer_weights=LAYER_WEIGHTS, *, pretrained: bool = True):
        super().__init__()
        net = build_loss_network(resolve_loss_network(network, pretrained), pretrained=pretrained)
        if len(net.layer_ids) != len(layer_weights):
            raise ValueError(f"{len(net.layer_ids)} layers but {len(layer_weights)} weights")
        self.features, self.to_input = net.features, net.renormalize
        self.layer_ids, self.scales, self.weights = net.layer_ids, net.scales, tuple(layer_weights)
        self.source = net.source
        self.register_buffer("mean", IMAGENET_MEAN.clone())
        self.register_buffer("std", IMAGENET_STD.clone())

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # the loss network's BN statistics stay fixed
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: ImageNet-normalised images."""
        out, x = [], self.to_input(x)
        scales = dict(zip(self.layer_ids, self.scales))
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in scales:
                out.append(x / scales[i])
        return out

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        prediction, target = (prediction - self.mean) / self.std, (target - self.mean) / self.std
        terms = {"pixel": F.l1_loss(prediction, target)}
        with torch.no_grad():
            target_feats = self._features(target)
        for i, (p, t, w) in enumerate(zip(self._features(prediction), target_feats, self.weights)):
            terms[f"feat_{i}"] = w * F.l1_loss(p, t)
            terms[f"gram_{i}"] = w**2 * GRAM_SCALE * F.l1_loss(gram_matrix(p), gram_matrix(t))
        terms["loss"] = sum(terms.values())
        return terms


def normalized_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of images in [0, 1] after ImageNet normalisation (per channel (x - mean) / std), as fastai
    computes every pixel loss on ``normalize(imagenet_stats, do_y=True)`` data: ~19.6x the MSE of the
    [0, 1] images (the mean of 1/std^2), so the lesson's GAN weights (1, 50) mean here what they meant there."""
    mean, std = IMAGENET_MEAN.to(prediction), IMAGENET_STD.to(prediction)
    return F.mse_loss((prediction - mean) / std, (target - mean) / std)


def pixel_mse(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain pixel MSE (the GAN generator's pretraining loss)."""
    loss = F.mse_loss(prediction, target)
    return {"loss": loss, "pixel_mse": loss}


def cosine_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, averaged over the batch (DeViSE: the target is a unit word vector)."""
    return (1 - F.cosine_similarity(prediction.float(), target.float(), dim=1)).mean()


class LabelVectorLoss(nn.Module):
    """Cosine loss to the word vector of each row's class label: ``vectors`` (classes, d)."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.register_buffer("vectors", torch.as_tensor(vectors, dtype=torch.float32))

    def forward(self, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cosine_loss(prediction, self.vectors[labels])
