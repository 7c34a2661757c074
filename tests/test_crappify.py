from pathlib import Path

import h5py
import numpy as np
import pytest

from prep.crappify import (
    CRAPPIFIERS,
    CrappifyConfig,
    CrappifyStage,
    JpegText,
    image_rng,
    make_crappifier,
)
from prep.sample import SAMPLE_PHOTOS
from storage.stage import run_stage
from tests.helpers import prepared


@pytest.fixture(scope="module")
def photo():
    """A real photo square from the bundled sample sources (the cat), 256 x 256."""
    from PIL import Image

    from prep.sample import SAMPLE_PHOTOS, photo_path

    with Image.open(photo_path(SAMPLE_PHOTOS[0])) as im:
        return np.asarray(im.convert("RGB").resize((256, 256)))


@pytest.mark.parametrize("name", sorted(CRAPPIFIERS))
def test_each_crappifier_is_deterministic_per_image_and_downscales(photo, name):
    crap = make_crappifier(name, 96)
    a, b = crap(photo, image_rng(0, 5)), crap(photo, image_rng(0, 5))
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    if name not in ("grayscale", "downscale"):  # these two draw nothing at random
        assert not np.array_equal(a, crap(photo, image_rng(0, 6)))


def test_default_draws_its_quality_in_white_in_the_top_left_quarter():
    black = np.zeros((256, 256, 3), np.uint8)
    corners = set()
    for index in range(20):
        out = JpegText()(black, image_rng(3, index)).astype(int).sum(axis=2)
        bright = np.argwhere(out > 300)
        assert len(bright) > 5, "the number is drawn"
        # drawn from a point of the top-left 48 x 48 quarter: a two-digit number reaches < 16 px further
        assert (bright.max(axis=0) < 48 + 16).all()
        corners.add(tuple(bright.min(axis=0)))
    assert len(corners) > 10  # a random point each time


def test_grayscale_has_no_colour_and_downscale_has_no_text(photo):
    g = make_crappifier("grayscale")(photo, image_rng(0, 0))
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    black = np.zeros((256, 256, 3), np.uint8)
    assert make_crappifier("downscale")(black, image_rng(0, 0)).max() < 10


def test_bad_choices_name_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown crappifier 'blur'; choose one of \['cutout', 'downscale', "):
        CrappifyConfig(crappifier="blur")
    with pytest.raises(ValueError, match="crappified size must be between 8 and 1024 pixels, got 4"):
        CrappifyConfig(size=4)


def test_crappified_store_is_aligned_with_its_source(resized, tiers):
    resized = resized(64, shard_images=10)
    stage = run_stage(tiers, CrappifyStage(source=str(resized.path), config=CrappifyConfig(size=24, shard_images=8)))
    for split in ("train", "val"):
        with h5py.File(stage.path / f"{split}.h5") as low, h5py.File(resized.path / f"{split}.h5") as high:
            assert low["images"].shape == (high["images"].shape[0], 24, 24, 3)
            for name in ("labels", "index"):
                np.testing.assert_array_equal(low[name][()], high[name][()])
            assert low["paths"].asstr()[()].tolist() == high["paths"].asstr()[()].tolist()
            k = 3
            expected = make_crappifier("jpeg_text", 24)(high["images"][k], image_rng(0, int(high["index"][k])))
            np.testing.assert_array_equal(low["images"][k], expected)
            assert low.attrs["crappifier"] == "jpeg_text"
    assert stage.manifest()["counts"]["val"] == 2 * len(SAMPLE_PHOTOS)


def test_interrupted_crappify_redoes_only_missing_shards_identically(resized, tiers, tmp_path):
    spec = CrappifyStage(source=str(resized(64, shard_images=10).path),
                         config=CrappifyConfig(crappifier="noise", size=16, shard_images=8), cores=1)
    stage = run_stage(tiers, spec)
    reference = {s: h5py.File(stage.path / f"{s}.h5")["images"][()] for s in ("train", "val")}
    # simulate a crash after some shards: no manifest, no joined stores, two shards lost
    stage.manifest_path.unlink()
    for p in [*stage.path.glob("*.h5"), *sorted((stage.path / "shards").glob("train-*.h5"))[1:3]]:
        p.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (stage.path / "shards").glob("*.h5")}
    run_stage(tiers, spec)
    assert {p: (stage.path / "shards" / p).stat().st_mtime_ns for p in kept} == kept
    for s in ("train", "val"):
        np.testing.assert_array_equal(h5py.File(stage.path / f"{s}.h5")["images"][()], reference[s])


def test_a_shard_uses_the_worker_threads_it_is_given_and_writes_the_same_bytes(resized, tiers, monkeypatch):
    import threading
    import time

    import prep.crappify

    threads = set()
    make = prep.crappify.make_crappifier

    def recording(name, size):
        crap = make(name, size)

        def run(image, rng):
            threads.add(threading.get_ident())
            time.sleep(0.002)  # long enough that both threads pick up work
            return crap(image, rng)

        return run

    monkeypatch.setattr(prep.crappify, "make_crappifier", recording)
    spec = CrappifyStage(source=str(resized(64, shard_images=10).path), config=CrappifyConfig(size=16))
    (shard,) = [s for s in spec.plan(prepared(spec, tiers)) if s.split == "val"]
    spec.build_shard(shard, workers=1)
    one = h5py.File(shard.path)["images"][()]
    assert len(threads) == 1
    Path(shard.path).unlink()
    threads.clear()
    spec.build_shard(shard, workers=2)
    assert len(threads) == 2 and threading.get_ident() not in threads
    np.testing.assert_array_equal(h5py.File(shard.path)["images"][()], one)
