"""Super-resolution: the pipeline to crappified pairs (one per size) -> train, evaluate, export."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from prefect import flow
from pydantic import Field

from flows.naming import run_name
from flows.pipeline import Crappifier, Gpus, ImageSide, Seed, detach, pipeline
from flows.summary import publish_summary
from storage.stage import open_stage
from storage.tiers import Tiers
from tasks.runs import begin_flow_run
from tasks.stages import stage
from training.superres import SuperResStage, superres_plan


@flow(name="imagesmith-superres",
      flow_run_name=run_name("superres-{data}-{arch}-{loss}-{low_size}to{high_size}px-seed{seed}"))
def superres(
    source: str | None = None,
    arch: Literal["unet", "johnson"] = "unet",
    loss: Literal["feature", "pixel"] = "feature",
    high_size: ImageSide = 128,
    low_size: Annotated[int, Field(ge=8, le=1024)] = 32,
    progressive_from: ImageSide | None = None,
    crappifier: Crappifier = "jpeg_text",
    epochs: Annotated[int, Field(ge=2, le=100_000)] = 10,
    lr: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 1e-3,
    batch_size: Annotated[int, Field(ge=1)] = 8,
    small_batch_size: Annotated[int, Field(ge=1)] | None = None,
    pretrained: bool = True,
    seed: Seed = 0,
    gpus: Gpus = 1,
    refresh: bool = False,
    wait: bool = True,
) -> dict[str, object]:
    """Train a generator from ``crappifier`` at ``low_size`` back to ``high_size`` originals and
    evaluate it against bicubic on held-out images.

    With ``progressive_from`` (e.g. 64 for 128, as lesson 7 does 128 then 256), it trains first on
    ``progressive_from``-pixel targets (inputs scaled alike, ``small_batch_size``, default 2x
    ``batch_size``) and then at ``high_size``: at each size a 1cycle of ``epochs`` with the
    encoder frozen, then one with it unfrozen at discriminative rates. Without it, the same two
    steps at ``high_size`` alone. ``gpus`` > 1 trains on that many processes (DDP, one per GPU; gloo processes on a CPU
    machine): the batch size is per process; the learning rate stays as given (adaptive optimizers; models/distributed.py).
    """
    begin_flow_run()
    since = time.time()
    sizes, config = superres_plan(arch=arch, loss=loss, high_size=high_size, low_size=low_size,
                                  progressive_from=progressive_from, epochs=epochs, lr=lr, batch_size=batch_size,
                                  small_batch_size=small_batch_size, pretrained=pretrained, seed=seed)
    crappified = [detach(pipeline(source=source, seed=seed, size=high, crappifier=crappifier, crappify_size=low,
                                  words=False, refresh=refresh, wait=wait)) for high, low in sizes]
    model_dir = stage(SuperResStage(pairs=tuple(c["crappify"] for c in crappified), config=config, gpus=gpus),
                      Tiers.from_env(), refresh=refresh, wait=wait)
    outputs = {**crappified[-1], "superres": model_dir}
    publish_summary("superres", outputs, since)
    return {**outputs, "metrics": open_stage(model_dir).manifest()["evaluation"]}
