"""Super-resolution on the bundled sample with the pretrained encoder and loss network: does a
CPU run of a few minutes beat bicubic upsampling on held-out photos, on PSNR and SSIM?

Builds the sample (15 classes x 40 train + 10 val), the originals at --high px and their
crappified versions at --low px, trains a generator with lesson 7's phases (encoder frozen, then
unfrozen at discriminative rates; 1cycle each; pair augmentation), and evaluates it on the val split.

usage: python bench/superres_sample.py [--arch unet] [--loss feature] [--high 64] [--low 32]
           [--crappifier jpeg_text] [--epochs 4] [--lr 1e-3] [--batch 8]
Ends with: RESULT psnr_model=... psnr_bicubic=... ssim_model=... ssim_bicubic=... encoder=... loss_net=... train_s=...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from prep.crappify import CrappifyConfig, CrappifyStage
from storage.stage import run_stage
from training.superres import evaluate_superres, superres_plan, train_superres

sys.path.insert(0, str(Path(__file__).parent))
from trainbench import sample_store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="unet")
    ap.add_argument("--loss", default="feature")
    ap.add_argument("--epochs", type=int, default=4, help="per step: frozen, then unfrozen (unet)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crappifier", default="jpeg_text")
    ap.add_argument("--high", type=int, default=64)
    ap.add_argument("--low", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="loader processes (0: in the training process)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        tiers, high = sample_store(tmp, args.high)
        low = run_stage(tiers, CrappifyStage(source=str(high.path),
                                             config=CrappifyConfig(crappifier=args.crappifier, size=args.low)))
        _, config = superres_plan(arch=args.arch, loss=args.loss, high_size=args.high, low_size=args.low,
                                  epochs=args.epochs, lr=args.lr, batch_size=args.batch)
        config = type(config)(**{**config.__dict__, "num_workers": args.workers})
        t = time.perf_counter()
        model, history = train_superres((low.path / "train.h5", high.path / "train.h5"), config, tmp / "run",
                                        on_epoch=lambda r: print(f"epoch {r['epoch']}: loss {r['loss']:.4f} "
                                                                 f"({r['seconds']:.0f} s)", flush=True))
        train_s = time.perf_counter() - t
        weights = json.loads((tmp / "run" / "weights.json").read_text())
        r = evaluate_superres(model, low.path / "val.h5", high.path / "val.h5")
    print(f"{args.arch}/{args.loss} on {config.encoder or '-'} (loss net {config.loss_network or '-'}), "
          f"{len(history)} epochs, {train_s:.0f} s; {r['images']} held-out photos "
          f"({args.crappifier} {args.low}->{args.high}); weights: "
          f"{ {k: (v['detail'] if v else None) for k, v in weights.items()} }")
    print(f"RESULT psnr_model={r['psnr_model']:.2f} psnr_bicubic={r['psnr_bicubic']:.2f} "
          f"ssim_model={r['ssim_model']:.4f} ssim_bicubic={r['ssim_bicubic']:.4f} encoder={config.encoder or '-'} "
          f"loss_net={config.loss_network or '-'} train_s={train_s:.0f}")


if __name__ == "__main__":
    main()
