"""Stage 6: DeViSE. Images -> word vectors, evaluated by hit@k (flat and zero-shot), searched both ways.

Fast path (the references'): the backbone's body is frozen, so its pooled activations are
computed once per image (and per horizontal flip, optionally) into an HDF5 store on the fast
tier, and the head trains on those in minutes. A softmax classifier with the same head trains on
the same features for the same schedule: the DeViSE paper's baseline. Fine-tuning (optional)
then trains body and head end to end from the image store with the shared loop.

Classes with no word vector are excluded from training and listed; the zero-shot classes (by
default the store's classes outside ImageNet-1k) are held out of training entirely and used
only for evaluation. Every stage writes ``embeddings.h5`` (one unit vector per image per split),
from which evaluation and the search index are built.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from models.data import ChunkShuffleStream, make_loader, to_float_nchw
from models.devise import Devise, DeviseConfig, DeviseHead, make_body
from models.losses import LabelVectorLoss
from models.metrics import hit_at_k
from models.schedule import Phase, PhaseSchedule, one_cycle
from models.train import (
    MODEL_FILE,
    TrainConfig,
    load_checkpoint,
    load_export,
    param_groups,
    save_checkpoint,
    seed_everything,
    train,
)
from storage.atomic import atomic_path, atomic_write_json
from storage.hdf5 import open_store
from storage.stage import StageDir, open_stage, stage_dir
from storage.tiers import Tiers
from storage.vector_index import DEFAULT_ANN_ABOVE, VectorIndex, build_index, unit_rows
from tasks.embeddings import WordTable
from tasks.listing import read_classes
from tasks.wordnet import imagenet_wnids

log = logging.getLogger(__name__)

FEATURES_VERSION = 1
DEVISE_VERSION = 1
INDEX_VERSION = 1
KS = (1, 2, 5, 10, 20)
EMBEDDINGS_FILE = "embeddings.h5"
FEATURE_CHUNK_ROWS = 256


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _stores(resize_dir: str | Path) -> dict[str, Path]:
    return {split: Path(resize_dir) / name for split, name in open_stage(resize_dir).manifest()["stores"].items()}


def store_classes(resize_dir: str | Path) -> list[str]:
    """The wnids the labels of a resize stage's stores index (listing order)."""
    return read_classes(open_stage(resize_dir).manifest()["listing_dir"])


# --- features (fast path) -------------------------------------------------------------------


@dataclass(frozen=True)
class FeaturesConfig:
    backbone: str = "resnet50"
    pretrained: bool = True
    flips: bool = True  # also the features of each image flipped left-right (training picks one per step)
    batch_size: int = 64
    seed: int = 0  # a from-scratch body's initial weights


def features_stage(tiers: Tiers, *, resize_dir: str | Path, config: FeaturesConfig) -> StageDir:
    params = {"version": FEATURES_VERSION, "resize": open_stage(resize_dir).key, **asdict(config)}
    return stage_dir(tiers, "fast", "devise-features", params)


def _image_batches(images: h5py.Dataset, batch_size: int, device: torch.device, *, what: str):
    """(row, normalised float batch on ``device``) for consecutive batches of a store's uint8 images."""
    n, logged = len(images), 0
    for a in range(0, n, batch_size):
        yield a, to_float_nchw(torch.from_numpy(images[a:a + batch_size]), device)
        if (a + batch_size) * 10 // max(n, 1) > logged:  # every 10%
            logged = (a + batch_size) * 10 // max(n, 1)
            log.info("%s: %d/%d images", what, min(a + batch_size, n), n)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def compute_features(body: torch.nn.Module, channels: int, store: Path, out: Path, *, flips: bool,
                     batch_size: int, device: torch.device) -> int:
    """Concat-pooled activations of every image of ``store``: ``features (N, views, 2C) float16``.

    ``channels``: C, the body's output channels. views = 2 with ``flips`` (original, mirrored),
    else 1. Labels and row order are the store's.
    """
    from models.blocks import ConcatPool

    pool = ConcatPool()
    body.eval().to(device)
    with open_store(store) as src, atomic_path(out) as tmp, h5py.File(tmp, "w") as dst:
        images = src["images"]
        n = len(images)
        views = 2 if flips else 1
        feats = dst.create_dataset("features", shape=(n, views, 2 * channels), dtype=np.float16,
                                   chunks=(max(min(FEATURE_CHUNK_ROWS, n), 1), views, 2 * channels))
        with torch.no_grad(), _autocast(device):
            for a, x in _image_batches(images, batch_size, device, what=f"features {store.name}"):
                out_views = [pool(body(x))]
                if flips:
                    out_views.append(pool(body(torch.flip(x, dims=[3]))))
                feats[a:a + len(x)] = torch.stack(out_views, dim=1).float().cpu().numpy().astype(np.float16)
        dst.create_dataset("labels", data=src["labels"][:])
        dst.attrs.update({"source_store": str(store), "views": views, "features": 2 * channels})
    return n


