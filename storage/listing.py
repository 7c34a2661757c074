"""The listing's files: ``classes.txt`` (one wnid a line, line number = label) and
``<split>.tsv`` (path, wnid, label), in the shuffled order later stages read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from storage.atomic import atomic_write_text

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
    empty: dict[str, list[str]] = field(default_factory=dict)  # split -> class folders without an image file
    left_out: list[list[str]] = field(default_factory=list)  # [relative path, why] of every entry not listed
    unsafe: list[str] = field(default_factory=list)  # entries skipped: names a TSV cannot hold (their repr)


def write_listing(listing: Listing, out_dir: Path) -> None:
    """``classes.txt`` and one ``<split>.tsv`` per split, each written atomically."""
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


def listed_splits(listing_dir: Path | str) -> list[str]:
    """The splits a written listing has, train first."""
    return [s for s in ("train", "val") if (Path(listing_dir) / f"{s}.tsv").is_file()]


def read_classes(listing_dir: Path | str) -> list[str]:
    return (Path(listing_dir) / "classes.txt").read_text().split()
