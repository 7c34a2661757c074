"""Super-resolution on the bundled sample: does a model trained for a CPU budget beat bicubic?

Builds the sample (7 classes x 40 train + 10 val), 128 px originals and 32 px crappified inputs
(x4), trains a generator on train, evaluates PSNR/SSIM on the held-out val photos next to bicubic.

usage: python bench/superres_sample.py [--arch johnson] [--loss pixel] [--epochs 20] [--crappifier jpeg_text]
Ends with: RESULT psnr_model=... psnr_bicubic=... ssim_model=... ssim_bicubic=... train_s=...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.schedule import one_cycle
from prep.crappify import CrappifyConfig, CrappifyStage
from storage.stage import run_stage
from training.superres import SuperResConfig, evaluate_superres, train_superres

sys.path.insert(0, str(Path(__file__).parent))
from trainbench import sample_store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="johnson")
    ap.add_argument("--loss", default="pixel")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crappifier", default="jpeg_text")
    ap.add_argument("--high", type=int, default=128)
    ap.add_argument("--low", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        tiers, high = sample_store(tmp, args.high)
        low = run_stage(tiers, CrappifyStage(source=str(high.path),
                                             config=CrappifyConfig(crappifier=args.crappifier, size=args.low)))
        config = SuperResConfig(arch=args.arch, loss=args.loss, batch_size=args.batch, pretrained=True,
                                phases=tuple(one_cycle(args.epochs, args.lr)))
        t = time.perf_counter()
        model, history = train_superres((low.path / "train.h5", high.path / "train.h5"), config, tmp / "run",
                                        on_epoch=lambda r: print(f"epoch {r['epoch']}: loss {r['loss']:.5f}",
                                                                 flush=True))
        train_s = time.perf_counter() - t
        r = evaluate_superres(model, low.path / "val.h5", high.path / "val.h5")
    print(f"{args.arch}/{args.loss}, {args.epochs} epochs on {history[-1]['step'] * args.batch // args.epochs} "
          f"pairs/epoch, {train_s:.0f} s; {r['images']} held-out photos ({args.crappifier} {args.low}->{args.high})")
    print(f"RESULT psnr_model={r['psnr_model']:.2f} psnr_bicubic={r['psnr_bicubic']:.2f} "
          f"ssim_model={r['ssim_model']:.4f} ssim_bicubic={r['ssim_bicubic']:.4f} train_s={train_s:.0f}")


if __name__ == "__main__":
    main()
