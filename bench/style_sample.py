"""Style transfer on real pictures, end to end, and the picture in docs/: a fast style network
trained on the bundled sample (the ``style`` stage) and Gatys optimisation, both against Munch's
The Scream, applied to a photo that is not in the sample (scikit-image's astronaut).

For each result: the style loss and the content loss (relative errors, models/style) against the
photo itself as the baseline (style loss of the untouched photo; content 0), and how much of the
photo's layout survives (correlation of edge maps with the photo's; random noise scores ~0).

usage: python bench/style_sample.py [--size 256] [--steps 200] [--train-size 128] [--epochs 2]
                                    [--picture docs/style.png]
Ends with: RESULT style ... lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainbench import device_info, print_results, sample_store  # noqa: E402

from models.style import BlockFeatures, StyleLoss  # noqa: E402
from storage.stage import run_stage  # noqa: E402
from training.style import (  # noqa: E402
    FastStyleConfig,
    FastStyleStage,
    GatysConfig,
    apply_style,
    default_style,
    file_digest,
    fit_style,
    gatys,
    load_rgb,
    load_style_model,
    resize_long_side,
    save_rgb,
)


def edges(image: torch.Tensor) -> np.ndarray:
    g = image.mean(0).numpy()
    return np.hypot(np.diff(g, axis=0)[:, :-1], np.diff(g, axis=1)[:-1, :]).ravel()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="the photo's longer side")
    ap.add_argument("--steps", type=int, default=200, help="Gatys loss evaluations")
    ap.add_argument("--train-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--picture", default="docs/style.png")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device_info(torch.device(device))}")
    import skimage.data

    photo = resize_long_side(torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 255, args.size)
    style_path = default_style()
    style = load_rgb(style_path)
    features = BlockFeatures().to(device)

    t0 = time.perf_counter()
    painted, _ = gatys(photo, style, GatysConfig(size=args.size, steps=args.steps), features=features, device=device)
    gatys_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tiers, resized = sample_store(Path(tmp), args.train_size)
        t0 = time.perf_counter()
        done = run_stage(tiers, FastStyleStage(images=str(resized.path), style_digest=file_digest(style_path),
                                               config=FastStyleConfig(epochs=args.epochs), style=str(style_path)))
        train_s = time.perf_counter() - t0
        model, _ = load_style_model(done.path)
    t0 = time.perf_counter()
    fast = apply_style(model, photo, device=device)
    apply_s = time.perf_counter() - t0

    h, w = photo.shape[1:]
    fitted = fit_style(style, h, w)
    # the measure: Gatys' own loss (content block 4, all five style blocks), one scale for both
    judge = StyleLoss(features, fitted.to(device), content_block=3).to(device)
    results = []
    for name, image in (("photo", photo), ("gatys", painted), ("fast", fast)):
        with torch.no_grad():
            terms = judge(image[None].to(device), photo[None].to(device))
        style_loss = float(sum(v for k, v in terms.items() if k.startswith("style_")))
        results.append({"bench": "style", "image": name, "style_loss": style_loss, "content_loss": float(terms["content"]),
                        "edge_corr": float(np.corrcoef(edges(image), edges(photo))[0, 1])})
    base = results[0]["style_loss"]
    for r in results:
        r["style_vs_photo"] = r["style_loss"] / base
    results[1]["seconds"], results[2]["seconds"], results[2]["train_s"] = gatys_s, apply_s, train_s
    picture = torch.cat([photo, fitted, painted, fast], dim=2)
    save_rgb(picture, args.picture)
    print(f"photo | style | Gatys ({args.steps} steps, {gatys_s:.0f} s) | fast ({args.epochs} epochs on the sample "
          f"at {args.train_size} px, {train_s:.0f} s; applied in {apply_s:.2f} s) -> {args.picture}")
    print_results(results)
    return results


if __name__ == "__main__":
    main()
