"""The ``imagesmith`` command."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from imagesmith.offline import apply_offline_defaults


def _cmd_doctor(args: argparse.Namespace) -> int:
    import h5py
    import prefect
    import torch

    from storage.tiers import Tiers
    from prep.imaging import imaging_backend

    info = imaging_backend()
    tiers = Tiers.from_env()
    print(f"imaging backend : {info['backend']} (PIL {info['pil_version']}; "
          f"dists: pillow-simd={info['pillow_simd_dist']}, pillow={info['pillow_dist']})")
    print(f"  libjpeg-turbo : {info['libjpeg_turbo']} (libjpeg {info['libjpeg_version']})")
    print(f"  AVX2          : cpu={info['cpu_avx2']} build={info['built_with_avx2']} ({info['build_note']})")
    if info["backend"] != "pillow-simd":
        print("  WARNING: plain Pillow is active; resizing runs ~2x slower. Run `make setup` as root to build pillow-simd.")
    print(f"torch           : {torch.__version__} (CUDA available: {torch.cuda.is_available()})")
    print(f"prefect         : {prefect.__version__} (API: {os.environ.get('PREFECT_API_URL') or 'none: ephemeral mode'})")
    print(f"h5py / HDF5     : {h5py.__version__} / {h5py.version.hdf5_version}")
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
            print(f"error: {out} is not empty; choose a new folder", file=sys.stderr)
            return 2
        summary = build_sample(out, **sizes)
        print(f"sample dataset: {out.resolve()} ({summary['counts']})")
    else:
        stage = run_stage(Tiers.from_env(), SampleStage(**sizes))
        print(f"sample dataset: {stage.path} ({stage.manifest()['counts']})")
    return 0


def _run_pipeline(args: argparse.Namespace) -> dict[str, str]:
    from flows.pipeline import pipeline

    return pipeline(source=args.source, seed=args.seed, size=args.size, dask_address=args.dask_address,
                    crappifier=args.crappifier, word_vectors=args.word_vectors, refresh=args.refresh)


def _print_outputs(outputs: dict[str, str]) -> None:
    from storage.stage import open_stage

    print("\nartifacts:")
    for stage, path in outputs.items():
        manifest = open_stage(path).manifest()
        summary = manifest.get("counts") or manifest.get("report", "")
        print(f"  {stage:<8} {path}  {summary}")


def _cmd_run(args: argparse.Namespace) -> int:
    _print_outputs(_run_pipeline(args))
    return 0


def _latest_stage(stage: str, tier: str = "fast") -> Path:
    """The most recently finished directory of ``stage`` on ``tier``."""
    from storage.stage import MANIFEST_NAME
    from storage.tiers import Tiers

    root = Tiers.from_env().root(tier) / stage
    done = sorted(root.glob(f"*/{MANIFEST_NAME}"), key=lambda p: p.stat().st_mtime)
    if not done:
        raise SystemExit(f"error: no finished {stage!r} stage under {root}; run `imagesmith run` first")
    return done[-1].parent


def _cmd_words(args: argparse.Namespace) -> int:
    from storage.words import WordTable

    table = WordTable(args.table or _latest_stage("embeddings"))
    try:
        hits = table.nearest_words(table.vector_for(args.text), k=args.k, vocabulary=args.vocabulary)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    print(f"nearest {args.vocabulary} synsets to {args.text!r} ({table.manifest['vectors_file']}):")
    for wnid, words, score in hits:
        print(f"  {wnid}  {score:.3f}  {words}")
    return 0


def _cmd_evaluate_superres(args: argparse.Namespace) -> int:
    from storage.catalog import source_store
    from training.superres import evaluate_superres, load_generator

    try:
        source = source_store(args.store)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = evaluate_superres(load_generator(args.model), args.store, source, limit=args.limit)
    print(f"{result['images']} images of {args.store} against {source}")
    print(f"{'':<10} {'PSNR dB':>8} {'SSIM':>7}")
    print(f"{'model':<10} {result['psnr_model']:>8.2f} {result['ssim_model']:>7.4f}")
    print(f"{'bicubic':<10} {result['psnr_bicubic']:>8.2f} {result['ssim_bicubic']:>7.4f}")
    print(f"RESULT psnr_model={result['psnr_model']:.2f} psnr_bicubic={result['psnr_bicubic']:.2f} "
          f"ssim_model={result['ssim_model']:.4f} ssim_bicubic={result['ssim_bicubic']:.4f}")
    return 0


def _cmd_enhance(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from training.superres import enhance, load_generator

    model = load_generator(args.model)
    with Image.open(args.input) as im:
        x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
    y = enhance(model, x, tile=args.tile)
    Image.fromarray((y.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(args.output)
    print(f"{args.input} {tuple(x.shape[1:][::-1])} -> {args.output} {tuple(y.shape[1:][::-1])}")
    return 0


def _cmd_devise(args: argparse.Namespace) -> int:
    from flows.devise import devise
    from storage.stage import open_stage
    from training.devise.evaluate import format_hits

    outputs = devise(source=args.source, size=args.size, backbone=args.backbone, pretrained=not args.no_pretrained,
                     epochs=args.epochs, batch_size=args.batch_size, finetune_epochs=args.finetune_epochs,
                     zero_shot=args.zero_shot, word_vectors=args.word_vectors, ann_above=args.ann_above,
                     seed=args.seed, refresh=args.refresh)
    model_dir = outputs.get("devise-finetune", outputs["devise"])
    print(format_hits(open_stage(model_dir).manifest()["metrics"]))
    print(f"model: {model_dir}\nsearch index: {outputs['devise-index']}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from training.devise.search import DeviseSearch

    search = DeviseSearch(args.index or _latest_stage("devise-index"))
    try:
        if args.text:
            hits = search.images_for_text(args.text, k=args.k)
            print(f"images nearest to {args.text!r}:")
        else:
            vector = search.embed_image(args.image)
            for vocabulary in ("imagenet", "wordnet"):
                print(f"nearest {'ImageNet classes' if vocabulary == 'imagenet' else 'WordNet nouns'} to {args.image}:")
                for wnid, words, score in search.table.nearest_words(vector, k=args.k, vocabulary=vocabulary):
                    print(f"  {score:.3f}  {wnid}  {words}")
            hits = search.images_for_vector(vector, k=args.k)
            print(f"nearest images to {args.image}:")
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    for hit in hits:
        print(f"  {hit.score:.3f}  {hit.wnid}  {search.table.names.get(hit.wnid, '?'):<20}  {hit.path}")
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    from imagesmith.server import api_url, is_healthy, start_server, stop_server

    if args.action == "start":
        url, started = start_server(port=args.port)
        print(f"prefect server {'started' if started else 'already running'}: UI {url.removesuffix('/api')}")
    elif args.action == "stop":
        print("stopped" if stop_server() else "no server started by imagesmith is recorded")
    else:
        url = api_url(port=args.port)
        print(f"{url}: {'healthy' if is_healthy(url) else 'not answering'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from imagesmith.server import start_server

    url, started = start_server(port=args.port)
    print(f"prefect server {'started' if started else 'already running'} at {url}")
    # in the environment, not only in this process's settings: shard tasks run in child processes
    # that must report to the same server (otherwise each starts a server-less one of its own)
    os.environ["PREFECT_API_URL"] = url
    outputs = _run_pipeline(args)
    _print_outputs(outputs)
    print(f"\nPrefect UI: {url.removesuffix('/api')}  (flow runs, task runs, logs and artifacts)")
    print("stop the server with: make stop-server")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagesmith", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="report the imaging backend, versions, tiers and Prefect API")
    p.add_argument("--json", action="store_true", help="also print the imaging record as JSON")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("sample", help="build the bundled sample dataset (real photos, ImageNet layout)")
    p.add_argument("--out", help="folder to write (default: a stage directory on the bulk tier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=10)
    p.set_defaults(func=_cmd_sample)

    for name, func, text in (
        ("run", _cmd_run, "run the pipeline flow (against PREFECT_API_URL, or ephemeral when unset)"),
        ("demo", _cmd_demo, "start a local Prefect server if none runs, then run the pipeline on the sample"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--source", help="ImageNet-layout folder (train/<wnid>/*.JPEG); default: the bundled sample")
        p.add_argument("--seed", type=int, default=0, help="shuffle seed")
        p.add_argument("--refresh", action="store_true",
                       help="rerun cached tasks; a stage whose directory still has its manifest is not "
                            "recomputed (delete that directory to force it)")
        p.add_argument("--size", type=int, default=224, help="square side of the HDF5 image stores")
        p.add_argument("--dask-address", help="run resize shards on this Dask scheduler (tcp://host:8786)")
        p.add_argument("--crappifier", default="jpeg_text" if name == "demo" else None,
                       choices=["jpeg_text", "downscale", "grayscale", "noise", "cutout"],
                       help="add the aligned low-quality store (stage 4) made by this crappifier"
                            + (" (default: jpeg_text, the lesson's)" if name == "demo" else ""))
        p.add_argument("--word-vectors", help="GoogleNews-vectors-negative300.bin or a fastText .bin/.vec "
                                              "(default: the bundled GloVe 6B 50-d)")
        if name == "demo":
            p.add_argument("--port", type=int, default=4200)
        p.set_defaults(func=func)

    p = sub.add_parser("words", help="nearest ImageNet classes or WordNet nouns to a text, by word vectors")
    p.add_argument("text")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--vocabulary", choices=["imagenet", "wordnet"], default="imagenet")
    p.add_argument("--table", help="an embeddings stage directory (default: the newest on the fast tier)")
    p.set_defaults(func=_cmd_words)

    p = sub.add_parser("evaluate-superres", help="PSNR/SSIM of a trained generator vs bicubic on a crappified store")
    p.add_argument("model", help="model.pt written by super-resolution training (or its folder)")
    p.add_argument("store", help="a crappified store, e.g. data/fast/crappify/<key>/val.h5")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.set_defaults(func=_cmd_evaluate_superres)

    p = sub.add_parser("enhance", help="upscale/restore any image with a trained generator (tiled)")
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--tile", type=int, default=256, help="tile side in input pixels (bounds memory)")
    p.set_defaults(func=_cmd_enhance)

    p = sub.add_parser("devise", help="train DeViSE (images -> word vectors) and build its search index")
    p.add_argument("--source", help="ImageNet-layout folder (default: the bundled sample)")
    p.add_argument("--size", type=int, default=224, help="square side of the image store")
    p.add_argument("--backbone", default="resnet50", help="torchvision CNN, e.g. resnet18, resnet50, convnext_tiny")
    p.add_argument("--no-pretrained", action="store_true", help="train the backbone from scratch (no local weights)")
    p.add_argument("--epochs", type=int, default=10, help="head epochs (1cycle) on precomputed features")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--finetune-epochs", type=int, default=0, help="then fine-tune body + head end to end")
    p.add_argument("--zero-shot", nargs="+", metavar="WNID",
                   help="classes held out of training (default: the classes outside ImageNet-1k)")
    p.add_argument("--word-vectors", help="GoogleNews-vectors-negative300.bin or fastText (default: bundled GloVe)")
    p.add_argument("--ann-above", type=int, default=100_000, help="use an HNSW index above this many images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refresh", action="store_true", help="rerun cached tasks")
    p.set_defaults(func=_cmd_devise)

    p = sub.add_parser("search", help="DeViSE search: text -> images, or image -> words and images")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help='words to find images of, e.g. "jumbo jet"')
    what.add_argument("--image", help="an image file to name and find similar images to")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--index", help="a devise-index stage directory (default: the newest on the fast tier)")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("server", help="manage the local Prefect server (127.0.0.1, PREFECT_HOME=.prefect)")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=4200)
    p.set_defaults(func=_cmd_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
