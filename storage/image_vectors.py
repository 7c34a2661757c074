"""``embeddings.h5``: a model's unit vector for every image of a store, per split, in store row order
(the DeViSE stages write it; evaluation and the search index read it)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from storage.atomic import atomic_path
from storage.vector_index import unit_rows

EMBEDDINGS_FILE = "embeddings.h5"


def write_embeddings(out: Path, by_split: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Per split, ``vectors (N, d)`` unit float32 and ``labels (N,)``, store row order; atomic."""
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        for split, (vectors, labels) in by_split.items():
            f.create_dataset(f"{split}/vectors", data=unit_rows(vectors))
            f.create_dataset(f"{split}/labels", data=labels.astype(np.int16))


def read_embeddings(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with h5py.File(path, "r") as f:
        return {split: (f[split]["vectors"][:], f[split]["labels"][:].astype(np.int64)) for split in f}
