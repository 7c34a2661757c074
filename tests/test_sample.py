import hashlib
import re

import pytest
from PIL import Image

from prep.sample import BAD_INPUT_KINDS, SAMPLE_PHOTOS, build_sample
from tests.conftest import SMALL_SAMPLE


def _digests(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"
    }


def test_layout_is_imagenet_style_with_real_wnids(sample_root, planted):
    assert len(planted) == len(BAD_INPUT_KINDS)
    for split, n in (("train", 4), ("val", 2)):
        wnids = sorted(d.name for d in (sample_root / split).iterdir())
        assert wnids == sorted(p.wnid for p in SAMPLE_PHOTOS)
        for wnid in wnids:
            assert re.fullmatch(r"n\d{8}", wnid)
            files = sorted((sample_root / split / wnid).iterdir())
            good = [f for f in files if str(f.relative_to(sample_root)) not in planted]
            assert len(good) == n
            assert all(re.fullmatch(rf"{wnid}_\d+\.JPEG", f.name) for f in files)


def test_good_images_are_real_rgb_jpegs_of_varied_imagenet_like_sizes(sample_root, planted):
    sizes = set()
    for path in sample_root.glob("*/*/*.JPEG"):
        if str(path.relative_to(sample_root)) in planted:
            continue
        with Image.open(path) as im:
            im.load()
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.add(im.size)
            assert 120 <= min(im.size) < 900
    assert len(sizes) > 35  # 42 images: augmentation gives (nearly) every one its own size


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(sample_root, tmp_path):
    again = tmp_path / "again"
    build_sample(again, **SMALL_SAMPLE)
    assert _digests(again) == _digests(sample_root)
    other = tmp_path / "other"
    build_sample(other, **{**SMALL_SAMPLE, "seed": 1})
    assert _digests(other).keys() == _digests(sample_root).keys()
    assert sum(a != b for a, b in zip(_digests(other).values(), _digests(sample_root).values())) > 40


def test_planted_bad_inputs_are_what_the_summary_says(tmp_path):
    summary = build_sample(tmp_path, seed=0, train_per_class=1, val_per_class=0)
    kinds = {p["kind"]: tmp_path / p["path"] for p in summary["planted"]}
    assert set(kinds) == set(BAD_INPUT_KINDS)
    assert all(path.name.endswith(".JPEG") for path in kinds.values())
    with Image.open(kinds["cmyk"]) as im:
        assert (im.format, im.mode) == ("JPEG", "CMYK")
    with Image.open(kinds["grayscale"]) as im:
        assert (im.format, im.mode) == ("JPEG", "L")
    with Image.open(kinds["png_named_jpeg"]) as im:
        assert im.format == "PNG"
    with Image.open(kinds["truncated"]) as im, pytest.raises(OSError, match="truncated"):
        im.load()
    assert kinds["empty"].stat().st_size == 0


def test_bad_sizes_are_rejected_with_the_values(tmp_path):
    with pytest.raises(ValueError, match="train_per_class must be >= 1 and val_per_class >= 0, got 0 and 1"):
        build_sample(tmp_path, train_per_class=0, val_per_class=1)
