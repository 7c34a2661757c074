"""Stage 7, GAN restoration (lesson 7, 2019; fastai v1 ``vision/gan.py``, ``callbacks/gan.py``), and
the WGAN (Arjovsky et al. 2017), as stages of the shared loop.

The restoration chain, each a stage of its own (cached, rerunnable alone):
1. generator pretraining: the super-resolution U-Net trained with pixel MSE (training/superres.py),
   or a finished super-res stage you name;
2. ``GeneratedStage``: that generator's outputs for every crappified image, a store aligned row for
   row with the crappified one (its ``source_store`` is the original: (fake, real) pairs);
3. ``CriticStage``: the critic pretrained as a classifier of generated (0) vs original (1) images;
4. ``GanStage``: both together, ``GanStep`` alternating by fastai's adaptive switcher: critic steps
   until its loss falls below 0.65, then one generator step. Generator loss = BCE(critic(fake), real)
   + 50 x pixel MSE, the MSE on ImageNet-normalised images as the lesson's (``normalize(imagenet_stats,
   do_y=True)``: ~20x the MSE on [0, 1] images); critic loss = mean of BCE on real and on fake. Adam(betas=(0, 0.99)), weight
   decay 1e-3, a constant lr of 1e-4, the critic at 5x. Every epoch: a grid of the same val images
   (crappified | bicubic | pretrained | GAN | original) and PSNR/SSIM of the GAN generator next to
   the pretrained one's and bicubic's: a GAN's losses say little about progress.

The WGAN: noise -> 64 px images, DCGAN generator and critic, Wasserstein losses, weights clipped to
+-0.01, 5 critic steps per generator step (100 for the first 25 generator steps and every 500th),
RMSprop as the paper (lr 1e-4 here, the paper's 5e-5 doubled for short CPU runs).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import distributed
from models.data import make_loader, to_unit
from models.gan import Critic, CriticLoss, DCGANCritic, DCGANGenerator, adaptive_bce, critic_accuracy
from models.losses import normalized_mse
from models.schedule import Phase, PhaseSchedule, one_cycle
from models.train import (
    MODEL_FILE,
    ModelStep,
    TrainConfig,
    TrainingStep,
    autocast,
    default_device,
    load_export,
    save_checkpoint,
    seed_everything,
    set_hyperparameters,
    train,
)
from prep.shards import Shard, ShardedStage
from storage.atomic import atomic_write_bytes, atomic_write_json
from storage.catalog import crappified_pair, image_stores, store_rows
from storage.hdf5 import ShardWriter, open_store
from storage.report import Reporter, epoch_table
from storage.stage import StageDir, StageSpec, open_stage, runtime, scale_out, upstream
from training.superres import (
    evaluate_superres,
    export_generator,
    grid_png,
    load_generator,
    png_markdown,
    sample_grid_png,
)

log = logging.getLogger(__name__)
CRITIC_FILE = "critic.pt"
SAMPLES_DIR = "samples"


def requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


# --- 2. the generated store ------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _cached_generator(path: str) -> torch.nn.Module:
    return load_generator(path)


@dataclass(frozen=True)
class GeneratedStage(ShardedStage):
    """A generator's output for every image of a crappify stage: aligned row for row with it, and
    paired with the same originals (``source_store``), so (generated, original) pairs read like
    (crappified, original) ones."""

    name = "generated"
    version = 1
    generator: str = upstream()  # a finished super-res stage (its model.pt)
    source: str = upstream()  # the crappify stage the generator restores
    rows_per_shard: int = 5000
    cores: int | None = runtime(1)  # one process: the model is loaded once
    device: str | None = runtime()

    def split_rows(self) -> dict[str, int]:
        return store_rows(self.source)

    def shard_images(self) -> int:
        return self.rows_per_shard

    def build_shard(self, shard: Shard, *, workers: int | None = None) -> dict[str, Any]:
        device = default_device(self.device)
        model = _cached_generator(str(Path(self.generator) / MODEL_FILE)).to(device).eval()
        low, high = crappified_pair(self.source, shard.split)
        with open_store(high) as hi:
            size = int(hi["images"].shape[1])
        with open_store(low) as src, ShardWriter(Path(shard.path), size=size, attrs={"split": shard.split}) as w:
            images, labels, index = src["images"], src["labels"], src["index"]
            paths = src["paths"].asstr()
            for a in range(shard.start, shard.stop, 32):
                b = min(a + 32, shard.stop)
                with torch.no_grad(), autocast(device):
                    out = model(to_unit(torch.from_numpy(images[a:b]), device)).float().clamp(0, 1)
                if out.shape[-1] != size:
                    raise ValueError(f"the generator makes {out.shape[-1]} px images; {high} holds {size} px")
                fake = (out.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
                for img, y, row, p in zip(fake, labels[a:b], index[a:b], paths[a:b]):
                    w.add(img, int(y), int(row), p)
        return {"shard": shard.index, "split": shard.split, "written": shard.stop - shard.start}

    def store_attrs(self, split: str) -> dict[str, Any]:
        low, high = crappified_pair(self.source, split)
        return {"generator": str(self.generator), "generated_from": str(low), "source_store": str(high)}

    def check_store(self, split: str, store: Path, counts: dict[str, int]) -> int:
        low, _ = crappified_pair(self.source, split)
        with open_store(store) as fake, open_store(low) as crap:
            if not np.array_equal(fake["index"][()], crap["index"][()]):
                raise RuntimeError(f"{store} is not aligned with {low}")
        return counts["written"]


# --- 3. critic pretraining -------------------------------------------------------------------


@dataclass(frozen=True)
class CriticConfig:
    epochs: int = 2
    lr: float = 1e-3  # 1cycle peak (the lesson's fit_one_cycle(6, 1e-3))
    batch_size: int = 8  # pairs: 8 generated + 8 original images a step
    nf: int = 64  # the first conv's width (fastai's default 128: heavy for a CPU)
    n_blocks: int = 3
    dropout: float = 0.15
    weight_decay: float = 1e-3
    num_workers: int = 0
    seed: int = 0

    def critic(self) -> Critic:
        return Critic(nf=self.nf, n_blocks=self.n_blocks, p=self.dropout)

    def fitted(self, size: int) -> CriticConfig:
        """The config with as many blocks as ``size`` px images allow (each halves the side; the last
        conv needs 4 px): fastai's 3 from 64 px up."""
        fit = max(1, size.bit_length() - 4)  # size / 2**(1 + n) >= 4
        if fit < self.n_blocks:
            log.info("critic: %d px images allow %d blocks, not %d", size, fit, self.n_blocks)
        return replace(self, n_blocks=min(self.n_blocks, fit))


