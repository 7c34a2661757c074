"""Stage 1 at ImageNet scale: list a tree of empty files shaped like ImageNet's train/ folder.

Compares our streaming ``list_dataset`` (os.scandir, file type from the directory entry) with
the obvious baseline (``Path.rglob`` + ``is_file()`` + sort, which stats every file), in one run.

usage: python bench/listing.py [--classes 1000] [--per-class 1281] [--root DIR]
With --root pointing at a real ImageNet folder, only the two listings run (nothing is created).
Ends with one machine-readable line: RESULT listing_files_per_s=... listing_vs_rglob=...
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from prep.listing import list_dataset


def make_tree(root: Path, classes: int, per_class: int) -> None:
    for c in range(classes):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            os.close(os.open(d / f"n{c:08d}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))


def rglob_baseline(root: Path) -> int:
    files = sorted(p for p in (root / "train").rglob("*") if p.is_file())
    return len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=1281)
    ap.add_argument("--root", type=Path, help="an existing ImageNet-layout folder (nothing is created)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = args.root
        if root is None:
            root = Path(tmp)
            t = time.perf_counter()
            make_tree(root, args.classes, args.per_class)
            print(f"made {args.classes * args.per_class:,} empty files in {time.perf_counter() - t:.1f} s")
        os.sync()
        t = time.perf_counter()
        listing = list_dataset(root, splits=("train",))
        ours = time.perf_counter() - t
        n = len(listing.splits["train"].paths)
        t = time.perf_counter()
        n_base = rglob_baseline(root)
        base = time.perf_counter() - t
        assert n == n_base, (n, n_base)
        print(f"list_dataset : {n:,} files in {ours:.2f} s ({n / ours:,.0f} files/s)")
        print(f"rglob+is_file: {n_base:,} files in {base:.2f} s ({n_base / base:,.0f} files/s)")
        print(f"RESULT listing_files={n} listing_s={ours:.2f} listing_files_per_s={n / ours:.0f} "
              f"listing_vs_rglob={base / ours:.2f}")


if __name__ == "__main__":
    main()
