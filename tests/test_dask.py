"""Shard tasks on a real Dask cluster (a LocalCluster of 2 worker processes)."""

import os

import h5py
import numpy as np
import pytest

from prep.resize import ResizeConfig, ResizeStage
from storage.stage import run_stage
from tests.helpers import prepared


@pytest.mark.slow
def test_resize_shards_run_on_dask_workers_and_match_a_local_run(prefect_server, sample_listing, tiers, tmp_path):
    from distributed import LocalCluster

    from flows.shards import run_shards

    spec = ResizeStage(listing=str(sample_listing.path), config=ResizeConfig(size=24, shard_images=6))
    shards = spec.plan(prepared(spec, tiers))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        results = run_shards(spec, tiers, shards, dask_address=cluster.scheduler_address)
    workers = {r["worker"] for r in results}
    rows = spec.split_rows()
    assert len(results) == len(shards) == sum(-(-n // 6) for n in rows.values())  # 6 images a shard
    assert len(workers) == 2 and all(not w.endswith(f":{os.getpid()}") for w in workers)
    stage = run_stage(tiers, spec, build=lambda out, report: spec.join(out, shards))

    local_tiers = type(tiers)(fast=tmp_path / "local-fast", bulk=tmp_path / "local-bulk")
    local = run_stage(local_tiers, spec)
    for split in ("train", "val"):
        with h5py.File(stage.path / f"{split}.h5") as a, h5py.File(local.path / f"{split}.h5") as b:
            np.testing.assert_array_equal(a["images"][()], b["images"][()])
            np.testing.assert_array_equal(a["index"][()], b["index"][()])
