"""Feature (perceptual) loss for image restoration (lesson 7, 2019; Johnson et al. 2016; Gatys et al.).

loss = L1(pixels) + sum_i w_i * L1(VGG16-bn features before max-pools #3, #4, #5)
                  + sum_i w_i^2 * 5e3 * L1(gram matrices of those features),
with the features at ``vgg16_bn().features`` indices 22, 32, 42, w = [5, 15, 2], and
gram = F F^T / (c h w). Every term is returned, so each can be logged.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from models.superres import IMAGENET_MEAN, IMAGENET_STD
from models.weights import load_pretrained

LAYER_IDS = (22, 32, 42)
LAYER_WEIGHTS = (5.0, 15.0, 2.0)
GRAM_SCALE = 5e3


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C), divided by C*H*W."""
    b, c, h, w = x.shape
    f = x.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


class FeatureLoss(nn.Module):
    """The perceptual loss on images in [0, 1]; ``forward`` returns ``{"loss", "pixel", "feat_i", "gram_i"}``."""

    def __init__(self, layer_ids=LAYER_IDS, layer_weights=LAYER_WEIGHTS, *, pretrained: bool = True):
        super().__init__()
        if len(layer_ids) != len(layer_weights):
            raise ValueError(f"{len(layer_ids)} layers but {len(layer_weights)} weights")
        vgg = torchvision.models.vgg16_bn(weights=None)
        self.pretrained = pretrained and load_pretrained(vgg, torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1)
        self.features = vgg.features[: max(layer_ids) + 1].eval()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.layer_ids, self.weights = tuple(layer_ids), tuple(layer_weights)
        self.register_buffer("mean", IMAGENET_MEAN.clone())
        self.register_buffer("std", IMAGENET_STD.clone())

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # the loss network's BN statistics stay fixed
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, x = [], (x - self.mean) / self.std
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.layer_ids:
                out.append(x)
        return out

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"pixel": F.l1_loss(prediction, target)}
        with torch.no_grad():
            target_feats = self._features(target)
        for i, (p, t, w) in enumerate(zip(self._features(prediction), target_feats, self.weights)):
            terms[f"feat_{i}"] = w * F.l1_loss(p, t)
            terms[f"gram_{i}"] = w**2 * GRAM_SCALE * F.l1_loss(gram_matrix(p), gram_matrix(t))
        terms["loss"] = sum(terms.values())
        return terms


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
