"""Word-table lookups: a batch of 256 queries against all 82k WordNet nouns, brute-force cosine.

Builds the real table (WordNet 3.0 + bundled GloVe 6B 50-d) in a temporary folder unless --table
points at a finished embeddings stage. Baseline in the same run: the same 256 queries one at a time.

usage: python bench/embeddings.py [--table STAGE_DIR] [--batch 256] [--k 10]
Ends with: RESULT batch256_wordnet_s=... batch_vs_loop=...
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from prep.wordnet import WordnetStage, wordnet_source
from prep.words import EmbeddingStage, GloveStage
from storage.stage import run_stage
from storage.tiers import Tiers
from storage.words import WordTable


def _build(tmp: Path) -> Path:
    tiers = Tiers(fast=tmp / "fast", bulk=tmp / "bulk")
    wordnet = run_stage(tiers, WordnetStage(source=str(wordnet_source())))
    glove = run_stage(tiers, GloveStage())
    return run_stage(tiers, EmbeddingStage(vectors=str(glove.path), wordnet=str(wordnet.path))).path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        table = WordTable(args.table or _build(Path(tmp)))
        rng = np.random.default_rng(0)
        # real queries: vectors of random WordNet nouns, slightly perturbed
        keys = table.table.index_to_key
        q = np.stack([table.vector(keys[i]) for i in rng.integers(0, len(keys), args.batch)])
        q = q + 0.1 * rng.standard_normal(q.shape).astype(np.float32)
        table.nearest_words(q[:8], args.k, "wordnet")  # warm-up
        batch = min(_time(lambda: table.nearest_words(q, args.k, "wordnet")) for _ in range(3))
        loop = _time(lambda: [table.nearest_words(v, args.k, "wordnet") for v in q])
        n = len(table._keys["wordnet"])
    print(f"{args.batch} queries x {n:,} nouns x {table.dims}-d, top-{args.k}: batch {batch:.3f} s, "
          f"one at a time {loop:.3f} s")
    print(f"RESULT batch{args.batch}_wordnet_s={batch:.3f} batch_vs_loop={loop / batch:.2f}")


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
