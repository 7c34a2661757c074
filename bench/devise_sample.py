"""DeViSE on the bundled sample: the fast path (head on precomputed features) vs fine-tuning end
to end, in time per epoch (same run) and hit@k, with the softmax baseline.

Builds the sample (7 classes x 40 train + 10 val; the 21k-only motorcycle is the zero-shot class),
a store at --size, the real word table (WordNet 3.0 + bundled GloVe 50-d), then features, head,
fine-tuning. Pretrained weights are used when present locally (see models/weights.py); without
them the backbone is random and the accuracies say little about DeViSE itself.

usage: python bench/devise_sample.py [--backbone resnet50] [--size 128] [--epochs 20] [--finetune-epochs 2]
Ends with: RESULT head_epoch_s=... finetune_epoch_s=... finetune_vs_head_epoch=... flat_hit5=... softmax_hit5=...
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
from embeddings import _build  # noqa: E402  (the real word table, as in bench/embeddings.py)
from trainbench import sample_store  # noqa: E402

from storage.stage import open_stage, run_stage  # noqa: E402
from training.devise.evaluate import format_hits  # noqa: E402
from training.devise.features import FeaturesConfig, FeaturesStage  # noqa: E402
from training.devise.finetune import FinetuneConfig, FinetuneStage  # noqa: E402
from training.devise.head import DeviseStage, HeadConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        words = _build(tmp)
        tiers, resized = sample_store(tmp, args.size)
        fc = FeaturesConfig(backbone=args.backbone, batch_size=32)
        t = time.perf_counter()
        features = run_stage(tiers, FeaturesStage(resize=str(resized.path), config=fc))
        features_s = time.perf_counter() - t
        hc = HeadConfig(epochs=args.epochs, lr=1e-2, batch_size=args.batch)
        head = run_stage(tiers, DeviseStage(features=str(features.path), words=str(words), config=hc))
        hm = open_stage(head.path).manifest()
        history = __import__("json").loads((head.path / "metrics.json").read_text())["history"]
        head_epoch_s = sum(h["seconds"] for h in history) / len(history)
        ftc = FinetuneConfig(epochs=args.finetune_epochs, batch_size=args.batch)
        tuned = run_stage(tiers, FinetuneStage(devise=str(head.path), config=ftc))
        fm = open_stage(tuned.path).manifest()
        ft_history = __import__("json").loads((tuned.path / "metrics.json").read_text())["history"]
        ft_epoch_s = sum(h["seconds"] for h in ft_history) / len(ft_history)
        n_images = sum(open_stage(features.path).manifest()["counts"].values())
    print(f"{args.backbone} at {args.size} px, backbone pretrained: {hm['pretrained_backbone']}; "
          f"features of {n_images} images x 2 views: "
          f"{features_s:.1f} s")
    print(f"\nhead on features ({args.epochs} epochs, {head_epoch_s:.3f} s/epoch):\n{format_hits(hm['metrics'])}")
    print(f"\nfine-tuned end to end ({args.finetune_epochs} epochs, {ft_epoch_s:.1f} s/epoch):\n"
          f"{format_hits(fm['metrics'])}")
    flat = next(r for r in hm["metrics"] if r["model"] == "devise" and r["task"] == "flat")
    softmax = next(r for r in hm["metrics"] if r["model"] == "softmax")
    print(f"RESULT head_epoch_s={head_epoch_s:.3f} finetune_epoch_s={ft_epoch_s:.1f} "
          f"finetune_vs_head_epoch={ft_epoch_s / head_epoch_s:.0f} flat_hit5={flat['hit@5']:.3f} "
          f"softmax_hit5={softmax['hit@5']:.3f}")


if __name__ == "__main__":
    main()
