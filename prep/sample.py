"""The bundled sample: a small ImageNet-layout dataset made from real photos that ship in packages.

Each photo gets the real ImageNet wnid that fits it. Random crops, flips, colour jitter and
rescales to ImageNet-like sizes give every class dozens of distinct images. The bad inputs real
ImageNet contains are planted too (CMYK, grayscale, a PNG named .JPEG, a truncated JPEG, a
zero-byte file), so later stages meet them on every run. Deterministic given the seed.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from storage.report import Reporter
from storage.stage import StageSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Photo:
    wnid: str
    words: str
    package: str  # importable package that ships the file, or "darknet" (Debian's darknet data)
    relpath: str  # path inside that package
    note: str = ""
    box: tuple[int, int, int, int] | None = None  # (left, top, right, bottom) of the subject in the photo


DARKNET_ENV = "IMAGESMITH_DARKNET_DIR"


def darknet_dirs() -> list[Path]:
    """Where the photos of Debian's ``darknet`` package may be: the package installed, or its data
    extracted into the virtual environment by scripts/bootstrap.sh (no need for its OpenCV deps)."""
    dirs = [os.environ.get(DARKNET_ENV), "/usr/share/darknet/data", Path(sys.prefix) / "share" / "darknet" / "data"]
    return [Path(d) for d in dirs if d]


SAMPLE_PHOTOS: tuple[Photo, ...] = (
    Photo("n02123045", "tabby, tabby cat", "skimage", "data/chelsea.png"),
    Photo("n07920052", "espresso", "skimage", "data/coffee.png"),
    Photo("n03773504", "missile", "skimage", "data/rocket.jpg", "a rocket on its launch pad"),
    Photo("n03877845", "palace", "sklearn", "datasets/images/china.jpg", "Summer Palace, Beijing"),
    Photo("n11939491", "daisy", "sklearn", "datasets/images/flower.jpg", "a dahlia; daisy is the 1k class nearest"),
    Photo("n03763968", "military uniform", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    Photo(
        "n03790512", "motorcycle, bike", "skimage", "data/motorcycle_left.png",
        "an ImageNet-21k class outside the 1k: a natural zero-shot class",
    ),
    Photo("n01614925", "bald eagle, American eagle", "darknet", "eagle.jpg", "a young bald eagle"),
    Photo("n02391049", "zebra", "darknet", "giraffe.jpg", "the zebra beside the giraffe", (300, 220, 440, 440)),
    Photo("n09428293", "seashore, coast", "darknet", "kite.jpg", "a beach with kite surfers"),
    Photo("n04485082", "tripod", "skimage", "data/camera.png", "the cameraman (grayscale)"),
    Photo("n02439033", "giraffe", "darknet", "giraffe.jpg", "21k only: zero-shot", (150, 10, 450, 330)),
    Photo("n02374451", "horse, Equus caballus", "darknet", "horses.jpg", "21k only (1k has sorrel): zero-shot"),
    Photo("n02084071", "dog, domestic dog", "darknet", "dog.jpg", "21k only (1k has breeds): zero-shot",
          (110, 200, 330, 550)),
    Photo("n02834778", "bicycle", "darknet", "dog.jpg", "21k only (1k has mountain bike): zero-shot",
          (300, 110, 580, 430)),
)

# (kind, what stage 2 must do with it)
BAD_INPUT_KINDS: dict[str, str] = {
    "cmyk": "convert",
    "grayscale": "convert",
    "png_named_jpeg": "convert",
    "truncated": "reject",
    "empty": "reject",
}


def photo_path(photo: Photo) -> Path:
    """Where the package that ships ``photo`` put it (found without importing the package)."""
    if photo.package == "darknet":
        for d in darknet_dirs():
            if (d / photo.relpath).is_file():
                return d / photo.relpath
        raise FileNotFoundError(
            f"sample photo {photo.relpath} ({photo.wnid} {photo.words!r}) of Debian's darknet package not found in "
            f"{[str(d) for d in darknet_dirs()]}; run `make setup` (it extracts the package's photos) or "
            f"set {DARKNET_ENV}")
    spec = importlib.util.find_spec(photo.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {photo.package!r} (source of the sample photo for {photo.wnid} {photo.words!r}) "
            "is not installed; run `make setup`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / photo.relpath
    if not path.is_file():
        raise FileNotFoundError(f"sample photo {path} for {photo.wnid} is missing from package {photo.package!r}")
    return path


def _load_photo(photo: Photo) -> Image.Image:
    with Image.open(photo_path(photo)) as im:
        im = im.convert("RGB")
        return im.crop(photo.box) if photo.box else im


def _short_side(rng: np.random.Generator) -> int:
    # ImageNet-like spread: most photos 250-500 px on the short side, some small, some large
    bucket = rng.choice(3, p=[0.15, 0.65, 0.20])
    low, high = [(120, 250), (250, 501), (501, 900)][bucket]
    return int(rng.integers(low, high))


def augment(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (30-100% of the area, aspect 3/4..4/3), flip, colour jitter, and rescale."""
    w, h = photo.size
    for _ in range(10):
        area = rng.uniform(0.3, 1.0) * w * h
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = photo.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(0.75, 1.25)))
    short = _short_side(rng)
    scale = short / min(cw, ch)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def _jpeg_bytes(img: Image.Image, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    img.save(
        buf,
        format="JPEG",
        quality=int(rng.integers(70, 96)),
        subsampling=int(rng.choice([0, 2], p=[0.2, 0.8])),  # 4:4:4 or 4:2:0
        progressive=bool(rng.random() < 0.2),
    )
    return buf.getvalue()


def _bad_input_bytes(kind: str, img: Image.Image) -> bytes:
    buf = io.BytesIO()
    if kind == "cmyk":
        img.convert("CMYK").save(buf, format="JPEG", quality=90)
    elif kind == "grayscale":
        img.convert("L").save(buf, format="JPEG", quality=90)
    elif kind == "png_named_jpeg":
        img.save(buf, format="PNG")
    elif kind == "truncated":
        img.save(buf, format="JPEG", quality=90)
        return buf.getvalue()[: len(buf.getvalue()) * 2 // 5]
    elif kind == "empty":
        return b""
    else:
        raise ValueError(f"unknown bad-input kind {kind!r}; choose one of {sorted(BAD_INPUT_KINDS)}")
    return buf.getvalue()


def build_sample(
    out: Path,
    *,
    seed: int = 0,
    train_per_class: int = 40,
    val_per_class: int = 10,
    photos: Sequence[Photo] = SAMPLE_PHOTOS,
    plant_bad_inputs: bool = True,
) -> dict[str, Any]:
    """Write ``out/train/<wnid>/*.JPEG`` and ``out/val/<wnid>/*.JPEG``; return a summary.

    File names follow ImageNet's ``<wnid>_<n>.JPEG``. The planted bad files sit in ``train/``
    among good ones and are listed in the summary with what stage 2 must do with each.
    """
    if train_per_class < 1 or val_per_class < 0:
        raise ValueError(
            f"train_per_class must be >= 1 and val_per_class >= 0, got {train_per_class} and {val_per_class}"
        )
    start = time.perf_counter()
    counts = {"train": 0, "val": 0}
    sizes: list[tuple[int, int]] = []
    for class_index, photo in enumerate(photos):
        source = _load_photo(photo)
        for split_index, (split, n) in enumerate((("train", train_per_class), ("val", val_per_class))):
            class_dir = out / split / photo.wnid
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, class_index, split_index, i])
                img = augment(source, rng)
                sizes.append(img.size)
                (class_dir / f"{photo.wnid}_{split_index * 10000 + i + 1}.JPEG").write_bytes(_jpeg_bytes(img, rng))
                counts[split] += 1
        log.info("sample: %s %s done (%d train, %d val)", photo.wnid, photo.words, train_per_class, val_per_class)
    planted = []
    if plant_bad_inputs:
        for k, kind in enumerate(BAD_INPUT_KINDS):
            photo = photos[k % len(photos)]
            rng = np.random.default_rng([seed, 1_000_000, k])
            relpath = f"train/{photo.wnid}/{photo.wnid}_{9000 + k}.JPEG"
            (out / relpath).write_bytes(_bad_input_bytes(kind, augment(_load_photo(photo), rng)))
            planted.append({"path": relpath, "kind": kind, "expect": BAD_INPUT_KINDS[kind]})
    short_sides = [min(s) for s in sizes]
    return {
        "classes": [{"wnid": p.wnid, "words": p.words, "source": f"{p.package}:{p.relpath}", "note": p.note} for p in photos],
        "counts": counts,
        "planted": planted,
        "short_side": {"min": min(short_sides), "median": int(np.median(short_sides)), "max": max(short_sides)},
        "seed": seed,
        "elapsed_s": round(time.perf_counter() - start, 3),
    }


@dataclass(frozen=True)
class SampleStage(StageSpec):
    """Stage 0: the bundled sample on the bulk tier (raw images live on bulk)."""

    name = "sample"
    tier = "bulk"
    version = 2  # bump when the generated bytes change (2: 15 classes, 5 of them outside ImageNet-1k)
    clean = True  # an interrupted build left an unknown subset of files
    seed: int = 0
    train_per_class: int = 40
    val_per_class: int = 10

    def key_params(self) -> dict[str, Any]:
        return {**super().key_params(), "photos": [[p.wnid, p.package, p.relpath, p.box] for p in SAMPLE_PHOTOS]}

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        summary = build_sample(out, seed=self.seed, train_per_class=self.train_per_class,
                               val_per_class=self.val_per_class)
        log.info("sample: %d train + %d val images in %s", summary["counts"]["train"], summary["counts"]["val"], out)
        return summary
