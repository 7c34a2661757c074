"""Style transfer speed: Gatys seconds per loss evaluation at ``--size`` (the lesson's 288 px) with
L-BFGS, against a plain forward + backward of the same VGG layers on the same image (baseline,
same run: what the optimisation cannot avoid); and the fast style network: training images/s end
to end from HDF5 vs a batch already on the device, and inference images/s at ``--size``.

usage: python bench/style.py [--size 288] [--iterations 20] [--train-size 256] [--batch 8] [--steps 30]
Small CPU check: --size 64 --iterations 3 --train-size 32 --batch 2 --steps 3 --warmup 1 --workers 1 --images 16
Ends with: RESULT gatys ... and RESULT fast_style ... lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainbench import device_info, loader_vs_resident, print_results, synthetic_store, timed_training  # noqa: E402

from models.data import make_loader, to_unit  # noqa: E402
from models.style import BlockFeatures, StyleLoss, StyleNet  # noqa: E402
from models.train import ModelStep  # noqa: E402
from training.style import GatysConfig, default_style, gatys, load_rgb  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=288)
    ap.add_argument("--iterations", type=int, default=20, help="Gatys loss evaluations timed")
    ap.add_argument("--train-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_info(device)}")
    # random weights: throughput only (the GPU machine has no weight packages)
    features = BlockFeatures(pretrained=False).to(device)
    try:
        style = load_rgb(default_style())
    except FileNotFoundError as e:  # the GPU machine has no darknet package: any image times the same
        print(f"style image: random pixels ({e})")
        style = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0))
    content = torch.rand(3, args.size, args.size)

    # baseline: forward + backward through the VGG layers the loss reads, nothing else
    x = content[None].to(device).requires_grad_(True)
    for i in range(args.iterations + 2):
        if i == 2:
            _sync(device)
            t0 = time.perf_counter()
        sum(f.mean() for f in features(x)).backward()
    _sync(device)
    vgg_s = (time.perf_counter() - t0) / args.iterations
    config = GatysConfig(size=args.size, steps=args.iterations, log_every=args.iterations)
    gatys(content, style, GatysConfig(size=args.size, steps=2), features=features, device=str(device))  # warm
    _sync(device)
    t0 = time.perf_counter()
    gatys(content, style, config, features=features, device=str(device))
    _sync(device)
    gatys_s = (time.perf_counter() - t0) / args.iterations
    results = [{"bench": "gatys", "size": args.size, "s_per_iteration": gatys_s, "vgg_fwd_bwd_s": vgg_s,
                "overhead": gatys_s / vgg_s}]
    print(f"Gatys at {args.size} px: {gatys_s:.3f} s per loss evaluation (VGG forward+backward alone "
          f"{vgg_s:.3f} s: x{gatys_s / vgg_s:.2f})")

    loss_fn = StyleLoss(features, style, content_block=1, style_weights=(1, 1, 1, 1, 0)).to(device)

    def run(batches):
        torch.manual_seed(0)
        net = StyleNet()
        return timed_training(ModelStep(net, torch.optim.Adam(net.parameters(), lr=1e-3), loss_fn), batches,
                              steps=args.steps, warmup=args.warmup, batch_size=args.batch, device=device)

    def prepare(images, _labels):
        x = to_unit(images, device)
        return x, x

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        store = synthetic_store(Path(tmp) / "images.h5", args.images, args.train_size)
        loader = make_loader(store, args.batch, num_workers=args.workers, drop_last=True)
        train = {"bench": "fast_style_train", "size": args.train_size} | loader_vs_resident(run, loader, prepare, device)
    net = StyleNet().to(device).eval()
    batch = torch.rand(args.batch, 3, args.size, args.size, device=device)
    with torch.no_grad():
        net(batch)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            net(batch)
        _sync(device)
    infer = {"bench": "fast_style_apply", "size": args.size, "images_per_s": 3 * args.batch / (time.perf_counter() - t0)}
    print(f"fast style training at {args.train_size} px: {train['images_per_s']:,.1f} img/s end to end, "
          f"{train['on_device_images_per_s']:,.1f} on-device; applying at {args.size} px: "
          f"{infer['images_per_s']:,.1f} img/s")
    results += [train, infer]
    print_results(results)
    return results


if __name__ == "__main__":
    main()
