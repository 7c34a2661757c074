"""Hierarchical precision@k (Frome et al. 2013, section 4; defined in full by Norouzi et al. 2014,
"ConSE", appendix): how many of a model's top k labels are *semantically close* to the truth,
which credits "dog" for a photo of a terrier when the exact label is out of reach.

For a true class y and a k, the correct set is built from the WordNet noun hierarchy (is-a edges,
hypernyms and hyponyms, walked in both directions): start with the candidates at tree distance 0
(y itself), then add those at distance 1, 2, ... until the set holds at least k candidate labels
(every candidate at the last distance is in, so the set can exceed k). Then

    hp@k = |top-k predictions  n  correct set(y, k)| / k,

averaged over the images. hp@1 = hit@1; hp@k >= hit@k / k. The candidates are the label set the
predictions come from (here the ImageNet-21k classes with a word vector).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def _neighbours(synset) -> Iterable:
    yield from synset.hypernyms()
    yield from synset.instance_hypernyms()
    yield from synset.hyponyms()
    yield from synset.instance_hyponyms()


class Hierarchy:
    """Correct sets over ``candidates`` (wnids) from an NLTK WordNet reader (prep.wordnet.open_wordnet)."""

    def __init__(self, wordnet, candidates: Sequence[str]):
        self.wn, self.candidates = wordnet, set(candidates)
        self._levels: dict[str, list[list[str]]] = {}

    def _synset(self, wnid: str):
        return self.wn.synset_from_pos_and_offset("n", int(wnid[1:]))

    def levels(self, wnid: str, needed: int) -> list[list[str]]:
        """Candidate wnids by tree distance from ``wnid`` (0, 1, ...), until ``needed`` are found."""
        cached = self._levels.get(wnid)
        if cached is not None and sum(map(len, cached)) >= needed:
            return cached
        start = self._synset(wnid)
        seen, frontier, levels, found = {start}, [start], [], 0
        while frontier and found < needed:
            level = sorted(f"n{s.offset():08d}" for s in frontier if f"n{s.offset():08d}" in self.candidates)
            levels.append(level)
            found += len(level)
            nxt = []
            for s in frontier:
                for n in _neighbours(s):
                    if n not in seen:
                        seen.add(n)
                        nxt.append(n)
            frontier = nxt
        self._levels[wnid] = levels
        return levels

    def correct_set(self, wnid: str, k: int) -> set[str]:
        out: set[str] = set()
        for level in self.levels(wnid, k):
            out.update(level)
            if len(out) >= k:
                break
        return out


def hierarchical_precision(top: np.ndarray, labels: Sequence[str], truth: Sequence[str], hierarchy: Hierarchy,
                           ks: Sequence[int]) -> dict[int, float]:
    """hp@k for each k: ``top`` (N, >= max k) indices into ``labels`` (the candidates, best first);
    ``truth`` the N true wnids."""
    totals = dict.fromkeys(ks, 0.0)
    for row, y in zip(top, truth):
        for k in ks:
            predicted = {labels[j] for j in row[:k]}
            totals[k] += len(predicted & hierarchy.correct_set(y, k)) / k
    return {k: v / max(len(truth), 1) for k, v in totals.items()}
