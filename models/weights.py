"""Pretrained torchvision weights from local disk only: never the network.

Real runs put the torchvision checkpoint files (e.g. ``resnet34-b627a593.pth``,
``vgg16_bn-6c64b313.pth``) in ``$IMAGESMITH_WEIGHTS_DIR`` or torch's hub cache
(``$TORCH_HOME/hub/checkpoints``). Without them a model trains from scratch, and says so loudly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)
WEIGHTS_ENV = "IMAGESMITH_WEIGHTS_DIR"


def weight_file(url: str) -> Path | None:
    """The local copy of a torchvision weights URL, if any."""
    name = url.rsplit("/", 1)[-1]
    dirs = [os.environ.get(WEIGHTS_ENV), Path(torch.hub.get_dir()) / "checkpoints"]
    for d in dirs:
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    return None


def load_pretrained(module: nn.Module, weights) -> bool:
    """Load ``weights`` (a torchvision ``WeightsEnum`` member) into ``module`` from local disk.

    Returns False, with a warning naming the file and where it was looked for, when it is absent.
    """
    path = weight_file(weights.url)
    if path is None:
        name = weights.url.rsplit("/", 1)[-1]
        log.warning("NO PRETRAINED WEIGHTS: %s not found in $%s or %s; %s trains FROM SCRATCH",
                    name, WEIGHTS_ENV, Path(torch.hub.get_dir()) / "checkpoints", type(module).__name__)
        return False
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    log.info("loaded pretrained weights from %s", path)
    return True


def load_any_pretrained(module: nn.Module, weights_enum) -> bool:
    """Load the first locally present member of a torchvision weights enum (its DEFAULT first).

    E.g. ResNet-50 has IMAGENET1K_V1 (``resnet50-0676ba61.pth``) and V2 (``resnet50-11ad3fa6.pth``):
    either file works. Warns loudly, naming the DEFAULT file, when none is present.
    """
    members = [weights_enum.DEFAULT, *(w for w in weights_enum if w is not weights_enum.DEFAULT)]
    for weights in members:
        if weight_file(weights.url) is not None:
            return load_pretrained(module, weights)
    return load_pretrained(module, weights_enum.DEFAULT)
