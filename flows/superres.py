"""Super-resolution: crappify -> train (progressive resizing) -> evaluate -> export, on top of the pipeline's stages."""

from __future__ import annotations

from dataclasses import replace

from prefect import flow

from flows.logs import route_stage_logs
from flows.pipeline import pipeline
from models.restore import SuperResConfig, progressive_phases
from models.schedule import one_cycle
from storage.tiers import Tiers
from tasks.superres import evaluate_superres_task, train_superres_task


@flow(name="imagesmith-superres")
def superres(
    source: str | None = None,
    arch: str = "unet",
    loss: str = "feature",
    high_size: int = 128,
    low_size: int = 32,
    progressive_from: int | None = None,
    crappifier: str = "jpeg_text",
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 8,
    small_batch_size: int | None = None,
    pretrained: bool = True,
    seed: int = 0,
    refresh: bool = False,
) -> dict[str, object]:
    """Train a generator from ``crappifier`` at ``low_size`` back to ``high_size`` originals and
    evaluate it against bicubic on held-out images.

    With ``progressive_from`` (e.g. 64 for 128, as lesson 7 does 128 then 256), it trains first on
    ``progressive_from``-pixel targets (inputs scaled alike, ``small_batch_size``, default 2x
    ``batch_size``) and then at ``high_size``: at each size a 1cycle of ``epochs`` with the
    encoder frozen, then one with it unfrozen at discriminative rates. Without it, one 1cycle
    with the U-Net's encoder at 1/10 of the learning rate.
    """
    route_stage_logs()
    if progressive_from is not None and not 0 < progressive_from < high_size:
        raise ValueError(f"progressive_from must be between 0 and high_size {high_size}, got {progressive_from}")
    if high_size % low_size:
        raise ValueError(f"high_size {high_size} must be a multiple of low_size {low_size}")
    sizes = [(high_size, low_size, batch_size)]
    if progressive_from:
        small_low = progressive_from * low_size // high_size
        sizes.insert(0, (progressive_from, small_low, small_batch_size or 2 * batch_size))
    crappified = [pipeline(source=source, seed=seed, size=high, crappifier=crappifier, crappify_size=low,
                           words=False, refresh=refresh) for high, low, _ in sizes]
    if progressive_from:
        phases = progressive_phases([(high, batch) for high, _, batch in sizes], epochs, lr)
    elif arch == "johnson":
        phases = tuple(one_cycle(epochs, lr))
    else:  # the U-Net's [encoder, rest] groups: the pretrained encoder learns at 1/10 of the rate
        phases = tuple(replace(p, group_scales=(0.1, 1.0)) for p in one_cycle(epochs, lr))
    config = SuperResConfig(arch=arch, loss=loss, batch_size=batch_size, phases=phases, pretrained=pretrained,
                            seed=seed)
    model_dir = train_superres_task([c["crappify"] for c in crappified], config, Tiers.from_env())
    metrics = evaluate_superres_task(model_dir, crappified[-1]["crappify"])
    return {**crappified[-1], "superres": model_dir, "metrics": metrics}