def run_features(stage: StageDir, *, resize_dir: str | Path, config: FeaturesConfig,
                 device: str | None = None) -> StageDir:
    """Pooled activations of every split of a resize stage, plus the (frozen) body's weights."""
    if stage.is_complete:
        return stage
    stage.prepare()
    start = time.perf_counter()
    dev = _device(device)
    seed_everything(config.seed)
    body, channels, loaded = make_body(config.backbone, pretrained=config.pretrained)
    # the body is saved whatever its origin: a from-scratch body's random weights are part of the model
    save_checkpoint(stage.path / "body.pt", body=body.state_dict())
    stores = _stores(resize_dir)
    counts = {split: compute_features(body, channels, store, stage.path / f"{split}.h5", flips=config.flips,
                                      batch_size=config.batch_size, device=dev)
              for split, store in stores.items()}
    with open_store(next(iter(stores.values()))) as f:
        size = int(f["images"].shape[1])
    stage.complete(backbone=config.backbone, pretrained_loaded=bool(loaded), features=2 * channels,
                   views=2 if config.flips else 1, counts=counts, image_size=size, resize_dir=str(resize_dir),
                   device=str(dev), elapsed_s=round(time.perf_counter() - start, 2))
    if config.pretrained and not loaded:
        log.warning("DeViSE features come from a backbone trained FROM SCRATCH (no local weights): "
                    "expect low accuracy")
    return stage


# --- classes --------------------------------------------------------------------------------


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
        zero = set(zero_shot)
    no_vector = [i for i, w in enumerate(classes) if w not in has_vector]
    zs = [i for i, w in enumerate(classes) if w in zero]
    trained = [i for i, w in enumerate(classes) if w in has_vector and w not in zero]
    if not trained:
        raise ValueError(f"no class is left to train on ({len(zs)} zero-shot, {len(no_vector)} without a vector)")
    return ClassPlan(list(classes), trained, zs, no_vector)


# --- training the head on features ----------------------------------------------------------


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


def devise_stage(tiers: Tiers, *, features_dir: str | Path, words_dir: str | Path, config: HeadConfig) -> StageDir:
    params = {"version": DEVISE_VERSION, "features": open_stage(features_dir).key,
              "words": open_stage(words_dir).key, **asdict(config)}
    return stage_dir(tiers, "fast", "devise", params)


def _feature_batches(stream: ChunkShuffleStream, views: int, seed: int):
    """batches(epoch, phase) for the loop: one random view (original or flipped) per row."""

    def batches(epoch: int, phase: Phase):
        stream.set_epoch(epoch)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        for x, y in stream:  # x: (B, views, F) float16
            pick = torch.randint(0, views, (len(x),), generator=g)
            yield x[torch.arange(len(x)), pick].float(), y

    return batches


def _fit_batch_size(store: Path, requested: int, keep: list[int], what: str, **stream) -> int:
    """``requested``, or fewer when ``store`` holds fewer training rows of the ``keep`` labels (with a warning)."""
    available = ChunkShuffleStream(store, 1, keep_labels=keep, **stream).n_kept
    if available < 2:
        raise ValueError(f"{what}: {available} training images; at least 2 are needed")
    if requested > available:
        log.warning("%s: batch size %d > %d training images; using %d", what, requested, available, available)
    return min(requested, available)


