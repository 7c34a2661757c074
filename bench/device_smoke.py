"""Device smoke: every trainer builds its real stage on this machine's accelerator, on tiny data.

On CUDA the loop runs with bf16 autocast and channels_last, as a user's GPU run does. Each part
builds the stage through ``run_stage`` (the one lifecycle: lock, build, manifest), so the trainers'
hooks (sample grids, evaluation) run under the loop's device/mode guard; then it checks that the
losses are finite and that the export loads back and runs on the device. Parts: super-res U-Net
with the feature loss, the GAN chain (generated store, critic, GAN phase for 2 epochs with a val
split so ``on_epoch`` draws its grids), the WGAN, fast style, a few Gatys steps, the DeViSE head
(with its softmax baseline) and fine-tuning, and a 2-process DDP super-res run when 2 GPUs are visible.

It needs nothing the GPU machine lacks (Prefect, gensim, faiss, nltk, tensorboard, the weight
packages): the networks start from random weights (``pretrained=False``, asked for), the data are
generated JPEGs of real ImageNet wnids, the word table is random unit vectors in the real format.

usage: python bench/device_smoke.py [--size 64] [--images 24] [--limit 90]
One line per part: RESULT part=... ok=1 seconds=... device=... [final_loss=...]; exit 1 if any part failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.distributed import cuda_devices  # noqa: E402
from storage.stage import StageSpec, run_stage  # noqa: E402
from storage.tiers import Tiers  # noqa: E402

# three ImageNet-1k classes and one outside it (zero-shot by default)
WNIDS = ("n02123045", "n07920052", "n03877845", "n02439033")


def make_source(root: Path, images: int, seed: int = 0) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG``: smooth colour fields with shapes and noise, 80-120 px."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", max(2, images // 4))):
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(80, 121, 2))
                yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
                base = np.stack([np.sin(6 * xx + c), np.cos(5 * yy - c), np.sin(4 * (xx + yy) + i)], -1)
                img = ((base * 0.4 + 0.5 + rng.normal(0, 0.05, (h, w, 3))).clip(0, 1) * 255).astype(np.uint8)
                im = Image.fromarray(img)
                d = ImageDraw.Draw(im)
                x0, y0 = (int(v) for v in rng.integers(0, 40, 2))
                d.ellipse([x0, y0, x0 + 30 + 10 * c, y0 + 30], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
                im.save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


@dataclass(frozen=True)
class RandomWordsStage(StageSpec):
    """A word table in the embeddings stage's format (storage/words.py) with random unit vectors for
    the source's wnids and a few hundred other ImageNet-21k classes: DeViSE without gensim or nltk."""

    name = "embeddings"
    version = 1
    dims: int = 50
    seed: int = 0

    def build(self, out: Path, report) -> dict[str, Any]:
        from prep.wordnet import imagenet_wnids
        from storage.vector_index import unit_rows
        from storage.words import VectorTable

        rng = np.random.default_rng(self.seed)
        wnids = list(dict.fromkeys([*WNIDS, *imagenet_wnids("1k")[:200], *imagenet_wnids("21k")[-200:]]))
        VectorTable.of(wnids, unit_rows(rng.normal(size=(len(wnids), self.dims)).astype(np.float32))).save(
            out / "word_table")
        words = [f"w{i}" for i in range(len(wnids))]
        VectorTable.of(words, unit_rows(rng.normal(size=(len(words), self.dims)).astype(np.float32))).save(out / "words")
        (out / "synsets.tsv").write_text("wnid\tmatched\trule\tlemmas\tword\n" + "".join(
            f"{w}\t1\trandom\t{w}_class\t{words[i]}\n" for i, w in enumerate(wnids)))
        (out / "imagenet-1k.txt").write_text("\n".join(imagenet_wnids("1k")) + "\n")
        return {"vectors_file": "random", "dims": self.dims, "synsets": len(wnids)}


class PartTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise PartTimeout("the part ran out of its time limit")


