"""Stage 4: crappification, the low-quality half of (low, high) training pairs (lesson 7, 2019).

"Anything you don't include in crappify your model won't learn to fix." The default is the
lesson's: shortest side -> 96 (bilinear), q = randint(10, 70), q drawn in white at a random point
of the top-left quarter, JPEG at quality q, decoded back (all in memory). Others by name:
``downscale`` (fixed quality 60, no text: the super-res notebook's), ``grayscale`` (for
colourisation), ``noise``, ``cutout``. Every crappifier is deterministic given (seed, image index).

The output store is aligned with its source: same rows, same order, same labels and paths.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from storage.hdf5 import ShardWriter, join_shards, open_store, reusable_shard
from storage.stage import StageDir, open_stage, stage_dir
from storage.tiers import Tiers
from tasks.shards import map_shards, shards_by_split

log = logging.getLogger(__name__)

CRAPPIFY_VERSION = 1
DEFAULT_SHARD_IMAGES = 5000


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
    """The lesson's crappifier: downscale, draw the quality number, JPEG at that quality."""

    size: int = 96
    quality: tuple[int, int] = (10, 70)  # inclusive, like random.randint

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = _small(image, self.size)
        q = int(rng.integers(self.quality[0], self.quality[1] + 1))
        w, h = img.size
        xy = (int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2)))  # top-left quarter
        ImageDraw.Draw(img).text(xy, str(q), fill=(255, 255, 255))
        return _jpeg_round_trip(img, q)


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
class CrappifyShard:
    split: str
    shard: int
    start: int
    stop: int
    source: str  # the high-res store
    out_path: str


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


def crappify_shard(spec: CrappifyShard, config: CrappifyConfig, *, workers: int | None = None) -> dict[str, Any]:
    """Crappify rows [start, stop) of the source store into one shard file; skipped when it exists and verifies."""
    out = Path(spec.out_path)
    if reusable_shard(out):
        return {"shard": spec.shard, "split": spec.split, "resumed": True}
    crappify = make_crappifier(config.crappifier, config.size)
    start = time.perf_counter()
    with open_store(spec.source) as src, ShardWriter(out, size=config.size, attrs={"split": spec.split}) as writer:
        images, labels, index = src["images"], src["labels"], src["index"]
        paths = src["paths"].asstr()
        block = 256
        for a in range(spec.start, spec.stop, block):
            b = min(a + block, spec.stop)
            xs, ys, rows, ps = images[a:b], labels[a:b], index[a:b], paths[a:b]
            for x, y, row, p in zip(xs, ys, rows, ps):
                # the stream is keyed by the image's listing row: the same image gets the same crap
                writer.add(crappify(x, image_rng(config.seed, int(row))), int(y), int(row), p)
        written, _ = writer.counts
    if written != spec.stop - spec.start:
        raise RuntimeError(f"shard {out}: {spec.stop - spec.start} inputs but {written} written")
    log.info("crappify %s shard %d: %d images, %.0f img/s", spec.split, spec.shard, written,
             written / max(time.perf_counter() - start, 1e-9))
    return {"shard": spec.shard, "split": spec.split, "resumed": False, "written": written,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


def crappify_stage(tiers: Tiers, *, resize_dir: Path | str, config: CrappifyConfig) -> StageDir:
    source = open_stage(resize_dir)
    return stage_dir(tiers, "fast", "crappify",
                     {"version": CRAPPIFY_VERSION, "source": source.key, **asdict(config)})


def plan_crappify(resize_dir: Path | str, stage_path: Path, shard_images: int) -> list[CrappifyShard]:
    specs = []
    for store in sorted(Path(resize_dir).glob("*.h5")):
        split = store.stem
        with open_store(store) as f:
            n = f["images"].shape[0]
        specs += [CrappifyShard(split, i, a, min(a + shard_images, n), str(store),
                                str(stage_path / "shards" / f"{split}-{i:05d}.h5"))
                  for i, a in enumerate(range(0, n, shard_images))]
    return specs


def join_crappified(stage: StageDir, specs: Sequence[CrappifyShard], config: CrappifyConfig) -> StageDir:
    """Join each split's shards into ``<split>.h5``; check it is aligned with its source; finish."""
    if stage.is_complete:
        return stage
    counts = {}
    for split, mine in shards_by_split(specs).items():
        out = stage.path / f"{split}.h5"
        join_shards([Path(s.out_path) for s in mine], out,
                    attrs={"crappifier": config.crappifier, "size": config.size, "seed": config.seed,
                           "source_store": mine[0].source})
        with open_store(out) as low, open_store(mine[0].source) as high:
            if not np.array_equal(low["index"][()], high["index"][()]):
                raise RuntimeError(f"{out} is not aligned with {mine[0].source}")
            counts[split] = int(low["images"].shape[0])
    stage.complete(counts=counts, crappifier=config.crappifier, size=config.size, seed=config.seed)
    log.info("crappify: %s -> %s", counts, stage.path)
    return stage


def run_crappify(stage: StageDir, *, resize_dir: Path | str, config: CrappifyConfig,
                 cores: int | None = None) -> StageDir:
    """The whole stage without Prefect: plan, every shard on all cores, join. Resumes by shard."""
    if stage.is_complete:
        return stage
    stage.prepare()
    specs = plan_crappify(resize_dir, stage.path, config.shard_images)
    map_shards(crappify_shard, specs, cores=cores, config=config)
    return join_crappified(stage, specs, config)


# --- Prefect layer --------------------------------------------------------------------------
from prefect import task  # noqa: E402  (the plain functions above do not need Prefect)
from prefect.artifacts import create_table_artifact  # noqa: E402


@task(name="plan-crappify")
def plan_crappify_task(resize_dir: str, config: CrappifyConfig, tiers: Tiers) -> list[CrappifyShard]:
    stage = crappify_stage(tiers, resize_dir=resize_dir, config=config)
    if not stage.is_complete:
        stage.prepare()
    return plan_crappify(resize_dir, stage.path, config.shard_images)


@task(name="crappify-shard", retries=2, retry_delay_seconds=5)
def crappify_shard_task(spec: CrappifyShard, config: CrappifyConfig, workers: int | None = None) -> dict[str, Any]:
    return crappify_shard(spec, config, workers=workers)


@task(name="join-crappify")
def join_crappify(resize_dir: str, config: CrappifyConfig, tiers: Tiers, specs: list[CrappifyShard],
                  shard_results: list[dict[str, Any]]) -> str:
    stage = join_crappified(crappify_stage(tiers, resize_dir=resize_dir, config=config), specs, config)
    m = stage.manifest()
    create_table_artifact(key="crappify-counts", table=[{"split": s, "pairs": n} for s, n in m["counts"].items()],
                          description=f"`{config.crappifier}` at {config.size} px, seed {config.seed}: `{stage.path}`")
    return str(stage.path)
