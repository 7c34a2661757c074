"""Stage 5, super-resolution: train a generator on aligned (crappified, original) HDF5 stores,
progressively resized, evaluate it against bicubic, export it, and enhance any image with it.

Evaluation is what the references never did: PSNR and SSIM against the high-resolution target on
held-out images, next to bicubic upsampling of the same inputs. A model that does not beat bicubic
has failed.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from models.augment import PairAugment
from models.backbones import UNET_ENCODERS, best_available
from models.data import make_loader, to_unit
from models.losses import FeatureLoss, pixel_mse, resolve_loss_network
from models.metrics import psnr, ssim
from models.schedule import Phase, PhaseSchedule, one_cycle
from models.superres import make_generator
from models.train import (
    MODEL_FILE,
    ModelStep,
    TrainConfig,
    autocast,
    default_device,
    eval_mode,
    load_export,
    module_device,
    param_groups,
    rank_seed,
    save_checkpoint,
    seed_everything,
    train,
)
from storage.atomic import atomic_write_bytes, atomic_write_json
from storage.catalog import crappified_pair, image_stores
from storage.hdf5 import open_store
from storage.report import Reporter, epoch_table
from storage.stage import StageDir, StageSpec, runtime, scale_out, upstream

log = logging.getLogger(__name__)
LOSSES = ("feature", "pixel")


def store_scale(low_store: str | Path, high_store: str | Path) -> int:
    with open_store(low_store) as low, open_store(high_store) as high:
        s_low, s_high = low["images"].shape[1], high["images"].shape[1]
    if s_high % s_low:
        raise ValueError(f"high-res side {s_high} is not a multiple of low-res side {s_low}")
    return s_high // s_low


# per layer group [encoder low, encoder high, decoder], as multipliers of the phase's lr:
# frozen (fastai's slice(lr): lr/10 for the encoder groups, whose BatchNorm layers alone train
# (train_bn=True), lr for the decoder); unfrozen (slice(lr/100, lr): 1e-5, 1e-4, 1e-3 for lr 1e-3)
FROZEN, UNFROZEN = (0.1, 0.1, 1.0), (0.01, 0.1, 1.0)
ENCODER_GROUPS = (0, 1)  # frozen in a frozen phase (their norm layers train)
WEIGHTS_FILE = "weights.json"  # where the pretrained weights a run started from came from


@dataclass(frozen=True)
class SuperResConfig:
    arch: str = "unet"
    loss: str = "feature"
    batch_size: int = 8
    phases: tuple[Phase, ...] = (Phase(1, (1e-3, 1e-5), "cosine", group_scales=FROZEN, frozen_groups=ENCODER_GROUPS),)
    pretrained: bool = True  # False: random encoder and loss network, asked for explicitly (--no-pretrained)
    seed: int = 0
    weight_decay: float = 1e-3  # the lesson's wd
    num_workers: int = 2  # loader processes reading the store pairs
    encoder: str = "auto"  # the U-Net's: auto = ResNet-34 from a local file, else the bundled EfficientNet-Lite0
    loss_network: str = "auto"  # the feature loss's: auto = VGG16-bn from a local file, else the bundled VGG19
    augment: bool = True  # random crop-zoom (up to 2) and flips, the same for input and target

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {list(LOSSES)}")
        # "auto" is resolved here, so that the stage key names the networks actually used
        encoder = "" if self.arch != "unet" else (
            best_available(UNET_ENCODERS) if self.encoder == "auto" and self.pretrained else
            "efficientnet_lite0" if self.encoder == "auto" else self.encoder)
        object.__setattr__(self, "encoder", encoder)
        object.__setattr__(self, "loss_network", "" if self.loss != "feature" else
                           resolve_loss_network(self.loss_network, self.pretrained))


def make_trainer(config: SuperResConfig, scale: int):
    """(model, optimizer, loss function). The U-Net's optimizer has three parameter groups (encoder
    low, encoder high, decoder: the phases' ``group_scales``); the Johnson network's one."""
    model = make_generator(config.arch, scale, encoder=config.encoder or "resnet34", pretrained=config.pretrained)
    if config.arch == "unet":
        groups = [{"params": g} for g in model.unet.layer_groups()]
    else:
        groups = param_groups((model, 1.0))
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=config.weight_decay)
    loss_fn = (FeatureLoss(config.loss_network, pretrained=config.pretrained) if config.loss == "feature"
               else pixel_mse)
    return model, optimizer, loss_fn


def weights_used(model: torch.nn.Module, loss_fn) -> dict[str, Any]:
    """What a manifest records about the pretrained weights a run started from (None: random)."""
    encoder = getattr(getattr(model, "unet", None), "weights", None)
    loss_net = getattr(loss_fn, "source", None)
    return {"encoder": encoder.record() if encoder else None, "loss_network": loss_net.record() if loss_net else None}


Pair = tuple[Path, Path]  # (low-res store, aligned high-res store)


def _legs(phases: tuple[Phase, ...]) -> list[tuple[int | None, int | None, tuple[Phase, ...]]]:
    """Consecutive phases with the same (image_size, batch_size): each leg is one pass of the loop."""
    legs: list[tuple[int | None, int | None, list[Phase]]] = []
    for p in phases:
        if legs and (legs[-1][0], legs[-1][1]) == (p.image_size, p.batch_size):
            legs[-1][2].append(p)
        else:
            legs.append((p.image_size, p.batch_size, [p]))
    return [(size, batch, tuple(ps)) for size, batch, ps in legs]


def _pair_for(pairs: dict[int, Pair], size: int | None) -> tuple[int, Pair]:
    """(high-res side, pair) for a phase's ``image_size`` (None: the only pair)."""
    if size is None:
        if len(pairs) != 1:
            raise ValueError(f"phases without an image_size need exactly one store pair; got sizes {sorted(pairs)}")
        return next(iter(pairs.items()))
    if size not in pairs:
        raise ValueError(f"a phase asks for image_size {size}; store pairs exist for {sorted(pairs)}")
    return size, pairs[size]