def _pair_batches(loader, *, device: torch.device | str):
    """batches(epoch, phase): (fake + real images, labels 0 then 1) from (generated, original) pairs."""

    def batches(epoch: int, phase: Phase):
        loader.dataset.set_epoch(epoch)
        for fake, real in loader:
            x = torch.cat([to_unit(fake, device), to_unit(real, device)])
            yield x, torch.cat([torch.zeros(len(fake)), torch.ones(len(real))])

    return batches


@torch.no_grad()
def critic_scores(critic: Critic, fake_store: Path, real_store: Path, *, limit: int | None = None,
                  batch: int = 32, device: str = "cpu") -> dict[str, float]:
    """Accuracy of the critic on generated (should say fake) and original (should say real) images."""
    critic.eval().to(device)
    hits = {"fake": [], "real": []}
    with open_store(fake_store) as f, open_store(real_store) as r:
        n = len(f["images"]) if limit is None else min(limit, len(f["images"]))
        for a in range(0, n, batch):
            hits["fake"].append(critic_accuracy(critic(to_unit(torch.from_numpy(f["images"][a:a + batch]), device)), False))
            hits["real"].append(critic_accuracy(critic(to_unit(torch.from_numpy(r["images"][a:a + batch]), device)), True))
    fake, real = float(np.mean(hits["fake"])), float(np.mean(hits["real"]))
    return {"critic_acc_fake": round(fake, 4), "critic_acc_real": round(real, 4),
            "critic_acc": round((fake + real) / 2, 4)}


