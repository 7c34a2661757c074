"""Stage 4: crappification, the low-quality half of (low, high) training pairs (lesson 7, 2019).

"Anything you don't include in crappify your model won't learn to fix." The default is the
lesson's: shortest side -> 96 (bilinear), q = randint(10, 70), q drawn in white at a random point
of the top-left quarter, JPEG at quality q, decoded back (all in memory). Others by name:
``downscale`` (fixed quality 60, no text: the super-res notebook's), ``grayscale`` (for
colourisation), ``noise``, ``cutout``. Every crappifier is deterministic given (seed, image index).

The output store is aligned with its source: same rows, same order, same labels and paths.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from prep.shards import DEFAULT_SHARD_IMAGES, Shard, ShardedStage, worker_map
from storage.catalog import image_stores, store_rows
from storage.hdf5 import ShardWriter, open_store, reusable_shard
from storage.report import Reporter
from storage.stage import StageDir, runtime, upstream

log = logging.getLogger(__name__)



def _small(image: np.ndarray, size: int) -> Image.Image:
    """Shortest side -> ``size`` (bilinear), center-cropped square (stores hold squares already)."""
    img = Image.fromarray(image)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def _jpeg_round_trip(img: Image.Image, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert("RGB"))


@dataclass(frozen=True)
class JpegText:
    """The lesson's crappifier: downscale, draw the quality number, JPEG at that quality.

    The lesson draws with PIL's default font (10 px) on 96 px images; the font scales with ``size``
    to keep that proportion (at 16 px a 10 px number would cover the picture), never below 4 px.
    """

    size: int = 96
    quality: tuple[int, int] = (10, 70)  # inclusive, like random.randint

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = _small(image, self.size)
        q = int(rng.integers(self.quality[0], self.quality[1] + 1))
        w, h = img.size
        xy = (int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2)))  # top-left quarter
        ImageDraw.Draw(img).text(xy, str(q), fill=(255, 255, 255), font=_font(max(4, round(10 * self.size / 96))))
        return _jpeg_round_trip(img, q)


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


@dataclass(frozen=True)
class Downscale:
    """Downscale and JPEG at one fixed quality (the super-resolution notebook's 60)."""

    size: int = 96
    quality: int = 60

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _jpeg_round_trip(_small(image, self.size), self.quality)


@dataclass(frozen=True)
class Grayscale:
    """Downscale and drop the colour (kept as 3 equal channels): pairs for colourisation."""

    size: int = 96

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(_small(image, self.size).convert("L").convert("RGB"))


@dataclass(frozen=True)
class Noise:
    """Downscale and add Gaussian noise with a random standard deviation (in 0-255 units)."""

    size: int = 96
    sigma: tuple[float, float] = (5.0, 25.0)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(_small(image, self.size), dtype=np.float32)
        x += rng.normal(0.0, rng.uniform(*self.sigma), x.shape).astype(np.float32)
        return np.clip(x, 0, 255).round().astype(np.uint8)


@dataclass(frozen=True)
class Cutout:
    """Downscale and black out 1-4 random boxes of 10-30% of the side."""

    size: int = 96
    boxes: tuple[int, int] = (1, 4)
    box_frac: tuple[float, float] = (0.1, 0.3)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.array(_small(image, self.size))
        for _ in range(int(rng.integers(self.boxes[0], self.boxes[1] + 1))):
            bw, bh = (max(1, int(rng.uniform(*self.box_frac) * self.size)) for _ in range(2))
            x0, y0 = int(rng.integers(0, self.size - bw + 1)), int(rng.integers(0, self.size - bh + 1))
            x[y0:y0 + bh, x0:x0 + bw] = 0
        return x


CRAPPIFIERS = {"jpeg_text": JpegText, "downscale": Downscale, "grayscale": Grayscale, "noise": Noise,
               "cutout": Cutout}


def make_crappifier(name: str, size: int = 96):
    if name not in CRAPPIFIERS:
        raise ValueError(f"unknown crappifier {name!r}; choose one of {sorted(CRAPPIFIERS)}")
    if not 8 <= size <= 1024:
        raise ValueError(f"crappified size must be between 8 and 1024 pixels, got {size}")
    return CRAPPIFIERS[name](size=size)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of one image: depends only on (seed, its row in the listing)."""
    return np.random.default_rng([seed, index])


@dataclass(frozen=True)
class CrappifyConfig:
    crappifier: str = "jpeg_text"
    size: int = 96
    seed: int = 0
    shard_images: int = DEFAULT_SHARD_IMAGES

    def __post_init__(self) -> None:
        make_crappifier(self.crappifier, self.size)  # validates name and size
        if self.shard_images < 1:
            raise ValueError(f"shard_images must be >= 1, got {self.shard_images}")


@dataclass(frozen=True)
class CrappifyStage(ShardedStage):
    """Stage 4 on a finished resize stage: a crappified store per split, aligned with its source."""

    name = "crappify"
    version = 2  # 2: jpeg_text's number scales with the image (10 px at 96 px, as the lesson)
    source: str = upstream()  # the resize stage
    config: CrappifyConfig = CrappifyConfig()
    cores: int | None = runtime()

    def split_rows(self) -> dict[str, int]:
        return store_rows(self.source)

    def shard_images(self) -> int:
        return self.config.shard_images

    def build_shard(self, shard: Shard, *, workers: int | None = None) -> dict[str, Any]:
        """Crappify rows [start, stop) of the source store into one shard file; skipped when it exists and verifies."""
        out, config = Path(shard.path), self.config
        if reusable_shard(out):
            return {"shard": shard.index, "split": shard.split, "resumed": True}
        crappify = make_crappifier(config.crappifier, config.size)
        source = image_stores(self.source)[shard.split]

        def one(item: tuple[np.ndarray, int]) -> np.ndarray:
            # the stream is keyed by the image's listing row: the same image gets the same crap
            image, row = item
            return crappify(image, image_rng(config.seed, row))

        start = time.perf_counter()
        with open_store(source) as src, worker_map(workers) as pmap, \
                ShardWriter(out, size=config.size, attrs={"split": shard.split}) as writer:
            images, labels, index = src["images"], src["labels"], src["index"]
            paths = src["paths"].asstr()
            block = 256
            for a in range(shard.start, shard.stop, block):
                b = min(a + block, shard.stop)
                xs, ys, rows, ps = images[a:b], labels[a:b], index[a:b], paths[a:b]
                for low, y, row, p in zip(pmap(one, zip(xs, rows.tolist())), ys, rows, ps):
                    writer.add(low, int(y), int(row), p)
            written, _ = writer.counts
        if written != shard.stop - shard.start:
            raise RuntimeError(f"shard {out}: {shard.stop - shard.start} inputs but {written} written")
        log.info("crappify %s shard %d: %d images, %.0f img/s", shard.split, shard.index, written,
                 written / max(time.perf_counter() - start, 1e-9))
        return {"shard": shard.index, "split": shard.split, "resumed": False, "written": written,
                "worker": f"{socket.gethostname()}:{os.getpid()}"}

    def store_attrs(self, split: str) -> dict[str, Any]:
        return {"crappifier": self.config.crappifier, "size": self.config.size, "seed": self.config.seed,
                "source_store": str(image_stores(self.source)[split])}

    def check_store(self, split: str, store: Path, counts: dict[str, int]) -> dict[str, Any]:
        with open_store(store) as low, open_store(image_stores(self.source)[split]) as high:
            if not np.array_equal(low["index"][()], high["index"][()]):
                raise RuntimeError(f"{store} is not aligned with {image_stores(self.source)[split]}")
        return counts["written"]

    def finish(self, out: Path, counts: dict[str, Any]) -> dict[str, Any]:
        log.info("crappify: %s -> %s", counts, out)
        return {**super().finish(out, counts), "crappifier": self.config.crappifier, "size": self.config.size,
                "seed": self.config.seed}

    def summarize(self, stage: StageDir, report: Reporter) -> None:
        report.table("crappify-counts", [{"split": s, "pairs": n} for s, n in stage.manifest()["counts"].items()],
                     f"`{self.config.crappifier}` at {self.config.size} px, seed {self.config.seed}: `{stage.path}`")
