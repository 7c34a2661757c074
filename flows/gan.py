"""GAN restoration (lesson 7): pipeline -> pretrained generator -> generated store -> pretrained
critic -> GAN phase; and the WGAN on a store of images. Each step is a stage: cached, rerunnable."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from prefect import flow
from pydantic import Field

from flows.naming import run_name
from flows.pipeline import Crappifier, Gpus, ImageSide, Seed, detach, pipeline
from flows.summary import publish_summary
from storage.tiers import Tiers
from tasks.runs import begin_flow_run
from tasks.stages import stage
from training.gan import CriticConfig, CriticStage, GanConfig, GanStage, GeneratedStage, WganConfig, WganStage
from training.superres import SuperResStage, superres_plan

Epochs = Annotated[int, Field(ge=1, le=100_000)]
PositiveFloat = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]


@flow(name="imagesmith-gan", flow_run_name=run_name("gan-{data}-{low_size}to{high_size}px-seed{seed}"))
def gan(
    source: str | None = None,
    high_size: ImageSide = 64,
    low_size: Annotated[int, Field(ge=8, le=1024)] = 32,
    crappifier: Crappifier = "jpeg_text",
    generator: str | None = None,
    generator_epochs: Epochs = 2,
    generator_lr: PositiveFloat = 1e-3,
    critic_epochs: Epochs = 2,
    critic_nf: Annotated[int, Field(ge=4)] = 64,
    gan_epochs: Epochs = 3,
    gan_lr: PositiveFloat = 1e-4,
    pixel_weight: Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)] = 50.0,
    critic_thresh: PositiveFloat = 0.65,
    batch_size: Annotated[int, Field(ge=2)] = 8,
    pretrained: bool = True,
    seed: Seed = 0,
    gpus: Gpus = 1,
    refresh: bool = False,
    wait: bool = True,
) -> dict[str, object]:
    """Restore ``crappifier``-damaged ``low_size`` images to ``high_size`` with a GAN, lesson 7's way.

    The generator (a U-Net on the pretrained encoder) is pretrained with pixel MSE for
    ``generator_epochs`` per step (frozen, then unfrozen), unless ``generator`` names a finished
    super-resolution stage directory to start from; the critic is pretrained on its outputs vs the
    originals; then the GAN phase runs ``gan_epochs`` at a constant ``gan_lr`` (critic at 5x),
    switching adaptively at ``critic_thresh``, generator loss = adversarial + ``pixel_weight`` x MSE.
    ``gpus`` > 1 trains on that many processes (DDP, one per GPU; gloo processes on a CPU
    machine): the batch size is per process; the learning rate stays as given (adaptive optimizers; models/distributed.py).
    """
    begin_flow_run()
    since = time.time()
    tiers = Tiers.from_env()
    run = {"refresh": refresh, "wait": wait}
    critic_config = CriticConfig(epochs=critic_epochs, nf=critic_nf, batch_size=batch_size, seed=seed)
    gan_config = GanConfig(epochs=gan_epochs, lr=gan_lr, batch_size=batch_size, pixel_weight=pixel_weight,
                           critic_thresh=critic_thresh, seed=seed)
    _, gen_config = superres_plan(arch="unet", loss="pixel", high_size=high_size, low_size=low_size,
                                  epochs=generator_epochs, lr=generator_lr, batch_size=batch_size,
                                  pretrained=pretrained, seed=seed)
    stages = detach(pipeline(source=source, seed=seed, size=high_size, crappifier=crappifier, crappify_size=low_size,
                             words=False, **run))
    pairs = stages["crappify"]
    if generator is None:
        generator = stage(SuperResStage(pairs=(pairs,), config=gen_config, gpus=gpus), tiers, **run)
    generated = stage(GeneratedStage(generator=generator, source=pairs), tiers, **run)
    critic = stage(CriticStage(generated=generated, config=critic_config, gpus=gpus), tiers, **run)
    gan_dir = stage(GanStage(generator=generator, critic=critic, pairs=pairs, config=gan_config, gpus=gpus), tiers,
                    **run)
    outputs = {**stages, "generator": generator, "generated": generated, "critic": critic, "gan": gan_dir}
    publish_summary("gan", outputs, since)
    return outputs


@flow(name="imagesmith-wgan", flow_run_name=run_name("wgan-{data}-{size}px-seed{seed}"))
def wgan(
    source: str | None = None,
    size: Literal[32, 64, 128] = 64,
    epochs: Epochs = 5,
    lr: PositiveFloat = 1e-4,
    batch_size: Annotated[int, Field(ge=2)] = 64,
    nf: Annotated[int, Field(ge=4)] = 64,
    clip: PositiveFloat = 0.01,
    n_critic: Annotated[int, Field(ge=1)] = 5,
    critic_warmup: Annotated[int, Field(ge=1)] = 100,
    seed: Seed = 0,
    gpus: Gpus = 1,
    refresh: bool = False,
    wait: bool = True,
) -> dict[str, object]:
    """A WGAN (noise -> ``size`` px images) trained on ``source`` (default: the bundled sample)
    resized to ``size``: DCGAN networks, weight clipping, ``n_critic`` critic steps a generator step
    (``critic_warmup`` for the first 25 and every 500th), RMSprop at ``lr``. ``gpus`` > 1 trains on that many processes (DDP, one per GPU; gloo processes on a CPU
    machine): the batch size is per process; the learning rate stays as given (adaptive optimizers; models/distributed.py)."""
    begin_flow_run()
    since = time.time()
    tiers = Tiers.from_env()
    config = WganConfig(epochs=epochs, lr=lr, batch_size=batch_size, nf=nf, clip=clip, n_critic=n_critic,
                        critic_warmup=critic_warmup, seed=seed)
    stages = detach(pipeline(source=source, seed=seed, size=size, words=False, refresh=refresh, wait=wait))
    outputs = {**stages, "wgan": stage(WganStage(images=stages["resize"], config=config, gpus=gpus), tiers,
                                       refresh=refresh, wait=wait)}
    publish_summary("wgan", outputs, since)
    return outputs
