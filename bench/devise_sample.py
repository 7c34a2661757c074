"""DeViSE on the bundled sample with the bundled pretrained backbone: hit@k next to the softmax
baselines and ConSE, the held-out classes' zero-shot ranks among ImageNet-21k, and (optionally)
fine-tuning end to end, in time per epoch against the fast path.

Builds the sample (15 classes x 40 train + 10 val; the 5 outside ImageNet-1k are held out for
zero-shot), a store at --size, the real word table (WordNet 3.0 + bundled GloVe 50-d), then
features, head, and --finetune-epochs of fine-tuning.

usage: python bench/devise_sample.py [--backbone auto] [--size 224] [--epochs 20] [--finetune-epochs 0]
Ends with: RESULT devise_pretrained hit1=... hit5=... softmax_hit1=... softmax_hit5=... zeroshot21k_hit5=...
           conse_zeroshot21k_hit5=... backbone=...
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

sys.path.insert(0, str(Path(__file__).parent))
from embeddings import _build  # noqa: E402  (the real word table, as in bench/embeddings.py)
from trainbench import sample_store  # noqa: E402

from storage.stage import open_stage, run_stage  # noqa: E402
from training.devise.evaluate import format_hits, hit  # noqa: E402
from training.devise.features import FeaturesConfig, FeaturesStage  # noqa: E402
from training.devise.finetune import FinetuneConfig, FinetuneStage  # noqa: E402
from training.devise.head import DeviseStage, HeadConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="auto")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--finetune-epochs", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        words = _build(tmp)
        tiers, resized = sample_store(tmp, args.size)
        t = time.perf_counter()
        features = run_stage(tiers, FeaturesStage(resize=str(resized.path),
                                                  config=FeaturesConfig(backbone=args.backbone, batch_size=32)))
        features_s = time.perf_counter() - t
        head = run_stage(tiers, DeviseStage(features=str(features.path), words=str(words),
                                            config=HeadConfig(epochs=args.epochs, lr=1e-2, batch_size=args.batch)))
        hm = open_stage(head.path).manifest()
        history = json.loads((head.path / "metrics.json").read_text())["history"]
        head_epoch_s = sum(h["seconds"] for h in history) / len(history)
        n_images = sum(open_stage(features.path).manifest()["counts"].values())
        if args.finetune_epochs:
            tuned = run_stage(tiers, FinetuneStage(devise=str(head.path), config=FinetuneConfig(
                epochs=args.finetune_epochs, batch_size=args.batch)))
            fm = open_stage(tuned.path).manifest()
            ft_history = json.loads((tuned.path / "metrics.json").read_text())["history"]
            ft_epoch_s = sum(h["seconds"] for h in ft_history) / len(ft_history)
    weights = hm["backbone_weights"]
    print(f"{hm['backbone']} at {args.size} px ({weights['detail'] if weights else 'RANDOM weights'}); "
          f"features of {n_images} images x 2 views: {features_s:.1f} s")
    print(f"\nhead on features ({args.epochs} epochs, {head_epoch_s:.3f} s/epoch):\n{format_hits(hm['metrics'])}")
    print("\nheld-out classes (rank of their name among ImageNet-21k for the mean vector of their images):")
    for r in hm["zero_shot_classes"]:
        print(f"  {r['class']:<12} DeViSE rank {r['rank_21k']:>5} / {r['of']}  ConSE rank {r.get('conse_rank_21k')!s:>5}"
              f"  nearest nouns: {r['nearest_nouns']}")
    if args.finetune_epochs:
        print(f"\nfine-tuned end to end ({args.finetune_epochs} epochs, {ft_epoch_s:.1f} s/epoch):\n"
              f"{format_hits(fm['metrics'])}")
        print(f"RESULT head_epoch_s={head_epoch_s:.3f} finetune_epoch_s={ft_epoch_s:.1f} "
              f"finetune_vs_head_epoch={ft_epoch_s / head_epoch_s:.0f}")
    m = hm["metrics"]
    print(f"RESULT devise_pretrained hit1={hit(m, 'devise', 'flat', None, 1):.3f} "
          f"hit5={hit(m, 'devise', 'flat', None, 5):.3f} softmax_hit1={hit(m, 'softmax', 'flat', None, 1):.3f} "
          f"softmax_hit5={hit(m, 'softmax', 'flat', None, 5):.3f} "
          f"classifier_hit1={hit(m, 'imagenet classifier', 'flat', None, 1):.3f} "
          f"classifier_hit5={hit(m, 'imagenet classifier', 'flat', None, 5):.3f} "
          f"zeroshot21k_hit5={hit(m, 'devise', 'zero-shot', 'imagenet-21k', 5):.3f} "
          f"conse_zeroshot21k_hit5={hit(m, 'conse', 'zero-shot', 'imagenet-21k', 5):.3f} "
          f"backbone={hm['backbone']} size={args.size}")


if __name__ == "__main__":
    main()
