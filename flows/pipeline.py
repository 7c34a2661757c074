"""The full pipeline flow: the stages that exist, chained by paths (never arrays)."""

from __future__ import annotations

from prefect import flow

from flows.logs import route_stage_logs
from storage.tiers import Tiers
from tasks.caching import stage_task_options
from tasks.listing import LISTING_VERSION, fingerprint_dataset_task, list_and_shuffle
from tasks.sample import SAMPLE_VERSION, build_sample_dataset


@flow(name="imagesmith-pipeline")
def pipeline(
    source: str | None = None,
    seed: int = 0,
    sample_seed: int = 0,
    sample_train_per_class: int = 40,
    sample_val_per_class: int = 10,
    refresh: bool = False,
) -> dict[str, str]:
    """Run every stage on ``source`` (an ImageNet-layout folder) or, when None, on the bundled sample.

    Returns ``{stage: directory}``. ``seed`` drives the shuffle; ``refresh`` recomputes cached stages.
    """
    route_stage_logs()
    tiers = Tiers.from_env()
    if source is None:
        sample = build_sample_dataset.with_options(
            **stage_task_options(tiers, code_version=SAMPLE_VERSION, refresh=refresh)
        )
        source = sample(tiers, sample_seed, sample_train_per_class, sample_val_per_class)
    fingerprint = fingerprint_dataset_task(source)
    listing = list_and_shuffle.with_options(
        **stage_task_options(tiers, code_version=LISTING_VERSION, refresh=refresh)
    )(source, fingerprint, seed, tiers)
    return {"dataset": source, "listing": listing}
