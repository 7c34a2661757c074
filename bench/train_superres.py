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
from trainbench import device_info, from_loader, resident, synthetic_store, timed_training  # noqa: E402

from models.data import (
    make_loader,  # noqa: E402
    to_unit,  # noqa: E402
)
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
            first = next(iter(loader))

            def run(batches):
                torch.manual_seed(0)
                model, optimizer, loss_fn = make_trainer(SuperResConfig(arch=args.arch, pretrained=False), args.scale)
                loss_fn = loss_fn.to(device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
                return timed_training(model, optimizer, loss_fn, batches, steps=args.steps, warmup=args.warmup,
                                      batch_size=batch, device=device)

            on_device = run(resident(tuple(t.to(device) for t in first), prepare))
            e2e = run(from_loader(loader, prepare))
            result = {"size": size, "images_per_s": e2e.images_per_s, "on_device_images_per_s": on_device.images_per_s,
                      "busy": e2e.images_per_s / on_device.images_per_s, "loader_wait": e2e.loader_wait_share,
                      "peak_gib": e2e.peak_memory_gib}
            print(f"{args.arch} {size // args.scale} -> {size} px, batch {batch}: {e2e.images_per_s:,.1f} img/s end to "
                  f"end, {on_device.images_per_s:,.1f} on-device; loader wait {e2e.loader_wait_share:.1%}; "
                  f"peak {e2e.peak_memory_gib:.2f} GiB")
            results.append(result)
    for r in results:
        print("RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return results


if __name__ == "__main__":
    main()
