"""DeViSE search: every image's vector in an index; text -> images, image -> words and images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data import to_float_nchw
from models.devise import Devise
from storage.atomic import atomic_write_text
from storage.catalog import image_stores, store_classes
from storage.hdf5 import open_store
from storage.image_vectors import read_embeddings
from storage.report import Reporter
from storage.stage import StageSpec, open_stage, upstream
from storage.vector_index import DEFAULT_ANN_ABOVE, VectorIndex, build_index, unit_rows
from storage.words import WordTable
from training.devise.export import load_devise

IMAGES_FILE = "images.tsv"


@dataclass(frozen=True)
class IndexStage(StageSpec):
    """Index every image's embedding (all splits) of a DeViSE model stage; ``images.tsv`` says which
    image each row is. Brute force up to ``ann_above`` images, an HNSW graph above."""

    name = "devise-index"
    version = 1
    model: str = upstream()  # a devise or devise-finetune stage
    ann_above: int = DEFAULT_ANN_ABOVE

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        mm = open_stage(self.model).manifest()
        embeddings = read_embeddings(Path(self.model) / mm["embeddings"])
        stores = image_stores(mm["resize_dir"])
        classes = store_classes(mm["resize_dir"])
        lines = ["split\trow\twnid\tpath"]
        for split, (_, labels) in embeddings.items():
            with open_store(stores[split]) as f:
                root = Path(f.attrs["dataset_root"])
                paths = f["paths"].asstr()[:]
            lines += [f"{split}\t{i}\t{classes[lab]}\t{root / p}" for i, (lab, p) in enumerate(zip(labels, paths))]
        facts = build_index(out, np.concatenate([v for v, _ in embeddings.values()]), ann_above=self.ann_above)
        atomic_write_text(out / IMAGES_FILE, "\n".join(lines) + "\n")
        return {**facts, "model": str(Path(self.model) / mm["model"]), "words_dir": mm["words_dir"]}


@dataclass
class ImageHit:
    score: float
    wnid: str
    path: str
    split: str = ""


@dataclass
class DeviseSearch:
    """Search one index: text -> images, image -> words and images."""

    index_dir: Path
    index: VectorIndex = field(init=False)

    def __post_init__(self) -> None:
        self.index_dir = Path(self.index_dir)
        self.manifest = open_stage(self.index_dir).manifest()
        self.index = VectorIndex(self.index_dir)
        rows = (self.index_dir / IMAGES_FILE).read_text().splitlines()[1:]
        self.images = [r.split("\t") for r in rows]
        self.table = WordTable(self.manifest["words_dir"])
        self._model: tuple[Devise, dict[str, Any]] | None = None

    def images_for_vector(self, vector: np.ndarray, k: int = 10) -> list[ImageHit]:
        scores, ids = self.index.search(vector[None], k)
        return [ImageHit(float(s), self.images[i][2], self.images[i][3], self.images[i][0])
                for s, i in zip(scores[0], ids[0]) if i >= 0]

    def images_for_text(self, text: str, k: int = 10) -> list[ImageHit]:
        return self.images_for_vector(self.table.vector_for(text), k)

    def embed_image(self, path: str | Path) -> np.ndarray:
        """The model's word-space vector for an image file (resized/cropped as the store was)."""
        from prep.resize import load_square

        if self._model is None:
            self._model = load_devise(self.manifest["model"])
        model, meta = self._model
        x = to_float_nchw(torch.from_numpy(np.array(load_square(path, meta["image_size"]))[None]), "cpu")
        with torch.no_grad():
            return unit_rows(model.eval()(x).numpy())[0]

    def words_for_image(self, path: str | Path, k: int = 5, vocabulary: str = "imagenet"):
        return self.table.nearest_words(self.embed_image(path), k=k, vocabulary=vocabulary)
