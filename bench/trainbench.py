"""What the GPU training benchmarks share: synthetic-content HDF5 stores and a timed run of the
shared training loop (models/train.py), end to end from the store and with the data already on
the device (the baseline: the same steps with no loader), in the same process.

Reported: images/s both ways; their ratio, the share of the loader-free speed the loader keeps
(how busy the accelerator stays); the share of wall time spent waiting for the next batch; peak
accelerator memory.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.schedule import Phase, PhaseSchedule
from models.train import TrainConfig, TrainingStep, train
from storage.hdf5 import ShardWriter


def sample_store(tmp: Path, size: int):
    """(tiers, finished resize stage) of the bundled sample (15 classes x 40 train + 10 val) at ``size``."""
    from prep.listing import ListingStage, fingerprint_dataset
    from prep.resize import ResizeConfig, ResizeStage
    from prep.sample import build_sample
    from storage.stage import run_stage
    from storage.tiers import Tiers

    build_sample(tmp / "ds", seed=0, plant_bad_inputs=False)
    tiers = Tiers(fast=tmp / "fast", bulk=tmp / "bulk")
    listing = run_stage(tiers, ListingStage(root=str(tmp / "ds"), fingerprint=fingerprint_dataset(tmp / "ds")))
    return tiers, run_stage(tiers, ResizeStage(listing=str(listing.path), config=ResizeConfig(size=size)))


def synthetic_store(path: Path, n: int, size: int, *, classes: int = 1000, seed: int = 0) -> Path:
    """A store of ``n`` random ``size`` x ``size`` images (content is irrelevant to throughput)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8)  # 64 distinct images, repeated
    with ShardWriter(path, size=size) as w:
        for i in range(n):
            w.add(base[i % 64], int(rng.integers(classes)), i, f"synthetic/{i}.JPEG")
    return path


@dataclass
class Timing:
    images_per_s: float
    loader_wait_share: float
    peak_memory_gib: float


def timed_training(step: TrainingStep, batches: Callable, *, steps: int, warmup: int, batch_size: int,
                   device: torch.device) -> Timing:
    """Run ``steps`` steps of the shared loop (one epoch, constant lr) over ``batches()``; time the
    steps after ``warmup``. ``batches()`` yields (x, y) already on ``device``."""
    cuda = device.type == "cuda"
    state = {"wait": 0.0, "t0": None, "t1": None}

    def timed(epoch: int, phase: Phase):
        it = iter(batches())
        for i in range(steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                state["t0"] = time.perf_counter()
                state["wait"] = 0.0
            t = time.perf_counter()
            batch = next(it)
            state["wait"] += time.perf_counter() - t
            yield batch
        if cuda:
            torch.cuda.synchronize()
        state["t1"] = time.perf_counter()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(checkpoint_dir=Path(tmp), device=str(device), progress=False)
        train(step, PhaseSchedule([Phase(1, 1e-4)], steps), timed, config, resume=False)
    wall = state["t1"] - state["t0"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return Timing((steps - warmup) * batch_size / wall, state["wait"] / wall, peak)


def resident(batch: tuple[torch.Tensor, ...], prepare: Callable) -> Callable:
    """batches() that give the same device-resident batch forever (prepared per step, as the loader's)."""

    def batches():
        while True:
            yield prepare(*batch)

    return batches


def from_loader(loader, prepare: Callable) -> Callable:
    def batches():
        while True:
            for b in loader:
                yield prepare(*b)

    return batches


def loader_vs_resident(run: Callable[[Callable], Timing], loader, prepare: Callable,
                       device: torch.device) -> dict[str, float]:
    """Time ``run(batches)`` twice: on the loader's first batch kept on the device (the model's own
    speed), then end to end from the loader. ``busy`` is their ratio: the share of the model's speed
    the loader sustains."""
    first = next(iter(loader))
    on_device = run(resident(tuple(t.to(device) for t in first), prepare))
    e2e = run(from_loader(loader, prepare))
    return {"images_per_s": e2e.images_per_s, "on_device_images_per_s": on_device.images_per_s,
            "busy": e2e.images_per_s / on_device.images_per_s, "loader_wait": e2e.loader_wait_share,
            "peak_gib": e2e.peak_memory_gib}


def print_results(results: list[dict]) -> None:
    """One ``RESULT key=value ...`` line per result (the lines docs/BENCHMARKS.md records)."""
    for r in results:
        print("RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


def device_info(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
