"""DeViSE (Frome et al. 2013; lesson 9, 2017): an image model that predicts the word vector of
its class, so images and words share one space: image -> nearest words, words -> nearest images,
and classes never trained on can still be named (zero-shot).

A torchvision backbone's convolutional body, concat pooling (avg + max: 2C features, 4096 for
ResNet-50), and a head ``BN -> Dropout -> Linear -> ReLU -> BN -> Dropout -> Linear`` to the word
vector size. Loss: 1 - cosine similarity (models/losses.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from models.blocks import ConcatPool, LinearBlock
from models.weights import load_any_pretrained


@dataclass(frozen=True)
class DeviseConfig:
    backbone: str = "resnet50"
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
    return sorted(torchvision.models.list_models(module=torchvision.models))


def make_body(name: str, *, pretrained: bool = True) -> tuple[nn.Module, int, bool]:
    """(convolutional body of torchvision's ``name``, its output channels, whether weights were loaded).

    ResNets (and ResNeXt, Wide ResNet, RegNet: anything with ``fc`` last) lose their pool and
    ``fc``; models with a ``features`` trunk (VGG, DenseNet, EfficientNet, MobileNet, ConvNeXt)
    keep just that.
    """
    if name not in classification_backbones():
        raise ValueError(f"unknown backbone {name!r}; choose a torchvision classification model, e.g. "
                         "resnet18, resnet50, convnext_tiny, efficientnet_b0")
    net = torchvision.models.get_model(name, weights=None)
    loaded = pretrained and load_any_pretrained(net, torchvision.models.get_model_weights(name))
    if isinstance(getattr(net, "fc", None), nn.Linear):
        body = nn.Sequential(*list(net.children())[:-2])
    elif isinstance(getattr(net, "features", None), nn.Module):
        body = net.features
    else:
        raise ValueError(f"backbone {name!r} has neither a final fc nor a features trunk; use a CNN such as "
                         "resnet50 or convnext_tiny")
    body.eval()
    with torch.no_grad():
        channels = body(torch.zeros(1, 3, 64, 64)).shape[1]
    return body.train(), channels, loaded


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
        self.body, self.features, self.pretrained = make_body(config.backbone, pretrained=config.pretrained)
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
