"""Choose the HDF5 chunk shape and compression by measurement (issue: stage 2).

For each (images per chunk, compression): write MB/s, file size, cold random single-image read
time (the file's pages are evicted with posix_fadvise before each read), and sequential batch
read throughput. Then the join: reads through a virtual dataset over shards vs one concatenated
file. Real images: the bundled sample resized to S (default 224).

usage: python bench/hdf5_layout.py [--size 224] [--images 350]
Ends with: RESULT chosen_chunk=... vds_vs_concat_seq=... vds_vs_concat_random=...
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from prep.resize import load_square
from prep.sample import build_sample
from storage.hdf5 import ShardWriter, join_shards


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _write(path: Path, images: np.ndarray, chunk: int, compression: str | None) -> float:
    t = time.perf_counter()
    with ShardWriter(path, size=images.shape[1], chunk_images=chunk, compression=compression) as w:
        for i, img in enumerate(images):
            w.add(img, 0, i, f"{i}")
    return time.perf_counter() - t


def _random_reads(path: Path, n: int, k: int = 30, also_evict: tuple[Path, ...] = ()) -> float:
    """Median ms for one image at a random row, cold (``also_evict``: a virtual dataset's shards)."""
    rng = np.random.default_rng(0)
    times = []
    for row in rng.integers(0, n, k):
        for p in (path, *also_evict):
            _evict(p)
        with h5py.File(path, "r") as f:
            t = time.perf_counter()
            f["images"][int(row)]
            times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def _sequential(path: Path, n: int, batch: int = 64, also_evict: tuple[Path, ...] = ()) -> float:
    """img/s reading the whole file in contiguous batches, cold."""
    for p in (path, *also_evict):
        _evict(p)
    t = time.perf_counter()
    with h5py.File(path, "r") as f:
        for a in range(0, n, batch):
            f["images"][a:a + batch]
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=350)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        per_class = max(1, args.images // 7)
        build_sample(tmp / "ds", seed=0, train_per_class=per_class, val_per_class=0, plant_bad_inputs=False)
        paths = sorted((tmp / "ds").rglob("*.JPEG"))[: args.images]
        images = np.stack([load_square(p, args.size) for p in paths])
        n, mb = len(images), images.nbytes / 2**20
        print(f"{n} images of {args.size}x{args.size}: {mb:.0f} MB raw")
        print(f"{'chunk':>5} {'compr':>5} {'write MB/s':>10} {'size MB':>8} {'rand ms':>8} {'seq img/s':>10}")
        rows = []
        for chunk in (1, 4, 16, 64):
            for compression in (None, "lzf", "gzip"):
                path = tmp / f"c{chunk}-{compression}.h5"
                secs = _write(path, images, chunk, compression)
                size = path.stat().st_size / 2**20
                rand = _random_reads(path, n)
                seq = _sequential(path, n)
                rows.append((chunk, compression, mb / secs, size, rand, seq))
                print(f"{chunk:>5} {str(compression):>5} {mb / secs:>10.0f} {size:>8.1f} {rand:>8.2f} {seq:>10.0f}")
                path.unlink()
        # the rule: uncompressed (JPEG-sourced pixels barely compress and compression makes
        # random reads slow), and the chunk with the best sequential read among those whose
        # random read stays within 2x of the best
        raw = [r for r in rows if r[1] is None]
        best_rand = min(r[4] for r in raw)
        chosen = max((r for r in raw if r[4] <= 2 * best_rand), key=lambda r: r[5])

        # virtual dataset over 8 shards vs one concatenated file, same chunking
        chunk = chosen[0]
        shards = []
        for k, part in enumerate(np.array_split(np.arange(n), 8)):
            shards.append(tmp / "shards" / f"s{k}.h5")
            _write(shards[-1], images[part], chunk, None)
        join_shards(shards, tmp / "vds.h5")
        _write(tmp / "concat.h5", images, chunk, None)
        shards = tuple(shards)
        vds_seq, concat_seq = _sequential(tmp / "vds.h5", n, also_evict=shards), _sequential(tmp / "concat.h5", n)
        vds_rand = _random_reads(tmp / "vds.h5", n, also_evict=shards)
        concat_rand = _random_reads(tmp / "concat.h5", n)
        print(f"join: virtual dataset over 8 shards: seq {vds_seq:.0f} img/s, random {vds_rand:.2f} ms; "
              f"one concatenated file: seq {concat_seq:.0f} img/s, random {concat_rand:.2f} ms")
        shutil.rmtree(tmp / "shards")
        print(f"RESULT chosen_chunk={chosen[0]} chosen_compression={chosen[1]} "
              f"vds_vs_concat_seq={vds_seq / concat_seq:.2f} vds_vs_concat_random={concat_rand / vds_rand:.2f}")


if __name__ == "__main__":
    main()
