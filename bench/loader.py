"""The HDF5 loader vs torchvision ImageFolder (+ JPEG decode, resize, center crop) on the same images.

Both produce uint8 batches of S x S images with 2 loader workers, shuffled, for whole epochs,
timed after one warm-up epoch each (worker start-up is paid once per run on real data; our
workers persist across epochs, ImageFolder's are forked anew each epoch, which stays in its time). Images: the bundled sample (default
1,400: 200 per class) resized into an HDF5 store by the stage itself.

usage: python bench/loader.py [--images 1400] [--size 224] [--batch 64] [--epochs 3] [--workers 2]
Ends with: RESULT loader_vs_imagefolder=...
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from models.data import make_loader
from prep.listing import ListingStage, fingerprint_dataset
from prep.resize import ResizeConfig, ResizeStage
from prep.sample import build_sample
from storage.stage import run_stage
from storage.tiers import Tiers


def _epochs(loader, epochs: int, set_epoch=None) -> float:
    """Images per second over ``epochs`` full passes after one warm-up epoch (worker start-up)."""
    n = 0
    for epoch in range(epochs + 1):
        if epoch == 1:
            t = time.perf_counter()
        if set_epoch:
            set_epoch(epoch)
        for x, _ in loader:
            n += len(x) if epoch else 0
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1400)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        root = tmp / "ds"
        build_sample(root, seed=0, train_per_class=-(-args.images // 7), val_per_class=0, plant_bad_inputs=False)
        tiers = Tiers(fast=tmp / "fast", bulk=tmp / "bulk")
        listing = run_stage(tiers, ListingStage(root=str(root), fingerprint=fingerprint_dataset(root)))
        stage = run_stage(tiers, ResizeStage(listing=str(listing.path), config=ResizeConfig(size=args.size)))
        store = stage.path / "train.h5"
        for p in root.rglob("*.JPEG"):  # both sides read from the page cache: we time CPU work
            p.read_bytes()

        ours = make_loader(store, args.batch, num_workers=args.workers)
        ours_ips = _epochs(ours, args.epochs, ours.dataset.set_epoch)

        folder = datasets.ImageFolder(str(root / "train"), transform=transforms.Compose([
            transforms.Resize(args.size), transforms.CenterCrop(args.size), transforms.PILToTensor()]))
        theirs = DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=args.workers)
        theirs_ips = _epochs(theirs, args.epochs)
    print(f"{len(folder)} images, S={args.size}, batch {args.batch}, {args.workers} workers, {args.epochs} epochs")
    print(f"HDF5 loader (ChunkShuffleStream)      {ours_ips:>9.0f} img/s")
    print(f"ImageFolder + decode/resize/crop      {theirs_ips:>9.0f} img/s")
    print(f"RESULT loader_vs_imagefolder={ours_ips / theirs_ips:.2f} loader_img_per_s={ours_ips:.0f}")


if __name__ == "__main__":
    main()
