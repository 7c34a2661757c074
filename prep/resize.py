"""Stage 2: shortest side -> S, center crop S x S, into HDF5 stores on the fast tier.

Three ways to go faster (lesson 9, 2017), all used here:
- SIMD resize: pillow-simd (scripts/bootstrap.sh) runs the same Pillow calls 5-6x faster.
- Less decode work: JPEG ``draft()`` decodes at 1/2, 1/4 or 1/8 scale in the DCT domain when the
  image is at least 2x the target, and ``resize(box=...)`` crops and resizes in one pass.
- All cores: one process per shard, each decoding inline and writing its own file, so no pixel
  crosses a pipe and no GIL is shared (prep/shards.py). A lone shard falls back to a thread pool
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from prep.imaging import imaging_backend
from prep.shards import DEFAULT_SHARD_IMAGES, Shard, ShardedStage, worker_map
from storage.catalog import read_rejects, write_rejects
from storage.hdf5 import (
    COMPRESSIONS,
    DEFAULT_CHUNK_IMAGES,
    ShardWriter,
    read_shard_summary,
    read_store_rejects,
    reusable_shard,
)
from storage.listing import SplitListing, listed_splits, read_split
from storage.report import Reporter
from storage.stage import StageDir, open_stage, runtime, upstream

log = logging.getLogger(__name__)

DEFAULT_SIZE = 224
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
            if "exif" in im.info and im.getexif().get(EXIF_ORIENTATION, 1) != 1:
                im = ImageOps.exif_transpose(im)  # a phone photo stored sideways: upright, as it is shown
            im = to_rgb(im)
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


EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit images (16-bit PNG/TIFF: modes I;16 and I) are scaled from 0..65535 to
    0..255 (``convert`` would clip them to near white); CMYK, L, P, RGBA ... convert as usual."""
    if im.mode in SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def _load_or_reason(path: str, size: int, max_pixels: int, use_draft: bool) -> np.ndarray | str:
    try:
        return load_square(path, size, max_pixels=max_pixels, use_draft=use_draft)
    except Rejected as e:
        return str(e)


@functools.lru_cache(maxsize=4)
def _cached_split(listing_dir: str, split: str) -> SplitListing:
    # every shard task of a process needs the same table: read the TSV once per process
    return read_split(listing_dir, split)


def _windows(n: int, width: int) -> Iterator[range]:
    for start in range(0, n, width):
        yield range(start, min(start + width, n))


@dataclass(frozen=True)
class ResizeStage(ShardedStage):
    """Stage 2 on a finished listing: every listed image as an S x S square in ``<split>.h5``."""

    name = "resize"
    version = 2  # bump when the stored pixels or layout change (2: EXIF orientation, 16-bit scaled)
    listing: str = upstream()
    config: ResizeConfig = ResizeConfig()
    cores: int | None = runtime()

    @functools.cached_property
    def _listing_manifest(self) -> dict[str, Any]:
        return open_stage(self.listing).manifest()

    def split_rows(self) -> dict[str, int]:
        return {split: len(_cached_split(self.listing, split).paths) for split in listed_splits(self.listing)}

    def shard_images(self) -> int:
        return self.config.shard_images

    def build_shard(self, shard: Shard, *, workers: int | None = None) -> dict[str, Any]:
        """Resize one shard into its own HDF5 file; skipped when that file exists and verifies (resume)."""
        out, config = Path(shard.path), self.config
        if reusable_shard(out):  # renamed only when complete; its checksum catches data lost to a power cut
            return {"shard": shard.index, "split": shard.split, "path": str(out), "resumed": True,
                    **read_shard_summary(out)}
        listing = _cached_split(self.listing, shard.split)
        rows = range(shard.start, shard.stop)
        root = Path(self._listing_manifest["root"])
        # Our max_pixels check runs on the header before decoding; align Pillow's own check with it
        # and silence its warning, which would fire for images we reject anyway.
        Image.MAX_IMAGE_PIXELS = config.max_pixels
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        start = time.perf_counter()
        load = functools.partial(_load_or_reason, size=config.size, max_pixels=config.max_pixels,
                                 use_draft=config.use_draft)
        with worker_map(workers) as pmap, ShardWriter(
            out, size=config.size, chunk_images=config.chunk_images, compression=config.compression,
            attrs={"split": shard.split, "shard": shard.index, "start": shard.start, "stop": shard.stop},
        ) as writer:
            # windows bound memory: at most 8 chunks of decoded images wait for the writer
            for window in _windows(len(rows), config.chunk_images * 8):
                idx = [rows[i] for i in window]
                for r, result in zip(idx, pmap(load, [str(root / listing.paths[r]) for r in idx])):
                    if isinstance(result, str):
                        writer.reject(r, listing.paths[r], result)
                    else:
                        writer.add(result, int(listing.labels[r]), r, listing.paths[r])
            written, rejected = writer.counts
        if written + rejected != len(rows):
            raise RuntimeError(f"shard {out}: {len(rows)} inputs but {written} written + {rejected} rejected")
        elapsed = time.perf_counter() - start
        log.info("resize %s shard %d: %d written, %d rejected, %.0f img/s", shard.split, shard.index,
                 written, rejected, len(rows) / max(elapsed, 1e-9))
        return {"shard": shard.index, "split": shard.split, "path": str(out), "resumed": False,
                "written": written, "rejected": rejected, "elapsed_s": round(elapsed, 3),
                "worker": f"{socket.gethostname()}:{os.getpid()}"}

    @functools.cached_property
    def _attrs(self) -> dict[str, Any]:
        backend = imaging_backend()
        return {
            "size": self.config.size, "listing_key": open_stage(self.listing).key, "listing_dir": str(self.listing),
            "dataset_root": self._listing_manifest["root"], "imaging_backend": backend["backend"],
            "pil_version": backend["pil_version"], "libjpeg_turbo": backend["libjpeg_turbo"],
            "use_draft": self.config.use_draft, "resize_version": self.version,
        }

    def store_attrs(self, split: str) -> dict[str, Any]:
        return {**self._attrs, "split": split}

    def check_store(self, split: str, store: Path, counts: dict[str, int]) -> dict[str, Any]:
        inputs = len(_cached_split(self.listing, split).paths)
        if counts["written"] + counts["rejected"] != inputs:
            raise RuntimeError(f"{split}: {inputs} inputs but {counts['written']} written + "
                               f"{counts['rejected']} rejected")
        return {"inputs": inputs, **counts}

    def finish(self, out: Path, counts: dict[str, Any]) -> dict[str, Any]:
        rejects = [(split, *r) for split in counts for r in read_store_rejects(out / f"{split}.h5")]
        write_rejects(out, rejects)
        log.info("resize: %s -> %s", counts, out)
        return {**super().finish(out, counts), "rejects": len(rejects),
                **{k: v for k, v in self._attrs.items() if k != "size"}}

    def summarize(self, stage: StageDir, report: Reporter) -> None:
        m = stage.manifest()
        report.table("resize-counts", [{"split": s, **c} for s, c in m["counts"].items()],
                     f"S={self.config.size}, backend {m['imaging_backend']} {m['pil_version']}: `{stage.path}`")
        rejects = read_rejects(stage.path)
        if rejects:
            report.table("resize-rejects", rejects[:1000],
                         f"{len(rejects)} rejected inputs (first 1000); all in `rejects.tsv`")
