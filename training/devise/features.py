"""DeViSE fast path, step 1: the frozen body's concat-pooled activations of every image, once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from models.blocks import ConcatPool
from models.data import store_batches
from models.devise import classification_backbones, make_body
from models.train import autocast, default_device, save_checkpoint, seed_everything
from storage.atomic import atomic_path
from storage.catalog import image_stores
from storage.hdf5 import open_store
from storage.report import Reporter
from storage.stage import StageSpec, runtime, upstream

log = logging.getLogger(__name__)

FEATURE_CHUNK_ROWS = 256
BODY_FILE = "body.pt"


@dataclass(frozen=True)
class FeaturesConfig:
    backbone: str = "resnet50"
    pretrained: bool = True
    flips: bool = True  # also the features of each image flipped left-right (training picks one per step)
    batch_size: int = 64
    seed: int = 0  # a from-scratch body's initial weights

    def __post_init__(self) -> None:
        if self.backbone not in classification_backbones():
            raise ValueError(f"unknown backbone {self.backbone!r}; choose a torchvision classification model, "
                             "e.g. resnet18, resnet50, convnext_tiny, efficientnet_b0")
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
    version = 1
    retries = 1
    resize: str = upstream()
    config: FeaturesConfig = FeaturesConfig()
    device: str | None = runtime()

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        config, start = self.config, time.perf_counter()
        device = default_device(self.device)
        seed_everything(config.seed)
        body, channels, loaded = make_body(config.backbone, pretrained=config.pretrained)
        # the body is saved whatever its origin: a from-scratch body's random weights are part of the model
        save_checkpoint(out / BODY_FILE, body=body.state_dict())
        stores = image_stores(self.resize)
        counts = {split: compute_features(body, channels, store, out / f"{split}.h5", flips=config.flips,
                                          batch_size=config.batch_size, device=device)
                  for split, store in stores.items()}
        with open_store(next(iter(stores.values()))) as f:
            size = int(f["images"].shape[1])
        if config.pretrained and not loaded:
            log.warning("DeViSE features come from a backbone trained FROM SCRATCH (no local weights): "
                        "expect low accuracy")
        return {"backbone": config.backbone, "pretrained_loaded": bool(loaded), "features": 2 * channels,
                "views": 2 if config.flips else 1, "counts": counts, "image_size": size,
                "resize_dir": str(self.resize), "device": device, "elapsed_s": round(time.perf_counter() - start, 2)}
