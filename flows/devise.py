"""DeViSE: pipeline (resize + word table) -> features -> head (+ softmax baseline) -> [fine-tune] -> search index."""

from __future__ import annotations

from prefect import flow

from flows.pipeline import pipeline
from storage.tiers import Tiers
from storage.vector_index import DEFAULT_ANN_ABOVE
from tasks.logs import route_stage_logs
from tasks.stages import stage
from training.devise.features import FeaturesConfig, FeaturesStage
from training.devise.finetune import FinetuneConfig, FinetuneStage
from training.devise.head import DeviseStage, HeadConfig
from training.devise.search import IndexStage


@flow(name="imagesmith-devise")
def devise(
    source: str | None = None,
    size: int = 224,
    backbone: str = "resnet50",
    pretrained: bool = True,
    flips: bool = True,
    epochs: int = 10,
    lr: float = 1e-2,
    batch_size: int = 256,
    hidden: int = 1024,
    dropout: float = 0.5,
    zero_shot: list[str] | None = None,
    finetune_epochs: int = 0,
    finetune_lr: float = 1e-4,
    finetune_batch_size: int = 64,
    word_vectors: str | None = None,
    ann_above: int = DEFAULT_ANN_ABOVE,
    seed: int = 0,
    refresh: bool = False,
) -> dict[str, object]:
    """Train DeViSE on ``source`` (default: the bundled sample) and index every image for search.

    The head trains on the frozen ``backbone``'s pooled features (``flips``: mirrored copies too);
    ``finetune_epochs`` > 0 then trains body and head end to end. ``zero_shot``: wnids held out of
    training for zero-shot evaluation (default: the classes outside ImageNet-1k). Word vectors
    come from ``word_vectors`` (Google News / fastText file) or the bundled GloVe 50-d.
    """
    route_stage_logs()
    tiers = Tiers.from_env()
    head = HeadConfig(epochs=epochs, lr=lr, batch_size=batch_size, hidden=hidden, dropout=dropout,
                      zero_shot=tuple(zero_shot) if zero_shot is not None else None, seed=seed)  # validates first
    stages = pipeline(source=source, seed=seed, size=size, words=True, word_vectors=word_vectors, refresh=refresh)
    features = stage(FeaturesStage(resize=stages["resize"], config=FeaturesConfig(
        backbone=backbone, pretrained=pretrained, flips=flips, seed=seed)), tiers, refresh=refresh)
    model_dir = stage(DeviseStage(features=features, words=stages["words"], config=head), tiers, refresh=refresh)
    outputs = {**stages, "devise-features": features, "devise": model_dir}
    if finetune_epochs:
        model_dir = stage(FinetuneStage(devise=model_dir, config=FinetuneConfig(
            epochs=finetune_epochs, lr=finetune_lr, batch_size=finetune_batch_size, seed=seed)), tiers,
            refresh=refresh)
        outputs["devise-finetune"] = model_dir
    outputs["devise-index"] = stage(IndexStage(model=model_dir, ann_above=ann_above), tiers, refresh=refresh)
    return outputs
