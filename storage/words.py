"""The word table a finished embeddings stage wrote: nearest words to vectors, vectors for text.

Files (fast tier), each a plain array (``.npy``, memory-mapped, never a pickle) and its keys
(``.json``): ``word_table`` (a unit vector per matched WordNet noun synset, by wnid) and ``words``
(the lower-cased vocabulary); ``synsets.tsv`` (how each synset matched) and ``imagenet-1k.txt``
(the 1k classes in their standard order).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from storage.atomic import atomic_path, atomic_write_text
from storage.stage import open_stage
from storage.vector_index import brute_force, unit_rows

VOCABULARIES = ("imagenet", "wordnet")
WORD_SPLIT = re.compile(r"[_\s\-]+")  # lemma and phrase separators: "golden_retriever", "jumbo jet", "x-ray"


class VectorTable:
    """Keys and their vectors: ``<stem>.npy`` (N, d) float32 and ``<stem>.json`` (the N keys, in row order)."""

    def __init__(self, keys: list[str], vectors: np.ndarray):
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys but {len(vectors)} vectors")
        self.index_to_key, self.vectors = keys, vectors
        self.key_to_index = {k: i for i, k in enumerate(keys)}

    @property
    def vector_size(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.index_to_key)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.vectors[self.key_to_index[key]]

    def save(self, stem: Path) -> None:
        """Both files, each written atomically (the stage's manifest, written last, names them done)."""
        with atomic_path(stem.with_suffix(".npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(self.vectors, dtype=np.float32))
        atomic_write_text(stem.with_suffix(".json"), json.dumps(self.index_to_key, ensure_ascii=False))

    @classmethod
    def load(cls, stem: Path) -> VectorTable:
        """Memory-mapped; a file that is not a plain array (e.g. a pickled object array) is refused."""
        try:
            vectors = np.load(stem.with_suffix(".npy"), mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{stem.with_suffix('.npy')} is not a plain array of numbers ({e}); "
                             "refusing to load it") from None
        if vectors.ndim != 2 or vectors.dtype.kind != "f":
            raise ValueError(f"{stem.with_suffix('.npy')} holds {vectors.dtype} {vectors.shape}; expected (N, d) floats")
        keys = json.loads(stem.with_suffix(".json").read_text())
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{stem.with_suffix('.json')} must be a JSON list of strings")
        return cls(keys, vectors)

    @classmethod
    def of(cls, keys: Sequence[str], vectors: np.ndarray) -> VectorTable:
        return cls(list(keys), np.asarray(vectors, dtype=np.float32))


class WordTable:
    """Lookups over a finished embeddings stage: nearest words to vectors, and vectors for text."""

    def __init__(self, stage_path: Path | str):
        self.path = Path(stage_path)
        self.manifest = open_stage(self.path).manifest()
        table = VectorTable.load(self.path / "word_table")
        self.words = VectorTable.load(self.path / "words")
        self.names = {}
        for line in (self.path / "synsets.tsv").read_text().splitlines()[1:]:
            key, _, _, lemmas, _ = line.split("\t")
            self.names[key] = lemmas.split(",")[0].replace("_", " ")
        imagenet = [w for w in (self.path / "imagenet-1k.txt").read_text().split() if w in table.key_to_index]
        self._keys = {"wordnet": list(table.index_to_key), "imagenet": imagenet}
        all_vectors = np.asarray(table.vectors)
        self._matrix = {"wordnet": all_vectors,
                        "imagenet": all_vectors[[table.key_to_index[w] for w in imagenet]]}
        self.table = table

    @property
    def dims(self) -> int:
        return self.table.vector_size

    def vector(self, wnid: str) -> np.ndarray:
        """The unit vector of a synset; KeyError names the wnid when it has none."""
        if wnid not in self.table.key_to_index:
            raise KeyError(f"{wnid} has no word vector (unmatched, or not a WordNet noun)")
        return np.asarray(self.table[wnid])

    def vector_for(self, text: str) -> np.ndarray:
        """A unit vector for free text: the phrase as one token when known, else the mean of its known words."""
        phrase = "_".join(WORD_SPLIT.split(text.strip().lower()))
        if phrase in self.words.key_to_index:
            return unit_rows(self.words[phrase])
        parts = [p for p in phrase.split("_") if p]
        known = [p for p in parts if p in self.words.key_to_index]
        if not known:
            raise KeyError(f"no word of {text!r} is in the vocabulary of {self.manifest['vectors_file']}")
        return unit_rows(np.mean([self.words[p] for p in known], axis=0))

    def vocabulary(self, name: str) -> tuple[list[str], np.ndarray]:
        """(wnids, unit vectors (N, d)) of ``imagenet`` (the matched 1k classes) or ``wordnet`` (all matched nouns)."""
        if name not in VOCABULARIES:
            raise ValueError(f"unknown vocabulary {name!r}; choose one of {list(VOCABULARIES)}")
        return self._keys[name], self._matrix[name]

    def nearest_words(self, vectors: np.ndarray, k: int = 5, vocabulary: str = "imagenet"):
        """Top-``k`` synsets by cosine for one vector (``(d,)`` -> list) or a batch (``(B, d)`` -> list of lists).

        Each hit is ``(wnid, words, cosine)``. Brute force on a float32 matrix: 82k x d is small.
        """
        keys, matrix = self.vocabulary(vocabulary)
        v = np.asarray(vectors, dtype=np.float32)
        single = v.ndim == 1
        q = unit_rows(v[None] if single else v)
        if q.shape[1] != self.dims:
            raise ValueError(f"query vectors have {q.shape[1]} dims; this table has {self.dims}")
        scores, ids = brute_force(matrix, q, k)
        hits = [[(keys[i], self.names[keys[i]], float(s)) for s, i in zip(row_s, row_i)]
                for row_s, row_i in zip(scores, ids)]
        return hits[0] if single else hits
