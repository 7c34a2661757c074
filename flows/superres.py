"""Super-resolution: crappify -> train -> evaluate -> export, on top of the pipeline's stages."""

from __future__ import annotations

from dataclasses import replace

from prefect import flow

from flows.logs import route_stage_logs
from flows.pipeline import pipeline
from models.restore import SuperResConfig
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
    crappifier: str = "jpeg_text",
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 8,
    pretrained: bool = True,
    seed: int = 0,
    refresh: bool = False,
) -> dict[str, object]:
    """Train a generator from ``crappifier`` at ``low_size`` back to ``high_size`` originals (1cycle;
    the U-Net's encoder at 1/10 of the learning rate) and evaluate it against bicubic."""
    route_stage_logs()
    stages = pipeline(source=source, seed=seed, size=high_size, crappifier=crappifier, crappify_size=low_size,
                      words=False, refresh=refresh)
    # the U-Net's [encoder, rest] groups: the pretrained encoder learns at 1/10 of the rate
    phases = tuple(one_cycle(epochs, lr)) if arch == "johnson" else tuple(
        replace(p, group_scales=(0.1, 1.0)) for p in one_cycle(epochs, lr))
    config = SuperResConfig(arch=arch, loss=loss, batch_size=batch_size, phases=phases, pretrained=pretrained,
                            seed=seed)
    model_dir = train_superres_task(stages["crappify"], config, Tiers.from_env())
    metrics = evaluate_superres_task(model_dir, stages["crappify"])
    return {**stages, "superres": model_dir, "metrics": metrics}
