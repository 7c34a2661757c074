"""Stage set-ups several test modules share."""

from pathlib import Path

from prep.listing import ListingStage, fingerprint_dataset
from prep.resize import ResizeConfig, ResizeStage
from storage.stage import StageDir, run_stage
from storage.tiers import Tiers


def run_listing(tiers: Tiers, root: Path, seed: int = 0) -> StageDir:
    """The listing stage of ``root`` in ``tiers``."""
    return run_stage(tiers, ListingStage(root=str(root), fingerprint=fingerprint_dataset(root), seed=seed))


def run_resize(tiers: Tiers, listing: StageDir | Path, **config) -> StageDir:
    """The resize stage of a listing in ``tiers`` (``config``: ResizeConfig fields; ``cores`` too)."""
    cores = config.pop("cores", None)
    return run_stage(tiers, ResizeStage(listing=str(getattr(listing, "path", listing)), config=ResizeConfig(**config),
                                        cores=cores))


def prepared(spec, tiers: Tiers) -> Path:
    """The stage directory of ``spec``, created (and cleaned of temporaries) as a run would, under its lock."""
    stage = spec.stage_dir(tiers)
    with stage.lock():
        return stage.prepare()
