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