def train_head(features_dir: str | Path, plan: ClassPlan, vectors: np.ndarray, config: HeadConfig,
               checkpoint_dir: Path, *, softmax: bool = False, device: str | None = None,
               on_epoch: Callable[[dict[str, Any]], None] | None = None):
    """Train the DeViSE head (cosine to word vectors) or, with ``softmax``, the classifier baseline
    (same head and schedule, cross-entropy over the store's classes). Resumes from ``checkpoint_dir``."""
    m = open_stage(features_dir).manifest()
    bs = _fit_batch_size(Path(features_dir) / "train.h5", config.batch_size, plan.trained, "DeViSE head",
                         x_key="features")
    stream = ChunkShuffleStream(Path(features_dir) / "train.h5", bs, x_key="features", keep_labels=plan.trained,
                                seed=config.seed, drop_last=True)
    outputs = len(plan.classes) if softmax else vectors.shape[1]
    seed_everything(config.seed)  # the same initial head every run (a resumed run starts where this one did)
    head = DeviseHead(m["features"], outputs, hidden=config.hidden, dropout=config.dropout)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if softmax:
        loss_fn: Any = torch.nn.CrossEntropyLoss()
    else:
        loss_fn = LabelVectorLoss(torch.from_numpy(vectors))
    tconfig = TrainConfig(checkpoint_dir=checkpoint_dir, seed=config.seed,
                          tensorboard_dir=checkpoint_dir / "tensorboard",
                          **({"device": device} if device else {}))
    loss_fn = loss_fn.to(tconfig.device)
    schedule = PhaseSchedule(one_cycle(config.epochs, config.lr), len(stream))
    history = train(head, optimizer, schedule, _feature_batches(stream, m["views"], config.seed), loss_fn, tconfig,
                    on_epoch=on_epoch)
    return head.cpu().eval(), history


