"""Stage 1: list an ImageNet-layout folder and shuffle it once, with a recorded seed.

Later stages read contiguous chunks of the shuffled list, so every chunk is a random mix of
classes and training can read sequentially (fast on any disk) and still see shuffled data
(lesson 9, 2017). Class index = position of the wnid in the sorted list of class folders.

Listing 1.28M files on a spinning disk is slow, so it is streamed with ``os.scandir`` (file
type from the directory entry, no stat per file) and cached: the key is the root path plus the
mtimes of the split and class folders, which change whenever a file is added, removed or renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.atomic import atomic_write_text
from storage.stage import StageDir, stage_dir
from storage.tiers import Tiers

log = logging.getLogger(__name__)

LISTING_VERSION = 1  # bump when the listing's content or format changes
SPLITS = ("train", "val")
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
TSV_HEADER = "path\twnid\tlabel"


@dataclass(frozen=True)
class SplitListing:
    paths: list[str]  # relative to the dataset root: "<split>/<wnid>/<file>"
    labels: np.ndarray  # (N,) int16, index into Listing.classes


@dataclass(frozen=True)
class Listing:
    root: Path
    classes: list[str]  # sorted wnids
    splits: dict[str, SplitListing]
    skipped: int  # entries that are not image files (other suffixes, stray files, links to dirs)


def _check_root(root: Path, splits: Sequence[str]) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory; expected {root}/train/<wnid>/*.JPEG")
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        raise FileNotFoundError(
            f"no {' or '.join(repr(s) for s in splits)} folder under {root}; "
            f"expected the ImageNet layout {root}/train/<wnid>/*.JPEG"
        )
    return present


def fingerprint_dataset(root: Path | str, splits: Sequence[str] = SPLITS) -> str:
    """Hash of the resolved root and the mtimes of its split and class folders (one stat per folder)."""
    root = Path(root).resolve()
    entries: list[list] = []
    for split in _check_root(root, splits):
        split_dir = root / split
        entries.append([split, split_dir.stat().st_mtime_ns])
        with os.scandir(split_dir) as it:
            dirs = sorted((e for e in it if e.is_dir()), key=lambda e: e.name)
        entries.extend([split, e.name, e.stat().st_mtime_ns] for e in dirs)
    blob = json.dumps([str(root), entries], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _scan_split(split_dir: Path, split: str) -> tuple[dict[str, list[str]], int]:
    """``{wnid: sorted relative paths}`` for one split, and the number of skipped entries."""
    by_class: dict[str, list[str]] = {}
    skipped = 0
    with os.scandir(split_dir) as it:
        class_dirs = []
        for entry in it:
            if entry.is_dir():
                class_dirs.append(entry.name)
            else:
                skipped += 1
    class_dirs.sort()
    start = time.perf_counter()
    n_files = 0
    for i, wnid in enumerate(class_dirs, 1):
        names = []
        with os.scandir(split_dir / wnid) as it:
            for entry in it:
                # is_file() answers from the directory entry's d_type: no stat on Linux filesystems
                if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                    names.append(entry.name)
                else:
                    skipped += 1
        names.sort()  # scandir order depends on the filesystem; sorting makes the listing reproducible
        by_class[wnid] = [f"{split}/{wnid}/{n}" for n in names]
        n_files += len(names)
        if i % 100 == 0 or i == len(class_dirs):
            log.info("listing %s: %d/%d class folders, %d files, %.1f s",
                     split, i, len(class_dirs), n_files, time.perf_counter() - start)
    return by_class, skipped


def list_dataset(root: Path | str, splits: Sequence[str] = SPLITS) -> Listing:
    """List ``root/<split>/<wnid>/*`` image files in sorted order; label = index of the sorted wnid."""
    root = Path(root).resolve()
    scanned: dict[str, dict[str, list[str]]] = {}
    skipped = 0
    for split in _check_root(root, splits):
        scanned[split], n_skipped = _scan_split(root / split, split)
        skipped += n_skipped
    classes = sorted({wnid for by_class in scanned.values() for wnid, paths in by_class.items() if paths})
    if not classes:
        raise FileNotFoundError(f"no image files under {root}/{{{','.join(scanned)}}}/<wnid>/ "
                                f"(accepted suffixes: {sorted(IMAGE_SUFFIXES)})")
    if len(classes) > np.iinfo(np.int16).max:
        raise ValueError(f"{len(classes)} classes do not fit the int16 labels (max {np.iinfo(np.int16).max})")
    index = {wnid: i for i, wnid in enumerate(classes)}
    splits_out = {}
    for split, by_class in scanned.items():
        paths = [p for wnid in sorted(by_class) for p in by_class[wnid]]
        labels = np.fromiter((index[p.split("/", 2)[1]] for p in paths), dtype=np.int16, count=len(paths))
        splits_out[split] = SplitListing(paths=paths, labels=labels)
    return Listing(root=root, classes=classes, splits=splits_out, skipped=skipped)


def shuffle_listing(listing: Listing, seed: int) -> Listing:
    """The same listing with each split in a random order drawn from ``seed`` (split-specific stream)."""
    shuffled = {}
    for split, s in listing.splits.items():
        # the split's name in the seed: train and val get independent streams
        order = np.random.default_rng([seed, *split.encode()]).permutation(len(s.paths))
        shuffled[split] = SplitListing(paths=[s.paths[i] for i in order], labels=s.labels[order])
    return Listing(root=listing.root, classes=listing.classes, splits=shuffled, skipped=listing.skipped)


def write_listing(listing: Listing, out_dir: Path) -> None:
    """``classes.txt`` (one wnid a line, line number = label) and ``<split>.tsv`` (path, wnid, label)."""
    atomic_write_text(out_dir / "classes.txt", "".join(f"{c}\n" for c in listing.classes))
    for split, s in listing.splits.items():
        rows = (f"{p}\t{listing.classes[label]}\t{label}" for p, label in zip(s.paths, s.labels.tolist()))
        atomic_write_text(out_dir / f"{split}.tsv", TSV_HEADER + "\n" + "".join(f"{r}\n" for r in rows))


def read_split(listing_dir: Path | str, split: str) -> SplitListing:
    """Read back one split of a written listing, in its shuffled order."""
    path = Path(listing_dir) / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"listing has no split {split!r}: {path} is missing")
    lines = path.read_text().splitlines()
    if not lines or lines[0] != TSV_HEADER:
        raise ValueError(f"{path} does not start with the header {TSV_HEADER!r}")
    paths, labels = [], []
    for line in lines[1:]:
        p, _, label = line.split("\t")
        paths.append(p)
        labels.append(int(label))
    return SplitListing(paths=paths, labels=np.asarray(labels, dtype=np.int16))


def read_classes(listing_dir: Path | str) -> list[str]:
    return (Path(listing_dir) / "classes.txt").read_text().split()


def listing_stage(tiers: Tiers, *, root: Path | str, fingerprint: str, seed: int) -> StageDir:
    """The fast-tier stage directory for this dataset state and seed."""
    params = {"version": LISTING_VERSION, "root": str(Path(root).resolve()), "fingerprint": fingerprint, "seed": seed}
    return stage_dir(tiers, "fast", "listing", params)


def run_listing(stage: StageDir, *, root: Path | str, seed: int) -> StageDir:
    """List, shuffle and write into ``stage`` unless its manifest says it is done."""
    if stage.is_complete:
        log.info("listing: %s is complete; nothing to do", stage.path)
        return stage
    stage.prepare()
    start = time.perf_counter()
    listing = list_dataset(root)
    list_s = time.perf_counter() - start
    listing = shuffle_listing(listing, seed)
    write_listing(listing, stage.path)
    elapsed = time.perf_counter() - start
    counts = {split: len(s.paths) for split, s in listing.splits.items()}
    per_class = {
        split: np.bincount(s.labels, minlength=len(listing.classes)).tolist() for split, s in listing.splits.items()
    }
    stage.complete(
        root=str(listing.root),
        seed=seed,
        counts=counts,
        classes=len(listing.classes),
        per_class=per_class,
        skipped_non_image=listing.skipped,
        list_s=round(list_s, 3),
        elapsed_s=round(elapsed, 3),
    )
    log.info("listing: %s files in %d classes, skipped %d non-image entries; %.2f s (listing %.2f s)",
             counts, len(listing.classes), listing.skipped, elapsed, list_s)
    return stage


# --- Prefect layer --------------------------------------------------------------------------
from prefect import task  # noqa: E402  (the plain functions above do not need Prefect)
from prefect.artifacts import create_table_artifact  # noqa: E402


@task(name="fingerprint-dataset")
def fingerprint_dataset_task(root: str) -> str:
    """Uncached on purpose: it is what tells a changed folder from an unchanged one."""
    return fingerprint_dataset(root)


@task(name="list-and-shuffle", retries=1, retry_delay_seconds=5)
def list_and_shuffle(root: str, fingerprint: str, seed: int, tiers: Tiers) -> str:
    """Stage 1; returns the listing directory (``classes.txt``, ``train.tsv``, ``val.tsv``)."""
    stage = run_listing(listing_stage(tiers, root=root, fingerprint=fingerprint, seed=seed), root=root, seed=seed)
    m = stage.manifest()
    create_table_artifact(
        key="listing",
        table=[{"split": split, "images": n, "classes": m["classes"]} for split, n in m["counts"].items()]
        + [{"split": "(skipped non-image entries)", "images": m["skipped_non_image"], "classes": ""}],
        description=f"Listing of `{m['root']}` shuffled with seed {m['seed']} in {m['elapsed_s']} s: `{stage.path}`",
    )
    return str(stage.path)
