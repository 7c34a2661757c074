"""Style transfer: Gatys et al.'s optimisation of an image's pixels, and fast (Johnson) style
transfer trained as a stage on an image store and applied in one forward pass.

Gatys (``gatys``): start from the content image (or smoothed noise), and minimise content + style
loss (models/style) over its pixels with L-BFGS (the lesson's) or Adam. The style image is scaled
to cover the content image and centre-cropped to it. ``scales`` > 1 optimises coarse to fine: at
half the size first, then the result upsampled is the start at the next size (large images take
their layout from the coarse pass and only detail at full size). The lesson's two variants are
settings: style only from noise (``content_weight=0``), content only from noise (style weights
0; ``content_block`` picks the layer reconstructed).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from models.backbones import LOSS_NETWORKS, best_available
from models.data import make_loader, to_unit
from models.schedule import PhaseSchedule, one_cycle
from models.style import DEFAULT_STYLE_WEIGHTS, BlockFeatures, StyleLoss, StyleNet
from models.train import (
    MODEL_FILE,
    ModelStep,
    NonFiniteLoss,
    TrainConfig,
    default_device,
    load_export,
    save_checkpoint,
    seed_everything,
    train,
)
from storage.atomic import atomic_write_bytes, atomic_write_json
from storage.catalog import image_stores
from storage.hdf5 import open_store
from storage.report import Reporter, epoch_table
from storage.stage import StageDir, StageSpec, runtime, scale_out, upstream
from training.superres import grid_png, png_markdown

log = logging.getLogger(__name__)
OPTIMIZERS = ("lbfgs", "adam")
INITS = ("content", "noise")
MODES = {  # --mode: (init, content weight on?, style on?)
    "transfer": ("content", True, True),
    "style": ("noise", False, True),
    "content": ("noise", True, False),
}


def load_rgb(path: str | Path) -> torch.Tensor:
    """(3, H, W) float in [0, 1] of an image file (any mode; EXIF orientation applied)."""
    from PIL import Image

    from prep.resize import to_rgb

    with Image.open(path) as im:
        return torch.from_numpy(np.array(to_rgb(im))).permute(2, 0, 1).float() / 255


def save_rgb(image: torch.Tensor, path: str | Path) -> Path:
    """Write (3, H, W) in [0, 1] as an image file (format from the suffix), atomically: a crash
    never leaves a half-written file under ``path``."""
    import io

    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix {path.suffix!r}; use .png, .jpg, .webp, ...")
    buf = io.BytesIO()
    Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())
    return path


def resize_long_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) scaled so that its longer side is ``size`` (antialiased when shrinking)."""
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    if scale == 1:
        return image
    out = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(image[None], size=out, mode="bicubic", align_corners=False, antialias=scale < 1)[0].clamp(0, 1)


