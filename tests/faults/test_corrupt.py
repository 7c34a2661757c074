"""A shard damaged after it was written (a power cut after its rename: shards are not fsynced one
by one) is found on resume, written again, and never read into a store."""

from pathlib import Path

import h5py

from prep.resize import ResizeConfig, ResizeStage
from prep.shards import map_shards
from storage.stage import run_stage
from storage.tiers import Tiers
from tests.helpers import prepared


def test_a_damaged_shard_is_found_and_rewritten_on_resume(sample_listing, tiers, caplog):
    """A power cut after a shard's rename but before its pages reached the disk (shards are not
    fsynced one by one) leaves a shard with wrong bytes, or a short file: the resume must notice."""
    from storage.hdf5 import verify_shard

    spec = ResizeStage(listing=str(sample_listing.path), config=ResizeConfig(size=32, shard_images=10))
    specs = spec.plan(prepared(spec, tiers))
    map_shards(spec.build_shard, specs, cores=1)
    shards = [Path(s.path) for s in specs]
    assert all(verify_shard(p) is None for p in shards)
    originals = {p: p.read_bytes() for p in shards}
    flipped, truncated = shards[0], shards[1]
    with h5py.File(flipped) as f:
        offset = f["images"].id.get_chunk_info(0).byte_offset  # where the first image's bytes sit
    data = bytearray(originals[flipped])
    data[offset + 100] ^= 0xFF  # one lost/garbled byte of pixel data
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(originals[truncated][: len(originals[truncated]) // 2])
    assert "CRC-32" in verify_shard(flipped) and verify_shard(truncated).startswith("unreadable")
    untouched = {p: p.stat().st_mtime_ns for p in shards[2:]}

    results = map_shards(spec.build_shard, specs, cores=1)
    assert [r["resumed"] for r in results] == [False, False] + [True] * (len(specs) - 2)
    assert {p: p.stat().st_mtime_ns for p in shards[2:]} == untouched
    assert flipped.read_bytes() != bytes(data) and verify_shard(flipped) is None and verify_shard(truncated) is None
    with h5py.File(flipped) as f, h5py.File(shards[2]) as g:
        assert f["images"].shape[0] + f["rejects/index"].shape[0] == 10 and g.attrs["images_crc32"] > 0
    assert "is damaged" in caplog.text
    # the store joins the rewritten shards: equal to a run that never saw the damage
    stage = run_stage(tiers, spec)
    fresh = run_stage(Tiers(fast=tiers.fast.parent / "fresh-fast", bulk=tiers.bulk.parent / "fresh-bulk"), spec)
    for split in ("train", "val"):
        with h5py.File(stage.path / f"{split}.h5") as a, h5py.File(fresh.path / f"{split}.h5") as b:
            assert a["images"][()].tobytes() == b["images"][()].tobytes()
