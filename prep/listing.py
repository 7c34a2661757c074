"""Stage 1: list an ImageNet-layout folder and shuffle it once, with a recorded seed.

Later stages read contiguous chunks of the shuffled list, so every chunk is a random mix of
classes and training can read sequentially (fast on any disk) and still see shuffled data
(lesson 9, 2017). Class index = position of the wnid in the sorted list of class folders.

Listing 1.28M files on a spinning disk is slow, so it is streamed with ``os.scandir`` (file
type from the directory entry, no stat per file) and cached: the key is the root path plus the
mtimes of the split and class folders, which change whenever a file is added, removed or renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from storage.listing import Listing, SplitListing, write_listing
from storage.report import Reporter
from storage.stage import StageDir, StageSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def check_source(root: Path | str) -> Path:
    """The dataset root, resolved, if it is a folder with a ``train/`` folder; else one clear error."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"source {str(root)!r} does not exist; expected an ImageNet-layout folder "
                                f"{root}/train/<wnid>/*.JPEG")
    if not root.is_dir():
        raise NotADirectoryError(f"source {str(root)!r} is not a folder; expected an ImageNet-layout folder "
                                 f"{root}/train/<wnid>/*.JPEG")
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"source {str(root)!r} has no train/ folder; expected the ImageNet layout "
                                f"{root}/train/<wnid>/*.JPEG (and optionally val/<wnid>/)")
    return root.resolve()


def _check_root(root: Path, splits: Sequence[str]) -> list[str]:
    check_source(root)
    return [s for s in splits if (root / s).is_dir()]


def _unsafe(name: str) -> bool:
    """A name the listing's TSV cannot hold (a tab or line break), or that is not valid UTF-8."""
    if any(c in name for c in "\t\n\r"):
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by the OS as surrogate escapes
        return True
    return False


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


@dataclass
class _Scan:
    by_class: dict[str, list[str]]  # wnid -> sorted relative paths
    skipped: int = 0  # non-image entries
    empty: list[str] = field(default_factory=list)  # class folders without an image file
    unsafe: list[str] = field(default_factory=list)  # entries whose names a TSV cannot hold (repr)
    left_out: list[list[str]] = field(default_factory=list)  # [relative path, why], each entry not listed


def _why_left_out(entry: os.DirEntry, *, in_class: bool) -> str:
    """Why an entry of a split (``in_class``: of a class folder) is not an image the listing takes."""
    if entry.is_symlink() and not os.path.exists(entry.path):
        return "a dangling symlink"
    if entry.is_dir():  # in a class folder (a split's folders are its classes)
        return "a sub-folder: images nested below <split>/<wnid>/ are not listed"
    if not in_class:
        return "a file where a class folder is expected (<split>/<wnid>/)"
    if not entry.is_file():
        return "not a regular file"
    return f"not an image file name (suffix {os.path.splitext(entry.name)[1] or 'none'!r}; accepted: " \
           f"{', '.join(sorted(IMAGE_SUFFIXES))})"


MAX_NAMED = 1000  # left-out entries named in the manifest (all are counted)


def _scan_split(split_dir: Path, split: str) -> _Scan:
    """Every image file of one split, by class folder, and what was left out and why."""
    scan = _Scan(by_class={})
    with os.scandir(split_dir) as it:
        class_dirs = []
        for entry in it:
            if entry.is_dir() and _unsafe(entry.name):
                scan.unsafe.append(repr(f"{split}/{entry.name}/"))
            elif entry.is_dir():
                class_dirs.append(entry.name)
            else:
                scan.skipped += 1
                scan.left_out.append([f"{split}/{entry.name}", _why_left_out(entry, in_class=False)])
    class_dirs.sort()
    start = time.perf_counter()
    n_files = 0
    for i, wnid in enumerate(class_dirs, 1):
        names = []
        with os.scandir(split_dir / wnid) as it:
            for entry in it:
                # is_file() answers from the directory entry's d_type: no stat on Linux filesystems
                if not (entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES):
                    scan.skipped += 1
                    scan.left_out.append([f"{split}/{wnid}/{entry.name}", _why_left_out(entry, in_class=True)])
                elif _unsafe(entry.name):
                    scan.unsafe.append(repr(f"{split}/{wnid}/{entry.name}"))
                else:
                    names.append(entry.name)
        names.sort()  # scandir order depends on the filesystem; sorting makes the listing reproducible
        if not names:
            scan.empty.append(wnid)
        scan.by_class[wnid] = [f"{split}/{wnid}/{n}" for n in names]
        n_files += len(names)
        if i % 100 == 0 or i == len(class_dirs):
            log.info("listing %s: %d/%d class folders, %d files, %.1f s",
                     split, i, len(class_dirs), n_files, time.perf_counter() - start)
    if scan.empty:
        log.warning("listing %s: %d class folders hold no image file: %s", split, len(scan.empty),
                    ", ".join(scan.empty[:10]))
    if scan.unsafe:
        log.warning("listing %s: skipped %d entries whose names hold a tab, a line break or bytes that are not "
                    "UTF-8, e.g. %s", split, len(scan.unsafe), scan.unsafe[0])
    return scan


