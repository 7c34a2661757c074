"""DeViSE fast path, step 2: the head (and the softmax baseline) trained on precomputed features."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data import ChunkShuffleStream
from models.devise import Devise, DeviseConfig, DeviseHead
from models.losses import LabelVectorLoss
from models.schedule import Phase, PhaseSchedule, one_cycle
from models.train import (MODEL_FILE, ModelStep, TrainConfig, default_device, load_checkpoint, rank_seed,
                          seed_everything, train)
from storage.atomic import atomic_write_json
from storage.catalog import store_classes
from storage.hdf5 import open_store
from storage.image_vectors import EMBEDDINGS_FILE, write_embeddings
from storage.report import Reporter, epoch_table
from storage.stage import StageDir, StageSpec, open_stage, runtime, upstream
from storage.words import WordTable
from prep.wordnet import open_wordnet
from training.devise.classes import ClassPlan, fit_batch_size, plan_classes, with_zero_shot_source
from training.devise.conse import class_vectors, conse_embed, feature_logits
from training.devise.evaluate import evaluate_devise, publish_hits, zero_shot_classes
from training.devise.export import export_devise
from training.devise.features import BODY_FILE


@dataclass(frozen=True)
class HeadConfig:
    epochs: int = 10
    lr: float = 1e-2  # 1cycle peak
    batch_size: int = 256
    weight_decay: float = 1e-2
    hidden: int = 1024
    dropout: float = 0.5
    zero_shot: tuple[str, ...] | None = None  # None: the store's classes outside ImageNet-1k
    softmax_baseline: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 2:
            raise ValueError(f"the head trains with 1cycle: at least 2 epochs, got {self.epochs}")


def _feature_batches(stream: ChunkShuffleStream, views: int, seed: int):
    """batches(epoch, phase) for the loop: one random view (original or flipped) per row."""

    def batches(epoch: int, phase: Phase):
        stream.set_epoch(epoch)
        g = torch.Generator().manual_seed(rank_seed(seed) * 100_003 + epoch)  # each DDP rank its own views
        for x, y in stream:  # x: (B, views, F) float16
            pick = torch.randint(0, views, (len(x),), generator=g)
            yield x[torch.arange(len(x)), pick].float(), y

    return batches


def train_head(features_dir: str | Path, plan: ClassPlan, vectors: np.ndarray, config: HeadConfig,
               checkpoint_dir: Path, *, softmax: bool = False, device: str | None = None,
               on_epoch: Callable[[dict[str, Any]], None] | None = None):
    """Train the DeViSE head (cosine to word vectors) or, with ``softmax``, the classifier baseline
    (same head and schedule, cross-entropy over the store's classes). Resumes from ``checkpoint_dir``."""
    m = open_stage(features_dir).manifest()
    bs = fit_batch_size(Path(features_dir) / "train.h5", config.batch_size, plan.trained, "DeViSE head",
                        x_key="features")
    stream = ChunkShuffleStream(Path(features_dir) / "train.h5", bs, x_key="features", keep_labels=plan.trained,
                                seed=config.seed, drop_last=True)
    outputs = len(plan.classes) if softmax else vectors.shape[1]
    seed_everything(config.seed)  # the same initial head every run (a resumed run starts where this one did)
    head = DeviseHead(m["features"], outputs, hidden=config.hidden, dropout=config.dropout)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn: Any = torch.nn.CrossEntropyLoss() if softmax else LabelVectorLoss(torch.from_numpy(vectors))
    tconfig = TrainConfig(checkpoint_dir=checkpoint_dir, seed=config.seed, device=default_device(device),
                          tensorboard_dir=checkpoint_dir / "tensorboard")
    loss_fn = loss_fn.to(tconfig.device)
    schedule = PhaseSchedule(one_cycle(config.epochs, config.lr), len(stream))
    history = train(ModelStep(head, optimizer, loss_fn), schedule, _feature_batches(stream, m["views"], config.seed),
                    tconfig,
                    on_epoch=on_epoch)
    return head.cpu().eval(), history


@torch.no_grad()
def apply_head(head: torch.nn.Module, features: Path, *, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(head outputs (N, out) float32 for the unflipped view, labels (N,))."""
    head.eval()
    with open_store(features) as f:
        feats, labels = f["features"], f["labels"][:].astype(np.int64)
        out = [head(torch.from_numpy(feats[a:a + batch, 0].astype(np.float32))).numpy()
               for a in range(0, len(feats), batch)]
    dims = head[-1][-1].out_features
    return (np.concatenate(out) if out else np.empty((0, dims), np.float32)), labels


@dataclass(frozen=True)
class DeviseStage(StageSpec):
    """Train the head (and the softmax baseline) on precomputed features; export; embed; evaluate."""

    name = "devise"
    # 2: ConSE and the ImageNet classifier in the table; 21k zero-shot candidates; 3: candidates
    # de-duplicated, 1k classes refused as zero-shot, hierarchical precision, a zero-shot source
    version = 3
    retries = 1  # a second try resumes from the last checkpoint
    archive = True
    features: str = upstream()
    words: str = upstream()
    config: HeadConfig = HeadConfig()
    # features of a second source whose classes (outside ImageNet-1k) are all held out: zero-shot
    # evaluation for a 1k-only training source
    zero_shot_features: str | None = upstream(optional=True)
    wordnet: str | None = upstream(optional=True)  # a WordNet stage: hierarchical precision@k
    device: str | None = runtime()

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        config, features_dir = self.config, Path(self.features)
        fm = open_stage(features_dir).manifest()
        table = WordTable(self.words)
        plan = plan_classes(store_classes(fm["resize_dir"]), table, config.zero_shot)
        vectors = plan.vectors(table)
        head, history = train_head(features_dir, plan, vectors, config, out / "devise", device=self.device,
                                   on_epoch=epoch_table(report, "devise-epochs", "DeViSE head: cosine loss per epoch"))
        splits = [s for s in ("train", "val") if (features_dir / f"{s}.h5").is_file()]
        embeddings = {s: apply_head(head, features_dir / f"{s}.h5") for s in splits}
        write_embeddings(out / EMBEDDINGS_FILE, embeddings)
        softmax_logits, softmax_history = None, []
        if config.softmax_baseline and "val" in embeddings:
            sm_head, softmax_history = train_head(features_dir, plan, vectors, config, out / "softmax",
                                                  softmax=True, device=self.device)
            softmax_logits = apply_head(sm_head, features_dir / "val.h5")
        conse = classifier_logits = None
        if fm.get("classifier"):  # a pretrained ImageNet classifier: its own baseline, and ConSE
            logits = {s: (feature_logits(features_dir, s), labels) for s, (_, labels) in embeddings.items()}
            class_vecs, has_vector = class_vectors(table)
            conse = {s: (conse_embed(lg, class_vecs, has_vector), labels) for s, (lg, labels) in logits.items()}
            classifier_logits = logits.get("val")
        eval_plan, eval_embeddings, eval_conse, zm = plan, embeddings, conse, {}
        if self.zero_shot_features:  # every image of the second source, its labels after the first's
            zdir = Path(self.zero_shot_features)
            zm = open_stage(zdir).manifest()
            eval_plan, relabel = with_zero_shot_source(plan, store_classes(zm["resize_dir"]), table)
            zsplits = [s for s in ("train", "val") if (zdir / f"{s}.h5").is_file()]
            extra = {f"zero-shot-{s}": apply_head(head, zdir / f"{s}.h5") for s in zsplits}
            eval_embeddings = {**embeddings, **{s: (v, relabel[lab]) for s, (v, lab) in extra.items()}}
            if conse is not None and zm.get("classifier"):
                class_vecs, has_vector = class_vectors(table)
                eval_conse = {**conse, **{f"zero-shot-{s}": (conse_embed(feature_logits(zdir, s), class_vecs, has_vector),
                                                             relabel[extra[f"zero-shot-{s}"][1]]) for s in zsplits}}
        wordnet = open_wordnet(self.wordnet) if self.wordnet else None
        metrics = evaluate_devise(eval_embeddings, eval_plan, table, softmax_logits=softmax_logits, conse=eval_conse,
                                  classifier_logits=classifier_logits, wordnet=wordnet)
        held_out = zero_shot_classes(eval_embeddings, eval_plan, table, conse=eval_conse)
        # the whole model: the features stage's body + this head
        model = Devise(DeviseConfig(backbone=fm["backbone"], dims=table.dims, hidden=config.hidden,
                                    dropout=config.dropout, pretrained=False))
        model.body.load_state_dict(load_checkpoint(features_dir / BODY_FILE)["body"])
        model.head.load_state_dict(head.state_dict())
        export_devise(out / MODEL_FILE, model, classes=plan.classes, image_size=fm["image_size"],
                      words_dir=self.words)
        atomic_write_json(out / "metrics.json", {"hits": metrics, "history": history,
                                                 "softmax_history": softmax_history, "classes": eval_plan.rows()})
        return {"mode": "features", "metrics": metrics, "zero_shot_classes": held_out, "classes": plan.rows(),
                "backbone": fm["backbone"],
                "backbone_weights": fm["weights"], "pretrained_backbone": fm["pretrained_loaded"],
                "model": MODEL_FILE, "embeddings": EMBEDDINGS_FILE,
                "final_loss": history[-1]["loss"], "resize_dir": fm["resize_dir"], "words_dir": str(self.words),
                "zero_shot_resize_dir": zm["resize_dir"] if self.zero_shot_features else None,
                "wordnet_dir": str(self.wordnet) if self.wordnet else None}

    def summarize(self, stage: StageDir, report: Reporter) -> None:
        publish_hits(stage, report, "head on precomputed features, vs a softmax classifier with the same budget")
