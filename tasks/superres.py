"""Stage 5 as Prefect tasks: train a super-resolution generator on a (crappified, original) pair
of stores, and evaluate it against bicubic. The work is in models/restore.py."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from torch.nn import functional as F

from models.restore import SuperResConfig, evaluate_superres, load_generator, to_unit, train_superres
from storage.atomic import atomic_write_json
from storage.hdf5 import open_store
from storage.stage import StageDir, open_stage, stage_dir
from storage.tiers import Tiers
from tasks.artifacts import epoch_table

SUPERRES_VERSION = 1


def superres_stage(tiers: Tiers, *, crappify_dirs: Sequence[str], config: SuperResConfig) -> StageDir:
    params = {"version": SUPERRES_VERSION, "pairs": [open_stage(d).key for d in crappify_dirs],
              "config": asdict(config)}
    return stage_dir(tiers, "fast", "superres", params)


def _stores(crappify_dir: str, split: str) -> tuple[Path, Path]:
    low = Path(crappify_dir) / f"{split}.h5"
    with open_store(low) as f:
        return low, Path(f.attrs["source_store"])


def training_pairs(crappify_dirs: Sequence[str]) -> dict[int, tuple[Path, Path]]:
    """{high-res side: (low, high) training stores} of each crappify stage (progressive resizing)."""
    pairs = {}
    for d in crappify_dirs:
        low, high = _stores(d, "train")
        with open_store(high) as f:
            pairs[int(f["images"].shape[1])] = (low, high)
    return pairs


@task(name="train-superres", retries=1, retry_delay_seconds=5)
def train_superres_task(crappify_dirs: list[str], config: SuperResConfig, tiers: Tiers) -> str:
    """Train on one crappify stage per image size (resuming after a crash); returns the stage directory."""
    stage = superres_stage(tiers, crappify_dirs=crappify_dirs, config=config)
    if stage.is_complete:
        return str(stage.path)
    stage.prepare()
    publish = epoch_table("superres-epochs", f"Loss terms per epoch ({config.arch}, {config.loss} loss)")
    _, full_history = train_superres(training_pairs(crappify_dirs), config, stage.path, on_epoch=publish)
    atomic_write_json(stage.path / "history.json", full_history)
    stage.complete(epochs=len(full_history), final_loss=full_history[-1]["loss"], model="model.pt")
    return str(stage.path)


def _grid_png(model: torch.nn.Module, low_store: Path, high_store: Path, n: int = 4) -> bytes:
    from PIL import Image

    with open_store(low_store) as lo, open_store(high_store) as hi:
        low = to_unit(torch.from_numpy(lo["images"][:n]), "cpu")
        high = to_unit(torch.from_numpy(hi["images"][:n]), "cpu")
    size = high.shape[-1]
    with torch.no_grad():
        pred = model.eval()(low).clamp(0, 1)
    columns = [F.interpolate(low, size=size, mode="nearest"),
               F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1), pred, high]
    grid = torch.cat([torch.cat(list(c), dim=1) for c in columns], dim=2)  # (3, n*size, 4*size)
    buf = io.BytesIO()
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@task(name="evaluate-superres")
def evaluate_superres_task(model_dir: str, crappify_dir: str, limit: int | None = None) -> dict[str, float]:
    """PSNR/SSIM vs bicubic on the held-out split, as artifacts; returns the means."""
    low, high = _stores(crappify_dir, "val")
    model = load_generator(model_dir)
    result = evaluate_superres(model, low, high, limit=limit)
    means = {k: round(result[k], 4) for k in ("psnr_model", "psnr_bicubic", "ssim_model", "ssim_bicubic")}
    atomic_write_json(Path(model_dir) / "evaluation.json", result)
    create_table_artifact(key="superres-evaluation", table=[{"images": result["images"], **means}],
                          description="Held-out photos: the model against bicubic upsampling of the same input")
    png = base64.b64encode(_grid_png(model, low, high)).decode()
    verdict = "beats" if result["psnr_model"] > result["psnr_bicubic"] else "does NOT beat"
    create_markdown_artifact(
        key="superres-samples",
        markdown=(f"## Super-resolution samples\n\nColumns: crappified input | bicubic | model | target. "
                  f"The model {verdict} bicubic: PSNR {means['psnr_model']} vs {means['psnr_bicubic']} dB.\n\n"
                  f"![samples](data:image/png;base64,{png})\n"),
    )
    return means
