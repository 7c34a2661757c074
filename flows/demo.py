"""The demo: the pipeline on the bundled sample, then DeViSE (and ConSE) on its pretrained backbone."""

from __future__ import annotations

from prefect import flow

from flows.devise import devise
from flows.pipeline import Seed, pipeline
from tasks.logs import route_stage_logs


@flow(name="imagesmith-demo")
def demo(seed: Seed = 0, refresh: bool = False, wait: bool = True) -> dict[str, object]:
    """Every stage on the bundled sample: listing, resize (224 px), crappify (jpeg_text at 96 px),
    the word table, then DeViSE on the bundled EfficientNet-Lite0 (or a local ResNet-50) with ConSE
    beside it, and the search index. Returns ``{stage: directory}``."""
    route_stage_logs()
    run = {"seed": seed, "refresh": refresh, "wait": wait}
    stages = pipeline(crappifier="jpeg_text", crappify_size=96, **run)
    return {**stages, **devise(epochs=20, batch_size=64, **run)}
