"""Where a finished stage keeps the files other stages read, found from its manifest.

One place knows the layout of stage directories: the image stores of a resize or crappify stage,
the classes their labels index, the original store a crappified one is aligned with, and the
resize stage's rejects table.
"""

from __future__ import annotations

from pathlib import Path

from storage.atomic import atomic_write_text
from storage.hdf5 import open_store
from storage.listing import read_classes
from storage.stage import open_stage

REJECTS_FILE = "rejects.tsv"
REJECTS_HEADER = ("split", "index", "path", "reason")


def image_stores(stage_dir: str | Path) -> dict[str, Path]:
    """``{split: store}`` of a finished resize or crappify stage, train first."""
    stores = open_stage(stage_dir).manifest()["stores"]
    return {split: Path(stage_dir) / stores[split] for split in sorted(stores, key=lambda s: s != "train")}


def store_rows(stage_dir: str | Path) -> dict[str, int]:
    """``{split: images}`` of a finished resize or crappify stage's stores."""
    rows = {}
    for split, store in image_stores(stage_dir).items():
        with open_store(store) as f:
            rows[split] = f["images"].shape[0]
    return rows


def store_classes(resize_dir: str | Path) -> list[str]:
    """The wnids the labels of a resize stage's stores index (listing order)."""
    return read_classes(open_stage(resize_dir).manifest()["listing_dir"])


def source_store(low_store: str | Path) -> Path:
    """The original store a crappified store is aligned with (row for row)."""
    with open_store(low_store) as f:
        source = f.attrs.get("source_store")
    if source is None:
        raise ValueError(f"{low_store} is not a crappified store (no source_store attribute); "
                         "pass fast/crappify/<key>/<split>.h5")
    return Path(source)


def crappified_pair(crappify_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(low, high): a crappify stage's store of ``split`` and the original it is aligned with."""
    stores = image_stores(crappify_dir)
    if split not in stores:
        raise FileNotFoundError(f"crappify stage {crappify_dir} has no {split!r} store; it has {sorted(stores)}")
    return stores[split], source_store(stores[split])


def write_rejects(stage_dir: Path, rows: list[tuple]) -> None:
    """``rejects.tsv``: one (split, listing row, path, reason) per rejected input."""
    atomic_write_text(stage_dir / REJECTS_FILE, "\t".join(REJECTS_HEADER) + "\n"
                      + "".join("\t".join(map(str, r)) + "\n" for r in rows))


def read_rejects(stage_dir: str | Path) -> list[dict[str, str]]:
    """The rejects table of a finished resize stage: split, index, path, reason."""
    lines = (Path(stage_dir) / REJECTS_FILE).read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]