def load_critic(path: str | Path) -> Critic:
    """A critic exported by the critic stage (``critic.pt`` or its folder)."""
    path = Path(path)
    state, meta, _ = load_export(path / CRITIC_FILE if path.is_dir() else path, "critic", "critic")
    critic = CriticConfig(**meta).critic()
    critic.load_state_dict(state["model"])
    return critic


@dataclass(frozen=True)
class CriticStage(StageSpec):
    """The critic pretrained to tell generated (0) from original (1) images; accuracy on val."""

    name = "critic"
    version = 2  # 2: spectral-normed self-attention (fastai's)
    retries = 1
    archive = True
    generated: str = upstream()
    config: CriticConfig = CriticConfig()
    device: str | None = runtime()
    gpus: int = scale_out()  # training processes (DDP; training/distributed.py)

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        config, device = self.config, default_device(self.device)
        fake, real = crappified_pair(self.generated, "train")
        loader = make_loader(fake, config.batch_size, target_store=real, num_workers=config.num_workers,
                             seed=config.seed, drop_last=True)
        config = config.fitted(loader.dataset.image_shape[0])
        seed_everything(config.seed)
        critic = config.critic()
        optimizer = torch.optim.AdamW(critic.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        tconfig = TrainConfig(checkpoint_dir=out / "train", seed=config.seed, device=device,
                              tensorboard_dir=out / "train" / "tensorboard")
        history = train(ModelStep(critic, optimizer, CriticLoss()),
                        PhaseSchedule(one_cycle(config.epochs, config.lr), len(loader)),
                        _pair_batches(loader, device=device), tconfig,
                        on_epoch=epoch_table(report, "critic-epochs", "Critic pretraining: BCE and accuracy"))
        save_checkpoint(out / CRITIC_FILE, model=critic.cpu().state_dict(), critic=asdict(config))
        scores = {}
        if "val" in image_stores(self.generated):
            scores = critic_scores(critic, *crappified_pair(self.generated, "val"), device=device)
        atomic_write_json(out / "history.json", history)
        return {"epochs": len(history), "final_loss": history[-1]["loss"], "critic": CRITIC_FILE, **scores,
                "generated": str(self.generated)}

    def summarize(self, stage: StageDir, report: Reporter) -> None:
        m = stage.manifest()
        if "critic_acc" in m:
            report.table("critic-accuracy", [{k: m[k] for k in ("critic_acc", "critic_acc_fake", "critic_acc_real")}],
                         "Pretrained critic on the held-out split: generated called fake, originals called real")


# --- 4. the GAN phase -------------------------------------------------------------------------


class GanStep(TrainingStep):
    """One GAN step, critic or generator as fastai's ``AdaptiveGANSwitcher`` decides: the critic trains
    until its batch loss falls below ``critic_thresh``, then the generator takes one step.

    The model not being trained gets no gradients (``requires_grad`` off) and stays in eval mode, so
    its BatchNorm statistics (and the critic's spectral-norm estimates and dropout) do not move.
    The critic's learning rate is ``critic_lr_mult`` x the schedule's (fastai's ``GANDiscriminativeLR``).
    The critic always judges images clamped to [0, 1], as it was pretrained (on stored 8-bit images):
    the generator's eval-mode output is clamped already, its training output is clamped here.
    The pixel term is ``normalized_mse`` (the lesson's units: ``pixel_weight`` 50 means what its 50 means).
    """

    def __init__(self, generator: torch.nn.Module, critic: Critic, gen_opt: torch.optim.Optimizer,
                 critic_opt: torch.optim.Optimizer, *, pixel_weight: float = 50.0, critic_thresh: float = 0.65,
                 critic_lr_mult: float = 5.0):
        self.generator, self.critic, self.gen_opt, self.critic_opt = generator, critic, gen_opt, critic_opt
        self.pixel_weight, self.critic_thresh, self.critic_lr_mult = pixel_weight, critic_thresh, critic_lr_mult
        self.gen_mode = False  # fastai starts with the critic

    def modules(self):
        return {"generator": self.generator, "critic": self.critic}

    def optimizers(self):
        return {"gen_opt": self.gen_opt, "critic_opt": self.critic_opt}

    def extra_state(self) -> dict[str, Any]:
        return {"gen_mode": self.gen_mode}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.gen_mode = bool(state.get("gen_mode", False))

    def train(self):  # the step chooses the modes itself, per model
        return self

    def step(self, low, high, *, lr, momentum, group_scales, device, bf16):
        set_hyperparameters(self.gen_opt, lr, None)  # GANs hate momentum: betas stay (0, 0.99)
        set_hyperparameters(self.critic_opt, lr * self.critic_lr_mult, None)
        if self.gen_mode:
            terms = self._generator_step(low, high, device, bf16)
            self.gen_mode = False
        else:
            terms = self._critic_step(low, high, device, bf16)
            # under DDP every rank must switch alike: the decision is on the loss averaged over ranks
            if float(distributed.mean_scalar(terms["critic"])) < self.critic_thresh:
                self.gen_mode = True
        return terms

    def _critic_step(self, low, high, device, bf16):
        self.generator.eval()
        requires_grad(self.generator, False)
        self.critic.train()
        requires_grad(self.critic, True)
        with torch.no_grad(), autocast(device, bf16):
            fake = self.generator(low).float()
        critic = self.wrapped("critic")  # under DDP: the critic's gradients are averaged over the ranks
        loss = (adaptive_bce(critic(high), True) + adaptive_bce(critic(fake), False)) / 2
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_opt.step()
        return {"loss": loss, "critic": loss.detach(), "gen_step": torch.zeros((), device=loss.device)}

    def _generator_step(self, low, high, device, bf16):
        self.critic.eval()
        requires_grad(self.critic, False)
        self.generator.train()
        requires_grad(self.generator, True)
        with autocast(device, bf16):
            fake = self.wrapped("generator")(low)
        fake = fake.float()
        adversarial = adaptive_bce(self.critic(fake.clamp(0, 1)), True)
        pixel = normalized_mse(fake, high)
        loss = adversarial + self.pixel_weight * pixel
        self.gen_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.gen_opt.step()
        return {"loss": loss, "gen": loss.detach(), "gen_adversarial": adversarial.detach(),
                "gen_pixel_mse": pixel.detach(), "gen_step": torch.ones((), device=loss.device)}


@dataclass(frozen=True)
class GanConfig:
    epochs: int = 3
    lr: float = 1e-4  # constant (the lesson's fit(40, lr)): no 1cycle, momentum not touched
    batch_size: int = 8
    pixel_weight: float = 50.0  # on the ImageNet-normalised MSE, as the lesson's weights_gen=(1, 50)
    critic_thresh: float = 0.65
    critic_lr_mult: float = 5.0
    weight_decay: float = 1e-3
    eval_images: int = 64  # val images scored every epoch (PSNR/SSIM)
    grid_rows: int = 4
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.critic_thresh <= 0:
            raise ValueError(f"epochs >= 1, lr > 0 and critic_thresh > 0 needed; got {self.epochs}, {self.lr}, "
                             f"{self.critic_thresh}")


def gan_optimizer(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam with betas (0, 0.99) ("GANs hate momentum") and decoupled weight decay."""
    return torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.0, 0.99), weight_decay=weight_decay)


@dataclass(frozen=True)
class GanStage(StageSpec):
    """The GAN phase: the pretrained generator against the pretrained critic, on crappified pairs."""

    name = "gan"
    version = 2  # 2: the pixel term in the lesson's (normalised) units, the critic's inputs clamped alike
    retries = 1
    archive = True
    generator: str = upstream()  # the pretrained generator's super-res stage
    critic: str = upstream()  # the critic stage
    pairs: str = upstream()  # the crappify stage (low) whose source is the originals (high)
    config: GanConfig = GanConfig()
    device: str | None = runtime()
    gpus: int = scale_out()  # training processes (DDP; training/distributed.py)

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        config, device = self.config, default_device(self.device)
        gm = open_stage(self.generator).manifest()
        low, high = crappified_pair(self.pairs, "train")
        loader = make_loader(low, config.batch_size, target_store=high, num_workers=config.num_workers,
                             seed=config.seed, drop_last=True)
        pretrained = load_generator(Path(self.generator) / MODEL_FILE)
        generator, critic = load_generator(Path(self.generator) / MODEL_FILE), load_critic(self.critic)
        step = GanStep(generator, critic, gan_optimizer(generator, config.lr, config.weight_decay),
                       gan_optimizer(critic, config.lr * config.critic_lr_mult, config.weight_decay),
                       pixel_weight=config.pixel_weight, critic_thresh=config.critic_thresh,
                       critic_lr_mult=config.critic_lr_mult)
        val = crappified_pair(self.pairs, "val") if "val" in image_stores(self.pairs) else None
        before = evaluate_superres(pretrained, *val, limit=config.eval_images, device=device) if val else None

        def evaluate(step_fn: GanStep) -> dict[str, float]:
            if val is None:
                return {}
            r = evaluate_superres(step_fn.generator, *val, limit=config.eval_images, device=device)
            return {"psnr_gan": r["psnr_model"], "ssim_gan": r["ssim_model"]}

        publish = epoch_table(report, "gan-epochs", "GAN phase per epoch: losses, the share of generator steps "
                              "(critic steps per generator step), PSNR/SSIM of the GAN generator on val images")
        samples = out / SAMPLES_DIR

        def on_epoch(record: dict[str, Any]) -> None:
            share = record.get("gen_step", 0.0)
            record["critic_steps_per_gen_step"] = round((1 - share) / share, 2) if share else None
            if before is not None:
                record.update({"psnr_pretrained": round(before["psnr_model"], 4),
                               "psnr_bicubic": round(before["psnr_bicubic"], 4)})
                png = sample_grid_png([pretrained, step.generator], *val, n=config.grid_rows)
                atomic_write_bytes(samples / f"epoch-{record['epoch']:03d}.png", png)
                report.markdown("gan-samples", png_markdown(
                    f"GAN samples, epoch {record['epoch']}",
                    "Columns: crappified | bicubic | pretrained generator | GAN generator | original. "
                    f"PSNR {record.get('valid_psnr_gan', 0):.2f} dB (pretrained {before['psnr_model']:.2f}, "
                    f"bicubic {before['psnr_bicubic']:.2f}).", png))
            publish(record)

        tconfig = TrainConfig(checkpoint_dir=out / "train", seed=config.seed, device=device,
                              tensorboard_dir=out / "train" / "tensorboard")
        history = train(step, PhaseSchedule([Phase(config.epochs, config.lr)], len(loader)),
                        _restoration_batches(loader, device), tconfig, evaluate=evaluate, on_epoch=on_epoch)
        scale = getattr(generator, "scale", 4)
        export_generator(generator.cpu(), "unet", scale, out / MODEL_FILE, encoder=gm.get("encoder", ""))
        after = evaluate_superres(generator, *val, device=device) if val else None
        full_before = evaluate_superres(pretrained, *val, device=device) if val else None
        atomic_write_json(out / "history.json", history)
        evaluation = None
        if after is not None:
            evaluation = {"images": after["images"], "psnr_bicubic": round(after["psnr_bicubic"], 4),
                          "psnr_pretrained": round(full_before["psnr_model"], 4), "psnr_gan": round(after["psnr_model"], 4),
                          "ssim_bicubic": round(after["ssim_bicubic"], 4),
                          "ssim_pretrained": round(full_before["ssim_model"], 4), "ssim_gan": round(after["ssim_model"], 4)}
        cm = open_stage(self.critic).manifest()
        return {"epochs": len(history), "model": MODEL_FILE, "evaluation": evaluation, "samples": SAMPLES_DIR,
                "critic_acc": cm.get("critic_acc"), "encoder": gm.get("encoder", ""),
                "critic_steps_per_gen_step": [h.get("critic_steps_per_gen_step") for h in history]}

    def summarize(self, stage: StageDir, report: Reporter) -> None:
        m = stage.manifest()
        if m["evaluation"]:
            report.table("gan-evaluation", [m["evaluation"]],
                         "Held-out photos: bicubic, the pretrained generator and the GAN generator (a GAN "
                         "usually lowers PSNR: it trades pixel fidelity for texture)")


def _restoration_batches(loader, device):
    def batches(epoch: int, phase: Phase):
        loader.dataset.set_epoch(epoch)
        for lo, hi in loader:
            yield to_unit(lo, device), to_unit(hi, device)

    return batches


# --- WGAN -------------------------------------------------------------------------------------


class WganStep(TrainingStep):
    """A Wasserstein GAN step: ``n_critic`` critic steps (weights clipped to +-``clip`` after each),
    then one generator step; 100 critic steps for the first 25 generator steps and every 500th."""

    def __init__(self, generator: DCGANGenerator, critic: DCGANCritic, gen_opt, critic_opt, *,
                 clip: float = 0.01, n_critic: int = 5, critic_warmup: int = 100):
        self.generator, self.critic, self.gen_opt, self.critic_opt = generator, critic, gen_opt, critic_opt
        self.clip, self.n_critic, self.critic_warmup = clip, n_critic, critic_warmup
        self.gen_iterations, self.critic_iterations = 0, 0

    def modules(self):
        return {"generator": self.generator, "critic": self.critic}

    def optimizers(self):
        return {"gen_opt": self.gen_opt, "critic_opt": self.critic_opt}

    def extra_state(self):
        return {"gen_iterations": self.gen_iterations, "critic_iterations": self.critic_iterations}

    def load_extra_state(self, state):
        self.gen_iterations = int(state.get("gen_iterations", 0))
        self.critic_iterations = int(state.get("critic_iterations", 0))

    def critic_steps_now(self) -> int:
        """The paper's schedule: ``critic_warmup`` (100) critic steps before each of the first 25
        generator steps and every 500th (a near-optimal critic), else ``n_critic``."""
        early = self.gen_iterations < 25 or self.gen_iterations % 500 == 0
        return max(self.critic_warmup, self.n_critic) if early else self.n_critic

    def step(self, real, labels, *, lr, momentum, group_scales, device, bf16):
        set_hyperparameters(self.gen_opt, lr, None)
        set_hyperparameters(self.critic_opt, lr, None)
        z = torch.randn(len(real), self.generator.nz, device=device)
        if self.critic_iterations < self.critic_steps_now():
            requires_grad(self.generator, False)
            requires_grad(self.critic, True)
            with torch.no_grad():
                fake = self.generator(z)
            # the critic maximises E[C(real)] - E[C(fake)]: minimise the negative
            critic = self.wrapped("critic")
            loss = critic(fake).mean() - critic(real).mean()
            self.critic_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.critic_opt.step()
            with torch.no_grad():
                for p in self.critic.parameters():
                    p.clamp_(-self.clip, self.clip)
            self.critic_iterations += 1
            return {"loss": loss, "critic": loss.detach(), "wasserstein_estimate": -loss.detach()}
        requires_grad(self.critic, False)
        requires_grad(self.generator, True)
        loss = -self.critic(self.wrapped("generator")(z)).mean()
        self.gen_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.gen_opt.step()
        self.gen_iterations += 1
        self.critic_iterations = 0
        return {"loss": loss, "generator": loss.detach()}


@dataclass(frozen=True)
class WganConfig:
    epochs: int = 5
    lr: float = 1e-4
    batch_size: int = 64
    nz: int = 100
    nf: int = 64
    clip: float = 0.01
    n_critic: int = 5
    critic_warmup: int = 100  # the paper's; a small dataset on a CPU wants less (e.g. 5: no warm-up)
    grid: int = 16  # images from a fixed noise batch, every epoch
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clip <= 0 or self.n_critic < 1 or self.epochs < 1:
            raise ValueError(f"clip > 0, n_critic >= 1 and epochs >= 1 needed; got {self.clip}, {self.n_critic}, "
                             f"{self.epochs}")


def export_wgan(out: Path, generator: DCGANGenerator, size: int, config: WganConfig) -> Path:
    save_checkpoint(out, model=generator.state_dict(), wgan={"size": size, "nz": config.nz, "nf": config.nf})
    return out


def load_wgan(path: str | Path) -> DCGANGenerator:
    state, meta, _ = load_export(Path(path) / MODEL_FILE if Path(path).is_dir() else path, "wgan", "WGAN generator")
    generator = DCGANGenerator(meta["size"], nz=meta["nz"], nf=meta["nf"])
    generator.load_state_dict(state["model"])
    return generator.eval()


@dataclass(frozen=True)
class WganStage(StageSpec):
    """A WGAN trained on the images of a resize stage (its side must be a power of 2, e.g. 64)."""

    name = "wgan"
    version = 2  # 2: DCGAN N(0, 0.02) init
    retries = 1
    archive = True
    images: str = upstream()  # a resize stage
    config: WganConfig = WganConfig()
    device: str | None = runtime()
    gpus: int = scale_out()  # training processes (DDP; training/distributed.py)

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        config, device = self.config, default_device(self.device)
        store = image_stores(self.images)["train"]
        loader = make_loader(store, config.batch_size, num_workers=0, seed=config.seed, drop_last=True)
        size = loader.dataset.image_shape[0]
        seed_everything(config.seed)
        generator, critic = DCGANGenerator(size, config.nz, config.nf), DCGANCritic(size, config.nf)
        step = WganStep(generator, critic, torch.optim.RMSprop(generator.parameters(), lr=config.lr),
                        torch.optim.RMSprop(critic.parameters(), lr=config.lr), clip=config.clip,
                        n_critic=config.n_critic, critic_warmup=config.critic_warmup)
        fixed = torch.randn(config.grid, config.nz, generator=torch.Generator().manual_seed(config.seed))
        publish = epoch_table(report, "wgan-epochs", "WGAN per epoch: critic loss (-Wasserstein estimate), generator")

        def on_epoch(record: dict[str, Any]) -> None:
            generator.eval()
            with torch.no_grad():
                images = (generator(fixed.to(device)).cpu() + 1) / 2
            generator.train()
            rows = int(np.sqrt(config.grid))
            png = grid_png([images[i::rows] for i in range(rows)])
            atomic_write_bytes(out / SAMPLES_DIR / f"epoch-{record['epoch']:03d}.png", png)
            report.markdown("wgan-samples", png_markdown(f"WGAN samples, epoch {record['epoch']}",
                                                          "The same noise every epoch.", png))
            record["generator_steps"] = step.gen_iterations
            publish(record)

        def batches(epoch: int, phase: Phase):
            loader.dataset.set_epoch(epoch)
            for images, labels in loader:
                yield to_unit(images, device) * 2 - 1, labels

        tconfig = TrainConfig(checkpoint_dir=out / "train", seed=config.seed, device=device, bf16=False,
                              tensorboard_dir=out / "train" / "tensorboard")
        history = train(step, PhaseSchedule([Phase(config.epochs, config.lr)], len(loader)), batches, tconfig,
                        on_epoch=on_epoch)
        export_wgan(out / MODEL_FILE, generator.cpu(), size, config)
        atomic_write_json(out / "history.json", history)
        return {"epochs": len(history), "model": MODEL_FILE, "samples": SAMPLES_DIR, "size": size,
                "generator_steps": step.gen_iterations, "final_critic": history[-1].get("critic")}
