"""Stage 2: shortest side -> S, center crop S x S, into HDF5 stores on the fast tier.

Three ways to go faster (lesson 9, 2017), all used here:
- SIMD resize: pillow-simd (scripts/bootstrap.sh) runs the same Pillow calls 5-6x faster.
- Less decode work: JPEG ``draft()`` decodes at 1/2, 1/4 or 1/8 scale in the DCT domain when the
  image is at least 2x the target, and ``resize(box=...)`` crops and resizes in one pass.
- All cores: one process per shard, each decoding inline and writing its own file, so no pixel
  crosses a pipe and no GIL is shared (tasks/shards.py). A lone shard falls back to a thread pool
  over its images.
One Prefect task per shard of thousands of images, never per image (~40 ms of CPU a task run).

Never pads with black borders: a center crop keeps the object at the same scale for every image.
Bad inputs are converted when possible (CMYK, grayscale, palette, a PNG named .JPEG: PIL reads by
content) and otherwise rejected with the reason; inputs = written + rejected, always.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from storage.atomic import atomic_write_text
from storage.hdf5 import (
    COMPRESSIONS,
    DEFAULT_CHUNK_IMAGES,
    ShardWriter,
    join_shards,
    read_shard_summary,
    read_store_rejects,
    reusable_shard,
)
from storage.stage import StageDir, open_stage, stage_dir
from storage.tiers import Tiers
from tasks.imaging import imaging_backend
from tasks.listing import read_split
from tasks.shards import map_shards, shards_by_split

log = logging.getLogger(__name__)

RESIZE_VERSION = 1  # bump when the stored pixels or layout change
DEFAULT_SIZE = 224
DEFAULT_SHARD_IMAGES = 5000
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (~ 9459 x 9459)


@dataclass(frozen=True)
class ResizeConfig:
    size: int = DEFAULT_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_images: int = DEFAULT_SHARD_IMAGES
    chunk_images: int = DEFAULT_CHUNK_IMAGES
    compression: str | None = None
    use_draft: bool = True

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 4096:
            raise ValueError(f"size must be between 8 and 4096 pixels, got {self.size}")
        if self.max_pixels < self.size * self.size:
            raise ValueError(f"max_pixels {self.max_pixels} is below one {self.size}x{self.size} image")
        if self.shard_images < 1 or self.chunk_images < 1:
            raise ValueError(f"shard_images and chunk_images must be >= 1, got {self.shard_images}, {self.chunk_images}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"unknown HDF5 compression {self.compression!r}; choose one of {list(COMPRESSIONS)}")


class Rejected(Exception):
    """An input that cannot become an image; the message is the reason stored with it."""


def load_square(path: str | Path, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                use_draft: bool = True) -> np.ndarray:
    """Decode ``path``, resize its shortest side to ``size`` and center-crop: ``(size, size, 3) uint8``.

    Raises ``Rejected`` with the reason for anything that cannot be decoded or is too large.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise Rejected(f"too many pixels: {w}x{h} = {w * h:,} > max_pixels {max_pixels:,}")
            if use_draft and im.format == "JPEG" and min(w, h) >= 2 * size:
                # draft() decodes at 1/2..1/8 scale in the DCT domain: 2-4x less decode work;
                # it picks the largest reduction that keeps both sides >= size
                im.draft(None, (size, size))
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")  # CMYK, L, P, RGBA, I;16 ...
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            # crop + shortest-side resize in one pass: only the kept square is resampled
            out = im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
            return np.asarray(out)
    except Rejected:
        raise
    except UnidentifiedImageError as e:
        if os.path.getsize(path) == 0:
            raise Rejected("empty file (0 bytes)") from e
        raise Rejected(f"not a readable image: {e}") from e
    except Image.DecompressionBombError as e:
        raise Rejected(f"decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, corrupt headers, bad modes
        raise Rejected(f"{type(e).__name__}: {e}") from e


def _load_or_reason(path: str, size: int, max_pixels: int, use_draft: bool) -> np.ndarray | str:
    try:
        return load_square(path, size, max_pixels=max_pixels, use_draft=use_draft)
    except Rejected as e:
        return str(e)


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: rows [start, stop) of one split of the shuffled listing."""

    split: str
    shard: int
    start: int
    stop: int
    listing_dir: str
    dataset_root: str
    out_path: str


def plan_shards(listing_dir: str | Path, dataset_root: str | Path, stage_path: Path, split: str,
                shard_images: int) -> list[ShardSpec]:
    n = len(_cached_split(str(listing_dir), split).paths)
    return [
        ShardSpec(split, i, start, min(start + shard_images, n), str(listing_dir), str(dataset_root),
                  str(stage_path / "shards" / f"{split}-{i:05d}.h5"))
        for i, start in enumerate(range(0, n, shard_images))
    ]


@functools.lru_cache(maxsize=4)
def _cached_split(listing_dir: str, split: str):
    # every shard task of a process needs the same table: read the TSV once per process
    return read_split(listing_dir, split)


def _windows(n: int, width: int) -> Iterator[range]:
    for start in range(0, n, width):
        yield range(start, min(start + width, n))


def resize_shard(spec: ShardSpec, config: ResizeConfig, *, workers: int | None = None) -> dict[str, Any]:
    """Resize one shard into its own HDF5 file; skipped when that file exists and verifies (resume)."""
    out = Path(spec.out_path)
    if reusable_shard(out):  # renamed only when complete; its checksum catches data lost to a power cut
        return {"shard": spec.shard, "split": spec.split, "path": str(out), "resumed": True, **read_shard_summary(out)}
    listing = _cached_split(spec.listing_dir, spec.split)
    rows = range(spec.start, spec.stop)
    root = Path(spec.dataset_root)
    workers = workers or os.cpu_count() or 1
    # Our max_pixels check runs on the header before decoding; align Pillow's own check with it
    # and silence its warning, which would fire for images we reject anyway.
    Image.MAX_IMAGE_PIXELS = config.max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    start = time.perf_counter()
    load = functools.partial(_load_or_reason, size=config.size, max_pixels=config.max_pixels,
                             use_draft=config.use_draft)
    # one worker decodes inline: a pool of one only adds a thread hand-off per image
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    with ShardWriter(
        out, size=config.size, chunk_images=config.chunk_images, compression=config.compression,
        attrs={"split": spec.split, "shard": spec.shard, "start": spec.start, "stop": spec.stop},
    ) as writer:
        # windows bound memory: at most 8 chunks of decoded images wait for the writer
        for window in _windows(len(rows), config.chunk_images * 8):
            idx = [rows[i] for i in window]
            files = [str(root / listing.paths[r]) for r in idx]
            results = pool.map(load, files) if pool else map(load, files)
            for r, result in zip(idx, results):
                if isinstance(result, str):
                    writer.reject(r, listing.paths[r], result)
                else:
                    writer.add(result, int(listing.labels[r]), r, listing.paths[r])
        written, rejected = writer.counts
    if pool:
        pool.shutdown()
    if written + rejected != len(rows):
        raise RuntimeError(f"shard {out}: {len(rows)} inputs but {written} written + {rejected} rejected")
    elapsed = time.perf_counter() - start
    log.info("resize %s shard %d: %d written, %d rejected, %.0f img/s", spec.split, spec.shard,
             written, rejected, len(rows) / max(elapsed, 1e-9))
    return {"shard": spec.shard, "split": spec.split, "path": str(out), "resumed": False,
            "written": written, "rejected": rejected, "elapsed_s": round(elapsed, 3),
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


def resize_shards(specs: Sequence[ShardSpec], config: ResizeConfig, *, cores: int | None = None,
                  pool: Executor | None = None) -> list[dict]:
    """Every shard on this machine (a process per shard, see tasks/shards.py)."""
    return map_shards(resize_shard, specs, cores=cores, pool=pool, config=config)


def resize_stage(tiers: Tiers, *, listing_dir: str | Path, config: ResizeConfig) -> StageDir:
    listing = open_stage(listing_dir)
    params = {"version": RESIZE_VERSION, "listing": listing.key, **asdict(config)}
    return stage_dir(tiers, "fast", "resize", params)


def store_attrs(config: ResizeConfig, listing_dir: str | Path) -> dict[str, Any]:
    backend = imaging_backend()
    listing = open_stage(listing_dir)
    return {
        "size": config.size, "listing_key": listing.key, "listing_dir": str(listing_dir),
        "dataset_root": listing.manifest()["root"], "imaging_backend": backend["backend"],
        "pil_version": backend["pil_version"], "libjpeg_turbo": backend["libjpeg_turbo"],
        "use_draft": config.use_draft, "resize_version": RESIZE_VERSION,
    }


def join_stage(stage: StageDir, specs: Sequence[ShardSpec], config: ResizeConfig) -> StageDir:
    """Join each split's shards into ``<split>.h5``, write ``rejects.tsv``, check the invariant, finish."""
    if stage.is_complete:
        return stage
    listing_dir = specs[0].listing_dir
    attrs = store_attrs(config, listing_dir)
    totals: dict[str, dict[str, int]] = {}
    reject_rows = []
    for split, mine in shards_by_split(specs).items():
        counts = join_shards([Path(s.out_path) for s in mine], stage.path / f"{split}.h5",
                             attrs={**attrs, "split": split})
        inputs = len(_cached_split(listing_dir, split).paths)
        if counts["written"] + counts["rejected"] != inputs:
            raise RuntimeError(f"{split}: {inputs} inputs but {counts['written']} written + "
                               f"{counts['rejected']} rejected")
        totals[split] = {"inputs": inputs, **counts}
        reject_rows += [(split, *r) for r in read_store_rejects(stage.path / f"{split}.h5")]
    atomic_write_text(stage.path / "rejects.tsv",
                      "split\tindex\tpath\treason\n" + "".join("\t".join(map(str, r)) + "\n" for r in reject_rows))
    stage.complete(counts=totals, rejects=len(reject_rows), **{k: v for k, v in attrs.items() if k != "size"},
                   stores={split: f"{split}.h5" for split in totals})
    log.info("resize: %s -> %s", totals, stage.path)
    return stage


def read_rejects(stage_path: str | Path) -> list[dict[str, str]]:
    """The rejects table of a finished resize stage: split, index, path, reason."""
    lines = (Path(stage_path) / "rejects.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def run_resize(stage: StageDir, *, listing_dir: str | Path, config: ResizeConfig,
               splits: Sequence[str] = ("train", "val"), cores: int | None = None) -> StageDir:
    """The whole stage without Prefect: plan, every shard (all cores), join. Resumes by shard."""
    if stage.is_complete:
        return stage
    stage.prepare()
    specs = plan_stage(listing_dir, stage.path, config, splits)
    resize_shards(specs, config, cores=cores)
    return join_stage(stage, specs, config)


def plan_stage(listing_dir: str | Path, stage_path: Path, config: ResizeConfig,
               splits: Sequence[str] = ("train", "val")) -> list[ShardSpec]:
    """Shard specs for every split the listing has, in order."""
    root = open_stage(listing_dir).manifest()["root"]
    return [s for split in splits if (Path(listing_dir) / f"{split}.tsv").is_file()
            for s in plan_shards(listing_dir, root, stage_path, split, config.shard_images)]


# --- Prefect layer --------------------------------------------------------------------------
from prefect import task  # noqa: E402  (the plain functions above do not need Prefect)
from prefect.artifacts import create_table_artifact  # noqa: E402


@task(name="plan-resize")
def plan_resize(listing_dir: str, config: ResizeConfig, tiers: Tiers) -> list[ShardSpec]:
    """Shard specs (rows of the listing) for every split; creates the stage directory."""
    stage = resize_stage(tiers, listing_dir=listing_dir, config=config)
    if not stage.is_complete:
        stage.prepare()
    return plan_stage(listing_dir, stage.path, config)


@task(name="resize-shard", retries=2, retry_delay_seconds=5)
def resize_shard_task(spec: ShardSpec, config: ResizeConfig, workers: int | None = None) -> dict[str, Any]:
    return resize_shard(spec, config, workers=workers)


@task(name="join-resize")
def join_resize(listing_dir: str, config: ResizeConfig, tiers: Tiers, specs: list[ShardSpec],
                shard_results: list[dict[str, Any]]) -> str:
    """Join the shards into the stores; returns the stage directory. Needs every shard done."""
    stage = join_stage(resize_stage(tiers, listing_dir=listing_dir, config=config), specs, config)
    m = stage.manifest()
    create_table_artifact(
        key="resize-counts",
        table=[{"split": s, **c} for s, c in m["counts"].items()],
        description=f"S={config.size}, backend {m['imaging_backend']} {m['pil_version']}: `{stage.path}`",
    )
    rejects = read_rejects(stage.path)
    if rejects:
        create_table_artifact(key="resize-rejects", table=rejects[:1000],
                              description=f"{len(rejects)} rejected inputs (first 1000); all in `rejects.tsv`")
    return str(stage.path)
