"""DeViSE evaluation as Frome et al. (2013) report it, on held-out images:

- flat hit@k of the trained classes' held-out images against every ImageNet-1k label (plus any trained
  class outside the 1k), next to the softmax baselines on the same images: the head's own softmax
  classifier over the trained classes, and the pretrained ImageNet classifier over its 1,000 labels;
- zero-shot hit@k of every image of the held-out classes, among meaningful candidate sets: all
  ImageNet-21k classes with a word vector (the paper's "21K" setting), the held-out classes plus the 1k,
  and all matched WordNet nouns. Among the held-out classes alone, hit@k is reported only for k
  below their number (with k >= the number of candidates every image is trivially a hit).

The same table holds ConSE (training/devise/conse.py), a zero-shot model that needs no training.
The 21k zero-shot rows also carry the papers' hierarchical precision@k (``hp@k``, training/devise/
hierarchy.py: the share of the top k that lie in the true class's WordNet neighbourhood of k
candidates) when a WordNet reader is given.

Zero-shot means classes neither the head nor the pretrained body and ConSE's classifier were
trained on: explicit held-out classes inside ImageNet-1k are refused (training/devise/classes.py).
On a 1k-only source there are none: a second source of classes outside the 1k
(``zero_shot_source``, e.g. folders of ImageNet-21k-only wnids) supplies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.metrics import hit_at_k
from prep.wordnet import imagenet_wnids
from storage.report import Reporter
from storage.stage import StageDir
from storage.vector_index import unit_rows
from storage.words import WordTable
from training.devise.classes import ClassPlan
from training.devise.hierarchy import Hierarchy, hierarchical_precision

KS = (1, 2, 5, 10, 20)
Split = tuple[np.ndarray, np.ndarray]  # (vectors or logits (N, .), labels (N,))


def _hits(queries: np.ndarray, matrix: np.ndarray, truth: np.ndarray, *, batch: int = 1024) -> dict[int, float]:
    """hit@k of cosine search over ``matrix`` rows, in query batches (50k x 82k scores do not fit at once)."""
    totals = dict.fromkeys(KS, 0.0)
    m = torch.from_numpy(np.array(matrix, dtype=np.float32))  # a copy: the table is a read-only memory map
    for a in range(0, len(queries), batch):
        q = torch.from_numpy(unit_rows(queries[a:a + batch]))
        for k, v in hit_at_k(q @ m.T, torch.from_numpy(truth[a:a + batch]), KS).items():
            totals[k] += v * len(q)
    return {k: v / len(queries) for k, v in totals.items()}


def _top(queries: np.ndarray, matrix: np.ndarray, k: int, *, batch: int = 1024) -> np.ndarray:
    """(N, k) indices of the ``k`` rows of ``matrix`` nearest each query by cosine, best first."""
    m = torch.from_numpy(np.array(matrix, dtype=np.float32))
    out = [(torch.from_numpy(unit_rows(queries[a:a + batch])) @ m.T).topk(min(k, len(m)), dim=1).indices.numpy()
           for a in range(0, len(queries), batch)]
    return np.concatenate(out) if out else np.empty((0, k), np.int64)


def _row(model: str, task: str, candidates: str, n_candidates: int, n_images: int,
         hits: dict[int, float], hp: dict[int, float] | None = None) -> dict[str, Any]:
    # with k >= the number of candidates every image is a hit: not a measurement
    row = {"model": model, "task": task, "candidates": candidates, "n_candidates": n_candidates, "images": n_images,
           **{f"hit@{k}": (round(v, 4) if k < n_candidates else None) for k, v in hits.items()}}
    if hp is not None:
        row.update({f"hp@{k}": (round(v, 4) if k < n_candidates else None) for k, v in hp.items()})
    return row


class CandidateSets:
    """The label sets searched, each as (wnids, unit vectors)."""

    def __init__(self, plan: ClassPlan, table: WordTable):
        has = set(table.table.key_to_index)
        in_1k = [w for w in imagenet_wnids("1k") if w in has]
        trained = [plan.classes[i] for i in plan.trained]
        self.held_out = [plan.classes[i] for i in plan.zero_shot]
        flat = list(dict.fromkeys([*in_1k, *trained]))
        self.flat_name = "imagenet-1k" if len(flat) == len(in_1k) else "imagenet-1k + trained"
        in_21k = list(dict.fromkeys([*(w for w in imagenet_wnids("21k") if w in has), *self.held_out]))
        nouns, noun_matrix = table.vocabulary("wordnet")
        self.table = table
        # de-duplicated: with a class listed twice, its truth column would be its last copy, and an image
        # whose nearest label is the first copy would miss
        self.sets = {"flat": flat, "imagenet-21k": in_21k, "held-out + imagenet-1k": list(dict.fromkeys([*self.held_out, *in_1k])),
                     "all WordNet nouns": nouns, "held-out classes": self.held_out}
        self._matrices = {"all WordNet nouns": noun_matrix}

    def matrix(self, name: str) -> np.ndarray:
        if name not in self._matrices:
            self._matrices[name] = np.stack([self.table.vector(w) for w in self.sets[name]])
        return self._matrices[name]

    def truth(self, name: str, wnids: Sequence[str]) -> np.ndarray:
        column = {w: j for j, w in enumerate(self.sets[name])}
        return np.array([column[w] for w in wnids], dtype=np.int64)


ZERO_SHOT_SETS = ("imagenet-21k", "held-out + imagenet-1k", "all WordNet nouns", "held-out classes")


HP_SET = "imagenet-21k"  # the candidates hierarchical precision is computed over (the papers' 21k setting)


def _vector_rows(model: str, embeddings: dict[str, Split], plan: ClassPlan, sets: CandidateSets,
                 hierarchy: Hierarchy | None = None) -> list[dict]:
    rows = []
    val_vectors, val_labels = embeddings.get("val", (np.empty((0, 1), np.float32), np.empty(0, np.int64)))
    keep = np.isin(val_labels, plan.trained)
    if keep.any():
        wnids = [plan.classes[i] for i in val_labels[keep]]
        rows.append(_row(model, "flat", sets.flat_name, len(sets.sets["flat"]), int(keep.sum()),
                         _hits(val_vectors[keep], sets.matrix("flat"), sets.truth("flat", wnids))))
    if plan.zero_shot:
        vecs = np.concatenate([v[np.isin(lab, plan.zero_shot)] for v, lab in embeddings.values()])
        labs = np.concatenate([lab[np.isin(lab, plan.zero_shot)] for _, lab in embeddings.values()])
        wnids = [plan.classes[i] for i in labs]
        for name in ZERO_SHOT_SETS if len(labs) else ():
            hp = None
            if name == HP_SET and hierarchy is not None:
                top = _top(vecs, sets.matrix(name), max(KS))
                hp = hierarchical_precision(top, sets.sets[name], wnids, hierarchy, KS)
            rows.append(_row(model, "zero-shot", name, len(sets.sets[name]), len(labs),
                             _hits(vecs, sets.matrix(name), sets.truth(name, wnids)), hp))
    return rows


def evaluate_devise(embeddings: dict[str, Split], plan: ClassPlan, table: WordTable, *,
                    softmax_logits: Split | None = None, conse: dict[str, Split] | None = None,
                    classifier_logits: Split | None = None, wordnet=None) -> list[dict[str, Any]]:
    """The hit@k table: DeViSE (``embeddings``: unit vectors per split), the softmax baselines on the
    same held-out images (``softmax_logits``: the head trained as a classifier over the trained
    classes; ``classifier_logits``: the pretrained ImageNet-1k classifier), and ConSE (``conse``).
    ``wordnet`` (an NLTK reader): hierarchical precision@k on the 21k zero-shot rows too."""
    sets = CandidateSets(plan, table)
    hierarchy = Hierarchy(wordnet, sets.sets[HP_SET]) if wordnet is not None and plan.zero_shot else None
    rows = _vector_rows("devise", embeddings, plan, sets, hierarchy)
    if softmax_logits is not None:
        logits, labels = softmax_logits
        mask = np.full(len(plan.classes), -np.inf, np.float32)
        mask[plan.trained] = 0  # the classifier can only name classes it was trained on
        sel = np.isin(labels, plan.trained)
        if sel.any():
            rows.append(_row("softmax", "flat", "trained classes", len(plan.trained), int(sel.sum()),
                             hit_at_k(torch.from_numpy(logits[sel] + mask), torch.from_numpy(labels[sel]), KS)))
    if classifier_logits is not None:
        logits, labels = classifier_logits
        column = {w: j for j, w in enumerate(imagenet_wnids("1k"))}
        sel = np.array([plan.classes[i] in column and i in plan.trained for i in labels], dtype=bool)
        if sel.any():
            truth = torch.tensor([column[plan.classes[i]] for i in labels[sel]])
            rows.append(_row("imagenet classifier", "flat", "imagenet-1k", 1000, int(sel.sum()),
                             hit_at_k(torch.from_numpy(logits[sel]), truth, KS)))
    if conse is not None:
        rows += _vector_rows("conse", conse, plan, sets, hierarchy)
    return rows


def _rank(vector: np.ndarray, matrix: np.ndarray, column: int) -> int:
    """1-based rank of row ``column`` of ``matrix`` by cosine to ``vector`` (ties count against it)."""
    scores = np.asarray(matrix, dtype=np.float32) @ unit_rows(vector)
    return int((scores >= scores[column]).sum())


def zero_shot_classes(embeddings: dict[str, Split], plan: ClassPlan, table: WordTable, *,
                      conse: dict[str, Split] | None = None, nearest: int = 5) -> list[dict[str, Any]]:
    """Per held-out class: the rank of its name among the ImageNet-21k classes for the mean vector of
    its images (DeViSE, and ConSE when given), and the WordNet nouns nearest that mean."""
    sets = CandidateSets(plan, table)
    matrix, column = sets.matrix("imagenet-21k"), {w: j for j, w in enumerate(sets.sets["imagenet-21k"])}
    rows = []
    for label in plan.zero_shot:
        wnid = plan.classes[label]
        vecs = np.concatenate([v[lab == label] for v, lab in embeddings.values()])
        if not len(vecs):
            continue
        mean = unit_rows(vecs.mean(axis=0))
        row = {"wnid": wnid, "class": table.names.get(wnid, wnid), "images": len(vecs),
               "rank_21k": _rank(mean, matrix, column[wnid]), "of": len(column)}
        if conse is not None:
            conse_mean = unit_rows(np.concatenate([v[lab == label] for v, lab in conse.values()]).mean(axis=0))
            row["conse_rank_21k"] = _rank(conse_mean, matrix, column[wnid])
        row["nearest_nouns"] = ", ".join(words for _, words, _ in table.nearest_words(mean, nearest, "wordnet"))
        rows.append(row)
    return rows


def hit(rows: list[dict[str, Any]], model: str, task: str, candidates: str | None, k: int) -> float | None:
    """One number of the table (None when the row is absent or k is trivial for it)."""
    for r in rows:
        if r["model"] == model and r["task"] == task and (candidates is None or r["candidates"] == candidates):
            return r[f"hit@{k}"]
    return None


def format_hits(rows: list[dict[str, Any]]) -> str:
    """The hit@k table as aligned text (CLI, benchmarks); '-' where a k is trivial for its candidates."""
    ks = [f"hit@{k}" for k in KS]
    lines = [f"{'model':<20} {'task':<10} {'candidates':<32} {'images':>6} " + " ".join(f"{k:>7}" for k in ks)]

    def cells(r, keys):
        return " ".join(f"{r[k]:>7.3f}" if r[k] is not None else f"{'-':>7}" for k in keys)

    for r in rows:
        candidates = f"{r['candidates']} ({r['n_candidates']})"
        lines.append(f"{r['model']:<20} {r['task']:<10} {candidates:<32} {r['images']:>6} " + cells(r, ks))
        if "hp@1" in r:
            lines.append(f"{'':<20} {'':<10} {'  hierarchical precision@k':<32} {'':>6} "
                         + cells(r, [f"hp@{k}" for k in KS]))
    if not any(r["task"] == "zero-shot" for r in rows):
        lines.append(NO_ZERO_SHOT)
    return "\n".join(lines)


NO_ZERO_SHOT = ("zero-shot: not evaluated: no class of the source was held out (every class with a word vector "
                "is in ImageNet-1k, which the pretrained body knows, or was trained on); give a second source of "
                "classes outside ImageNet-1k (--zero-shot-source DIR: train/<wnid>/ folders of ImageNet-21k-only "
                "classes) to measure it")


def publish_hits(stage: StageDir, report: Reporter, what: str) -> None:
    """The stage's hit@k table as the ``devise-hits`` table, and the held-out classes' ranks."""
    m = stage.manifest()
    if m.get("zero_shot_classes"):
        report.table("devise-zero-shot", m["zero_shot_classes"],
                     "Classes never trained on: the rank of their name among all ImageNet-21k classes for the mean "
                     "predicted vector of their images (1 = named right), and the WordNet nouns nearest it")
    weights = m.get("backbone_weights") or {}
    report.table(
        "devise-hits", m["metrics"],
        f"DeViSE hit@k ({what}; backbone {m.get('backbone', '?')}, weights: {weights.get('detail', 'RANDOM')}). "
        f"Flat: held-out images of the trained classes; zero-shot: every image of the held-out classes. "
        f"`{stage.path}`")
