"""The full pipeline flow: the stages that exist, chained by paths (never arrays)."""

from __future__ import annotations

from typing import Any

from prefect import Task, flow, unmapped

from flows.logs import route_stage_logs
from flows.runners import shard_runner
from storage.tiers import Tiers
from tasks.caching import stage_task_options
from tasks.crappify import CRAPPIFY_VERSION, CrappifyConfig, crappify_shard_task, join_crappify, plan_crappify_task
from tasks.embeddings import DEFAULT_MAX_WORDS, EMBED_VERSION, build_word_table, prepare_word_vectors, prepare_wordnet
from tasks.listing import LISTING_VERSION, fingerprint_dataset_task, list_and_shuffle
from tasks.resize import (
    DEFAULT_SHARD_IMAGES,
    DEFAULT_SIZE,
    RESIZE_VERSION,
    ResizeConfig,
    ShardSpec,
    join_resize,
    plan_resize,
    resize_shard_task,
)
from tasks.sample import SAMPLE_VERSION, build_sample_dataset


def run_shard_tasks(name: str, shard_task: Task, specs: list, config: Any, *, code_version: int,
                    dask_address: str | None, refresh: bool) -> list[dict[str, Any]]:
    """Every shard task of a stage in a subflow ``name`` on the right runner (processes or Dask)."""
    runner, workers = shard_runner(len(specs), dask_address)

    @flow(name=name, task_runner=runner)
    def shards(specs: list, config: Any, workers: int | None) -> list[dict[str, Any]]:
        route_stage_logs()
        cached = shard_task.with_options(
            **stage_task_options(Tiers.from_env(), code_version=code_version, refresh=refresh))
        return cached.map(specs, unmapped(config), unmapped(workers)).result()

    return shards(specs, config, workers)


def resize_shards(specs: list[ShardSpec], config: ResizeConfig, *, dask_address: str | None = None,
                  refresh: bool = False) -> list[dict[str, Any]]:
    """Every shard of the resize stage, in the ``resize-shards`` subflow."""
    return run_shard_tasks("resize-shards", resize_shard_task, specs, config, code_version=RESIZE_VERSION,
                           dask_address=dask_address, refresh=refresh)


@flow(name="imagesmith-pipeline")
def pipeline(
    source: str | None = None,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    shard_images: int = DEFAULT_SHARD_IMAGES,
    dask_address: str | None = None,
    crappifier: str | None = None,
    crappify_size: int = 96,
    words: bool = True,
    word_vectors: str | None = None,
    max_words: int = DEFAULT_MAX_WORDS,
    sample_seed: int = 0,
    sample_train_per_class: int = 40,
    sample_val_per_class: int = 10,
    refresh: bool = False,
) -> dict[str, str]:
    """Run every stage on ``source`` (an ImageNet-layout folder) or, when None, on the bundled sample.

    Returns ``{stage: directory}``. ``seed`` drives the shuffle, ``size`` the square side of the
    HDF5 stores; ``dask_address`` sends the shard tasks to a Dask cluster. ``crappifier`` (e.g.
    ``jpeg_text``, the lesson's) adds the aligned low-quality store at ``crappify_size``. ``words`` builds the
    word-vector table for WordNet nouns and ImageNet classes from ``word_vectors`` (a Google News
    word2vec or fastText file) or, when None, the bundled GloVe 6B 50-d. ``refresh`` reruns cached
    tasks (stages whose manifest still exists are not recomputed).
    """
    route_stage_logs()
    tiers = Tiers.from_env()
    config = ResizeConfig(size=size, shard_images=shard_images)  # validates before any work
    cached = {"refresh": refresh}
    if source is None:
        sample = build_sample_dataset.with_options(**stage_task_options(tiers, code_version=SAMPLE_VERSION, **cached))
        source = sample(tiers, sample_seed, sample_train_per_class, sample_val_per_class)
    fingerprint = fingerprint_dataset_task(source)
    listing = list_and_shuffle.with_options(
        **stage_task_options(tiers, code_version=LISTING_VERSION, **cached)
    )(source, fingerprint, seed, tiers)

    specs = plan_resize(listing, config, tiers)
    results = resize_shards(specs, config, dask_address=dask_address, refresh=refresh)
    resized = join_resize.with_options(
        **stage_task_options(tiers, code_version=RESIZE_VERSION, **cached)
    )(listing, config, tiers, specs, results)
    outputs = {"dataset": source, "listing": listing, "resize": resized}
    if crappifier:
        crap_config = CrappifyConfig(crappifier=crappifier, size=crappify_size, seed=seed)
        crap_specs = plan_crappify_task(resized, crap_config, tiers)
        crap_results = run_shard_tasks("crappify-shards", crappify_shard_task, crap_specs, crap_config,
                                       code_version=CRAPPIFY_VERSION, dask_address=dask_address, refresh=refresh)
        outputs["crappify"] = join_crappify.with_options(
            **stage_task_options(tiers, code_version=CRAPPIFY_VERSION, **cached)
        )(resized, crap_config, tiers, crap_specs, crap_results)
    if words:
        vectors = prepare_word_vectors(tiers, word_vectors)
        wordnet = prepare_wordnet(tiers)
        outputs["words"] = build_word_table.with_options(
            **stage_task_options(tiers, code_version=EMBED_VERSION, **cached)
        )(tiers, vectors, wordnet, max_words)
    return outputs
