"""The search index: HNSW (faiss) vs brute-force cosine on real vectors, recall@10 and query time.

Database: the 400k lower-cased GloVe 6B 50-d words of the real word table (the biggest real
vector set here), minus 1,000 held-out words that are the queries (so no query finds itself).
Baseline in the same run: exact brute force over the same vectors (the index's ``exact=True``).

usage: python bench/search.py [--table STAGE_DIR] [--queries 1000] [--sizes 100000 400000]
Ends with: RESULT hnsw_recall10=... hnsw_vs_brute_batch=... hnsw_vs_brute_single=...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from embeddings import _build  # noqa: E402  (the same real word table as bench/embeddings.py)

from storage.vector_index import VectorIndex, build_index, recall_at, unit_rows  # noqa: E402
from storage.words import WordTable  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 390_000])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        table = WordTable(args.table or _build(Path(tmp)))
        words = unit_rows(np.asarray(table.words.vectors))
        rng = np.random.default_rng(0)
        held = rng.choice(len(words), args.queries, replace=False)
        queries = words[held]
        database = np.delete(words, held, axis=0)
        print(f"{len(words):,} GloVe words x {words.shape[1]}-d; {args.queries} held-out words as queries")
        print(f"{'vectors':>9} {'build s':>8} {'recall@10':>9} {'batch brute s':>13} {'batch hnsw s':>12} "
              f"{'1-query brute ms':>16} {'1-query hnsw ms':>15}")
        result = {}
        for n in args.sizes:
            out = Path(tmp) / f"index-{n}"
            t = time.perf_counter()
            build_index(out, database[:n], ann_above=0, recall_queries=200)
            build = time.perf_counter() - t
            index = VectorIndex(out)
            brute_s, (_, exact) = _timed(lambda: index.search(queries, 10, exact=True))
            hnsw_s, (_, found) = _timed(lambda: index.search(queries, 10))
            single_brute = min(_timed(lambda: index.search(queries[i], 10, exact=True))[0] for i in range(50))
            single_hnsw = min(_timed(lambda: index.search(queries[i], 10))[0] for i in range(50))
            recall = recall_at(found, exact)
            print(f"{n:>9,} {build:>8.1f} {recall:>9.4f} {brute_s:>13.3f} {hnsw_s:>12.3f} "
                  f"{single_brute * 1e3:>16.2f} {single_hnsw * 1e3:>15.3f}")
            result = {"recall": recall, "batch": brute_s / hnsw_s, "single": single_brute / single_hnsw}
    print(f"RESULT hnsw_recall10={result['recall']:.4f} hnsw_vs_brute_batch={result['batch']:.2f} "
          f"hnsw_vs_brute_single={result['single']:.2f}")


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


if __name__ == "__main__":
    main()
