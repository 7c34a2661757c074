"""Ablation of the GAN generator's pretraining on the bundled sample (pixel MSE, lesson 7's two
steps, 2 + 2 epochs, 64 px originals from jpeg_text 32 px inputs): which part of the lesson's
recipe moves held-out PSNR/SSIM. The loader runs in the training process (--workers 0), so every
variant sees the same batches.

usage: python bench/generator_ablation.py VARIANT [--workers 0]
  VARIANT: lesson (1a at slice(lr*10), the frozen encoder's BN trained), lr_1a (1a at slice(lr)),
           bn_frozen (1a at slice(lr*10), the encoder's BN frozen too)
Ends with: RESULT variant=... psnr_model=... psnr_bicubic=... ssim_model=... train_s=...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", choices=("lesson", "lr_1a", "bn_frozen"))
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()

    from trainbench import sample_store

    from models.schedule import one_cycle
    from prep.crappify import CrappifyConfig, CrappifyStage
    from storage.catalog import crappified_pair
    from storage.stage import run_stage
    from training.superres import ENCODER_GROUPS, FROZEN, evaluate_superres, superres_plan, train_superres

    with tempfile.TemporaryDirectory() as tmp:
        tiers, resized = sample_store(Path(tmp), 64)
        crap = run_stage(tiers, CrappifyStage(source=str(resized.path), config=CrappifyConfig(crappifier="jpeg_text",
                                                                                                size=32)))
        _, config = superres_plan(loss="pixel", high_size=64, low_size=32, epochs=2, lr=1e-3, batch_size=8)
        phases = list(config.phases)
        if args.variant == "lr_1a":
            phases = [replace(p, group_scales=FROZEN, frozen_groups=ENCODER_GROUPS)
                      for p in one_cycle(2, 1e-3, pct_start=0.9)] + phases[2:]
        elif args.variant == "bn_frozen":  # a zero rate for the encoder's groups: its BN does not train
            phases = [replace(p, group_scales=(0.0, 0.0, 1.0)) for p in phases[:2]] + phases[2:]
        config = replace(config, phases=tuple(phases), num_workers=args.workers)
        start = time.perf_counter()
        model, _ = train_superres(crappified_pair(str(crap.path), "train"), config, Path(tmp) / "train",
                                  device="cpu", tensorboard=False)
        seconds = time.perf_counter() - start
        r = evaluate_superres(model, *crappified_pair(str(crap.path), "val"))
    print(f"RESULT variant={args.variant} psnr_model={r['psnr_model']:.2f} psnr_bicubic={r['psnr_bicubic']:.2f} "
          f"ssim_model={r['ssim_model']:.4f} train_s={seconds:.0f}")


if __name__ == "__main__":
    main()
