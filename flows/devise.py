"""DeViSE: pipeline (resize + word table) -> features -> head (+ softmax baseline) -> [fine-tune] -> search index."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from prefect import flow
from pydantic import AfterValidator, Field

from flows.naming import run_name
from flows.pipeline import Gpus, ImageSide, Seed, detach, pipeline
from flows.summary import publish_summary
from models.devise import classification_backbones
from storage.tiers import Tiers
from storage.vector_index import DEFAULT_ANN_ABOVE
from tasks.runs import begin_flow_run
from tasks.stages import stage
from training.devise.features import FeaturesConfig, FeaturesStage
from training.devise.finetune import FinetuneConfig, FinetuneStage
from training.devise.head import DeviseStage, HeadConfig
from training.devise.search import IndexStage


def _none_or_a_cycle(epochs: int) -> int:
    if epochs == 1:
        raise ValueError("finetune_epochs is 0 (no fine-tuning) or at least 2 (a 1cycle needs 2); got 1")
    return epochs


FinetuneEpochs = Annotated[int, Field(ge=0, le=100_000), AfterValidator(_none_or_a_cycle)]
# the UI's run form offers these; "auto": a local ResNet-50 file, else the bundled EfficientNet-Lite0
Backbone = Literal[tuple(["auto", *classification_backbones()])]  # type: ignore[valid-type]


@flow(name="imagesmith-devise", flow_run_name=run_name("devise-{data}-{backbone}-{size}px-seed{seed}"))
def devise(
    source: str | None = None,
    size: ImageSide = 224,
    backbone: Backbone = "auto",
    pretrained: bool = True,
    flips: bool = True,
    epochs: Annotated[int, Field(ge=2, le=100_000)] = 10,
    lr: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 1e-2,
    batch_size: Annotated[int, Field(ge=2)] = 256,
    hidden: Annotated[int, Field(ge=1)] = 1024,
    dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.5,
    zero_shot: list[str] | None = None,
    zero_shot_source: str | None = None,
    finetune_epochs: FinetuneEpochs = 0,
    finetune_lr: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 1e-4,
    finetune_batch_size: Annotated[int, Field(ge=2)] = 64,
    word_vectors: str | None = None,
    ann_above: Annotated[int, Field(ge=0)] = DEFAULT_ANN_ABOVE,
    seed: Seed = 0,
    gpus: Gpus = 1,
    refresh: bool = False,
    wait: bool = True,
) -> dict[str, object]:
    """Train DeViSE on ``source`` (default: the bundled sample) and index every image for search.

    The head trains on the frozen ``backbone``'s pooled features (``flips``: mirrored copies too;
    ``auto``: a local ResNet-50 file, else the bundled EfficientNet-Lite0);
    ``finetune_epochs`` > 0 then trains body and head end to end. ``zero_shot``: wnids held out of
    training for zero-shot evaluation (default: the classes outside ImageNet-1k; classes inside it are
    refused: the pretrained body knows them). ``zero_shot_source``: a second folder in the same
    layout whose classes (outside ImageNet-1k, e.g. ImageNet-21k-only wnids) are all held out, so a
    1k-only source can be evaluated zero-shot too. Word vectors
    come from ``word_vectors`` (Google News / fastText file) or the bundled GloVe 50-d.
    ``gpus`` > 1 runs the fine-tuning on that many processes (DDP, one per GPU; gloo processes on
    a CPU machine): its batch size is per process and its learning rate stays as given (AdamW). The head
    trains on precomputed features in seconds: one process.
    """
    begin_flow_run()
    since = time.time()
    tiers = Tiers.from_env()
    run = {"refresh": refresh, "wait": wait}
    # every parameter is checked before any work
    head = HeadConfig(epochs=epochs, lr=lr, batch_size=batch_size, hidden=hidden, dropout=dropout,
                      zero_shot=tuple(zero_shot) if zero_shot is not None else None, seed=seed)
    features_config = FeaturesConfig(backbone=backbone, pretrained=pretrained, flips=flips, seed=seed)
    finetune = FinetuneConfig(epochs=finetune_epochs, lr=finetune_lr, batch_size=finetune_batch_size,
                              seed=seed) if finetune_epochs else None
    stages = detach(pipeline(source=source, seed=seed, size=size, words=True, word_vectors=word_vectors, **run))
    features = stage(FeaturesStage(resize=stages["resize"], config=features_config), tiers, **run)
    outputs = {**stages, "devise-features": features}
    zero_shot_features = None
    if zero_shot_source is not None:
        held = detach(pipeline(source=zero_shot_source, seed=seed, size=size, words=False, **run))
        outputs["zero-shot-resize"] = held["resize"]
        zero_shot_features = outputs["zero-shot-features"] = stage(
            FeaturesStage(resize=held["resize"], config=features_config), tiers, **run)
    model_dir = stage(DeviseStage(features=features, words=stages["words"], config=head,
                                  zero_shot_features=zero_shot_features, wordnet=stages["wordnet"]), tiers, **run)
    outputs["devise"] = model_dir
    if finetune:
        model_dir = outputs["devise-finetune"] = stage(FinetuneStage(devise=model_dir, config=finetune, gpus=gpus), tiers,
                                                           **run)
    outputs["devise-index"] = stage(IndexStage(model=model_dir, ann_above=ann_above), tiers, **run)
    publish_summary("devise", outputs, since)
    return outputs
