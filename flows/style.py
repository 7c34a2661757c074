"""Fast style transfer (lesson 9; Johnson et al. 2016): pipeline -> the style network trained on
the resized images against one style image. Cached by the style image's bytes, not its path."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from prefect import flow
from pydantic import Field

from flows.naming import run_name
from flows.pipeline import Gpus, ImageSide, Seed, detach, pipeline
from flows.summary import publish_summary
from storage.tiers import Tiers
from tasks.runs import begin_flow_run
from tasks.stages import stage
from training.style import FastStyleConfig, FastStyleStage, default_style, file_digest, load_rgb

PositiveFloat = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]
Weight = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]


def check_style_image(path: str | Path) -> Path:
    """``path`` if it is a readable image, else a ValueError naming it and why."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"style image {str(path)!r} does not exist (or is not a file)")
    try:
        load_rgb(path)
    except Exception as e:  # noqa: BLE001  (PIL raises many kinds for a file that is not an image)
        raise ValueError(f"style image {str(path)!r} is not a readable image ({type(e).__name__}: {e})") from None
    return path


@flow(name="imagesmith-style", flow_run_name=run_name("style-{data}-{style}-{size}px-seed{seed}"))
def style(
    source: str | None = None,
    style_image: str | None = None,
    size: ImageSide = 128,
    epochs: Annotated[int, Field(ge=1, le=100_000)] = 2,
    lr: PositiveFloat = 1e-3,
    batch_size: Annotated[int, Field(ge=1)] = 4,
    content_weight: Weight = 1.0,
    style_weights: Annotated[list[Weight], Field(min_length=5, max_length=5)] = [1.0, 1.0, 1.0, 1.0, 0.0],  # noqa: B006
    tv_weight: Weight = 0.0,
    seed: Seed = 0,
    gpus: Gpus = 1,
    refresh: bool = False,
    wait: bool = True,
) -> dict[str, str]:
    """Train a network that paints any photo in the style of ``style_image`` (default: Munch's The
    Scream, shipped by Debian's darknet package) in one forward pass: the images of ``source``
    (default: the bundled sample) resized to ``size``, ``epochs`` of 1cycle at ``lr``; loss =
    ``content_weight`` x content (relu2_2) + style grams per VGG block weighted by ``style_weights``
    (+ ``tv_weight`` x total variation). Returns ``{stage: directory}``; apply the result with
    ``imagesmith stylize --model <style dir> IN OUT``. ``gpus`` > 1 trains on that many processes (DDP, one per GPU; gloo processes on a CPU
    machine): the batch size is per process; the learning rate stays as given (adaptive optimizers; models/distributed.py)."""
    begin_flow_run()
    since = time.time()
    tiers = Tiers.from_env()
    # every parameter is checked before any work
    path = check_style_image(style_image) if style_image else default_style()
    config = FastStyleConfig(epochs=epochs, lr=lr, batch_size=batch_size, content_weight=content_weight,
                             style_weights=tuple(style_weights), tv_weight=tv_weight, seed=seed)
    stages = detach(pipeline(source=source, seed=seed, size=size, words=False, refresh=refresh, wait=wait))
    spec = FastStyleStage(images=stages["resize"], style_digest=file_digest(path), config=config,
                          style=str(path.resolve()), gpus=gpus)
    outputs = {**stages, "style": stage(spec, tiers, refresh=refresh, wait=wait)}
    publish_summary("style", outputs, since)
    return outputs
