"""Stage 2 speed: our resize stage vs plain Pillow, pillow-simd and the JPEG-decode floor.

One run, one image set, same machine:
- plain Pillow 13 baseline: open, convert RGB, resize shortest side (bilinear), center crop.
  Plain Pillow and pillow-simd are both the ``PIL`` package and cannot share a process, so this
  one runs in a child process with Pillow 13 on its path (installed once into
  .venv/bench/pillow13 from the package index).
- pillow-simd baseline: the same code in this process (whatever PIL the venv has).
- our stage function (``ResizeStage.build_shard``: draft decode, crop+resize in one pass, HDF5 write with
  a CRC-32 per shard), on one core (one shard) and on all cores (a shard per core, a process each, as the flow
  runs them).
Every single-core number is taken with the process pinned to one CPU (sched_setaffinity).
- decode floors: full JPEG decode, and decode with the same draft() reduction the stage uses.

usage: python bench/resize.py [--root IMAGENET_FOLDER] [--images 350] [--size 224]
Ends with: RESULT stage_vs_pillow=... stage_vs_simd=... stage_vs_decode=... scaling_2core=...
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PILLOW_DIR = REPO / ".venv" / "bench" / "pillow13"
PILLOW_VERSION = "13.0.0"

# The baseline, as a notebook would write it; shared verbatim by this process and the child.
BASELINE = '''
from PIL import Image
import numpy as np

def baseline(path, size):
    im = Image.open(path).convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))
'''

CHILD = BASELINE + '''
import json, os, sys, time, PIL
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, like the parent's 1-core runs
paths, size, reps = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
best = 0.0
for _ in range(reps):
    t = time.perf_counter()
    for p in paths:
        baseline(p, size)
    best = max(best, len(paths) / (time.perf_counter() - t))
print(json.dumps({"pil": PIL.__version__, "ips": best}))
'''


def _ensure_plain_pillow() -> None:
    if (PILLOW_DIR / "PIL").is_dir():
        return
    print(f"installing plain Pillow {PILLOW_VERSION} into {PILLOW_DIR} (once)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(PILLOW_DIR),
                    f"pillow=={PILLOW_VERSION}"], check=True)


def _best_ips(fn, items, reps: int) -> float:
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        fn(items)
        best = max(best, len(items) / (time.perf_counter() - t))
    return best


def _images(args, tmp: Path) -> list[str]:
    if args.root:
        paths = sorted(str(p) for p in Path(args.root).glob("train/*/*") if p.suffix.lower() in (".jpeg", ".jpg"))
        import random

        random.Random(0).shuffle(paths)
        return paths[: args.images]
    from prep.sample import build_sample

    per_class = -(-args.images // 7)
    build_sample(tmp / "ds", seed=0, train_per_class=per_class, val_per_class=0, plant_bad_inputs=False)
    return sorted(str(p) for p in (tmp / "ds").rglob("*.JPEG"))[: args.images]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="an ImageNet-layout folder to sample images from (default: the bundled sample)")
    ap.add_argument("--images", type=int, default=350)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    _ensure_plain_pillow()

    import numpy as np
    from PIL import Image

    from prep.imaging import imaging_backend
    from prep.resize import ResizeConfig, ResizeStage
    from prep.shards import Shard, map_shards
    from storage.listing import Listing, SplitListing, write_listing
    from storage.stage import StageDir

    namespace: dict = {}
    exec(BASELINE, namespace)  # noqa: S102  (the same baseline source the child runs)
    baseline = namespace["baseline"]

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        paths = _images(args, tmp)
        n = len(paths)
        for p in paths:  # warm the page cache: we time CPU work, not the disk
            Path(p).read_bytes()
        size, cores = args.size, os.cpu_count() or 1
        print(f"{n} images, S={size}, {cores} cores, backend {imaging_backend()['backend']} "
              f"{imaging_backend()['pil_version']}")

        all_cpus = os.sched_getaffinity(0)
        # single-core numbers are taken pinned to one CPU: a "1 worker" run must not borrow the
        # other core for its writes or its page-cache flushes
        os.sched_setaffinity(0, {min(all_cpus)})
        child = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(paths), str(size), str(args.reps)],
            env={**os.environ, "PYTHONPATH": f"{PILLOW_DIR}"}, capture_output=True, text=True, check=True)
        plain = json.loads(child.stdout)
        assert plain["pil"] == PILLOW_VERSION, plain

        simd = _best_ips(lambda ps: [baseline(p, size) for p in ps], paths, args.reps)

        def decode(ps, draft: bool):
            for p in ps:
                with Image.open(p) as im:
                    if draft and im.format == "JPEG" and min(im.size) >= 2 * size:
                        im.draft(None, (size, size))
                    im.load()

        decode_full = _best_ips(lambda ps: decode(ps, False), paths, args.reps)
        decode_draft = _best_ips(lambda ps: decode(ps, True), paths, args.reps)

        # our stage function over one shard holding every image, written to HDF5
        root = Path(os.path.commonpath(paths))
        rel = [os.path.relpath(p, root) for p in paths]
        listing_dir = tmp / "listing"
        write_listing(Listing(root=root, classes=["c"], splits={"train": SplitListing(
            paths=rel, labels=np.zeros(n, np.int16))}, skipped=0), listing_dir)
        StageDir("listing", "bench", listing_dir).complete(root=str(root))
        spec = ResizeStage(listing=str(listing_dir), config=ResizeConfig(size=size, shard_images=n))

        def stage(shards: int):
            """The stage's own path: ``map_shards`` over ``shards`` equal shards (a process each)."""
            bounds = np.linspace(0, n, shards + 1).astype(int)
            specs = [Shard("train", i, int(bounds[i]), int(bounds[i + 1]), str(tmp / f"shard-{shards}-{i}.h5"))
                     for i in range(shards)]

            def run(_):
                for s in specs:
                    Path(s.path).unlink(missing_ok=True)
                map_shards(spec.build_shard, specs, cores=shards, pool=pool)
            return run

        pool = None  # one shard: map_shards runs it in this process
        stage_1 = _best_ips(stage(1), paths, args.reps)
        os.sched_setaffinity(0, all_cpus)
        # one pool for every repetition, warmed first: process start-up (~2 s each) is paid once
        # per flow run on real data, not per image
        with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
            stage(cores)(None)
            stage_all = _best_ips(stage(cores), paths, args.reps)

    print(f"{'plain Pillow ' + plain['pil'] + ' baseline':<40} {plain['ips']:>8.0f} img/s (1 core)")
    print(f"{'pillow-simd baseline (same code)':<40} {simd:>8.0f} img/s (1 core)")
    print(f"{'our stage, 1 core':<40} {stage_1:>8.0f} img/s")
    print(f"{f'our stage, {cores} cores':<40} {stage_all:>8.0f} img/s ({stage_all / cores:.0f} per core)")
    print(f"{'decode only, full':<40} {decode_full:>8.0f} img/s (1 core)")
    print(f"{'decode only, with the stage draft()':<40} {decode_draft:>8.0f} img/s (1 core)")
    # stage_vs_decode: against pure JPEG decode (the floor); stage_vs_draft_decode: against
    # decoding only, with the same draft() reduction the stage uses (a stricter floor)
    print(f"RESULT stage_vs_pillow={stage_1 / plain['ips']:.2f} stage_vs_simd={stage_1 / simd:.2f} "
          f"stage_vs_decode={stage_1 / decode_full:.2f} stage_vs_draft_decode={stage_1 / decode_draft:.2f} "
          f"scaling_{cores}core={stage_all / stage_1:.2f}")


if __name__ == "__main__":
    main()
