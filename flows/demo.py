"""The demo: every model family, small, on the bundled sample, in one flow run.

pipeline (224 px store + word table) -> DeViSE head (+ ConSE) and a two-epoch fine-tune -> search
index; super-resolution (U-Net, feature loss, 32 -> 64 px) -> the GAN chain on that generator
(generated store, critic, GAN phase); a WGAN at 64 px; fast style transfer at 128 px. Each family
is a subflow: one that fails does not hide the others, and the run ends Failed naming it. The run
publishes a summary artifact (stage, state, time, key figure), built or cached.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from prefect import flow

from flows.devise import devise
from flows.gan import gan, wgan
from flows.naming import run_name
from flows.pipeline import Seed, detach, pipeline
from flows.style import style
from flows.summary import publish_rows, stage_row
from flows.superres import superres
from storage.tiers import Tiers
from tasks.runs import begin_flow_run

log = logging.getLogger(__name__)

# Sized to finish in about 10 minutes on 2 CPU cores from a fresh clone (docs/BENCHMARKS.md, "demo"):
# a smaller cut of the bundled sample (the same 15 classes), then every family on it
SAMPLE = {"sample_train_per_class": 20, "sample_val_per_class": 4, "size": 224}
DEMO = {
    "devise": {"epochs": 20, "batch_size": 64, "finetune_epochs": 2, "finetune_batch_size": 32},
    "superres": {"arch": "unet", "loss": "feature", "high_size": 64, "low_size": 32, "epochs": 2, "batch_size": 16},
    "gan": {"high_size": 64, "low_size": 32, "critic_epochs": 4, "gan_epochs": 2, "batch_size": 16},
    "wgan": {"size": 64, "epochs": 10, "batch_size": 32, "critic_warmup": 5},
    "style": {"size": 128, "epochs": 1, "batch_size": 4},
}
# smoke=True: every stage of every family on 32 px images in a minute or two (the tests, a quick
# check of an install); the numbers it prints mean nothing
SMOKE_SAMPLE = {"sample_train_per_class": 4, "sample_val_per_class": 1, "size": 32}
SMOKE = {
    "devise": {"size": 32, "epochs": 2, "batch_size": 8, "hidden": 32, "finetune_epochs": 2, "finetune_batch_size": 8},
    "superres": {"arch": "unet", "loss": "pixel", "high_size": 32, "low_size": 16, "epochs": 2, "batch_size": 8},
    "gan": {"high_size": 32, "low_size": 16, "critic_epochs": 1, "critic_nf": 8, "gan_epochs": 1, "batch_size": 8},
    "wgan": {"size": 32, "epochs": 1, "batch_size": 8, "nf": 8, "critic_warmup": 2},
    "style": {"size": 32, "epochs": 1, "batch_size": 4},
}
# the directories each family's flow returns that are its own stages (the pipeline's are listed once)
FAMILY_STAGES = {
    "pipeline": ["dataset", "listing", "resize", "words"],
    "devise": ["devise-features", "devise", "devise-finetune", "devise-index"],
    "superres": ["crappify", "superres"],
    "gan": ["generated", "critic", "gan"],
    "wgan": ["wgan"],
    "style": ["style"],
}


def clear_scratch_tiers(tiers: Tiers) -> None:
    """Empty both tiers, which must lie under a folder named ``scratch`` (nothing else is ever cleared)."""
    for root in (tiers.fast, tiers.bulk):
        if "scratch" not in root.parts:
            raise ValueError(f"scratch=True deletes the tiers, and {root} is not under a folder named 'scratch'; "
                             "set IMAGESMITH_FAST_DIR and IMAGESMITH_BULK_DIR to e.g. data/scratch/fast and "
                             "data/scratch/bulk (the demo-nightly deployment does)")
    for root in (tiers.fast, tiers.bulk):
        if root.exists():
            log.info("demo: clearing the scratch tier %s", root)
            shutil.rmtree(root)


def summary_rows(results: dict[str, Any], since: float) -> list[dict[str, Any]]:
    """One row per stage of every family (a failed family: one row with its error)."""
    rows = []
    for family, names in FAMILY_STAGES.items():
        outputs = results.get(family)
        if isinstance(outputs, BaseException):
            rows.append({"family": family, "stage": "-", "state": "FAILED", "seconds": None,
                         "figure": f"{type(outputs).__name__}: {outputs}"[:300], "key": ""})
            continue
        for name in names:
            path = (outputs or {}).get(name)
            row = stage_row(family, name, path, since) if path else None
            if row:
                rows.append(row)
    return rows


@flow(name="imagesmith-demo", flow_run_name=run_name("demo-seed{seed}" + "{smoke_tag}"), timeout_seconds=3600)
def demo(seed: Seed = 0, refresh: bool = False, wait: bool = True, scratch: bool = False,
         smoke: bool = False) -> dict[str, Any]:
    """Every model family on the bundled sample (module docstring). Returns ``{family: {stage: dir}}``
    plus ``summary`` (the rows of the table the CLI prints and the run publishes). ``scratch``: start
    from empty tiers (the nightly deployment: it then really rebuilds everything); allowed only when
    both tiers lie under a folder named ``scratch``, since it deletes them. ``smoke``: every stage on
    32 px images with a few images and epochs (a check that everything runs, in a minute or two)."""
    begin_flow_run()
    since = time.time()
    if scratch:
        clear_scratch_tiers(Tiers.from_env())
    run = {"seed": seed, "refresh": refresh, "wait": wait}
    plan = SMOKE if smoke else DEMO
    results: dict[str, Any] = {"pipeline": detach(pipeline(**(SMOKE_SAMPLE if smoke else SAMPLE), **run))}
    source = results["pipeline"]["dataset"]  # the sample's folder: every family lists it as a dataset

    def family(name: str, fn, **params: Any) -> dict[str, Any] | BaseException:
        state = fn(source=source, **params, **run, return_state=True)
        results[name] = detach(state.result(raise_on_failure=False))
        return results[name]

    family("devise", devise, **plan["devise"])
    sr = family("superres", superres, **plan["superres"])
    if isinstance(sr, BaseException):
        results["gan"] = RuntimeError("skipped: its generator is the super-res stage, which failed")
    else:
        family("gan", gan, generator=sr["superres"], **plan["gan"])
    family("wgan", wgan, **plan["wgan"])
    family("style", style, **plan["style"])
    rows = summary_rows(results, since)
    publish_rows("demo", rows, "imagesmith demo")
    failed = [f for f, r in results.items() if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"demo: {', '.join(failed)} failed: "
                           + "; ".join(f"{f}: {results[f]}" for f in failed))
    return {**results, "summary": rows}
