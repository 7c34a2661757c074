import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from prep.resize import Rejected, ResizeConfig, ResizeStage, load_square
from prep.shards import map_shards
from storage.catalog import read_rejects
from storage.listing import read_split
from tests.helpers import prepared, run_resize


def _jpeg(path: Path, array: np.ndarray, quality: int = 95) -> Path:
    Image.fromarray(array).save(path, format="JPEG", quality=quality)
    return path


def _bands(w: int, h: int) -> np.ndarray:
    """Red | green | blue bands along the long side; the middle band is exactly the center square."""
    img = np.zeros((h, w, 3), np.uint8)
    long_side, short = max(w, h), min(w, h)
    edge = (long_side - short) // 2
    for lo, hi, channel in ((0, edge, 0), (edge, long_side - edge, 1), (long_side - edge, long_side, 2)):
        if w >= h:
            img[:, lo:hi, channel] = 255
        else:
            img[lo:hi, :, channel] = 255
    return img


@pytest.mark.parametrize("w,h", [(400, 200), (200, 400), (300, 300)])
def test_shortest_side_then_center_crop_keeps_only_the_middle(tmp_path, w, h):
    out = load_square(_jpeg(tmp_path / "b.jpg", _bands(w, h)), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    inner = out[2:-2, 2:-2].reshape(-1, 3).astype(int)  # away from the crop edge's JPEG ringing
    assert inner[:, 1].min() > 200 and inner[:, [0, 2]].max() < 60  # all green: no side bands, no black padding


def test_draft_only_for_images_at_least_twice_the_target_and_close_to_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))
    big = _jpeg(tmp_path / "big.jpg", smooth)  # 640x480: short side 480 >= 2 x 224, so draft applies
    with_draft = load_square(big, 224).astype(float)
    without = load_square(big, 224, use_draft=False).astype(float)
    assert not np.array_equal(with_draft, without)  # draft changed the decode path
    psnr = 10 * np.log10(255**2 / np.mean((with_draft - without) ** 2))
    assert psnr > 28, psnr
    small = _jpeg(tmp_path / "small.jpg", smooth[:400, :400])  # 400 < 2 x 224: no draft
    np.testing.assert_array_equal(load_square(small, 224), load_square(small, 224, use_draft=False))


def test_convertible_bad_inputs_become_rgb(sample_root, planted):
    for relpath, kind in planted.items():
        if kind in ("cmyk", "grayscale", "png_named_jpeg"):
            out = load_square(sample_root / relpath, 48)
            assert out.shape == (48, 48, 3), kind
    gray = next(p for p, k in planted.items() if k == "grayscale")
    out = load_square(sample_root / gray, 48).astype(int)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


@pytest.mark.parametrize("kind,reason", [("truncated", "truncated"), ("empty", r"empty file \(0 bytes\)")])
def test_broken_inputs_are_rejected_with_the_reason(sample_root, planted, kind, reason):
    path = next(p for p, k in planted.items() if k == kind)
    with pytest.raises(Rejected, match=reason):
        load_square(sample_root / path, 48)


def test_text_named_jpeg_and_decompression_bombs_are_rejected(tmp_path):
    (tmp_path / "notes.JPEG").write_text("not an image at all")
    with pytest.raises(Rejected, match="not a readable image"):
        load_square(tmp_path / "notes.JPEG", 32)
    big = _jpeg(tmp_path / "big.jpg", np.zeros((300, 400, 3), np.uint8))
    with pytest.raises(Rejected, match=r"too many pixels: 400x300 = 120,000 > max_pixels 100,000"):
        load_square(big, 32, max_pixels=100_000)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="size must be between 8 and 4096 pixels, got 4"):
        ResizeConfig(size=4)
    with pytest.raises(ValueError, match=r"unknown HDF5 compression 'zstd'; choose one of \[None, 'lzf', 'gzip'\]"):
        ResizeConfig(compression="zstd")


def test_store_follows_listing_order_and_inputs_equal_written_plus_rejected(sample_root, planted, sample_listing,
                                                                           resized):
    listing = sample_listing
    stage = resized(40, shard_images=8)
    rejects = read_rejects(stage.path)
    assert {r["path"] for r in rejects} == {p for p, k in planted.items() if k in ("truncated", "empty")}
    for split in ("train", "val"):
        rows = read_split(listing.path, split)
        rejected = {int(r["index"]) for r in rejects if r["split"] == split}
        with h5py.File(stage.path / f"{split}.h5") as f:
            index = f["index"][()]
            assert len(index) + len(rejected) == len(rows.paths)
            assert sorted(set(index) | rejected) == list(range(len(rows.paths)))
            assert list(index) == sorted(index)  # shuffled-listing order, rejects left out
            assert f["paths"].asstr()[()].tolist() == [rows.paths[i] for i in index]
            np.testing.assert_array_equal(f["labels"][()], rows.labels[index])
            k = len(index) // 2
            np.testing.assert_array_equal(f["images"][k], load_square(sample_root / rows.paths[index[k]], 40))
            assert f.attrs["size"] == 40 and f.attrs["listing_key"] == listing.key
            assert f.attrs["imaging_backend"] in ("pillow-simd", "pillow")
    m = stage.manifest()
    assert m["counts"]["train"]["inputs"] == m["counts"]["train"]["written"] + m["counts"]["train"]["rejected"]


