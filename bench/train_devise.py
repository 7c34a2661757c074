"""DeViSE fine-tuning throughput: ResNet-50 at 224 px, bf16 autocast, channels_last, batch 256,
end to end from an HDF5 image store through the loader, vs the same steps on a batch already on
the GPU (baseline, same run). Target on one H100: >= 2,500 img/s end to end with the GPU >= 90%
busy (end-to-end / on-device >= 0.90).

usage: python bench/train_devise.py [--images 8192] [--size 224] [--batch 256] [--steps 60]
                                    [--warmup 10] [--workers 8] [--backbone resnet50]
Small CPU check: --images 64 --size 64 --batch 8 --steps 4 --warmup 1 --workers 1 --backbone resnet18
Ends with: RESULT images_per_s=... on_device_images_per_s=... busy=... loader_wait=... peak_gib=...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainbench import device_info, loader_vs_resident, print_results, synthetic_store, timed_training  # noqa: E402

from models.data import make_loader, to_float_nchw  # noqa: E402
from models.devise import Devise, DeviseConfig  # noqa: E402
from models.losses import LabelVectorLoss  # noqa: E402
from models.train import ModelStep  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--dims", type=int, default=300)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_info(device)}")
    vectors = torch.nn.functional.normalize(torch.randn(1000, args.dims), dim=1)

    def prepare(images, labels):
        x = to_float_nchw(images, device)
        return torch.flip(x, dims=[3]), labels.to(device, non_blocking=True)

    def run(batches):
        torch.manual_seed(0)
        model = Devise(DeviseConfig(backbone=args.backbone, dims=args.dims, pretrained=False))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return timed_training(ModelStep(model, optimizer, LabelVectorLoss(vectors).to(device)), batches, steps=args.steps,
                              warmup=args.warmup, batch_size=args.batch, device=device)

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        store = synthetic_store(Path(tmp) / "store.h5", args.images, args.size)
        loader = make_loader(store, args.batch, num_workers=args.workers, drop_last=True)
        result = loader_vs_resident(run, loader, prepare, device)
    print(f"{args.backbone} {args.size}px batch {args.batch}, {args.workers} loader workers:")
    print(f"  end to end from HDF5: {result['images_per_s']:,.0f} img/s (waiting for the loader "
          f"{result['loader_wait']:.1%} of the time; peak memory {result['peak_gib']:.1f} GiB)")
    print(f"  batch already on the device: {result['on_device_images_per_s']:,.0f} img/s")
    print_results([result])
    return result


if __name__ == "__main__":
    main()
