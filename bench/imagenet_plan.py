"""The whole-ImageNet plan, measured where it can be on this machine.

1. Writes a synthetic ImageNet-shaped folder: ``--classes`` x ``--per-class`` JPEGs cut from the
   bundled real photos, with ImageNet's size mix (about 60% 500x375, 15% 375x500, 10% 500x333,
   the rest 150-1600 px on the long side; quality 90; mean ~110 KB, as ImageNet's train files).
2. Runs list -> resize (S) -> crappify (jpeg_text, 96 px) as stages on all local cores, timing
   each: images/s and per core, and the projected wall time for ImageNet's 1,281,167 training
   images on 16 and 64 cores (linear in cores: an upper bound; the bulk disk must then deliver
   the read rate printed beside it).
3. The resize shards again on a 2-worker Dask ``LocalCluster`` (processes, 1 thread each) against
   the local process pool on the same 2 cores: the overhead of sending shards to Dask.
4. Disk space at S = 224 and 256 for 1.28M images: uncompressed HDF5 (what the stores hold),
   against JPEG-in-HDF5 (the resized squares re-encoded at quality 90 and 95: their measured mean
   size, and the decode speed a loader would then pay per core).

usage: python bench/imagenet_plan.py [--classes 20] [--per-class 100] [--size 224]
Ends with: RESULT lines (bench=imagenet_plan ...).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from trainbench import print_results  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def _sources() -> list[np.ndarray]:
    from PIL import Image

    from prep.sample import SAMPLE_PHOTOS, photo_path

    arrays, seen = [], set()
    for photo in SAMPLE_PHOTOS:
        try:
            path = photo_path(photo)
        except FileNotFoundError:
            continue
        if path in seen:
            continue
        seen.add(path)
        with Image.open(path) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    return arrays


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) from ImageNet's mix of shapes."""
    r = rng.random()
    if r < 0.60:
        return 500, 375
    if r < 0.75:
        return 375, 500
    if r < 0.85:
        return 500, 333
    long = int(rng.integers(150, 1600))
    aspect = float(rng.uniform(0.6, 0.9))
    return (long, int(long * aspect)) if rng.random() < 0.7 else (int(long * aspect), long)


