"""DeViSE fine-tuning: body and head end to end from the image store, from the fast path's model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data import make_loader, store_batches, to_float_nchw
from models.devise import Devise
from models.losses import LabelVectorLoss
from models.schedule import Phase, PhaseSchedule, one_cycle
from models.train import MODEL_FILE, ModelStep, TrainConfig, autocast, default_device, param_groups, rank_seed, train
from storage.atomic import atomic_write_json
from storage.catalog import image_stores, store_classes
from storage.hdf5 import open_store
from storage.image_vectors import EMBEDDINGS_FILE, write_embeddings
from storage.report import Reporter, epoch_table
from storage.stage import StageDir, StageSpec, open_stage, runtime, scale_out, upstream
from storage.words import WordTable
from prep.wordnet import open_wordnet
from training.devise.classes import ClassPlan, fit_batch_size, with_zero_shot_source
from training.devise.evaluate import evaluate_devise, publish_hits
from training.devise.export import export_devise, load_devise


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

    def __post_init__(self) -> None:
        if self.epochs < 2:
            raise ValueError(f"fine-tuning runs a 1cycle: at least 2 epochs, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the head has BatchNorm), got {self.batch_size}")


@torch.no_grad()
def embed_store(model: Devise, store: Path, *, batch_size: int = 64,
                device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted word vectors (N, d), labels) for every image of ``store``, in row order."""
    model.eval().to(device)
    out = []
    with open_store(store) as f:
        labels = f["labels"][:].astype(np.int64)
        with autocast(device):
            for _, x in store_batches(f["images"], batch_size, device, what=f"embed {store.name}"):
                out.append(model(x).float().cpu().numpy())
    return (np.concatenate(out) if out else np.empty((0, model.config.dims), np.float32)), labels


@dataclass(frozen=True)
class FinetuneStage(StageSpec):
    """Fine-tune body + head end to end from the image store (random flips), from a DeViSE stage's model."""

    name = "devise-finetune"
    version = 2  # 2: the DeViSE stage's zero-shot source and hierarchical precision in its evaluation
    retries = 1  # a second try resumes from the last checkpoint
    archive = True
    devise: str = upstream()
    config: FinetuneConfig = FinetuneConfig()
    device: str | None = runtime()
    gpus: int = scale_out()  # training processes (DDP; training/distributed.py)

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        config = self.config
        dm = open_stage(self.devise).manifest()
        model, meta = load_devise(self.devise)
        model.frozen_body_bn = config.frozen_bn
        table = WordTable(dm["words_dir"])
        classes = meta["classes"]
        plan = ClassPlan.from_rows(classes, dm["classes"])
        vectors = plan.vectors(table)
        stores = image_stores(dm["resize_dir"])
        bs = fit_batch_size(stores["train"], config.batch_size, plan.trained, "DeViSE fine-tuning")
        loader = make_loader(stores["train"], bs, num_workers=config.num_workers, keep_labels=plan.trained,
                             seed=config.seed, drop_last=True)
        dev = default_device(self.device)
        optimizer = torch.optim.AdamW(param_groups((model.body, config.body_lr_scale), (model.head, 1.0)),
                                      lr=config.lr, weight_decay=config.weight_decay)

        def batches(epoch: int, phase: Phase):
            loader.dataset.set_epoch(epoch)
            g = torch.Generator().manual_seed(rank_seed(config.seed) * 100_003 + epoch)  # each DDP rank its own
            for images, labels in loader:
                x = to_float_nchw(images, dev)
                flip = (torch.rand(len(x), generator=g) < 0.5).to(dev)
                x[flip] = torch.flip(x[flip], dims=[3])
                yield x, labels

        tconfig = TrainConfig(checkpoint_dir=out / "finetune", seed=config.seed, device=dev,
                              tensorboard_dir=out / "finetune" / "tensorboard")
        step = ModelStep(model, optimizer, LabelVectorLoss(torch.from_numpy(vectors)).to(dev))
        history = train(step, PhaseSchedule(one_cycle(config.epochs, config.lr), len(loader.dataset)), batches, tconfig,
                        on_epoch=epoch_table(report, "devise-finetune-epochs", "DeViSE fine-tuning"))
        model = model.cpu()
        embeddings = {s: embed_store(model, p, device=dev) for s, p in stores.items()}
        write_embeddings(out / EMBEDDINGS_FILE, embeddings)
        eval_plan, eval_embeddings = plan, dict(embeddings)
        if dm.get("zero_shot_resize_dir"):  # the DeViSE stage's zero-shot source, through the fine-tuned model
            eval_plan, relabel = with_zero_shot_source(plan, store_classes(dm["zero_shot_resize_dir"]), table)
            for s, p in image_stores(dm["zero_shot_resize_dir"]).items():
                vectors_, labels = embed_store(model, p, device=dev)
                eval_embeddings[f"zero-shot-{s}"] = (vectors_, relabel[labels])
        wordnet = open_wordnet(dm["wordnet_dir"]) if dm.get("wordnet_dir") else None
        metrics = evaluate_devise(eval_embeddings, eval_plan, table, wordnet=wordnet)
        export_devise(out / MODEL_FILE, model, classes=classes, image_size=meta["image_size"],
                      words_dir=dm["words_dir"])
        atomic_write_json(out / "metrics.json", {"hits": metrics, "history": history})
        return {"mode": "finetune", "metrics": metrics, "classes": dm["classes"], "backbone": dm.get("backbone"),
                "backbone_weights": dm.get("backbone_weights"), "model": MODEL_FILE,
                "embeddings": EMBEDDINGS_FILE, "final_loss": history[-1]["loss"], "resize_dir": dm["resize_dir"],
                "words_dir": dm["words_dir"]}

    def summarize(self, stage: StageDir, report: Reporter) -> None:
        publish_hits(stage, report, "fine-tuned end to end")
