"""Which classes DeViSE trains on, which it holds out for zero-shot evaluation, which it cannot use."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.data import ChunkShuffleStream
from prep.wordnet import imagenet_wnids
from storage.words import WordTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassPlan:
    classes: list[str]  # the store's wnids, label order
    trained: list[int]  # labels trained on
    zero_shot: list[int]  # labels held out entirely, for zero-shot evaluation
    no_vector: list[int]  # labels without a word vector: excluded, listed

    def rows(self) -> list[dict[str, str]]:
        role = {**{i: "trained" for i in self.trained}, **{i: "zero_shot" for i in self.zero_shot},
                **{i: "no_vector" for i in self.no_vector}}
        return [{"label": str(i), "wnid": w, "role": role[i]} for i, w in enumerate(self.classes)]

    @classmethod
    def from_rows(cls, classes: list[str], rows: list[dict[str, str]]) -> ClassPlan:
        """The plan ``rows()`` recorded (in a stage manifest)."""
        def labels(role: str) -> list[int]:
            return [int(r["label"]) for r in rows if r["role"] == role]

        return cls(classes, labels("trained"), labels("zero_shot"), labels("no_vector"))

    def vectors(self, table: WordTable) -> np.ndarray:
        """(classes, d) training targets: each trained class's unit word vector, zeros elsewhere."""
        vectors = np.zeros((len(self.classes), table.dims), np.float32)
        for i in self.trained:
            vectors[i] = table.vector(self.classes[i])
        return vectors


def plan_classes(classes: Sequence[str], table: WordTable, zero_shot: Sequence[str] | None) -> ClassPlan:
    """Which classes train, which are held out for zero-shot (default: those outside ImageNet-1k)."""
    has_vector = set(table.table.key_to_index)
    if zero_shot is None:
        in_1k = set(imagenet_wnids("1k"))
        zero = {w for w in classes if w not in in_1k and w in has_vector}
    else:
        unknown = sorted(set(zero_shot) - set(classes))
        if unknown:
            raise ValueError(f"zero-shot classes {unknown} are not classes of the store; it has {len(classes)} "
                             f"classes, e.g. {list(classes)[:5]}")
        missing = sorted(w for w in zero_shot if w not in has_vector)
        if missing:
            raise ValueError(f"zero-shot classes {missing} have no word vector, so they cannot be named")
        check_not_in_1k(zero_shot, "zero-shot classes")
        zero = set(zero_shot)
    no_vector = [i for i, w in enumerate(classes) if w not in has_vector]
    zs = [i for i, w in enumerate(classes) if w in zero]
    trained = [i for i, w in enumerate(classes) if w in has_vector and w not in zero]
    if not trained:
        raise ValueError(f"no class is left to train on ({len(zs)} zero-shot, {len(no_vector)} without a vector)")
    return ClassPlan(list(classes), trained, zs, no_vector)


def check_not_in_1k(wnids: Sequence[str], what: str) -> None:
    """Refuse ImageNet-1k classes as zero-shot: the pretrained body and ConSE's classifier were trained
    on them, so holding them out of the head's training measures nothing zero-shot."""
    in_1k = sorted(set(wnids) & set(imagenet_wnids("1k")))
    if in_1k:
        raise ValueError(f"{what} {in_1k} are ImageNet-1k classes: the pretrained backbone (and ConSE's classifier) "
                         f"learned them, so they are not zero-shot; hold out classes outside the 1k (ImageNet-21k "
                         f"only, e.g. n02084071 dog, n02439033 giraffe)")


def with_zero_shot_source(plan: ClassPlan, extra: Sequence[str], table: WordTable) -> tuple[ClassPlan, np.ndarray]:
    """``plan`` extended by the classes of a second store held out entirely (a zero-shot source), and
    the label of each of its classes in the extended plan (a class already held out keeps its label;
    a new one follows the first store's). They must lie outside ImageNet-1k and outside the trained
    classes; those without a word vector are listed as such."""
    check_not_in_1k(extra, "zero-shot source classes")
    trained = sorted(set(extra) & {plan.classes[i] for i in plan.trained})
    if trained:
        raise ValueError(f"zero-shot source classes {trained} are trained on (they are classes of the training source)")
    has_vector = set(table.table.key_to_index)
    if not any(w in has_vector for w in extra):
        raise ValueError(f"no class of the zero-shot source has a word vector ({len(extra)} classes, e.g. "
                         f"{list(extra)[:3]})")
    classes, zero_shot, no_vector = list(plan.classes), list(plan.zero_shot), list(plan.no_vector)
    labels = []
    for w in extra:
        if w in classes:  # already held out in the training source: more images of it
            labels.append(classes.index(w))
            continue
        labels.append(len(classes))
        (zero_shot if w in has_vector else no_vector).append(len(classes))
        classes.append(w)
    return ClassPlan(classes, plan.trained, zero_shot, no_vector), np.array(labels, dtype=np.int64)


def fit_batch_size(store: Path, requested: int, keep: list[int], what: str, **stream) -> int:
    """``requested``, or fewer when ``store`` holds fewer training rows of the ``keep`` labels (with a warning)."""
    available = ChunkShuffleStream(store, 1, keep_labels=keep, **stream).n_kept
    if available < 2:
        raise ValueError(f"{what}: {available} training images; at least 2 are needed")
    if requested > available:
        log.warning("%s: batch size %d > %d training images; using %d", what, requested, available, available)
    return min(requested, available)