def test_store_survives_moving_the_stage_directory(sample_listing, tiers, tmp_path):
    stage = run_resize(tiers, sample_listing, size=16, shard_images=10)
    with h5py.File(stage.path / "val.h5") as f:
        before = f["images"][()]
    moved = tmp_path / "elsewhere"
    shutil.move(stage.path, moved)
    with h5py.File(moved / "val.h5") as f:  # the virtual dataset names its shards by relative path
        np.testing.assert_array_equal(f["images"][()], before)


def test_local_parallelism_uses_a_process_per_shard_and_threads_for_a_lone_shard():
    from prep.shards import local_parallelism

    assert local_parallelism(10, cores=4) == (4, 1)
    assert local_parallelism(3, cores=8) == (3, 1)
    assert local_parallelism(1, cores=8) == (1, 8)
    assert local_parallelism(10, cores=1) == (1, 1)


@pytest.mark.slow
def test_several_shards_run_in_separate_processes(sample_listing, tiers):
    spec = ResizeStage(listing=str(sample_listing.path), config=ResizeConfig(size=16, shard_images=10))
    shards = [s for s in spec.plan(prepared(spec, tiers)) if s.split == "train"]
    results = map_shards(spec.build_shard, shards, cores=2)
    workers = {r["worker"] for r in results}
    assert len(workers) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)
    assert sum(r["written"] + r["rejected"] for r in results) == len(read_split(sample_listing.path, "train").paths)


def test_joining_with_a_missing_shard_names_it(tmp_path):
    from storage.hdf5 import ShardWriter, join_shards

    with ShardWriter(tmp_path / "a.h5", size=8) as w:
        w.add(np.zeros((8, 8, 3), np.uint8), 0, 0, "x.JPEG")
    with pytest.raises(FileNotFoundError, match=r"cannot join train.h5: 1 shard\(s\) missing, e.g. .*b.h5"):
        join_shards([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "train.h5")
    assert not (tmp_path / "train.h5").exists()


def test_a_failing_shard_shuts_its_thread_pool_down_and_leaves_no_file(sample_listing, tiers, monkeypatch):
    import threading

    import prep.resize

    calls = {"n": 0}
    load = prep.resize._load_or_reason

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise MemoryError("simulated failure mid-shard")
        return load(*args, **kwargs)

    def pool_threads():
        return {t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")}

    monkeypatch.setattr(prep.resize, "_load_or_reason", failing)
    spec = ResizeStage(listing=str(sample_listing.path), config=ResizeConfig(size=16))
    shard = spec.plan(prepared(spec, tiers))[0]
    before = pool_threads()
    with pytest.raises(MemoryError, match="simulated failure"):
        spec.build_shard(shard, workers=2)
    assert pool_threads() <= before  # no worker thread of the failed shard is left running
    assert not Path(shard.path).exists() and not list(Path(shard.path).parent.glob(".tmp-*"))


def test_16_bit_images_are_scaled_to_8_bits_not_clipped_white(tmp_path):
    levels = np.array([[0, 1000], [30000, 65535]], np.uint16)
    wide = np.kron(levels, np.ones((8, 8), np.uint16))  # 16 x 16, four flat blocks
    Image.fromarray(wide).save(tmp_path / "gray16.png")  # a 16-bit PNG (mode I;16), named as ImageNet would
    (tmp_path / "gray16.JPEG").write_bytes((tmp_path / "gray16.png").read_bytes())
    with Image.open(tmp_path / "gray16.JPEG") as im:
        assert im.mode in ("I;16", "I")
    out = load_square(tmp_path / "gray16.JPEG", 16)
    expected = np.round(levels.astype(np.int64) * 255 / 65535).astype(np.uint8)  # [[0, 4], [117, 255]]
    for (r, c), value in np.ndenumerate(expected):
        assert (out[r * 8 + 4, c * 8 + 4] == value).all(), (r, c, out[r * 8 + 4, c * 8 + 4], value)


@pytest.mark.parametrize("orientation,corner", [(1, (0, 0)), (6, (0, 1)), (8, (1, 0)), (3, (1, 1))])
def test_exif_orientation_is_applied_before_the_crop(tmp_path, orientation, corner):
    """A phone photo stored sideways: red in the stored top-left quadrant shows at the top-right after
    orientation 6 (rotate 90 clockwise), the bottom-left after 8, the bottom-right after 3."""
    stored = np.full((64, 64, 3), 30, np.uint8)
    stored[:32, :32] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "phone.JPEG", quality=95, exif=exif.tobytes())
    out = load_square(tmp_path / "phone.JPEG", 32).astype(int)
    red = {(r, c): out[r * 16 + 8, c * 16 + 8, 0] > 200 and out[r * 16 + 8, c * 16 + 8, 1] < 60
           for r in (0, 1) for c in (0, 1)}
    assert [k for k, v in red.items() if v] == [corner]