def train_superres(pairs: Pair | Mapping[int, Pair], config: SuperResConfig, checkpoint_dir: Path, *,
                   device: str | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                   tensorboard: bool = True):
    """Train a generator from crappified stores to the originals; returns (model, history).

    ``pairs``: one (low, high) pair, or ``{high-res side: (low, high)}`` for progressive resizing,
    where each phase's ``image_size`` picks its pair (and ``batch_size`` overrides the config's).
    Consecutive phases at one size form a leg, trained by the shared loop with its own checkpoint
    (``checkpoint_dir/leg-<i>-<size>/last.pt``); the weights carry from leg to leg, and a rerun
    resumes inside the leg that was interrupted. TensorBoard curves go to each leg's folder.
    """
    if not isinstance(pairs, Mapping):
        low, high = pairs
        with open_store(high) as f:
            pairs = {int(f["images"].shape[1]): (Path(low), Path(high))}
    pairs = {int(k): (Path(lo), Path(hi)) for k, (lo, hi) in pairs.items()}
    scales = {store_scale(*pair) for pair in pairs.values()}
    if len(scales) != 1:
        raise ValueError(f"every store pair must have the same scale; got {sorted(scales)}")
    scale = scales.pop()
    seed_everything(config.seed)  # the same initial weights every run: a resumed run starts where this one did
    model, optimizer, loss_fn = make_trainer(config, scale)
    step = ModelStep(model, optimizer, loss_fn)
    atomic_write_json(Path(checkpoint_dir) / WEIGHTS_FILE, weights_used(model, loss_fn))
    augment = PairAugment() if config.augment else None
    tconfig = TrainConfig(checkpoint_dir=checkpoint_dir, seed=config.seed, device=default_device(device))
    loss_fn = loss_fn.to(tconfig.device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
    history: list[dict[str, Any]] = []
    for i, (size, batch_size, phases) in enumerate(_legs(config.phases)):
        if config.arch != "unet":  # one parameter group: drop per-phase group scales meant for the U-Net
            phases = tuple(replace(p, group_scales=None, frozen_groups=()) for p in phases)
        leg_size, (low, high) = _pair_for(pairs, size)
        loader = make_loader(low, batch_size or config.batch_size, num_workers=config.num_workers, target_store=high,
                             seed=config.seed, drop_last=True)
        if len(loader) < 1:
            raise ValueError(f"{loader.dataset.n} training pairs in {low} are fewer than one batch of "
                             f"{loader.dataset.batch_size}")
        leg_dir = Path(checkpoint_dir) / f"leg-{i}-{size or 'store'}"
        leg_config = replace(tconfig, checkpoint_dir=leg_dir,
                             tensorboard_dir=leg_dir / "tensorboard" if tensorboard else None)
        offset = len(history)

        def batches(epoch: int, phase: Phase, loader=loader):
            loader.dataset.set_epoch(epoch)
            # the same crops on a resume; each DDP rank its own
            draws = torch.Generator().manual_seed(rank_seed(config.seed) * 100_003 + epoch)
            for lo, hi in loader:
                lo, hi = to_unit(lo, tconfig.device), to_unit(hi, tconfig.device)
                yield augment(lo, hi, draws) if augment else (lo, hi)

        def tagged(record: dict[str, Any], offset=offset, leg=i, leg_size=leg_size) -> dict[str, Any]:
            return {**record, "epoch": offset + record["epoch"], "leg": leg, "size": leg_size}

        history += [tagged(r) for r in train(
            step, PhaseSchedule(phases, len(loader)), batches, leg_config,
            on_epoch=(lambda r, tagged=tagged: on_epoch(tagged(r))) if on_epoch else None)]
    export_generator(model.cpu(), config.arch, scale, Path(checkpoint_dir) / MODEL_FILE, encoder=config.encoder)
    return model, history


def lesson_phases(epochs: int, lr: float, *, second_size: bool = False, **data) -> list[Phase]:
    """Lesson 7's two steps at one size (``do_fit`` = ``fit_one_cycle(epochs, lrs, pct_start=0.9)``):
    ``do_fit('1a', slice(lr*10))`` with the encoder frozen (no gradients for it but its BatchNorm
    layers, fastai's ``train_bn=True``), then unfrozen at ``slice(1e-5, lr)`` over the three layer
    groups (1e-5, 1e-4, 1e-3 for the lesson's lr = 1e-3). At the second, larger size the lesson
    freezes again at ``slice(lr)`` ('2a') and ends with ``slice(1e-6, 1e-4)``, pct_start 0.3 ('2b'):
    ``second_size`` does that, relative to ``lr``."""
    frozen_top = lr if second_size else lr * 10
    frozen = [replace(p, group_scales=FROZEN, frozen_groups=ENCODER_GROUPS)
              for p in one_cycle(epochs, frozen_top, pct_start=0.9, **data)]
    top, pct = (lr / 10, 0.3) if second_size else (lr, 0.9)
    unfrozen = [replace(p, group_scales=UNFROZEN) for p in one_cycle(epochs, top, pct_start=pct, **data)]
    return frozen + unfrozen


def progressive_phases(sizes: Sequence[tuple[int, int]], epochs: int, lr: float) -> tuple[Phase, ...]:
    """Lesson 7's schedule for each (high-res size, batch size), smallest first: ``lesson_phases`` at
    each size (frozen, then unfrozen; the later sizes as the lesson's second)."""
    phases: list[Phase] = []
    for i, (size, batch) in enumerate(sizes):
        phases += lesson_phases(epochs, lr, second_size=i > 0, image_size=size, batch_size=batch)
    return tuple(phases)


@torch.no_grad()
def evaluate_superres(model: torch.nn.Module, low_store: str | Path, high_store: str | Path, *,
                      limit: int | None = None, batch_size: int = 16, device: str = "cpu") -> dict[str, Any]:
    """Per-image and mean PSNR/SSIM of the model and of bicubic upsampling against the targets."""
    model.to(device)  # where it is already, when a training hook calls this
    with eval_mode(model):
        scale = store_scale(low_store, high_store)
        rows: list[dict[str, Any]] = []
        with open_store(low_store) as low_f, open_store(high_store) as high_f:
            n = low_f["images"].shape[0] if limit is None else min(limit, low_f["images"].shape[0])
            paths = high_f["paths"].asstr()
            for a in range(0, n, batch_size):
                b = min(a + batch_size, n)
                low = to_unit(torch.from_numpy(low_f["images"][a:b]), device)
                high = to_unit(torch.from_numpy(high_f["images"][a:b]), device)
                pred = model(low).clamp(0, 1)
                bicubic = F.interpolate(low, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
                for i, (pm, pb, sm, sb) in enumerate(zip(psnr(pred, high), psnr(bicubic, high), ssim(pred, high),
                                                         ssim(bicubic, high))):
                    rows.append({"path": paths[a + i], "psnr_model": float(pm), "psnr_bicubic": float(pb),
                                 "ssim_model": float(sm), "ssim_bicubic": float(sb)})
    if not rows:
        raise ValueError(f"no images to evaluate in {low_store}")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr_model", "psnr_bicubic", "ssim_model", "ssim_bicubic")}
    return {"images": len(rows), **mean, "per_image": rows}


def load_generator(checkpoint: str | Path) -> torch.nn.Module:
    """A generator exported by ``train_superres`` (``model.pt``, or the folder holding it)."""
    state, meta, _ = load_export(checkpoint, "superres", "generator")
    model = make_generator(meta["arch"], meta["scale"], encoder=meta.get("encoder") or "resnet34", pretrained=False,
                           announce=False)  # the saved weights are loaded next
    model.load_state_dict(state["model"])
    return model.eval()


def export_generator(model: torch.nn.Module, arch: str, scale: int, out: Path, *, encoder: str = "") -> Path:
    """Weights + (arch, scale, encoder): enough to rebuild the generator ``make_generator`` made."""
    save_checkpoint(out, model=model.state_dict(), superres={"arch": arch, "scale": scale, "encoder": encoder})
    return out


def enhance(model: torch.nn.Module, image: torch.Tensor, *, tile: int = 256, overlap: int = 16,
            scale: int | None = None, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run a fully convolutional generator on an image of any size, in overlapping tiles.

    ``image``: (3, H, W) in [0, 1]. Tiles of ``tile`` low-res pixels bound memory; the overlap is
    cropped away so seams do not show.
    """
    scale = scale or model.scale
    _, h, w = image.shape
    out = torch.zeros(3, h * scale, w * scale)
    step = tile - 2 * overlap
    total, done = len(range(0, h, step)) * len(range(0, w, step)), 0
    with torch.no_grad():
        for y in range(0, h, step):
            for x in range(0, w, step):
                y0, x0 = max(y - overlap, 0), max(x - overlap, 0)
                y1, x1 = min(y + step + overlap, h), min(x + step + overlap, w)
                pred = model(image[None, :, y0:y1, x0:x1])[0].clamp(0, 1)
                ty, tx = (y - y0) * scale, (x - x0) * scale
                hh, ww = (min(y + step, h) - y) * scale, (min(x + step, w) - x) * scale
                out[:, y * scale:y * scale + hh, x * scale:x * scale + ww] = pred[:, ty:ty + hh, tx:tx + ww]
                done += 1
                if progress is not None:
                    progress(done, total)  # (tiles done, tiles in all)
    return out


# --- the stage ------------------------------------------------------------------------------

SAMPLES_FILE = "samples.png"
EVALUATION_FILE = "evaluation.json"
MEANS = ("psnr_model", "psnr_bicubic", "ssim_model", "ssim_bicubic")


def superres_plan(*, arch: str = "unet", loss: str = "feature", high_size: int = 128, low_size: int = 32,
                  progressive_from: int | None = None, epochs: int = 10, lr: float = 1e-3, batch_size: int = 8,
                  small_batch_size: int | None = None, pretrained: bool = True,
                  seed: int = 0) -> tuple[list[tuple[int, int]], SuperResConfig]:
    """(the (high, low) store sizes to crappify, smallest first; the training config) for a run.

    With ``progressive_from`` (e.g. 64 for 128, as lesson 7 does 128 then 256), training goes first
    on ``progressive_from``-pixel targets (inputs scaled alike, ``small_batch_size``, default 2x
    ``batch_size``) and then at ``high_size``: at each size a 1cycle of ``epochs`` with the encoder
    frozen, then one with it unfrozen at discriminative rates. Without it, one 1cycle with the
    U-Net's encoder at 1/10 of the learning rate.
    """
    if progressive_from is not None and not 0 < progressive_from < high_size:
        raise ValueError(f"progressive_from must be between 0 and high_size {high_size}, got {progressive_from}")
    if high_size % low_size:
        raise ValueError(f"high_size {high_size} must be a multiple of low_size {low_size}")
    sizes = [(high_size, low_size, batch_size)]
    if progressive_from:
        sizes.insert(0, (progressive_from, progressive_from * low_size // high_size,
                         small_batch_size or 2 * batch_size))
    if arch == "johnson":  # nothing pretrained to freeze: one 1cycle per size
        phases = tuple(p for high, _, batch in sizes
                       for p in one_cycle(epochs, lr, image_size=high if progressive_from else None,
                                          batch_size=batch if progressive_from else None))
    elif progressive_from:
        phases = progressive_phases([(high, batch) for high, _, batch in sizes], epochs, lr)
    else:  # the lesson's first two steps: encoder frozen, then unfrozen at discriminative rates
        phases = tuple(lesson_phases(epochs, lr))
    config = SuperResConfig(arch=arch, loss=loss, batch_size=batch_size, phases=phases, pretrained=pretrained,
                            seed=seed)
    return [(high, low) for high, low, _ in sizes], config


def training_pairs(crappify_dirs: Sequence[str | Path]) -> dict[int, Pair]:
    """{high-res side: (low, high) training stores} of each crappify stage (progressive resizing)."""
    pairs = {}
    for d in crappify_dirs:
        low, high = crappified_pair(d, "train")
        with open_store(high) as f:
            pairs[int(f["images"].shape[1])] = (low, high)
    return pairs


def grid_png(columns: list[torch.Tensor]) -> bytes:
    """Image batches (B, 3, S, S) in [0, 1], one per column, side by side as one PNG (B rows)."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(c.clamp(0, 1)), dim=1) for c in columns], dim=2)  # (3, B*S, cols*S)
    buf = io.BytesIO()
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images)`` in eval mode on the model's own device, as float32 on the CPU; the model is
    neither moved nor left in another mode (it may be the one being trained: hooks call this)."""
    with eval_mode(model):
        device = module_device(model)
        with autocast(device):
            return model(images.to(device)).float().cpu()


def sample_grid_png(models: torch.nn.Module | Sequence[torch.nn.Module], low_store: Path, high_store: Path,
                    n: int = 4) -> bytes:
    """Columns crappified (nearest) | bicubic | each model | target for the first ``n`` images, as PNG."""
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    with open_store(low_store) as lo, open_store(high_store) as hi:
        low = to_unit(torch.from_numpy(lo["images"][:n]), "cpu")
        high = to_unit(torch.from_numpy(hi["images"][:n]), "cpu")
    size = high.shape[-1]
    preds = [predict(m, low) for m in models]
    return grid_png([F.interpolate(low, size=size, mode="nearest"),
                     F.interpolate(low, size=size, mode="bicubic", align_corners=False), *preds, high])


def png_markdown(title: str, text: str, png: bytes) -> str:
    """A markdown page with a PNG inline (Prefect artifacts show data: URLs)."""
    return f"## {title}\n\n{text}\n\n![{title}](data:image/png;base64,{base64.b64encode(png).decode()})\n"


@dataclass(frozen=True)
class SuperResStage(StageSpec):
    """Train on one crappify stage per image size (smallest first), then evaluate on the largest
    size's held-out split against bicubic. Resumes inside the leg a crash interrupted."""

    name = "superres"
    # 2: pretrained encoder/loss network required, lesson phases, pair augmentation; 3: fastai's
    # DynamicUnet decoder, the lesson's 1a rate (slice(lr*10)) with the frozen encoder's BN trained
    version = 3
    retries = 1  # a second try resumes from the last checkpoint
    archive = True  # the model, history and evaluation go to the bulk tier too
    pairs: tuple[str, ...] = upstream()  # crappify stage directories
    # a factory: the default resolves "auto" to the installed weights, which an import must not need
    config: SuperResConfig = field(default_factory=SuperResConfig)
    device: str | None = runtime()
    gpus: int = scale_out()  # training processes (DDP; training/distributed.py)

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        config = self.config
        publish = epoch_table(report, "superres-epochs", f"Loss terms per epoch ({config.arch}, {config.loss} loss)")
        model, history = train_superres(training_pairs(self.pairs), config, out, device=self.device,
                                        on_epoch=publish)
        atomic_write_json(out / "history.json", history)
        means = None
        if "val" in image_stores(self.pairs[-1]):
            low, high = crappified_pair(self.pairs[-1], "val")
            result = evaluate_superres(model, low, high, device=default_device(self.device))
            atomic_write_json(out / EVALUATION_FILE, result)
            atomic_write_bytes(out / SAMPLES_FILE, sample_grid_png(model, low, high))
            means, images = {k: round(result[k], 4) for k in MEANS}, result["images"]
        else:
            images = 0
            log.warning("superres: %s has no val store: the model is not evaluated", self.pairs[-1])
        return {"epochs": len(history), "final_loss": history[-1]["loss"], "model": MODEL_FILE, "evaluation": means,
                "evaluated_images": images, "encoder": config.encoder, "loss_network": config.loss_network,
                "weights": json.loads((out / WEIGHTS_FILE).read_text())}

    def summarize(self, stage: StageDir, report: Reporter) -> None:
        m = stage.manifest()
        means = m["evaluation"]
        if means is None:
            return
        report.table("superres-evaluation", [{"images": m["evaluated_images"], **means}],
                     "Held-out photos: the model against bicubic upsampling of the same input")
        verdict = "beats" if means["psnr_model"] > means["psnr_bicubic"] else "does NOT beat"
        report.markdown("superres-samples", png_markdown(
            "Super-resolution samples",
            f"Columns: crappified input | bicubic | model | target. The model {verdict} bicubic: PSNR "
            f"{means['psnr_model']} vs {means['psnr_bicubic']} dB.", (stage.path / SAMPLES_FILE).read_bytes()))
