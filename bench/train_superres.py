"""Super-resolution training throughput: the U-Net (ResNet-34 encoder) + feature loss (VGG16-bn)
at 128 and 256 px output (inputs a quarter the side), bf16 autocast, channels_last, end to end from
aligned HDF5 stores through the loader, vs the same steps on a batch already on the device
(baseline, same run). Batch sizes follow the reference schedule: 32 at 128 px, 12 at 256 px.

usage: python bench/train_superres.py [--sizes 128 256] [--batches 32 12] [--images 2048] [--steps 40]
                                      [--warmup 8] [--workers 8] [--arch unet]
Small CPU check: --sizes 32 --batches 4 --images 32 --steps 3 --warmup 1 --workers 1
Ends with one line per size: RESULT size=... images_per_s=... on_device_images_per_s=... busy=...
loader_wait=... peak_gib=...
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

from models.data import (
    make_loader,  # noqa: E402
    to_unit,  # noqa: E402
)
from models.train import ModelStep  # noqa: E402
from training.superres import SuperResConfig, make_trainer  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 12])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--arch", default="unet", choices=["unet", "johnson"])
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--encoder", default="resnet34", help="the U-Net's (random weights: throughput only)")
    args = ap.parse_args(argv)
    if len(args.sizes) != len(args.batches):
        ap.error(f"one batch size per size: got sizes {args.sizes} and batches {args.batches}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_info(device)}")

    def prepare(low, high):
        return to_unit(low, device), to_unit(high, device)

    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for size, batch in zip(args.sizes, args.batches):
            low_store = synthetic_store(Path(tmp) / f"low-{size}.h5", args.images, size // args.scale)
            high_store = synthetic_store(Path(tmp) / f"high-{size}.h5", args.images, size)
            loader = make_loader(low_store, batch, target_store=high_store, num_workers=args.workers, drop_last=True)

            def run(batches):
                torch.manual_seed(0)
                model, optimizer, loss_fn = make_trainer(SuperResConfig(arch=args.arch, pretrained=False, encoder=args.encoder),
                                                         args.scale)
                loss_fn = loss_fn.to(device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
                return timed_training(ModelStep(model, optimizer, loss_fn), batches, steps=args.steps,
                                      warmup=args.warmup, batch_size=batch, device=device)

            result = {"size": size} | loader_vs_resident(run, loader, prepare, device)
            print(f"{args.arch} {size // args.scale} -> {size} px, batch {batch}: {result['images_per_s']:,.1f} img/s "
                  f"end to end, {result['on_device_images_per_s']:,.1f} on-device; loader wait "
                  f"{result['loader_wait']:.1%}; peak {result['peak_gib']:.2f} GiB")
            results.append(result)
    print_results(results)
    return results


if __name__ == "__main__":
    main()
