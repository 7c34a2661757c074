"""DeViSE evaluation: flat hit@k against ImageNet-1k, the softmax baseline, and zero-shot hit@k."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.metrics import hit_at_k
from storage.report import Reporter
from storage.stage import StageDir
from storage.vector_index import unit_rows
from storage.words import WordTable
from training.devise.classes import ClassPlan

KS = (1, 2, 5, 10, 20)


def _hits(queries: np.ndarray, matrix: np.ndarray, truth: np.ndarray, *, batch: int = 1024) -> dict[int, float]:
    """hit@k of cosine search over ``matrix`` rows, in query batches (50k x 82k scores do not fit at once)."""
    totals = dict.fromkeys(KS, 0.0)
    m = torch.from_numpy(np.array(matrix, dtype=np.float32))  # a copy: the table is a read-only memory map
    for a in range(0, len(queries), batch):
        q = torch.from_numpy(unit_rows(queries[a:a + batch]))
        for k, v in hit_at_k(q @ m.T, torch.from_numpy(truth[a:a + batch]), KS).items():
            totals[k] += v * len(q)
    return {k: v / len(queries) for k, v in totals.items()}


def _row(model: str, task: str, candidates: str, n_candidates: int, n_images: int, hits: dict[int, float]) -> dict:
    return {"model": model, "task": task, "candidates": candidates, "n_candidates": n_candidates, "images": n_images,
            **{f"hit@{k}": round(v, 4) for k, v in hits.items()}}


def evaluate_devise(embeddings: dict[str, tuple[np.ndarray, np.ndarray]], plan: ClassPlan, table: WordTable, *,
                    softmax_logits: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """The hit@k table: flat (held-out images of trained classes vs ImageNet-1k + trained classes),
    the softmax baseline (same images, over the trained classes), zero-shot (every image of the
    held-out classes, vs those classes and vs all WordNet nouns)."""
    rows = []
    val_vectors, val_labels = embeddings.get("val", (np.empty((0, table.dims), np.float32), np.empty(0, np.int64)))
    trained = set(plan.trained)
    keep = np.isin(val_labels, list(trained))
    if keep.any():
        keys_1k, _ = table.vocabulary("imagenet")
        candidates = list(dict.fromkeys([*keys_1k, *(plan.classes[i] for i in plan.trained)]))
        column = {w: j for j, w in enumerate(candidates)}
        truth = np.array([column[plan.classes[i]] for i in val_labels[keep]])
        matrix = np.stack([table.vector(w) for w in candidates])
        rows.append(_row("devise", "flat", "imagenet-1k + trained", len(candidates), int(keep.sum()),
                         _hits(val_vectors[keep], matrix, truth)))
        if softmax_logits is not None:
            logits, labels = softmax_logits
            mask = np.full(len(plan.classes), -np.inf, np.float32)
            mask[plan.trained] = 0  # the classifier can only name classes it was trained on
            sel = np.isin(labels, list(trained))
            scores = torch.from_numpy(logits[sel] + mask)
            rows.append(_row("softmax", "flat", "trained", len(plan.trained), int(sel.sum()),
                             hit_at_k(scores, torch.from_numpy(labels[sel]), KS)))
    if plan.zero_shot:
        vecs = np.concatenate([v[np.isin(lab, plan.zero_shot)] for v, lab in embeddings.values()])
        labs = np.concatenate([lab[np.isin(lab, plan.zero_shot)] for _, lab in embeddings.values()])
        if len(labs):
            zs = [plan.classes[i] for i in plan.zero_shot]
            col = {w: j for j, w in enumerate(zs)}
            truth = np.array([col[plan.classes[i]] for i in labs])
            rows.append(_row("devise", "zero-shot", "held-out classes", len(zs), len(labs),
                             _hits(vecs, np.stack([table.vector(w) for w in zs]), truth)))
            keys, matrix = table.vocabulary("wordnet")
            col = {w: j for j, w in enumerate(keys)}
            rows.append(_row("devise", "zero-shot", "all WordNet nouns", len(keys), len(labs),
                             _hits(vecs, matrix, np.array([col[plan.classes[i]] for i in labs]))))
    return rows


def format_hits(rows: list[dict[str, Any]]) -> str:
    """The hit@k table as aligned text (CLI, benchmarks)."""
    ks = [f"hit@{k}" for k in KS]
    lines = [f"{'model':<8} {'task':<10} {'candidates':<30} {'images':>6} " + " ".join(f"{k:>7}" for k in ks)]
    for r in rows:
        candidates = f"{r['candidates']} ({r['n_candidates']})"
        lines.append(f"{r['model']:<8} {r['task']:<10} {candidates:<30} {r['images']:>6} "
                     + " ".join(f"{r[k]:>7.3f}" for k in ks))
    return "\n".join(lines)


def publish_hits(stage: StageDir, report: Reporter, what: str) -> None:
    """The stage's hit@k table as the ``devise-hits`` table."""
    m = stage.manifest()
    report.table(
        "devise-hits", m["metrics"],
        f"DeViSE hit@k ({what}; backbone pretrained: {m.get('pretrained_backbone', 'see features')}). "
        f"Flat: held-out images of the trained classes; zero-shot: every image of the held-out classes. "
        f"`{stage.path}`")
