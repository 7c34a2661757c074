"""Shard tasks on a real Dask cluster (a LocalCluster of 2 worker processes)."""

import os

import h5py
import numpy as np
import pytest

from tasks.listing import fingerprint_dataset, listing_stage, run_listing
from tasks.resize import ResizeConfig, join_stage, plan_shards, resize_stage, run_resize


@pytest.mark.slow
def test_resize_shards_run_on_dask_workers_and_match_a_local_run(prefect_server, sample_root, tiers, tmp_path):
    from distributed import LocalCluster

    from flows.pipeline import resize_shards

    listing = run_listing(listing_stage(tiers, root=sample_root, fingerprint=fingerprint_dataset(sample_root),
                                        seed=0), root=sample_root, seed=0)
    config = ResizeConfig(size=24, shard_images=6)
    stage = resize_stage(tiers, listing_dir=listing.path, config=config)
    stage.prepare()
    specs = [s for split in ("train", "val") for s in plan_shards(listing.path, sample_root, stage.path, split, 6)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        results = resize_shards(specs, config, dask_address=cluster.scheduler_address)
    workers = {r["worker"] for r in results}
    assert len(results) == len(specs) == 9  # 33 train in 6 shards + 14 val in 3
    assert len(workers) == 2 and all(not w.endswith(f":{os.getpid()}") for w in workers)
    join_stage(stage, specs, config)

    local_tiers = type(tiers)(fast=tmp_path / "local-fast", bulk=tmp_path / "local-bulk")
    local = run_resize(resize_stage(local_tiers, listing_dir=listing.path, config=config),
                       listing_dir=listing.path, config=config)
    for split in ("train", "val"):
        with h5py.File(stage.path / f"{split}.h5") as a, h5py.File(local.path / f"{split}.h5") as b:
            np.testing.assert_array_equal(a["images"][()], b["images"][()])
            np.testing.assert_array_equal(a["index"][()], b["index"][()])
