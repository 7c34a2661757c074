"""The data pipeline flow: the stages that exist, chained by paths (never arrays)."""

from __future__ import annotations

from prefect import flow

from flows.shards import run_sharded
from prep.crappify import CrappifyConfig, CrappifyStage
from prep.listing import ListingStage
from prep.resize import DEFAULT_SIZE, ResizeConfig, ResizeStage
from prep.sample import SampleStage
from prep.shards import DEFAULT_SHARD_IMAGES
from prep.wordnet import WordnetStage, wordnet_source
from prep.words import DEFAULT_MAX_WORDS, EmbeddingStage, GloveStage
from storage.tiers import Tiers
from storage.wordvec import check_vector_path
from tasks.logs import route_stage_logs
from tasks.stages import fingerprint_task, stage


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
    # every parameter is checked before any work
    resize = ResizeConfig(size=size, shard_images=shard_images)
    crappify = CrappifyConfig(crappifier=crappifier, size=crappify_size, seed=seed) if crappifier else None
    vectors = str(check_vector_path(word_vectors)) if words and word_vectors else None
    if source is None:
        source = stage(SampleStage(seed=sample_seed, train_per_class=sample_train_per_class,
                                   val_per_class=sample_val_per_class), tiers, refresh=refresh)
    listing = stage(ListingStage(root=source, fingerprint=fingerprint_task(source), seed=seed), tiers, refresh=refresh)
    resized = run_sharded(ResizeStage(listing=listing, config=resize), tiers, dask_address=dask_address,
                          refresh=refresh)
    outputs = {"dataset": source, "listing": listing, "resize": resized}
    if crappify:
        outputs["crappify"] = run_sharded(CrappifyStage(source=resized, config=crappify), tiers,
                                          dask_address=dask_address, refresh=refresh)
    if words:
        vectors = vectors or stage(GloveStage(), tiers, refresh=refresh)
        wordnet = stage(WordnetStage(source=str(wordnet_source())), tiers, refresh=refresh)
        outputs["words"] = stage(EmbeddingStage(vectors=vectors, wordnet=wordnet, max_words=max_words), tiers,
                                 refresh=refresh)
    return outputs