@torch.no_grad()
def _apply_head(head: torch.nn.Module, features: Path, *, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(head outputs (N, out) float32 for the unflipped view, labels (N,))."""
    head.eval()
    with open_store(features) as f:
        feats, labels = f["features"], f["labels"][:].astype(np.int64)
        out = [head(torch.from_numpy(feats[a:a + batch, 0].astype(np.float32))).numpy()
               for a in range(0, len(feats), batch)]
    dims = head[-1][-1].out_features
    return (np.concatenate(out) if out else np.empty((0, dims), np.float32)), labels


def write_embeddings(out: Path, by_split: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """``embeddings.h5``: per split, ``vectors (N, d)`` unit float32 and ``labels (N,)``, store row order."""
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        for split, (vectors, labels) in by_split.items():
            f.create_dataset(f"{split}/vectors", data=unit_rows(vectors))
            f.create_dataset(f"{split}/labels", data=labels.astype(np.int16))


def read_embeddings(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with h5py.File(path, "r") as f:
        return {split: (f[split]["vectors"][:], f[split]["labels"][:].astype(np.int64)) for split in f}


def export_devise(out: Path, model: Devise, *, classes: list[str], image_size: int, words_dir: str | Path) -> Path:
    """Weights + what search needs to rebuild and use the model."""
    save_checkpoint(out, model=model.state_dict(),
                    devise={"config": asdict(model.config), "classes": classes, "image_size": image_size,
                            "words": str(words_dir)})
    return out


def load_devise(path: str | Path) -> tuple[Devise, dict[str, Any]]:
    """A model exported by the DeViSE stages (``model.pt`` or its folder) and its metadata."""
    state, meta, _ = load_export(path, "devise", "DeViSE model")
    model = Devise(DeviseConfig(**{**meta["config"], "pretrained": False}))
    model.load_state_dict(state["model"])
    return model.eval(), meta


# --- evaluation -----------------------------------------------------------------------------


def _hits(queries: np.ndarray, matrix: np.ndarray, truth: np.ndarray, *, batch: int = 1024) -> dict[int, float]:
    """hit@k of cosine search over ``matrix`` rows, in query batches (50k x 82k scores do not fit at once)."""
    totals = dict.fromkeys(KS, 0.0)
    m = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
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


# --- the stage -------------------------------------------------------------------------------


def run_devise(stage: StageDir, *, features_dir: str | Path, words_dir: str | Path, config: HeadConfig,
               device: str | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> StageDir:
    """Train the head (and the softmax baseline) on precomputed features; export; embed; evaluate."""
    if stage.is_complete:
        return stage
    stage.prepare()
    fm = open_stage(features_dir).manifest()
    table = WordTable(words_dir)
    plan = plan_classes(store_classes(fm["resize_dir"]), table, config.zero_shot)
    vectors = plan.vectors(table)
    head, history = train_head(features_dir, plan, vectors, config, stage.path / "devise", device=device,
                               on_epoch=on_epoch)
    splits = [s for s in ("train", "val") if (Path(features_dir) / f"{s}.h5").is_file()]
    embeddings = {s: _apply_head(head, Path(features_dir) / f"{s}.h5") for s in splits}
    write_embeddings(stage.path / EMBEDDINGS_FILE, embeddings)
    softmax_logits, softmax_history = None, []
    if config.softmax_baseline and "val" in embeddings:
        sm_head, softmax_history = train_head(features_dir, plan, vectors, config, stage.path / "softmax",
                                              softmax=True, device=device)
        softmax_logits = _apply_head(sm_head, Path(features_dir) / "val.h5")
    metrics = evaluate_devise(embeddings, plan, table, softmax_logits=softmax_logits)
    # the whole model: the features stage's body + this head
    model = Devise(DeviseConfig(backbone=fm["backbone"], dims=table.dims, hidden=config.hidden,
                                dropout=config.dropout, pretrained=False))
    model.body.load_state_dict(load_checkpoint(Path(features_dir) / "body.pt")["body"])
    model.head.load_state_dict(head.state_dict())
    export_devise(stage.path / MODEL_FILE, model, classes=plan.classes, image_size=fm["image_size"],
                  words_dir=words_dir)
    atomic_write_json(stage.path / "metrics.json", {"hits": metrics, "history": history,
                                                    "softmax_history": softmax_history, "classes": plan.rows()})
    stage.complete(mode="features", metrics=metrics, classes=plan.rows(), pretrained_backbone=fm["pretrained_loaded"],
                   model=MODEL_FILE, embeddings=EMBEDDINGS_FILE, final_loss=history[-1]["loss"],
                   resize_dir=fm["resize_dir"], words_dir=str(words_dir))
    return stage


# --- fine-tuning end to end -----------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 2
    lr: float = 1e-4  # 1cycle peak for the head; the body gets ``body_lr_scale`` of it
    body_lr_scale: float = 0.1
    frozen_bn: bool = True  # keep the body's BatchNorm statistics (those the head's features were computed with)
    batch_size: int = 64
    weight_decay: float = 1e-2
    num_workers: int = 2
    seed: int = 0


def finetune_stage(tiers: Tiers, *, devise_dir: str | Path, config: FinetuneConfig) -> StageDir:
    params = {"version": DEVISE_VERSION, "devise": open_stage(devise_dir).key, **asdict(config)}
    return stage_dir(tiers, "fast", "devise-finetune", params)


@torch.no_grad()
def embed_store(model: Devise, store: Path, *, batch_size: int = 64,
                device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(predicted word vectors (N, d), labels) for every image of ``store``, in row order."""
    model.eval().to(device)
    out = []
    with open_store(store) as f:
        labels = f["labels"][:].astype(np.int64)
        with _autocast(device):
            for _, x in _image_batches(f["images"], batch_size, device, what=f"embed {store.name}"):
                out.append(model(x).float().cpu().numpy())
    return (np.concatenate(out) if out else np.empty((0, model.config.dims), np.float32)), labels


def run_finetune(stage: StageDir, *, devise_dir: str | Path, config: FinetuneConfig, device: str | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> StageDir:
    """Fine-tune body + head end to end from the image store (random flips), starting from the fast path's model."""
    if stage.is_complete:
        return stage
    stage.prepare()
    dm = open_stage(devise_dir).manifest()
    model, meta = load_devise(devise_dir)
    model.frozen_body_bn = config.frozen_bn
    table = WordTable(dm["words_dir"])
    classes = meta["classes"]
    plan = ClassPlan.from_rows(classes, dm["classes"])
    vectors = plan.vectors(table)
    stores = _stores(dm["resize_dir"])
    bs = _fit_batch_size(stores["train"], config.batch_size, plan.trained, "DeViSE fine-tuning")
    loader = make_loader(stores["train"], bs, num_workers=config.num_workers, keep_labels=plan.trained,
                         seed=config.seed, drop_last=True)
    dev = _device(device)
    optimizer = torch.optim.AdamW(param_groups((model.body, config.body_lr_scale), (model.head, 1.0)), lr=config.lr,
                                  weight_decay=config.weight_decay)

    def batches(epoch: int, phase: Phase):
        loader.dataset.set_epoch(epoch)
        g = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        for images, labels in loader:
            x = to_float_nchw(images, dev)
            flip = (torch.rand(len(x), generator=g) < 0.5).to(dev)
            x[flip] = torch.flip(x[flip], dims=[3])
            yield x, labels

    tconfig = TrainConfig(checkpoint_dir=stage.path / "finetune", seed=config.seed, device=str(dev),
                          tensorboard_dir=stage.path / "finetune" / "tensorboard")
    history = train(model, optimizer, PhaseSchedule(one_cycle(config.epochs, config.lr), len(loader.dataset)),
                    batches, LabelVectorLoss(torch.from_numpy(vectors)).to(dev), tconfig, on_epoch=on_epoch)
    model = model.cpu()
    embeddings = {s: embed_store(model, p, device=dev) for s, p in stores.items()}
    write_embeddings(stage.path / EMBEDDINGS_FILE, embeddings)
    metrics = evaluate_devise(embeddings, plan, table)
    export_devise(stage.path / MODEL_FILE, model, classes=classes, image_size=meta["image_size"],
                  words_dir=dm["words_dir"])
    atomic_write_json(stage.path / "metrics.json", {"hits": metrics, "history": history})
    stage.complete(mode="finetune", metrics=metrics, classes=dm["classes"], model=MODEL_FILE,
                   embeddings=EMBEDDINGS_FILE, final_loss=history[-1]["loss"], resize_dir=dm["resize_dir"],
                   words_dir=dm["words_dir"])
    return stage


# --- search ---------------------------------------------------------------------------------


def index_stage(tiers: Tiers, *, model_dir: str | Path, ann_above: int) -> StageDir:
    params = {"version": INDEX_VERSION, "model": open_stage(model_dir).key, "model_stage": open_stage(model_dir).stage,
              "ann_above": ann_above}
    return stage_dir(tiers, "fast", "devise-index", params)


def run_index(stage: StageDir, *, model_dir: str | Path, ann_above: int = DEFAULT_ANN_ABOVE) -> StageDir:
    """Index every image's embedding (all splits) for search; ``images.tsv`` says which image each row is."""
    if stage.is_complete:
        return stage
    stage.prepare()
    mm = open_stage(model_dir).manifest()
    embeddings = read_embeddings(Path(model_dir) / mm["embeddings"])
    stores = _stores(mm["resize_dir"])
    classes = store_classes(mm["resize_dir"])
    lines = ["split\trow\twnid\tpath"]
    for split, (_, labels) in embeddings.items():
        with open_store(stores[split]) as f:
            root = Path(f.attrs["dataset_root"])
            paths = f["paths"].asstr()[:]
        lines += [f"{split}\t{i}\t{classes[lab]}\t{root / p}" for i, (lab, p) in enumerate(zip(labels, paths))]
    facts = build_index(stage.path, np.concatenate([v for v, _ in embeddings.values()]), ann_above=ann_above)
    with atomic_path(stage.path / "images.tsv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    stage.complete(**facts, model=str(Path(model_dir) / mm["model"]), words_dir=mm["words_dir"])
    return stage


@dataclass
class ImageHit:
    score: float
    wnid: str
    path: str
    split: str = ""


@dataclass
class DeviseSearch:
    """Search one index: text -> images, image -> words and images."""

    index_dir: Path
    index: VectorIndex = field(init=False)

    def __post_init__(self) -> None:
        self.index_dir = Path(self.index_dir)
        self.manifest = open_stage(self.index_dir).manifest()
        self.index = VectorIndex(self.index_dir)
        rows = (self.index_dir / "images.tsv").read_text().splitlines()[1:]
        self.images = [r.split("\t") for r in rows]
        self.table = WordTable(self.manifest["words_dir"])
        self._model: tuple[Devise, dict[str, Any]] | None = None

    def images_for_vector(self, vector: np.ndarray, k: int = 10) -> list[ImageHit]:
        scores, ids = self.index.search(vector[None], k)
        return [ImageHit(float(s), self.images[i][2], self.images[i][3], self.images[i][0])
                for s, i in zip(scores[0], ids[0]) if i >= 0]

    def images_for_text(self, text: str, k: int = 10) -> list[ImageHit]:
        return self.images_for_vector(self.table.vector_for(text), k)

    def embed_image(self, path: str | Path) -> np.ndarray:
        """The model's word-space vector for an image file (resized/cropped as the store was)."""
        from tasks.resize import load_square

        if self._model is None:
            self._model = load_devise(self.manifest["model"])
        model, meta = self._model
        x = to_float_nchw(torch.from_numpy(np.array(load_square(path, meta["image_size"]))[None]), "cpu")
        with torch.no_grad():
            return unit_rows(model.eval()(x).numpy())[0]

    def words_for_image(self, path: str | Path, k: int = 5, vocabulary: str = "imagenet"):
        return self.table.nearest_words(self.embed_image(path), k=k, vocabulary=vocabulary)


# --- Prefect layer --------------------------------------------------------------------------
from prefect import task  # noqa: E402  (the plain functions above do not need Prefect)
from prefect.artifacts import create_table_artifact  # noqa: E402

from tasks.artifacts import epoch_table  # noqa: E402


@task(name="compute-devise-features", retries=1, retry_delay_seconds=5)
def compute_features_task(resize_dir: str, config: FeaturesConfig, tiers: Tiers) -> str:
    return str(run_features(features_stage(tiers, resize_dir=resize_dir, config=config),
                            resize_dir=resize_dir, config=config).path)


def _publish_hits(stage: StageDir, what: str) -> None:
    m = stage.manifest()
    create_table_artifact(
        key="devise-hits", table=m["metrics"],
        description=(f"DeViSE hit@k ({what}; backbone pretrained: {m.get('pretrained_backbone', 'see features')}). "
                     f"Flat: held-out images of the trained classes; zero-shot: every image of the held-out "
                     f"classes. `{stage.path}`"))


@task(name="train-devise", retries=1, retry_delay_seconds=5)
def train_devise_task(features_dir: str, words_dir: str, config: HeadConfig, tiers: Tiers) -> str:
    """Head + softmax baseline on the features (resumes after a crash); hit@k table artifact."""
    stage = run_devise(devise_stage(tiers, features_dir=features_dir, words_dir=words_dir, config=config),
                       features_dir=features_dir, words_dir=words_dir, config=config,
                       on_epoch=epoch_table("devise-epochs", "DeViSE head: cosine loss per epoch"))
    _publish_hits(stage, "head on precomputed features, vs a softmax classifier with the same budget")
    return str(stage.path)


@task(name="finetune-devise", retries=1, retry_delay_seconds=5)
def finetune_devise_task(devise_dir: str, config: FinetuneConfig, tiers: Tiers) -> str:
    stage = run_finetune(finetune_stage(tiers, devise_dir=devise_dir, config=config), devise_dir=devise_dir,
                         config=config, on_epoch=epoch_table("devise-finetune-epochs", "DeViSE fine-tuning"))
    _publish_hits(stage, "fine-tuned end to end")
    return str(stage.path)


@task(name="build-search-index")
def build_index_task(model_dir: str, tiers: Tiers, ann_above: int = DEFAULT_ANN_ABOVE) -> str:
    return str(run_index(index_stage(tiers, model_dir=model_dir, ann_above=ann_above), model_dir=model_dir,
                         ann_above=ann_above).path)
