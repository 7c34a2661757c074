"""ConSE (Norouzi et al. 2014, "Zero-shot learning by convex combination of semantic embeddings"):
a pretrained ImageNet classifier's top-T probabilities weight the word vectors of its classes.
No training: it names classes the classifier never saw, and works from the first run.

    f(x) = 1/Z * sum_{t=1..T} p(y_t | x) s(y_t),   Z = sum_t p(y_t | x)

over the T most probable classes y_t that have a word vector (T = 10, the paper's best).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.backbones import build_classifier
from models.data import to_float_nchw
from models.devise import resolve_backbone
from models.train import load_checkpoint
from prep.wordnet import imagenet_wnids
from storage.hdf5 import open_store
from storage.vector_index import unit_rows
from storage.words import WordTable
from training.devise.features import CLASSIFIER_FILE

DEFAULT_T = 10


def class_vectors(table: WordTable) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (1000, d) of the ImageNet-1k classes in the classifiers' order, zeros where unmatched;
    which have one (1000,) bool)."""
    wnids = imagenet_wnids("1k")
    has = np.array([w in table.table.key_to_index for w in wnids])
    vectors = np.zeros((len(wnids), table.dims), np.float32)
    vectors[has] = np.stack([table.vector(w) for w, h in zip(wnids, has) if h])
    return vectors, has


def conse_embed(logits: np.ndarray, vectors: np.ndarray, has_vector: np.ndarray, top: int = DEFAULT_T) -> np.ndarray:
    """Unit ConSE vectors (N, d) from classifier logits (N, 1000)."""
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1)
    probs[:, ~torch.as_tensor(has_vector)] = 0  # a class without a word vector cannot vote
    weights, ids = probs.topk(top, dim=1)  # (N, T)
    v = (weights.unsqueeze(2) * torch.as_tensor(vectors)[ids]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1e-12)
    return unit_rows(v.numpy())


def feature_logits(features_dir: str | Path, split: str, *, batch: int = 4096) -> np.ndarray:
    """ImageNet-1k logits of every image of a features store (unflipped view), from the backbone's own
    classifier on the average-pooled half of the concat-pooled features."""
    state = load_checkpoint(Path(features_dir) / CLASSIFIER_FILE)
    weight, bias = state["weight"].float(), state["bias"].float()
    channels = weight.shape[1]
    with open_store(Path(features_dir) / f"{split}.h5") as f:
        feats = f["features"]
        out = [(torch.from_numpy(feats[a:a + batch, 0, :channels].astype(np.float32)) @ weight.T + bias).numpy()
               for a in range(0, len(feats), batch)]
    return np.concatenate(out) if out else np.empty((0, weight.shape[0]), np.float32)


class ConseImages:
    """ConSE for image files: the bundled (or best local) classifier + a word table."""

    def __init__(self, table: WordTable, backbone: str = "auto", *, image_size: int = 224, top: int = DEFAULT_T):
        self.table, self.image_size, self.top = table, image_size, top
        self.backbone = resolve_backbone(backbone)
        self.model, self.source = build_classifier(self.backbone)
        self.vectors, self.has_vector = class_vectors(table)

    def embed_image(self, path: str | Path) -> np.ndarray:
        from prep.resize import load_square

        x = to_float_nchw(torch.from_numpy(np.array(load_square(path, self.image_size))[None]), "cpu")
        with torch.no_grad():
            logits = self.model(x).numpy()
        return conse_embed(logits, self.vectors, self.has_vector, self.top)[0]
