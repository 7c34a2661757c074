"""The ``imagesmith`` command.

Exit codes: 0 success; 1 a run failed (its log says why; a full disk says which stage, where and
how much space is left); 2 bad input, one line naming the value and what is accepted, checked
before any work starts; 75 (EX_TEMPFAIL) ``--no-wait`` found another run building a stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

from imagesmith.offline import apply_offline_defaults

EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 1, 2, 75
SIZE_RANGE = (8, 4096)  # the HDF5 stores' square side (prep.resize.ResizeConfig)
CRAPPIFIERS = ["jpeg_text", "downscale", "grayscale", "noise", "cutout"]


class UsageError(Exception):
    """Bad input to a command: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit 2), not the usage text and a line."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


INT_CEILING = 1_000_000  # epochs, steps, batch sizes, k...: past this a number is a typo, not a plan


def _int_in(low: int, high: int | None = INT_CEILING):
    """An argparse type: an integer in [low, high]; the error names the value and the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            accepted = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range; use a number {accepted}")
        return value
    return parse


def _existing(path: str | None, what: str) -> Path | None:
    """``path`` if it exists, else a UsageError naming it."""
    if path is None:
        return None
    if not Path(path).exists():
        raise UsageError(f"{what} {path!r} does not exist")
    return Path(path)


def _cmd_doctor(args: argparse.Namespace) -> int:
    import h5py
    import prefect
    import torch

    from prep.imaging import imaging_backend
    from storage.tiers import Tiers

    info = imaging_backend()
    tiers = Tiers.from_env()
    print(f"imaging backend : {info['backend']} (PIL {info['pil_version']}; "
          f"dists: pillow-simd={info['pillow_simd_dist']}, pillow={info['pillow_dist']})")
    print(f"  libjpeg-turbo : {info['libjpeg_turbo']} (libjpeg {info['libjpeg_version']})")
    print(f"  AVX2          : cpu={info['cpu_avx2']} build={info['built_with_avx2']} ({info['build_note']})")
    if info["backend"] != "pillow-simd":
        print("  WARNING: plain Pillow is active; resizing runs ~2x slower. Run `make setup` as root to build pillow-simd.")
    print(f"torch           : {torch.__version__} (CUDA available: {torch.cuda.is_available()})")
    print(f"prefect         : {prefect.__version__}; API: {_api_url()[1]}")
    print(f"h5py / HDF5     : {h5py.__version__} / {h5py.version.hdf5_version}")
    from models.backbones import DEVISE_BACKBONES, LOSS_NETWORKS, UNET_ENCODERS
    from models.weights import weights_report

    print("pretrained weights (first found wins: local file, then installed package):")
    for network, source, where in weights_report(list(dict.fromkeys(DEVISE_BACKBONES + UNET_ENCODERS + LOSS_NETWORKS))):
        print(f"  {network:<19}: {'OK   ' if source else 'none '} {where}")
    for name in ("fast", "bulk"):
        root = tiers.root(name)
        probe = root if root.exists() else next((p for p in root.parents if p.exists()), Path("/"))
        free = shutil.disk_usage(probe).free / 2**30
        print(f"tier {name:<10} : {root} ({free:.1f} GiB free)")
    if args.json:
        print(json.dumps(info))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from prep.sample import SampleStage, build_sample
    from storage.stage import run_stage
    from storage.tiers import Tiers

    sizes = {"seed": args.seed, "train_per_class": args.train_per_class, "val_per_class": args.val_per_class}
    if args.out:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"{out} is not empty; choose a new folder")
        summary = build_sample(out, **sizes)
        print(f"sample dataset: {out.resolve()} ({summary['counts']})")
    else:
        stage = run_stage(Tiers.from_env(), SampleStage(**sizes))
        print(f"sample dataset: {stage.path} ({stage.manifest()['counts']})")
    return 0


def _check_pipeline_args(args: argparse.Namespace) -> None:
    """Everything the pipeline will be handed, checked before a server or a flow starts."""
    from prep.listing import check_source
    from storage.tiers import Tiers
    from storage.wordvec import check_vector_path

    try:
        Tiers.from_env()  # tiers that cannot be folders fail here, not after the flow started
        if args.source:
            args.source = str(check_source(args.source))
        if args.word_vectors:
            check_vector_path(args.word_vectors)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    if getattr(args, "gpus", 1) > 1:
        import torch

        if torch.cuda.is_available() and args.gpus > torch.cuda.device_count():
            raise UsageError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPU(s)")


def _run_pipeline(args: argparse.Namespace) -> dict[str, str]:
    from flows.pipeline import pipeline

    return pipeline(source=args.source, seed=args.seed, size=args.size, dask_address=args.dask_address,
                    crappifier=args.crappifier, word_vectors=args.word_vectors, refresh=args.refresh,
                    wait=not args.no_wait)


def _print_outputs(outputs: dict[str, str]) -> None:
    from storage.stage import MANIFEST_NAME, open_stage

    print("\nartifacts:")
    for stage, path in outputs.items():
        if not (Path(path) / MANIFEST_NAME).is_file():  # the user's own source folder: not a stage of ours
            print(f"  {stage:<8} {path}  (your folder)")
            continue
        manifest = open_stage(path).manifest()
        summary = manifest.get("counts") or manifest.get("report", "")
        print(f"  {stage:<8} {path}  {summary}")


def _cmd_run(args: argparse.Namespace) -> int:
    _check_pipeline_args(args)
    _print_outputs(_run_pipeline(args))
    return 0


def _latest_stage(stage: str, tier: str = "fast") -> Path:
    """The most recently finished directory of ``stage`` on ``tier``."""
    from storage.stage import MANIFEST_NAME
    from storage.tiers import Tiers

    root = Tiers.from_env().root(tier) / stage
    done = sorted(root.glob(f"*/{MANIFEST_NAME}"), key=lambda p: p.stat().st_mtime)
    if not done:
        raise UsageError(f"no finished {stage!r} stage under {root}; run `imagesmith run` first")
    return done[-1].parent


def _finished_stage(path: str | None, stage: str, option: str) -> Path:
    """A finished stage directory the user named with ``option`` (default: the newest ``stage``)."""
    from storage.stage import MANIFEST_NAME

    if path is None:
        return _latest_stage(stage)
    if not (Path(path) / MANIFEST_NAME).is_file():
        raise UsageError(f"{option} {path!r} is not a finished {stage!r} stage directory (no {MANIFEST_NAME})")
    try:
        kind = json.loads((Path(path) / MANIFEST_NAME).read_text()).get("stage")
    except (OSError, ValueError) as e:
        raise UsageError(f"{option} {path!r}: its {MANIFEST_NAME} does not read ({e})") from None
    if kind != stage:
        raise UsageError(f"{option} {path!r} is a finished {kind!r} stage; a {stage!r} stage directory is needed "
                         f"(<tier>/{stage}/<key>)")
    return Path(path)


def _cmd_words(args: argparse.Namespace) -> int:
    from storage.words import WordTable

    if not args.text.strip():
        raise UsageError("the text is empty; give words to look up, e.g. \"golden retriever\"")
    table = WordTable(_finished_stage(args.table, "embeddings", "--table"))
    hits = table.nearest_words(table.vector_for(args.text), k=args.k, vocabulary=args.vocabulary)
    print(f"nearest {args.vocabulary} synsets to {args.text!r} ({table.manifest['vectors_file']}):")
    for wnid, words, score in hits:
        print(f"  {wnid}  {score:.3f}  {words}")
    return 0


def _cmd_evaluate_superres(args: argparse.Namespace) -> int:
    from storage.catalog import source_store
    from training.superres import evaluate_superres, load_generator

    _existing(args.model, "model")
    _existing(args.store, "store")
    source = source_store(args.store)
    result = evaluate_superres(load_generator(args.model), args.store, source, limit=args.limit)
    print(f"{result['images']} images of {args.store} against {source}")
    print(f"{'':<10} {'PSNR dB':>8} {'SSIM':>7}")
    print(f"{'model':<10} {result['psnr_model']:>8.2f} {result['ssim_model']:>7.4f}")
    print(f"{'bicubic':<10} {result['psnr_bicubic']:>8.2f} {result['ssim_bicubic']:>7.4f}")
    print(f"RESULT psnr_model={result['psnr_model']:.2f} psnr_bicubic={result['psnr_bicubic']:.2f} "
          f"ssim_model={result['ssim_model']:.4f} ssim_bicubic={result['ssim_bicubic']:.4f}")
    return 0


def _read_image(path: str, max_pixels: int | None = None):
    """(3, H, W) float in [0, 1] of an image file, or a UsageError saying why it cannot be read.
    ``max_pixels``: PIL's decompression-bomb limit for this read (None: PIL's default, ~89 Mpixels)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from prep.resize import to_rgb

    _existing(path, "image")
    limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(to_rgb(im))).permute(2, 0, 1).float() / 255
    except Image.DecompressionBombError as e:
        raise UsageError(f"{path!r} is larger than the {Image.MAX_IMAGE_PIXELS:,}-pixel limit that guards against "
                         f"decompression bombs ({e}); pass --max-pixels N to raise it") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UsageError(f"{path!r} is not a readable image ({type(e).__name__}: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _cmd_enhance(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from training.superres import enhance, load_generator

    _existing(args.model, "model")
    _writable_image_path(args.output)  # before the inference, not after it
    x = _read_image(args.input, args.max_pixels)
    model = load_generator(args.model)

    def progress(done: int, total: int) -> None:
        if total > 1 and (done == total or done % max(1, total // 10) == 0):
            print(f"enhance: {done}/{total} tiles", file=sys.stderr, flush=True)

    y = enhance(model, x, tile=args.tile, progress=progress)
    Image.fromarray((y.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(args.output)
    print(f"{args.input} {tuple(x.shape[1:][::-1])} -> {args.output} {tuple(y.shape[1:][::-1])}")
    return 0


def _float_over(low: float, *, inclusive: bool, high: float = 1e12):
    """An argparse type: a finite number > ``low`` (>= with ``inclusive``) and <= ``high``; the error
    names the value (nan and inf are refused: they train nothing and write black images)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number; use a number "
                                             f"{'>=' if inclusive else '>'} {low:g} and <= {high:g}")
        if value < low or (value == low and not inclusive) or value > high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; use a number {'>=' if inclusive else '>'} "
                                             f"{low:g} and <= {high:g}")
        return value
    return parse


LEARNING_RATE = _float_over(0, inclusive=False, high=10.0)


def _floats(count: int, what: str):
    """An argparse type: ``count`` comma-separated numbers >= 0."""
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {count} comma-separated numbers") from None
        if len(values) != count or not all(math.isfinite(v) and 0 <= v <= 1e12 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: {what} takes {count} comma-separated finite numbers >= 0, "
                                             "e.g. " + ",".join(["1"] * count))
        return values
    return parse


def _cmd_stylize(args: argparse.Namespace) -> int:
    import time

    from training.style import MODES, GatysConfig, apply_style, gatys, load_style_model, save_rgb

    paths = args.images
    start = time.perf_counter()
    if args.model:
        if len(paths) != 2:
            raise UsageError(f"with --model, stylize takes CONTENT OUT (2 paths), got {len(paths)}: {' '.join(paths)}")
        _existing(args.model, "model")
        content, out = paths
        _writable_image_path(out)
        model, meta = load_style_model(args.model)
        x = _read_image(content)
        y = apply_style(model, x, device=args.device or ("cuda" if _cuda() else "cpu"))
        save_rgb(y, out)
        print(f"{content} {tuple(x.shape[1:][::-1])} -> {out} in {time.perf_counter() - start:.1f} s "
              f"(style: {meta.get('style')})")
        return 0
    init, with_content, with_style = MODES[args.mode]
    wanted = 3 if with_style else 2
    if len(paths) != wanted:
        form = "CONTENT STYLE OUT" if with_style else "CONTENT OUT"
        raise UsageError(f"stylize --mode {args.mode} takes {form} ({wanted} paths), got {len(paths)}: {' '.join(paths)}")
    content = _read_image(paths[0])
    style = _read_image(paths[1]) if with_style else None
    out = paths[-1]
    _writable_image_path(out)
    try:
        config = GatysConfig(size=args.size, steps=args.steps, optimizer=args.optimizer, lr=args.lr,
                             init=args.init or init, content_block=args.content_layer - 1,
                             content_weight=args.content_weight if with_content else 0.0,
                             style_weights=args.style_weights if with_style else (0.0,) * 5,
                             tv_weight=args.tv_weight, scaling=args.scaling, scales=args.scales, seed=args.seed,
                             log_every=args.log_every)
    except ValueError as e:
        raise UsageError(str(e)) from None

    def progress(r):
        style_sum = sum(v for k, v in r.items() if k.startswith("style_"))
        print(f"scale {r['scale'] + 1}/{config.scales} {r['size'][1]}x{r['size'][0]}: iteration "
              f"{r['iteration']}/{config.steps}  loss {r['loss']:.4f} (content {r.get('content', 0.0):.4f}, "
              f"style {style_sum:.4f})  {r['s_per_iteration']:.2f} s/iteration", file=sys.stderr, flush=True)

    image, history = gatys(content, style, config, device=args.device or ("cuda" if _cuda() else "cpu"),
                           progress=progress)
    save_rgb(image, out)
    print(f"{paths[0]} -> {out} {tuple(image.shape[1:][::-1])}: {history[-1]['total_iterations']} iterations "
          f"in {time.perf_counter() - start:.1f} s, final loss {history[-1]['loss']:.4f}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _writable_image_path(path: str) -> None:
    """A UsageError unless ``path`` has an image suffix and its folder exists."""
    from PIL import Image

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"output {path!r} is a folder; name the image file to write, e.g. {str(p / 'out.png')!r}")
    if Image.registered_extensions().get(p.suffix.lower()) is None:
        raise UsageError(f"output {path!r} has no image suffix PIL can write; use .png, .jpg, .webp, ...")
    if not p.parent.is_dir():
        raise UsageError(f"output {path!r}: folder {str(p.parent)!r} does not exist")


def _cmd_style(args: argparse.Namespace) -> int:
    from flows.style import check_style_image, style
    from storage.stage import open_stage

    _check_pipeline_args(args)
    if args.style is not None:
        try:
            check_style_image(args.style)
        except ValueError as e:
            raise UsageError(str(e)) from None
    outputs = style(source=args.source, style_image=args.style, size=args.size, epochs=args.epochs, lr=args.lr,
                    batch_size=args.batch_size, content_weight=args.content_weight,
                    style_weights=list(args.style_weights), tv_weight=args.tv_weight, seed=args.seed,
                    gpus=args.gpus, refresh=args.refresh, wait=not args.no_wait)
    m = open_stage(outputs["style"]).manifest()
    print(f"style {outputs['style']}: {m['epochs']} epochs on {m['image_side']} px images, final loss "
          f"{m['final_loss']:.4f} (val {m['val_loss'] if m['val_loss'] is None else round(m['val_loss'], 4)})")
    print(f"style image: {m['style']}\nsamples every epoch: {outputs['style']}/{m['samples']}/\n"
          f"apply it: imagesmith stylize --model {outputs['style']} IN.jpg OUT.png")
    return 0


def _cmd_superres(args: argparse.Namespace) -> int:
    from flows.superres import superres

    _check_pipeline_args(args)
    if args.high_size % args.low_size:
        raise UsageError(f"--high-size {args.high_size} must be a multiple of --low-size {args.low_size}")
    if args.progressive_from is not None and not args.low_size < args.progressive_from < args.high_size:
        raise UsageError(f"--progressive-from {args.progressive_from} must lie between --low-size {args.low_size} "
                         f"and --high-size {args.high_size}")
    outputs = superres(source=args.source, arch=args.arch, loss=args.loss, high_size=args.high_size,
                       low_size=args.low_size, progressive_from=args.progressive_from, crappifier=args.crappifier,
                       epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       pretrained=not args.no_pretrained, seed=args.seed, gpus=args.gpus, refresh=args.refresh,
                       wait=not args.no_wait)
    m = outputs["metrics"]
    print(f"model: {outputs['superres']}/model.pt  (imagesmith enhance MODEL IN OUT)")
    if m:
        verdict = "beats" if m["psnr_model"] > m["psnr_bicubic"] and m["ssim_model"] > m["ssim_bicubic"] else \
            "does NOT beat"
        print(f"held-out images: PSNR {m['psnr_model']:.2f} dB (bicubic {m['psnr_bicubic']:.2f}), SSIM "
              f"{m['ssim_model']:.4f} (bicubic {m['ssim_bicubic']:.4f}): the model {verdict} bicubic on both")
    return 0


def _cmd_devise(args: argparse.Namespace) -> int:
    from flows.devise import devise
    from storage.stage import open_stage
    from training.devise.evaluate import format_hits

    _check_pipeline_args(args)
    if args.finetune_epochs == 1:
        raise UsageError("--finetune-epochs 1: fine-tuning runs a 1cycle, so use 0 (no fine-tuning) or at least 2")
    bad = [w for w in args.zero_shot or () if not (len(w) == 9 and w[0] == "n" and w[1:].isdigit())]
    if bad:
        raise UsageError(f"--zero-shot {bad[0]!r} is not a WordNet noun id; expected n + 8 digits, e.g. n02084071")
    from prep.listing import check_source
    from training.devise.classes import check_not_in_1k

    try:
        check_not_in_1k(args.zero_shot or (), "--zero-shot classes")
        if args.zero_shot_source:
            args.zero_shot_source = str(check_source(args.zero_shot_source))
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    from flows.devise import Backbone

    accepted = Backbone.__args__  # type: ignore[attr-defined]
    if args.backbone not in accepted:
        raise UsageError(f"--backbone {args.backbone!r} is not a backbone this build accepts; choose one of "
                         f"{', '.join(accepted[:12])}, ... ({len(accepted)} in all, e.g. resnet50, efficientnet_lite0)")
    outputs = devise(source=args.source, size=args.size, backbone=args.backbone, pretrained=not args.no_pretrained,
                     epochs=args.epochs, batch_size=args.batch_size, finetune_epochs=args.finetune_epochs,
                     zero_shot=args.zero_shot, zero_shot_source=args.zero_shot_source,
                     word_vectors=args.word_vectors, ann_above=args.ann_above,
                     seed=args.seed, gpus=args.gpus, refresh=args.refresh, wait=not args.no_wait)
    model_dir = outputs.get("devise-finetune", outputs["devise"])
    print(format_hits(open_stage(model_dir).manifest()["metrics"]))
    print(f"model: {model_dir}\nsearch index: {outputs['devise-index']}")
    return 0


def _cmd_gan(args: argparse.Namespace) -> int:
    from flows.gan import gan
    from storage.stage import open_stage

    _check_pipeline_args(args)
    if args.generator is not None:
        _finished_stage(args.generator, "superres", "--generator")
    if args.high_size % args.low_size:
        raise UsageError(f"--high-size {args.high_size} must be a multiple of --low-size {args.low_size}")
    outputs = gan(source=args.source, high_size=args.high_size, low_size=args.low_size, crappifier=args.crappifier,
                  generator=args.generator, generator_epochs=args.generator_epochs, critic_epochs=args.critic_epochs,
                  gan_epochs=args.epochs, batch_size=args.batch_size, pretrained=not args.no_pretrained,
                  seed=args.seed, gpus=args.gpus, refresh=args.refresh, wait=not args.no_wait)
    m, critic = open_stage(outputs["gan"]).manifest(), open_stage(outputs["critic"]).manifest()
    for name in ("generator", "generated", "critic", "gan"):
        print(f"{name:<10} {outputs[name]}")
    print(f"critic accuracy on held-out images: {critic.get('critic_acc')} "
          f"(generated {critic.get('critic_acc_fake')}, originals {critic.get('critic_acc_real')})")
    print(f"critic steps per generator step, each epoch: {m['critic_steps_per_gen_step']}")
    if m["evaluation"]:
        e = m["evaluation"]
        print(f"{e['images']} held-out images      PSNR dB    SSIM")
        for who in ("bicubic", "pretrained", "gan"):
            print(f"  {who:<24} {e['psnr_' + who]:>7.2f}  {e['ssim_' + who]:.4f}")
    print(f"samples every epoch: {outputs['gan']}/{m['samples']}/  model: {outputs['gan']}/model.pt "
          "(imagesmith enhance MODEL IN OUT)")
    return 0


def _cmd_wgan(args: argparse.Namespace) -> int:
    from flows.gan import wgan
    from storage.stage import open_stage

    _check_pipeline_args(args)
    outputs = wgan(source=args.source, size=args.size, epochs=args.epochs, batch_size=args.batch_size,
                   critic_warmup=args.critic_warmup, seed=args.seed, gpus=args.gpus, refresh=args.refresh,
                   wait=not args.no_wait)
    m = open_stage(outputs["wgan"]).manifest()
    print(f"wgan {outputs['wgan']}: {m['epochs']} epochs, {m['generator_steps']} generator steps; "
          f"samples every epoch in {outputs['wgan']}/{m['samples']}/")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from prep.resize import Rejected
    from training.devise.search import DeviseSearch

    if args.text is not None and not args.text.strip():
        raise UsageError("--text is empty; give words to search for, e.g. --text \"jumbo jet\"")
    if args.image is not None:
        _read_image(args.image, args.max_pixels)  # a missing or unreadable file is named before the index loads
        if args.max_pixels:  # the search reads the file again
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = args.max_pixels
        if args.index is None and not _has_finished("devise-index"):
            return _conse_search(args)
    search = DeviseSearch(_finished_stage(args.index, "devise-index", "--index"))
    if args.text is not None:
        hits = search.images_for_text(args.text, k=args.k)
        print(f"images nearest to {args.text!r}:")
    else:
        try:
            vector = search.embed_image(args.image)
        except Rejected as e:
            raise UsageError(f"--image {args.image!r}: {e}") from None
        for vocabulary in ("imagenet", "wordnet"):
            print(f"nearest {'ImageNet classes' if vocabulary == 'imagenet' else 'WordNet nouns'} to {args.image}:")
            for wnid, words, score in search.table.nearest_words(vector, k=args.k, vocabulary=vocabulary):
                print(f"  {score:.3f}  {wnid}  {words}")
        hits = search.images_for_vector(vector, k=args.k)
        print(f"nearest images to {args.image}:")
    for hit in hits:
        print(f"  {hit.score:.3f}  {hit.wnid}  {search.table.names.get(hit.wnid, '?'):<20}  {hit.path}")
    return 0


def _has_finished(stage: str) -> bool:
    try:
        _latest_stage(stage)
        return True
    except UsageError:
        return False


def _conse_search(args: argparse.Namespace) -> int:
    """No DeViSE model yet: name the image with ConSE (the pretrained classifier + word vectors)."""
    from storage.words import WordTable
    from training.devise.conse import ConseImages

    conse = ConseImages(WordTable(_latest_stage("embeddings")))
    vector = conse.embed_image(args.image)
    print(f"(no DeViSE index yet: ConSE on {conse.backbone}'s ImageNet classifier, no training)")
    for vocabulary in ("imagenet", "wordnet"):
        print(f"nearest {'ImageNet classes' if vocabulary == 'imagenet' else 'WordNet nouns'} to {args.image}:")
        for wnid, words, score in conse.table.nearest_words(vector, k=args.k, vocabulary=vocabulary):
            print(f"  {score:.3f}  {wnid}  {words}")
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    from imagesmith.server import api_url, ensure_operations, is_healthy, start_server, stop_server

    if args.action == "start":
        url, started = start_server(port=args.port)
        print(f"prefect server {'started' if started else 'already running'}: UI {url.removesuffix('/api')}")
        for change in ensure_operations(url):
            print(f"  created {change}")
    elif args.action == "stop":
        print("stopped" if stop_server() else "no server started by imagesmith is recorded")
    else:
        url = api_url(port=args.port)
        print(f"{url}: {'healthy' if is_healthy(url) else 'not answering'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from imagesmith.server import ensure_operations, start_server

    url, started = start_server(port=args.port)
    print(f"prefect server {'started' if started else 'already running'} at {url}")
    # in the environment before Prefect is first imported (its settings are read then), and for the
    # shard tasks' child processes, which must report to the same server (else each starts its own)
    os.environ["PREFECT_API_URL"] = url
    ensure_operations(url)
    from flows.demo import demo
    from flows.summary import format_table
    from training.devise.evaluate import format_hits

    state = demo(seed=args.seed, refresh=args.refresh, wait=not args.no_wait, smoke=args.smoke, return_state=True)
    result = state.result(raise_on_failure=False)
    rows = result.get("summary") if isinstance(result, dict) else None
    if rows:
        print("\n" + format_table(rows))
        devise_dir = next((r["path"] for r in rows if r["stage"] == "devise-finetune"), None) or \
            next((r["path"] for r in rows if r["stage"] == "devise"), None)
        if devise_dir:
            from storage.stage import open_stage

            print(f"\nDeViSE hit@k on held-out images ({Path(devise_dir).parent.name}):")
            print(format_hits(open_stage(devise_dir).manifest()["metrics"]))
    print(f"\nPrefect UI: {url.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}  "
          "(task runs, logs, the demo-summary artifact)")
    print("stop the server with: make stop-server")
    if state.is_failed():
        print(f"error: {_one_line(result) if isinstance(result, BaseException) else state.message}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _api_url() -> tuple[str | None, str]:
    """(the Prefect API that answers, or None; what was found). PREFECT_API_URL when set, else a
    local server on the default port; without either, runs are ephemeral and nobody sees them."""
    from imagesmith.server import api_url, is_healthy

    url = os.environ.get("PREFECT_API_URL")
    if url:
        if is_healthy(url):
            return url, f"PREFECT_API_URL={url} (healthy)"
        return None, f"PREFECT_API_URL={url} does not answer; start it (`imagesmith server start`) or unset it"
    if is_healthy(api_url()):
        return api_url(), f"a local server at {api_url()} (healthy; set PREFECT_API_URL to it so runs report there)"
    return None, ("none: no PREFECT_API_URL and nothing answers on 127.0.0.1:4200, so a run is ephemeral "
                  "(it never appears in a UI); start a server with `imagesmith server start`")


def _recent_flow_runs(url: str, limit: int) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId
    from prefect.client.schemas.sorting import FlowRunSort

    os.environ["PREFECT_API_URL"] = url

    async def read():
        async with get_client() as client:  # top-level runs only (subflows are listed under them in the UI)
            return await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True)),
                sort=FlowRunSort.START_TIME_DESC, limit=limit)

    return asyncio.run(read())


def _cmd_status(args: argparse.Namespace) -> int:
    from storage.archive import stage_inventory
    from storage.tiers import Tiers

    tiers = Tiers.from_env()
    rows = stage_inventory(tiers)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"stages (fast: {tiers.fast}, bulk: {tiers.bulk}):")
    if not rows:
        print("  none yet (imagesmith demo builds them)")
    for tier in ("fast", "bulk"):
        mine = [r for r in rows if r["tier"] == tier]
        if mine:
            total = sum(r["bytes"] for r in mine)
            print(f"  {tier} tier: {len(mine)} stage(s), {_human(total)}")
        for r in sorted(mine, key=lambda r: (r["stage"], r.get("completed_unix") or 0)):
            note = f"  archived -> {r['archived_to']}" if r.get("archived_to") else ""
            if r.get("problem"):
                note += f"  ({r['problem'].removeprefix('damaged: ')}; the next run moves it aside and rebuilds it)"
            print(f"    {r['stage']:<16} {r['key']}  {r['state']:<10} {_human(r['bytes']):>10}  "
                  f"{r.get('completed_at') or '-':<24}{note}")
    url, what = _api_url()
    if url is None:
        print(f"\nlast runs: {what}")
        return 0
    runs = _recent_flow_runs(url, args.runs)
    order = {"FAILED": 0, "CRASHED": 0, "CANCELLED": 1, "RUNNING": 2, "PENDING": 2, "SCHEDULED": 3}
    runs.sort(key=lambda r: order.get(r.state_type.value if r.state_type else "", 4))
    print(f"\nlast {len(runs)} run(s) at {url} (failed first):")
    for r in runs:
        start = r.start_time.strftime("%Y-%m-%d %H:%M:%S") if r.start_time else "-"
        print(f"  {r.state_name or '-':<10} {start:<20} {r.name:<40} {url.removesuffix('/api')}/runs/flow-run/{r.id}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from storage.archive import stage_dirs
    from storage.stage import StageDir, verify_stage
    from storage.tiers import Tiers

    if args.stages:
        paths = []
        for given in args.stages:
            path = Path(given)
            if not path.is_dir() or not re.fullmatch(r"[0-9a-f]{16}", path.name):
                raise UsageError(f"{given!r} is not a stage directory (<tier>/<stage>/<16 hex key>)")
            paths.append(path)
    else:
        tiers = Tiers.from_env()
        paths = [p for tier in ("fast", "bulk") for p in stage_dirs(tiers, tier)]
    damaged = unrecorded = checked = 0
    for path in paths:
        stage = StageDir(stage=path.parent.name, key=path.name, path=path)
        problem = stage.problem()
        if problem is not None and problem.startswith("unfinished"):
            print(f"  {stage.stage:<16} {stage.key}  unfinished (nothing to verify)")
            continue
        bad = verify_stage(stage)
        checked += 1
        if bad:
            damaged += 1
            print(f"  {stage.stage:<16} {stage.key}  DAMAGED: " + "; ".join(bad))
        elif "integrity" not in stage.manifest():
            unrecorded += 1
            print(f"  {stage.stage:<16} {stage.key}  complete, no checksums recorded (built before they were)")
        else:
            print(f"  {stage.stage:<16} {stage.key}  ok ({len(stage.manifest()['integrity'])} files, CRC-32 checked)")
    print(f"{checked} stage(s) verified: {damaged} damaged, {unrecorded} without checksums")
    return 1 if damaged else 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from storage.archive import collect_garbage
    from storage.tiers import Tiers

    result = collect_garbage(Tiers.from_env(), args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in result["removed"]:
        print(f"  {verb} {path}")
    print(f"{verb} {len(result['removed'])} stage(s) ({_human(result['freed_bytes'])}) from the fast tier; kept "
          f"{len(result['kept'])} used by the last {result['runs']} run(s) and "
          f"{len(result['skipped_unfinished'])} unfinished or being built")
    return 0


def _cmd_archive(args: argparse.Namespace) -> int:
    from storage.archive import ARCHIVE_RECORD, archive_stage, stage_dirs
    from storage.stage import open_stage
    from storage.tiers import Tiers

    tiers = Tiers.from_env()
    if args.stages:
        paths = []
        for p in args.stages:
            if not (Path(p) / "manifest.json").is_file():
                raise UsageError(f"STAGE_DIR {p!r} is not a finished stage directory (no manifest.json); "
                                 "`imagesmith status` lists them")
            paths.append(Path(p))
    else:  # every finished model on the fast tier not archived yet
        paths = [p for p in stage_dirs(tiers, "fast") if (p / "manifest.json").is_file()
                 and not (p / ARCHIVE_RECORD).is_file() and {"model", "critic"} & set(open_stage(p).manifest())]
    for path in paths:
        record = archive_stage(open_stage(path), tiers)
        print(f"  {path} -> {record['archived_to']} ({record['files']} files, {_human(record['bytes'])})")
    print(f"archived {len(paths)} stage(s)")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options every flow command shares."""
    p.add_argument("--source", help="ImageNet-layout folder (train/<wnid>/*.JPEG); default: the bundled sample")
    p.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="shuffle (and initial weights) seed")
    p.add_argument("--refresh", action="store_true",
                   help="rerun cached tasks; a stage whose directory still has its manifest is not "
                        "recomputed (delete that directory to force it)")
    p.add_argument("--no-wait", action="store_true",
                   help="fail at once (exit 75) when another run is building a stage this run needs, "
                        "instead of waiting for it")
    p.add_argument("--word-vectors", help="GoogleNews-vectors-negative300.bin or a fastText .bin/.vec "
                                          "(default: the bundled GloVe 6B 50-d)")


def _add_gpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=_int_in(1, 64), default=1,
                   help="training processes, one per GPU (DDP through torchrun; gloo processes on a CPU "
                        "machine); the batch size is per process; the learning rate stays as given (adaptive optimizers are not scaled)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imagesmith", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("doctor", help="report the imaging backend, versions, tiers and Prefect API")
    p.add_argument("--json", action="store_true", help="also print the imaging record as JSON")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("sample", help="build the bundled sample dataset (real photos, ImageNet layout)")
    p.add_argument("--out", help="folder to write (default: a stage directory on the bulk tier)")
    p.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    p.add_argument("--train-per-class", type=_int_in(1), default=40)
    p.add_argument("--val-per-class", type=_int_in(0), default=10)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("run", help="run the pipeline flow (against PREFECT_API_URL, or ephemeral when unset)")
    _add_run_options(p)
    p.add_argument("--size", type=_int_in(*SIZE_RANGE), default=224, help="square side of the HDF5 image stores")
    p.add_argument("--dask-address", help="run resize shards on this Dask scheduler (tcp://host:8786)")
    p.add_argument("--crappifier", choices=CRAPPIFIERS,
                   help="add the aligned low-quality store (stage 4) made by this crappifier")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="start a local Prefect server if none runs, then train every model family "
                                    "small on the bundled sample (about 10 min on 2 cores) and print a summary")
    p.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="shuffle (and initial weights) seed")
    p.add_argument("--refresh", action="store_true", help="rerun cached tasks")
    p.add_argument("--no-wait", action="store_true", help="fail at once (exit 75) when another run builds a stage")
    p.add_argument("--port", type=_int_in(1, 65535), default=4200)
    p.add_argument("--smoke", action="store_true",
                   help="every stage on 32 px images, a few images and epochs: checks that everything runs "
                        "(a minute or two); its numbers mean nothing")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("words", help="nearest ImageNet classes or WordNet nouns to a text, by word vectors")
    p.add_argument("text")
    p.add_argument("-k", type=_int_in(1), default=5)
    p.add_argument("--vocabulary", choices=["imagenet", "wordnet"], default="imagenet")
    p.add_argument("--table", help="an embeddings stage directory (default: the newest on the fast tier)")
    p.set_defaults(func=_cmd_words)

    p = sub.add_parser("evaluate-superres", help="PSNR/SSIM of a trained generator vs bicubic on a crappified store")
    p.add_argument("model", help="model.pt written by super-resolution training (or its folder)")
    p.add_argument("store", help="a crappified store, e.g. data/fast/crappify/<key>/val.h5")
    p.add_argument("--limit", type=_int_in(1), help="evaluate only the first N images")
    p.set_defaults(func=_cmd_evaluate_superres)

    p = sub.add_parser("enhance", help="upscale/restore any image with a trained generator (tiled)")
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--tile", type=_int_in(16), default=256, help="tile side in input pixels (bounds memory)")
    p.add_argument("--max-pixels", type=_int_in(1, 10**10), help="accept input images up to this many pixels "
                                                                  "(default: PIL's decompression-bomb limit, ~89 M)")
    p.set_defaults(func=_cmd_enhance)

    p = sub.add_parser("superres", help="super-resolution: crappify the sample (or --source), train, evaluate vs bicubic")
    _add_run_options(p)
    p.add_argument("--arch", choices=["unet", "johnson"], default="unet")
    p.add_argument("--loss", choices=["feature", "pixel"], default="feature")
    p.add_argument("--high-size", type=_int_in(*SIZE_RANGE), default=128, help="side of the targets")
    p.add_argument("--low-size", type=_int_in(8, 1024), default=32, help="side of the crappified inputs")
    p.add_argument("--progressive-from", type=_int_in(*SIZE_RANGE),
                   help="train first at this target side, then at --high-size (lesson 7's 128 then 256)")
    p.add_argument("--crappifier", default="jpeg_text", choices=CRAPPIFIERS)
    p.add_argument("--epochs", type=_int_in(2), default=10, help="per 1cycle (frozen, then unfrozen)")
    p.add_argument("--lr", type=LEARNING_RATE, default=1e-3)
    p.add_argument("--batch-size", type=_int_in(1), default=8)
    p.add_argument("--no-pretrained", action="store_true", help="random encoder and loss network (asked for)")
    _add_gpus(p)
    p.set_defaults(func=_cmd_superres)

    p = sub.add_parser("devise", help="train DeViSE (images -> word vectors) and build its search index")
    _add_run_options(p)
    p.add_argument("--size", type=_int_in(*SIZE_RANGE), default=224, help="square side of the image store")
    p.add_argument("--backbone", default="auto",
                   help="auto (a local ResNet-50 file, else the bundled EfficientNet-Lite0), efficientnet_lite0, "
                        "or a torchvision CNN such as resnet18, resnet50, convnext_tiny")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (asked for: never a fallback)")
    p.add_argument("--epochs", type=_int_in(2), default=10, help="head epochs (1cycle) on precomputed features")
    p.add_argument("--batch-size", type=_int_in(2), default=256)
    p.add_argument("--finetune-epochs", type=_int_in(0), default=0,
                   help="then fine-tune body + head end to end (0: no fine-tuning, else at least 2)")
    p.add_argument("--zero-shot", nargs="+", metavar="WNID",
                   help="classes held out of training (default: the classes outside ImageNet-1k; 1k classes are "
                        "refused: the pretrained backbone knows them)")
    p.add_argument("--zero-shot-source", metavar="DIR",
                   help="a second folder (train/<wnid>/ layout) of classes outside ImageNet-1k, all held out: "
                        "zero-shot evaluation for a 1k-only --source")
    p.add_argument("--ann-above", type=_int_in(0, 10**12), default=100_000, help="use an HNSW index above this many images")
    _add_gpus(p)
    p.set_defaults(func=_cmd_devise)

    p = sub.add_parser("gan", help="GAN restoration: pretrained generator and critic, then the adaptive GAN phase")
    _add_run_options(p)
    p.add_argument("--high-size", type=_int_in(*SIZE_RANGE), default=64, help="side of the originals (targets)")
    p.add_argument("--low-size", type=_int_in(8, 1024), default=32, help="side of the crappified inputs")
    p.add_argument("--crappifier", default="jpeg_text", choices=CRAPPIFIERS)
    p.add_argument("--generator", help="start from this finished super-res stage directory (its model.pt) "
                                       "instead of pretraining a generator")
    p.add_argument("--generator-epochs", type=_int_in(1), default=2, help="per step (frozen, then unfrozen)")
    p.add_argument("--critic-epochs", type=_int_in(1), default=2)
    p.add_argument("--epochs", type=_int_in(1), default=3, help="GAN phase epochs")
    p.add_argument("--batch-size", type=_int_in(2), default=8)
    p.add_argument("--no-pretrained", action="store_true", help="random encoder weights (asked for)")
    _add_gpus(p)
    p.set_defaults(func=_cmd_gan)

    p = sub.add_parser("wgan", help="a WGAN: noise -> images, trained on the sample (or --source) resized")
    _add_run_options(p)
    p.add_argument("--size", type=int, choices=[32, 64, 128], default=64)
    p.add_argument("--epochs", type=_int_in(1), default=5)
    p.add_argument("--batch-size", type=_int_in(2), default=64)
    p.add_argument("--critic-warmup", type=_int_in(1), default=100,
                   help="critic steps before each of the first 25 generator steps (the paper's 100)")
    _add_gpus(p)
    p.set_defaults(func=_cmd_wgan)

    p = sub.add_parser("stylize", help="paint an image in the style of another: Gatys optimisation (CONTENT STYLE OUT) "
                                       "or a trained fast style network (--model DIR CONTENT OUT)")
    p.add_argument("images", nargs="+", metavar="PATH", help="CONTENT STYLE OUT; CONTENT OUT with --model or "
                                                             "--mode content")
    p.add_argument("--model", help="a finished fast style stage (imagesmith style), or its model.pt: one forward pass")
    p.add_argument("--mode", choices=["transfer", "style", "content"], default="transfer",
                   help="transfer: content + style from the content image; style: the style alone from noise; "
                        "content: the content layer alone, reconstructed from noise")
    p.add_argument("--size", type=_int_in(32, 8192), default=384, help="the output's longer side")
    p.add_argument("--steps", type=_int_in(1), default=200, help="loss evaluations per scale")
    p.add_argument("--scales", type=_int_in(1, 6), default=1,
                   help="optimise coarse to fine: at size / 2^(N-1) first, doubling each time")
    p.add_argument("--optimizer", choices=["lbfgs", "adam"], default="lbfgs")
    p.add_argument("--lr", type=LEARNING_RATE, help="default: 1 for L-BFGS (line search), 0.02 for Adam")
    p.add_argument("--init", choices=["content", "noise"], help="the starting image (default: by --mode)")
    p.add_argument("--content-layer", type=_int_in(1, 5), default=4, help="VGG block of the content loss (1-5)")
    p.add_argument("--content-weight", type=_float_over(0, inclusive=True), default=1.0)
    p.add_argument("--style-weights", type=_floats(5, "--style-weights"), default=(1.0,) * 5,
                   help="one weight per VGG block, e.g. 1,1,1,1,1 (0 drops a block)")
    p.add_argument("--tv-weight", type=_float_over(0, inclusive=True), default=0.0, help="total variation (smoothness)")
    p.add_argument("--scaling", choices=["relative", "lesson"], default="relative",
                   help="relative: each term a relative error (weights mean the same on any VGG and size); "
                        "lesson: the lesson's raw MSE with its 1e6 (tuned for VGG16-bn)")
    p.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="seed of the noise start")
    p.add_argument("--log-every", type=_int_in(1), default=20)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=_cmd_stylize)

    p = sub.add_parser("style", help="train a fast style network on the sample (or --source) against one painting")
    _add_run_options(p)
    p.add_argument("--style", help="the style image (default: Munch's The Scream from Debian's darknet package)")
    p.add_argument("--size", type=_int_in(*SIZE_RANGE), default=128, help="side of the training images")
    p.add_argument("--epochs", type=_int_in(1), default=2)
    p.add_argument("--lr", type=LEARNING_RATE, default=1e-3)
    p.add_argument("--batch-size", type=_int_in(1), default=4)
    p.add_argument("--content-weight", type=_float_over(0, inclusive=True), default=1.0)
    p.add_argument("--style-weights", type=_floats(5, "--style-weights"), default=(1.0, 1.0, 1.0, 1.0, 0.0),
                   help="one weight per VGG block (default 1,1,1,1,0: relu1_2 to relu4_x, as Johnson et al.)")
    p.add_argument("--tv-weight", type=_float_over(0, inclusive=True), default=0.0)
    _add_gpus(p)
    p.set_defaults(func=_cmd_style)

    p = sub.add_parser("search", help="DeViSE search: text -> images, or image -> words and images "
                                      "(before any DeViSE run: image -> words by ConSE)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help='words to find images of, e.g. "jumbo jet"')
    what.add_argument("--image", help="an image file to name and find similar images to")
    p.add_argument("--max-pixels", type=_int_in(1, 10**10), help="accept --image files up to this many pixels "
                                                                  "(default: PIL's decompression-bomb limit, ~89 M)")
    p.add_argument("-k", type=_int_in(1), default=10)
    p.add_argument("--index", help="a devise-index stage directory (default: the newest on the fast tier)")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("status", help="every stage on both tiers (state, key, size, completion, archive) and the "
                                      "last runs from the Prefect API, failed first")
    p.add_argument("--runs", type=_int_in(1, 200), default=10, help="how many recent runs to list")
    p.add_argument("--json", action="store_true", help="the stages as JSON")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("verify", help="check every file of finished stages against the sizes and CRC-32s "
                                      "recorded when they were written (exit 1 when one is damaged)")
    p.add_argument("stages", nargs="*", metavar="STAGE_DIR", help="stage directories (default: every stage on "
                                                                   "both tiers)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("gc", help="free the fast tier: remove finished stages that none of the last N runs used "
                                  "(nor anything those runs' stages read)")
    p.add_argument("--keep", type=_int_in(1), required=True, help="keep every stage the last N runs used")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    p.set_defaults(func=_cmd_gc)

    p = sub.add_parser("archive", help="copy trained models (model, history, evaluation, grids) to the bulk tier, "
                                       "checksummed; done after every training stage, this redoes failed copies")
    p.add_argument("stages", nargs="*", metavar="STAGE_DIR", help="stage directories (default: every finished "
                                                                  "model on the fast tier not archived yet)")
    p.set_defaults(func=_cmd_archive)

    p = sub.add_parser("server", help="manage the local Prefect server (127.0.0.1, PREFECT_HOME=.prefect)")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=_int_in(1, 65535), default=4200)
    p.set_defaults(func=_cmd_server)
    return parser


def _one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    args = build_parser().parse_args(argv)
    from storage.stage import DiskFull, StageBusy, StageIncomplete

    try:
        return args.func(args)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, not stacked tracebacks
        signum = getattr(e, "signum", 2)  # models.train.TrainingStopped says where it checkpointed
        print(f"stopped: {_one_line(e) if str(e) else 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return 128 + signum
    except UsageError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except StageBusy as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BUSY
    except DiskFull as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, StageIncomplete, ValueError, KeyError) as e:
        if type(e).__name__ == "NonFiniteLoss":  # models.train: training diverged; the line says where
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return EXIT_FAILED
        if args.command in ("run", "demo", "superres", "devise", "gan", "wgan", "style"):
            raise  # inside a flow run: not an input we checked, so the traceback helps
        # a file or folder the user named that is missing, unreadable or of the wrong kind
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