def list_dataset(root: Path | str, splits: Sequence[str] = SPLITS) -> Listing:
    """List ``root/<split>/<wnid>/*`` image files in sorted order; label = index of the sorted wnid."""
    root = Path(root).resolve()
    scans = {split: _scan_split(root / split, split) for split in _check_root(root, splits)}
    scanned = {split: scan.by_class for split, scan in scans.items()}
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
    return Listing(root=root, classes=classes, splits=splits_out, skipped=sum(s.skipped for s in scans.values()),
                   empty={split: s.empty for split, s in scans.items() if s.empty},
                   unsafe=[name for s in scans.values() for name in s.unsafe],
                   left_out=sorted(item for s in scans.values() for item in s.left_out))


def shuffle_listing(listing: Listing, seed: int) -> Listing:
    """The same listing with each split in a random order drawn from ``seed`` (split-specific stream)."""
    shuffled = {}
    for split, s in listing.splits.items():
        # the split's name in the seed: train and val get independent streams
        order = np.random.default_rng([seed, *split.encode()]).permutation(len(s.paths))
        shuffled[split] = SplitListing(paths=[s.paths[i] for i in order], labels=s.labels[order])
    return dataclasses.replace(listing, splits=shuffled)


@dataclass(frozen=True)
class ListingStage(StageSpec):
    """Stage 1: the dataset at ``root`` (in the state ``fingerprint`` names), listed and shuffled with ``seed``."""

    name = "listing"
    # bump when the listing's content or format changes (2: unsafe names skipped, empty folders
    # reported). The manifest's "left_out" (each entry not listed, and why) changes no listed file.
    version = 2
    root: str
    fingerprint: str
    seed: int = 0
    retries = 1  # a listing of a network or USB disk can fail once and work again

    def key_params(self) -> dict[str, Any]:
        return {**super().key_params(), "root": str(Path(self.root).resolve())}

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        start = time.perf_counter()
        listing = list_dataset(self.root)
        list_s = time.perf_counter() - start
        listing = shuffle_listing(listing, self.seed)
        write_listing(listing, out)
        elapsed = time.perf_counter() - start
        counts = {split: len(s.paths) for split, s in listing.splits.items()}
        per_class = {
            split: np.bincount(s.labels, minlength=len(listing.classes)).tolist() for split, s in listing.splits.items()
        }
        log.info("listing: %s files in %d classes, skipped %d non-image entries; %.2f s (listing %.2f s)",
                 counts, len(listing.classes), listing.skipped, elapsed, list_s)
        return {"root": str(listing.root), "seed": self.seed, "counts": counts, "classes": len(listing.classes),
                "per_class": per_class, "skipped_non_image": listing.skipped, "empty_class_folders": listing.empty,
                "skipped_unsafe_names": listing.unsafe, "left_out": listing.left_out[:MAX_NAMED],
                "left_out_count": len(listing.left_out), "list_s": round(list_s, 3), "elapsed_s": round(elapsed, 3)}

    def summarize(self, stage: StageDir, report: Reporter) -> None:
        m = stage.manifest()
        report.table(
            "listing",
            [{"split": split, "images": n, "classes": m["classes"]} for split, n in m["counts"].items()]
            + [{"split": "(skipped non-image entries)", "images": m["skipped_non_image"], "classes": ""}]
            + [{"split": f"(empty class folders in {split})", "images": 0, "classes": ", ".join(wnids)}
               for split, wnids in m["empty_class_folders"].items()]
            + [{"split": f"(left out: {why})", "images": 1, "classes": path} for path, why in m.get("left_out", [])[:50]]
            + ([{"split": "(skipped: names with a tab, line break or non-UTF-8 bytes)",
                 "images": len(m["skipped_unsafe_names"]), "classes": ", ".join(m["skipped_unsafe_names"][:20])}]
               if m["skipped_unsafe_names"] else []),
            f"Listing of `{m['root']}` shuffled with seed {m['seed']} in {m['elapsed_s']} s: `{stage.path}`",
        )
