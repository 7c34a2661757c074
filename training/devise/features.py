"""DeViSE fast path, step 1: the frozen body's concat-pooled activations of every image, once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from models.blocks import ConcatPool
from models.data import store_batches
from models.devise import make_body, resolve_backbone
from models.train import autocast, default_device, save_checkpoint, seed_everything
from storage.atomic import atomic_path
from storage.catalog import image_stores
from storage.hdf5 import open_store
from storage.report import Reporter
from storage.stage import StageSpec, runtime, upstream

log = logging.getLogger(__name__)

FEATURE_CHUNK_ROWS = 256
BODY_FILE = "body.pt"
CLASSIFIER_FILE = "classifier.pt"  # the backbone's ImageNet-1k linear classifier on the average-pooled features


@dataclass(frozen=True)
class FeaturesConfig:
    backbone: str = "auto"  # auto: the best with pretrained weights here (a local ResNet-50, else EfficientNet-Lite)
    pretrained: bool = True  # False: random weights, asked for explicitly (--no-pretrained)
    flips: bool = True  # also the features of each image flipped left-right (training picks one per step)
    batch_size: int = 64
    seed: int = 0  # a from-scratch body's initial weights

    def __post_init__(self) -> None:
        # "auto" is resolved here, so the stage key names the backbone actually used
        random_auto = self.backbone == "auto" and not self.pretrained  # random weights: the bundled architecture
        object.__setattr__(self, "backbone", "efficientnet_lite0" if random_auto else resolve_backbone(self.backbone))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def compute_features(body: torch.nn.Module, channels: int, store: Path, out: Path, *, flips: bool,
                     batch_size: int, device: torch.device | str) -> int:
    """Concat-pooled activations of every image of ``store``: ``features (N, views, 2C) float16``.

    ``channels``: C, the body's output channels. views = 2 with ``flips`` (original, mirrored),
    else 1. Labels and row order are the store's.
    """
    pool = ConcatPool()
    body.eval().to(device)
    with open_store(store) as src, atomic_path(out) as tmp, h5py.File(tmp, "w") as dst:
        images = src["images"]
        n = len(images)
        views = 2 if flips else 1
        feats = dst.create_dataset("features", shape=(n, views, 2 * channels), dtype=np.float16,
                                   chunks=(max(min(FEATURE_CHUNK_ROWS, n), 1), views, 2 * channels))
        with torch.no_grad(), autocast(device):
            for a, x in store_batches(images, batch_size, device, what=f"features {store.name}"):
                out_views = [pool(body(x))]
                if flips:
                    out_views.append(pool(body(torch.flip(x, dims=[3]))))
                feats[a:a + len(x)] = torch.stack(out_views, dim=1).float().cpu().numpy().astype(np.float16)
        dst.create_dataset("labels", data=src["labels"][:])
        dst.attrs.update({"source_store": str(store), "views": views, "features": 2 * channels})
    return n


@dataclass(frozen=True)
class FeaturesStage(StageSpec):
    """Pooled activations of every split of a resize stage, plus the (frozen) body's weights."""

    name = "devise-features"
    version = 2  # 2: pretrained weights required (recorded), the ImageNet classifier kept for ConSE
    retries = 1
    resize: str = upstream()
    config: FeaturesConfig = field(default_factory=FeaturesConfig)  # resolves "auto": not at import
    device: str | None = runtime()

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        config, start = self.config, time.perf_counter()
        device = default_device(self.device)
        seed_everything(config.seed)
        body = make_body(config.backbone, pretrained=config.pretrained)
        # the body is saved whatever its origin: a from-scratch body's random weights are part of the model
        save_checkpoint(out / BODY_FILE, body=body.module.state_dict())
        classifier = None
        if body.classifier is not None and body.source is not None:  # ImageNet-1k logits for ConSE
            save_checkpoint(out / CLASSIFIER_FILE, weight=body.classifier.weight.detach(),
                            bias=body.classifier.bias.detach())
            classifier = CLASSIFIER_FILE
        stores = image_stores(self.resize)
        counts = {split: compute_features(body.module, body.channels, store, out / f"{split}.h5", flips=config.flips,
                                          batch_size=config.batch_size, device=device)
                  for split, store in stores.items()}
        with open_store(next(iter(stores.values()))) as f:
            size = int(f["images"].shape[1])
        return {"backbone": config.backbone, "weights": body.source.record() if body.source else None,
                "pretrained_loaded": body.source is not None, "features": 2 * body.channels,
                "classifier": classifier, "views": 2 if config.flips else 1, "counts": counts, "image_size": size,
                "resize_dir": str(self.resize), "device": device, "elapsed_s": round(time.perf_counter() - start, 2)}