def fit_style(style: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The style image scaled to cover (height, width) and centre-cropped to it (the lesson resized
    its painting to the bird photo's size)."""
    h, w = style.shape[-2:]
    scale = max(height / h, width / w)
    sh, sw = max(height, round(h * scale)), max(width, round(w * scale))
    scaled = F.interpolate(style[None], size=(sh, sw), mode="bicubic", align_corners=False,
                           antialias=scale < 1)[0].clamp(0, 1)
    top, left = (sh - height) // 2, (sw - width) // 2
    return scaled[:, top:top + height, left:left + width]


def smooth_noise(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform noise, box-blurred 8x8 (the lesson median-filtered it 8x8), around mid-grey."""
    noise = torch.rand(1, 3, height + 7, width + 7, generator=generator)
    return F.avg_pool2d(noise, 8, stride=1)[0] * 0.5 + 0.25


@dataclass(frozen=True)
class GatysConfig:
    size: int = 384  # the output's longer side (the content image is scaled to it)
    steps: int = 200  # loss evaluations per scale (each is a forward and backward pass)
    optimizer: str = "lbfgs"
    lr: float | None = None  # default: 1 for L-BFGS (with a strong-Wolfe line search), 0.02 for Adam
    init: str = "content"  # or "noise"
    content_block: int = 3  # the lesson's block_ends[3]
    content_weight: float = 1.0
    style_weights: tuple[float, ...] = DEFAULT_STYLE_WEIGHTS
    scaling: str = "relative"  # or "lesson" (models/style)
    tv_weight: float = 0.0
    scales: int = 1  # > 1: coarse to fine, each scale twice the last
    network: str = "auto"
    seed: int = 0
    log_every: int = 20

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {list(INITS)}")
        if self.size < 32:
            raise ValueError(f"size {self.size} is too small for VGG's five blocks; use at least 32")
        if self.scaling not in ("relative", "lesson"):
            raise ValueError(f"unknown scaling {self.scaling!r}; choose relative or lesson")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.steps < 1 or self.scales < 1:
            raise ValueError(f"steps and scales must be >= 1; got {self.steps}, {self.scales}")
        if self.size >> (self.scales - 1) < 32:
            raise ValueError(f"{self.scales} scales start at {self.size >> (self.scales - 1)} px; "
                             "fewer scales or a larger size (the coarsest must be >= 32 px)")
        if len(self.style_weights) != 5 or min(self.style_weights) < 0:
            raise ValueError(f"style_weights: five weights >= 0 (one per VGG block), got {list(self.style_weights)}")
        if self.content_weight < 0 or self.tv_weight < 0:
            raise ValueError("content_weight and tv_weight must be >= 0")
        if not self.content_weight and not any(self.style_weights):
            raise ValueError("nothing to optimise: content_weight is 0 and every style weight is 0")
        if not 0 <= self.content_block < 5:
            raise ValueError(f"content_block must be 0-4 (the five VGG blocks), got {self.content_block}")


def gatys(content: torch.Tensor, style: torch.Tensor | None, config: GatysConfig = GatysConfig(), *,
          device: str = "cpu", features: BlockFeatures | None = None,
          progress: Callable[[dict[str, Any]], None] | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Optimise an image: ``content`` (3, H, W) in [0, 1] gives the size and layout, ``style`` (3,
    h, w) the textures (None: content only). Returns (image (3, H', W') in [0, 1] with its longer
    side ``config.size``, history: one record per ``log_every`` loss evaluations and per scale end)."""
    if style is None and any(config.style_weights):
        raise ValueError("style weights are set but no style image was given")
    features = (features or BlockFeatures(config.network)).to(device).eval()
    generator = torch.Generator().manual_seed(config.seed)
    target = resize_long_side(content, config.size)
    history: list[dict[str, Any]] = []
    image = None
    total = 0
    for level in range(config.scales):
        factor = 2 ** (config.scales - 1 - level)
        h, w = max(1, target.shape[1] // factor), max(1, target.shape[2] // factor)
        here = F.interpolate(target[None], size=(h, w), mode="bicubic", align_corners=False,
                             antialias=factor > 1)[0].clamp(0, 1) if factor > 1 else target
        if image is None:
            start = here if config.init == "content" else smooth_noise(h, w, generator)
        else:
            start = F.interpolate(image[None], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        loss_fn = StyleLoss(features, fit_style(style, h, w).to(device) if style is not None else here.to(device),
                            content_block=config.content_block, content_weight=config.content_weight,
                            style_weights=config.style_weights if style is not None else (0.0,) * 5,
                            scaling=config.scaling, tv_weight=config.tv_weight).to(device)
        content_target = loss_fn.content_targets(here[None].to(device)) if config.content_weight else None
        image, records, total = _optimise(start.to(device), loss_fn, content_target, config, level, total, progress)
        history += records
    return image.detach().clamp(0, 1).cpu(), history


def _optimise(start: torch.Tensor, loss_fn: StyleLoss, content_target, config: GatysConfig, level: int,
              done_before: int, progress) -> tuple[torch.Tensor, list[dict[str, Any]], int]:
    x = start[None].clone().requires_grad_(True)
    if config.optimizer == "lbfgs":
        opt = torch.optim.LBFGS([x], lr=config.lr or 1.0, max_iter=config.steps, max_eval=config.steps,
                                history_size=50,
                                line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)
    else:
        opt = torch.optim.Adam([x], lr=config.lr or 0.02)
    state = {"n": 0, "last": None}
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def closure():
        opt.zero_grad(set_to_none=True)
        terms = loss_fn(x, content_target=content_target)
        terms["loss"].backward()
        state["n"] += 1
        state["last"] = {k: float(v.detach()) for k, v in terms.items()}
        bad = {k: v for k, v in state["last"].items() if not math.isfinite(v)}
        if bad:  # a black image written with exit 0 is worse than a stop that says where
            raise NonFiniteLoss(f"style transfer diverged at iteration {done_before + state['n']} (scale {level}): "
                                + ", ".join(f"{k} = {v}" for k, v in bad.items())
                                + "; lower --lr or the loss weights")
        if state["n"] % config.log_every == 0 or state["n"] == config.steps:
            seconds = time.perf_counter() - t0
            record = {"scale": level, "size": list(x.shape[-2:]), "iteration": state["n"],
                      "total_iterations": done_before + state["n"], "seconds": round(seconds, 2),
                      "s_per_iteration": round(seconds / state["n"], 4), **state["last"]}
            records.append(record)
            if progress:
                progress(record)
        return terms["loss"]

    if config.optimizer == "lbfgs":
        while state["n"] < config.steps:
            before = state["n"]
            opt.step(closure)
            if state["n"] == before:  # converged: no more evaluations
                break
    else:
        while state["n"] < config.steps:
            opt.step(closure)
    return x.detach()[0], records, done_before + state["n"]


def file_digest(path: str | Path) -> str:
    """16 hex chars of the SHA-256 of a file's bytes (a style image's identity in a stage key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]



# --- style images -----------------------------------------------------------------------------

BUNDLED_STYLE = "scream.jpg"
BUNDLED_STYLE_NOTE = ("Edvard Munch, The Scream (1893), public domain; the copy in Debian's darknet package "
                      "(data/scream.jpg)")


def default_style() -> Path:
    """The bundled painting: Munch's The Scream from Debian's ``darknet`` data (installed, or
    extracted into the environment by ``make setup``), or an error saying how to get one."""
    from prep.sample import darknet_dirs

    for d in darknet_dirs():
        if (d / BUNDLED_STYLE).is_file():
            return d / BUNDLED_STYLE
    raise FileNotFoundError(f"no bundled style image ({BUNDLED_STYLE} of Debian's darknet package) in "
                            f"{', '.join(map(str, darknet_dirs()))}; run `make setup`, `apt-get install darknet`, "
                            "or name your own painting with --style")


def style_source(path: str | Path) -> str:
    """Where a style image came from, for manifests and artifacts."""
    try:
        if Path(path).resolve() == default_style().resolve():
            return BUNDLED_STYLE_NOTE
    except FileNotFoundError:
        pass
    return f"your file {path}"


# --- fast style transfer: a network trained against one style image -----------------------------


@dataclass(frozen=True)
class FastStyleConfig:
    epochs: int = 2
    lr: float = 1e-3  # 1cycle peak (Johnson et al.: Adam at 1e-3)
    batch_size: int = 4  # the paper's
    content_block: int = 1  # relu2_2, the paper's content layer
    content_weight: float = 1.0
    style_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 0.0)  # the paper's relu1_2 ... relu4_3
    scaling: str = "relative"
    tv_weight: float = 0.0
    style_size: int | None = None  # the style image's longer side (default: the training images' side)
    nf: int = 32
    n_res: int = 5
    network: str = "auto"
    pretrained: bool = True  # False: a random loss network, asked for explicitly (tests, the device smoke)
    eval_images: int = 16  # val images whose loss is logged every epoch
    grid_rows: int = 4
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"epochs >= 1, lr > 0 and batch_size >= 1 needed; got {self.epochs}, {self.lr}, "
                             f"{self.batch_size}")
        if len(self.style_weights) != 5 or min(self.style_weights) < 0 or not any(self.style_weights):
            raise ValueError(f"style_weights: five weights >= 0, not all 0; got {list(self.style_weights)}")
        if not 0 <= self.content_block < 5 or self.content_weight < 0:
            raise ValueError(f"content_block 0-4 and content_weight >= 0 needed; got {self.content_block}, "
                             f"{self.content_weight}")
        # "auto" resolved here: the stage key names the network actually used
        if self.network == "auto":
            object.__setattr__(self, "network", best_available(LOSS_NETWORKS) if self.pretrained else "vgg19_caffe")


def style_model(config: FastStyleConfig) -> torch.nn.Module:
    return StyleNet(n_res=config.n_res, nf=config.nf)


def export_style_model(model: torch.nn.Module, out: Path, config: FastStyleConfig, *, style_digest: str,
                       style_note: str) -> Path:
    save_checkpoint(out, model=model.state_dict(),
                    style={"nf": config.nf, "n_res": config.n_res, "style_digest": style_digest, "style": style_note})
    return out


def load_style_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the network, its metadata) of a fast-style export (``model.pt`` or the folder holding it)."""
    state, meta, _ = load_export(path, "style", "fast style model")
    model = StyleNet(n_res=meta["n_res"], nf=meta["nf"])
    model.load_state_dict(state["model"])
    return model.eval(), meta


@torch.no_grad()
def apply_style(model: torch.nn.Module, image: torch.Tensor, *, device: str = "cpu") -> torch.Tensor:
    """(3, H, W) in [0, 1] -> the stylised image, the same size, in one forward pass."""
    return model.to(device).eval()(image[None].to(device))[0].clamp(0, 1).cpu()


SAMPLES_DIR = "samples"
SAMPLES_FILE = "samples.png"


@dataclass(frozen=True)
class FastStyleStage(StageSpec):
    """Train the fast style network on a resize stage's images against one style image; every
    epoch a grid of stylised val images (a PNG and a Prefect artifact) and the val loss; export
    ``model.pt`` for ``imagesmith stylize --model``."""

    name = "style"
    version = 1
    retries = 1  # a second try resumes from the last checkpoint
    archive = True
    images: str = upstream()  # a resize stage
    style_digest: str = ""  # file_digest of the style image: its bytes, not its path, are in the key
    config: FastStyleConfig = field(default_factory=FastStyleConfig)  # resolves "auto": not at import
    style: str = runtime("")  # the style image's path (where to read it)
    device: str | None = runtime()
    gpus: int = scale_out()  # training processes (DDP; training/distributed.py)

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        config, device = self.config, default_device(self.device)
        if file_digest(self.style) != self.style_digest:
            raise ValueError(f"the style image {self.style} is not the one this stage's key names "
                             f"(sha256 {self.style_digest}...); it changed since the run was planned")
        stores = image_stores(self.images)
        loader = make_loader(stores["train"], config.batch_size, num_workers=config.num_workers, seed=config.seed,
                             drop_last=True)
        if len(loader) < 1:
            raise ValueError(f"{loader.dataset.n} training images in {stores['train']} are fewer than one batch "
                             f"of {config.batch_size}")
        side = loader.dataset.image_shape[0]
        seed_everything(config.seed)  # the same initial weights every run: a resumed run starts where this one did
        model = style_model(config)
        features = BlockFeatures(config.network, pretrained=config.pretrained)
        style = resize_long_side(load_rgb(self.style), config.style_size or side)
        loss_fn = StyleLoss(features, style, content_block=config.content_block, content_weight=config.content_weight,
                            style_weights=config.style_weights, scaling=config.scaling,
                            tv_weight=config.tv_weight).to(device)
        step = ModelStep(model, torch.optim.Adam(model.parameters(), lr=config.lr), loss_fn)
        val = None
        if "val" in stores:
            with open_store(stores["val"]) as f:
                val = to_unit(torch.from_numpy(f["images"][:max(config.eval_images, config.grid_rows)]), "cpu")
        note = style_source(self.style)

        def batches(epoch: int, phase):
            loader.dataset.set_epoch(epoch)
            for x, _ in loader:
                x = to_unit(x, device)
                yield x, x

        @torch.no_grad()
        def evaluate(step_fn: ModelStep) -> dict[str, float]:
            if val is None:
                return {}
            step_fn.model.eval()
            x = val[:config.eval_images].to(device)
            terms = loss_fn(step_fn.model(x), x)
            return {"loss": float(terms["loss"]), "content": float(terms.get("content", 0.0)),
                    "style": float(sum(v for k, v in terms.items() if k.startswith("style_")))}

        publish = epoch_table(report, "style-epochs", f"Fast style training per epoch: loss terms (train) and "
                                                      f"val loss; style: {note}")

        def on_epoch(record: dict[str, Any]) -> None:
            if val is not None:
                rows = val[:config.grid_rows]
                with torch.no_grad():
                    styled = model.eval()(rows.to(device)).float().cpu()
                png = grid_png([rows, styled])
                atomic_write_bytes(out / SAMPLES_DIR / f"epoch-{record['epoch']:03d}.png", png)
                atomic_write_bytes(out / SAMPLES_FILE, png)
                report.markdown("style-samples", png_markdown(
                    f"Fast style, epoch {record['epoch']}", f"Columns: val image | stylised. Style: {note}.", png))
            publish(record)

        tconfig = TrainConfig(checkpoint_dir=out / "train", seed=config.seed, device=device,
                              tensorboard_dir=out / "train" / "tensorboard")
        history = train(step, PhaseSchedule(one_cycle(config.epochs, config.lr), len(loader)), batches, tconfig,
                        evaluate=evaluate, on_epoch=on_epoch)
        export_style_model(model.cpu(), out / MODEL_FILE, config, style_digest=self.style_digest, style_note=note)
        atomic_write_json(out / "history.json", history)
        source = features.source
        return {"epochs": len(history), "model": MODEL_FILE, "samples": SAMPLES_DIR, "style": note,
                "style_digest": self.style_digest, "image_side": side, "network": config.network,
                "weights": source.record() if source else None, "final_loss": history[-1]["loss"],
                "val_loss": history[-1].get("valid_loss")}

    def summarize(self, stage: StageDir, report: Reporter) -> None:
        m = stage.manifest()
        samples = stage.path / SAMPLES_FILE
        if samples.is_file():
            report.markdown("style-samples", png_markdown(
                "Fast style transfer", f"Columns: val image | stylised ({m['epochs']} epochs). Style: {m['style']}. "
                f"Apply it: imagesmith stylize --model {stage.path} IN OUT", samples.read_bytes()))
