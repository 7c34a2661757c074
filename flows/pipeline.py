"""The data pipeline flow: the stages that exist, chained by paths (never arrays)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from prefect import flow
from pydantic import Field

from flows.naming import run_name
from flows.shards import run_sharded
from flows.summary import publish_summary
from prep.crappify import CrappifyConfig, CrappifyStage
from prep.listing import ListingStage, check_source
from prep.resize import DEFAULT_SIZE, ResizeConfig, ResizeStage
from prep.sample import SampleStage
from prep.shards import DEFAULT_SHARD_IMAGES
from prep.wordnet import WordnetStage, wordnet_source
from prep.words import DEFAULT_MAX_WORDS, EmbeddingStage, GloveStage
from storage.tiers import Tiers
from storage.wordvec import check_vector_path
from tasks.runs import begin_flow_run
from tasks.stages import fingerprint_task, stage

# parameter bounds the flow checks before it runs (the Prefect UI shows them on its run form)
Seed = Annotated[int, Field(ge=0)]
Gpus = Annotated[int, Field(ge=1, le=64)]  # training processes, one per GPU (DDP); on a CPU machine, gloo processes
ImageSide = Annotated[int, Field(ge=8, le=4096)]
Crappifier = Literal["jpeg_text", "downscale", "grayscale", "noise", "cutout"]


def detach(value: Any) -> Any:
    """A subflow's result as fresh objects, to hand to tasks (and other subflows) of the caller.

    Prefect links the objects a subflow returns to its flow run, and a task given one records a
    flow-run input, which Prefect's default UI cannot draw: the task run's page is blank ("Invalid
    TaskInputResponse"). Equal copies are plain parameters; the lineage shows as the subflow run.
    """
    if isinstance(value, str):
        return value.encode().decode()  # equal, but a new object (an ASCII decode always allocates)
    if isinstance(value, dict):
        return {k: detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detach(v) for v in value)
    return value


@flow(name="imagesmith-pipeline", flow_run_name=run_name("pipeline-{data}-{size}px-seed{seed}"))
def pipeline(
    source: str | None = None,
    seed: Seed = 0,
    size: ImageSide = DEFAULT_SIZE,
    shard_images: Annotated[int, Field(ge=1)] = DEFAULT_SHARD_IMAGES,
    dask_address: str | None = None,
    crappifier: Crappifier | None = None,
    crappify_size: Annotated[int, Field(ge=8, le=1024)] = 96,
    words: bool = True,
    word_vectors: str | None = None,
    max_words: Annotated[int, Field(ge=1)] = DEFAULT_MAX_WORDS,
    sample_seed: Seed = 0,
    sample_train_per_class: Annotated[int, Field(ge=1)] = 40,
    sample_val_per_class: Annotated[int, Field(ge=0)] = 10,
    refresh: bool = False,
    wait: bool = True,
) -> dict[str, str]:
    """Run every stage on ``source`` (an ImageNet-layout folder) or, when None, on the bundled sample.

    Returns ``{stage: directory}``. ``seed`` drives the shuffle, ``size`` the square side of the
    HDF5 stores; ``dask_address`` sends the shard tasks to a Dask cluster. ``crappifier`` (e.g.
    ``jpeg_text``, the lesson's) adds the aligned low-quality store at ``crappify_size``. ``words`` builds the
    word-vector table for WordNet nouns and ImageNet classes from ``word_vectors`` (a Google News
    word2vec or fastText file) or, when None, the bundled GloVe 6B 50-d. ``refresh`` reruns cached
    tasks (stages whose manifest still exists are not recomputed). ``wait``: wait for another run
    building a stage this one needs (else fail at once with StageBusy).
    """
    begin_flow_run()
    since = time.time()
    tiers = Tiers.from_env()
    # every parameter is checked before any work
    resize = ResizeConfig(size=size, shard_images=shard_images)
    crappify = CrappifyConfig(crappifier=crappifier, size=crappify_size, seed=seed) if crappifier else None
    vectors = str(check_vector_path(word_vectors)) if words and word_vectors else None
    source = str(check_source(source)) if source is not None else None
    run = {"refresh": refresh, "wait": wait}
    if source is None:
        source = stage(SampleStage(seed=sample_seed, train_per_class=sample_train_per_class,
                                   val_per_class=sample_val_per_class), tiers, **run)
    listing = stage(ListingStage(root=source, fingerprint=fingerprint_task(source), seed=seed), tiers, **run)
    resized = run_sharded(ResizeStage(listing=listing, config=resize), tiers, dask_address=dask_address, **run)
    outputs = {"dataset": source, "listing": listing, "resize": resized}
    if crappify:
        outputs["crappify"] = run_sharded(CrappifyStage(source=resized, config=crappify), tiers,
                                          dask_address=dask_address, **run)
    if words:
        vectors = vectors or stage(GloveStage(), tiers, **run)
        wordnet = stage(WordnetStage(source=str(wordnet_source())), tiers, **run)
        outputs["words"] = stage(EmbeddingStage(vectors=vectors, wordnet=wordnet, max_words=max_words), tiers, **run)
        outputs["wordnet"] = wordnet
    publish_summary("pipeline", outputs, since)
    return outputs