def write_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> dict[str, float]:
    """An ImageNet-layout train/ folder of real-photo JPEGs; returns its count and mean file size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = _sources()
    total = 0
    for c in range(classes):
        d = root / "train" / f"n{10_000_000 + c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            src = sources[int(rng.integers(len(sources)))]
            w, h = _size(rng)
            sh, sw = src.shape[:2]
            ch, cw = int(sh * rng.uniform(0.5, 1.0)), int(sw * rng.uniform(0.5, 1.0))
            y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
            img = np.asarray(Image.fromarray(src[y:y + ch, x:x + cw]).resize((w, h), Image.BILINEAR), np.float32)
            # sensor grain: a real photo's fine detail (without it the upscaled crops compress 2x better)
            img = Image.fromarray(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            (d / f"n{10_000_000 + c:08d}_{i}.JPEG").write_bytes(buf.getvalue())
            total += len(buf.getvalue())
    n = classes * per_class
    return {"images": n, "mean_kb": total / n / 1024}


def _jpeg_in_hdf5(store: Path, limit: int = 500) -> dict[str, float]:
    """Mean JPEG size of the store's squares at q 90 and 95, and decode images/s on one core."""
    from PIL import Image

    from storage.hdf5 import open_store

    with open_store(store) as f:
        images = f["images"][:limit]
    out: dict[str, float] = {}
    for q in (90, 95):
        blobs = []
        for a in images:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=q)
            blobs.append(buf.getvalue())
        out[f"jpeg_q{q}_kb"] = float(np.mean([len(b) for b in blobs])) / 1024
        t0 = time.perf_counter()
        for b in blobs:
            with Image.open(io.BytesIO(b)) as im:
                im.load()
        out[f"jpeg_q{q}_decode_per_core"] = len(blobs) / (time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--shard-images", type=int, default=250)
    ap.add_argument("--dask", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    from prep.crappify import CrappifyConfig, CrappifyStage
    from prep.listing import ListingStage, fingerprint_dataset
    from prep.resize import ResizeConfig, ResizeStage
    from prep.shards import map_shards
    from storage.stage import run_stage
    from storage.tiers import Tiers

    cores = len(os.sched_getaffinity(0))
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folder = write_folder(tmp / "imagenet", args.classes, args.per_class)
        print(f"wrote {folder['images']} JPEGs (mean {folder['mean_kb']:.0f} KB) in {time.perf_counter() - t0:.0f} s")
        tiers = Tiers(fast=tmp / "fast", bulk=tmp / "bulk")
        n = folder["images"]
        timings = {}
        t0 = time.perf_counter()
        listing = run_stage(tiers, ListingStage(root=str(tmp / "imagenet"),
                                                fingerprint=fingerprint_dataset(tmp / "imagenet")))
        timings["list"] = time.perf_counter() - t0
        resize_spec = ResizeStage(listing=str(listing.path),
                                  config=ResizeConfig(size=args.size, shard_images=args.shard_images), cores=cores)
        t0 = time.perf_counter()
        resized = run_stage(tiers, resize_spec)
        timings["resize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_stage(tiers, CrappifyStage(source=str(resized.path), cores=cores,
                                       config=CrappifyConfig(crappifier="jpeg_text", size=96,
                                                             shard_images=args.shard_images)))
        timings["crappify"] = time.perf_counter() - t0
        for stage, seconds in timings.items():
            rate = n / seconds
            used = 1 if stage == "list" else cores  # the listing is one process: it does not scale with cores
            r = {"bench": "imagenet_plan", "stage": stage, "images": n, "cores": used, "seconds": seconds,
                 "images_per_s": rate, "per_core": rate / used,
                 "projected_h_16": IMAGENET_TRAIN / (rate / used * (16 if used > 1 else 1)) / 3600,
                 "projected_h_64": IMAGENET_TRAIN / (rate / used * (64 if used > 1 else 1)) / 3600}
            if stage == "resize":  # what the bulk disk must deliver at 64 cores
                r["read_mb_s_64"] = rate / cores * 64 * folder["mean_kb"] / 1024
            results.append(r)
            print(f"{stage:<9} {rate:8.0f} img/s on {used} cores ({rate / used:6.0f} per core): ImageNet in "
                  f"{r['projected_h_16']:.2f} h on 16 cores, {r['projected_h_64']:.2f} h on 64")

        if args.dask:  # the same shards through a 2-worker Dask LocalCluster vs the local pool
            import multiprocessing

            from distributed import Client, LocalCluster

            def again(tag: str):
                spec = ResizeStage(listing=str(listing.path), config=ResizeConfig(size=args.size,
                                                                                  shard_images=args.shard_images))
                out = tmp / f"again-{tag}"
                out.mkdir()
                return spec, spec.plan(out)

            spec, shards = again("pool")
            with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(int, range(2)))  # start the processes first: as warm as Dask's workers
                t0 = time.perf_counter()
                map_shards(spec.build_shard, shards, cores=2, pool=pool)
                pool_s = time.perf_counter() - t0
            spec, shards = again("dask")
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                t0 = time.perf_counter()
                client.gather(client.map(spec.build_shard, shards, workers=None, pure=False))
                dask_s = time.perf_counter() - t0
            results.append({"bench": "imagenet_plan", "stage": "resize_dask_vs_pool", "images": n,
                            "pool_s": pool_s, "dask_s": dask_s, "dask_overhead": dask_s / pool_s})
            print(f"resize shards on 2 workers: process pool {pool_s:.1f} s, Dask LocalCluster {dask_s:.1f} s "
                  f"(x{dask_s / pool_s:.2f})")

        jpeg = _jpeg_in_hdf5(resized.path / "train.h5")
        for side in (224, 256):
            raw_gb = IMAGENET_TRAIN * side * side * 3 / 1e9
            scale = (side / args.size) ** 2  # JPEG bytes grow about with the pixel count
            results.append({"bench": "imagenet_plan", "stage": f"disk_{side}", "hdf5_gb": raw_gb,
                            "jpeg_q90_gb": IMAGENET_TRAIN * jpeg["jpeg_q90_kb"] * scale * 1024 / 1e9,
                            "jpeg_q95_gb": IMAGENET_TRAIN * jpeg["jpeg_q95_kb"] * scale * 1024 / 1e9})
        results.append({"bench": "imagenet_plan", "stage": "jpeg_in_hdf5", "size": args.size, **jpeg})
        print(f"JPEG-in-HDF5 at {args.size} px: q90 {jpeg['jpeg_q90_kb']:.1f} KB, decoded at "
              f"{jpeg['jpeg_q90_decode_per_core']:.0f} img/s per core; q95 {jpeg['jpeg_q95_kb']:.1f} KB")
    print_results(results)
    return results


if __name__ == "__main__":
    main()