def finite(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


def history_ok(path: Path) -> float:
    """The last epoch's loss of a history file; raises if any logged loss is not finite."""
    history = json.loads(path.read_text())
    history = history["history"] if isinstance(history, dict) else history
    bad = [(h["epoch"], k, v) for h in history for k, v in h.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite values in {path}: {bad[:3]}")
    return float(history[-1]["loss"])


def on_device(module: torch.nn.Module, device: str) -> torch.nn.Module:
    module = module.to(device).eval()
    if torch.device(device).type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="side of the originals (a power of 2 for the WGAN)")
    ap.add_argument("--images", type=int, default=24, help="training images per class (4 classes)")
    ap.add_argument("--limit", type=int, default=90, help="seconds each part may take")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size, low = args.size, args.size // 2
    print(f"device smoke on {device}"
          + (f" ({torch.cuda.get_device_name(0)}, {cuda_devices()} GPU(s))" if device == "cuda" else ""), flush=True)

    from models.schedule import Phase
    from prep.crappify import CrappifyConfig, CrappifyStage
    from prep.listing import ListingStage, fingerprint_dataset
    from prep.resize import ResizeConfig, ResizeStage
    from training.devise.export import load_devise
    from training.devise.features import FeaturesConfig, FeaturesStage
    from training.devise.finetune import FinetuneConfig, FinetuneStage
    from training.devise.head import DeviseStage, HeadConfig
    from training.gan import (CriticConfig, CriticStage, GanConfig, GanStage, GeneratedStage, WganConfig, WganStage,
                              load_critic, load_wgan)
    from training.style import FastStyleConfig, FastStyleStage, GatysConfig, file_digest, gatys, load_style_model
    from training.superres import SuperResConfig, SuperResStage, lesson_phases, load_generator

    failures = 0
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        tiers = Tiers(fast=tmp / "fast", bulk=tmp / "bulk")
        done: dict[str, Any] = {}

        def part(name: str, fn) -> None:
            nonlocal failures
            start = time.perf_counter()
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(args.limit)
            try:
                facts = fn() or {}
                bad = {k: v for k, v in facts.items() if not finite(v) and not isinstance(v, str)}
                if bad:
                    raise RuntimeError(f"non-finite results: {bad}")
                extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items())
                print(f"RESULT part={name} ok=1 seconds={time.perf_counter() - start:.1f} device={device} {extra}".rstrip(),
                      flush=True)
            except Exception as e:  # noqa: BLE001  (a failed part is reported and the others still run)
                failures += 1
                traceback.print_exc()
                message = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                print(f"RESULT part={name} ok=0 seconds={time.perf_counter() - start:.1f} device={device} "
                      f"error={message!r}", flush=True)
            finally:
                signal.alarm(0)

        def data():
            source = make_source(tmp / "source", args.images)
            listing = run_stage(tiers, ListingStage(root=str(source), fingerprint=fingerprint_dataset(source), seed=0))
            done["resize"] = run_stage(tiers, ResizeStage(listing=str(listing.path), config=ResizeConfig(size=size),
                                                          cores=1))
            done["crappify"] = run_stage(tiers, CrappifyStage(source=str(done["resize"].path), cores=1,
                                                              config=CrappifyConfig(crappifier="jpeg_text", size=low)))
            return {"images": args.images * len(WNIDS)}

        def superres():
            config = SuperResConfig(arch="unet", loss="feature", batch_size=4, pretrained=False, num_workers=0,
                                    phases=tuple(lesson_phases(1, 1e-3)))
            stage = run_stage(tiers, SuperResStage(pairs=(str(done["crappify"].path),), config=config, device=device))
            done["superres"] = stage
            model = on_device(load_generator(stage.path / "model.pt"), device)
            with torch.no_grad():
                out = model(torch.rand(2, 3, low, low, device=device))
            assert out.shape == (2, 3, size, size) and torch.isfinite(out).all()
            m = stage.manifest()
            return {"final_loss": history_ok(stage.path / "history.json"), "psnr": m["evaluation"]["psnr_model"]}

        def gan_chain():
            generated = run_stage(tiers, GeneratedStage(generator=str(done["superres"].path),
                                                        source=str(done["crappify"].path), device=device))
            critic = run_stage(tiers, CriticStage(generated=str(generated.path), device=device,
                                                  config=CriticConfig(epochs=1, batch_size=4, nf=16)))
            history_ok(critic.path / "history.json")
            on_device(load_critic(critic.path), device)
            gan = run_stage(tiers, GanStage(generator=str(done["superres"].path), critic=str(critic.path),
                                            pairs=str(done["crappify"].path), device=device,
                                            config=GanConfig(epochs=2, batch_size=4, eval_images=8)))
            m = gan.manifest()
            assert len(list((gan.path / "samples").glob("epoch-*.png"))) == 2, "on_epoch drew no grid"
            on_device(load_generator(gan.path / "model.pt"), device)
            return {"final_loss": history_ok(gan.path / "history.json"), "critic_acc": m["critic_acc"],
                    "psnr_gan": m["evaluation"]["psnr_gan"]}

        def wgan():
            stage = run_stage(tiers, WganStage(images=str(done["resize"].path), device=device,
                                               config=WganConfig(epochs=2, batch_size=8, nf=16, critic_warmup=5)))
            g = on_device(load_wgan(stage.path), device)
            with torch.no_grad():
                assert torch.isfinite(g(torch.randn(2, g.nz, device=device))).all()
            return {"final_loss": history_ok(stage.path / "history.json"), "generator_steps": stage.manifest()["generator_steps"]}

        def fast_style():
            from PIL import Image

            style = tmp / "style.png"
            Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(style)
            config = FastStyleConfig(epochs=1, batch_size=4, nf=8, n_res=1, pretrained=False, eval_images=4)
            stage = run_stage(tiers, FastStyleStage(images=str(done["resize"].path), style=str(style),
                                                    style_digest=file_digest(style), config=config, device=device))
            model, _ = load_style_model(stage.path)
            with torch.no_grad():
                assert torch.isfinite(on_device(model, device)(torch.rand(1, 3, size, size, device=device))).all()
            return {"final_loss": history_ok(stage.path / "history.json")}

        def gatys_steps():
            from models.style import BlockFeatures

            g = torch.Generator().manual_seed(0)
            content, style = torch.rand(3, 48, 64, generator=g), torch.rand(3, 48, 48, generator=g)
            image, history = gatys(content, style, GatysConfig(size=64, steps=4, optimizer="adam", log_every=2),
                                   device=device, features=BlockFeatures("vgg19_caffe", pretrained=False))
            assert torch.isfinite(image).all() and image.shape[-1] == 64
            return {"final_loss": float(history[-1]["loss"])}

        def devise():
            words = run_stage(tiers, RandomWordsStage())
            features = run_stage(tiers, FeaturesStage(resize=str(done["resize"].path), device=device,
                                                      config=FeaturesConfig(backbone="resnet18", pretrained=False,
                                                                            batch_size=16)))
            head = run_stage(tiers, DeviseStage(features=str(features.path), words=str(words.path), device=device,
                                                config=HeadConfig(epochs=2, batch_size=8, hidden=32)))
            fine = run_stage(tiers, FinetuneStage(devise=str(head.path), device=device,
                                                  config=FinetuneConfig(epochs=2, batch_size=4, num_workers=0)))
            model, _ = load_devise(fine.path)
            with torch.no_grad():
                assert torch.isfinite(on_device(model, device)(torch.rand(2, 3, size, size, device=device))).all()
            return {"head_loss": float(head.manifest()["final_loss"]), "final_loss": float(fine.manifest()["final_loss"])}

        def ddp():
            from training.distributed import run_distributed

            config = SuperResConfig(arch="johnson", loss="pixel", batch_size=4, pretrained=False, num_workers=0,
                                    augment=True, phases=(Phase(2, 1e-3, "constant"),))
            stage = run_distributed(tiers, SuperResStage(pairs=(str(done["crappify"].path),), config=config,
                                                         device=device, gpus=2), 2)
            return {"final_loss": history_ok(stage.path / "history.json")}

        part("data", data)
        if "crappify" not in done:
            return 1
        part("superres_unet_feature", superres)
        if "superres" in done:
            part("gan_chain", gan_chain)
        part("wgan", wgan)
        part("fast_style", fast_style)
        part("gatys", gatys_steps)
        part("devise_head_finetune", devise)
        if device == "cuda" and cuda_devices() >= 2 or os.environ.get("SMOKE_DDP") == "1":
            part("ddp_2_processes", ddp)
        else:
            print(f"# ddp_2_processes: skipped ({cuda_devices()} GPU visible; it needs 2)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
