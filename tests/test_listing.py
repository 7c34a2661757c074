import shutil

import numpy as np
import pytest

from prep.listing import (
    ListingStage,
    fingerprint_dataset,
    list_dataset,
    shuffle_listing,
)
from prep.sample import SAMPLE_PHOTOS
from storage.listing import read_classes, read_split
from storage.stage import run_stage
from tests.helpers import prepared

N_CLASSES = len(SAMPLE_PHOTOS)


@pytest.fixture
def own_sample(sample_root, tmp_path):
    """A private copy of the session sample, for tests that change the folder."""
    root = tmp_path / "ds"
    shutil.copytree(sample_root, root)
    return root


def test_labels_are_indices_of_sorted_wnids(sample_root):
    listing = list_dataset(sample_root)
    assert listing.classes == sorted(p.wnid for p in SAMPLE_PHOTOS)
    for split, s in listing.splits.items():
        assert len(s.paths) == len(s.labels)
        for path, label in zip(s.paths, s.labels):
            assert path.split("/")[:2] == [split, listing.classes[label]]
    # 4 train per class + the 5 planted bad files (they are image-named files: stage 2 judges them)
    assert len(listing.splits["train"].paths) == 4 * N_CLASSES + 5
    assert len(listing.splits["val"].paths) == 2 * N_CLASSES


def test_non_image_entries_are_skipped_and_counted(own_sample):
    wnid = SAMPLE_PHOTOS[0].wnid
    (own_sample / "train" / wnid / "README.txt").write_text("notes")
    (own_sample / "train" / wnid / "nested").mkdir()
    (own_sample / "train" / "LOC_synset_mapping.txt").write_text("stray")
    listing = list_dataset(own_sample)
    assert listing.skipped == 3
    assert not any(p.endswith(("README.txt", "nested")) for p in listing.splits["train"].paths)


def test_shuffle_is_a_seeded_permutation_that_keeps_path_label_pairs(sample_root):
    listing = list_dataset(sample_root)
    a, b, c = (shuffle_listing(listing, seed) for seed in (7, 7, 8))
    train = listing.splits["train"]
    assert a.splits["train"].paths == b.splits["train"].paths
    assert a.splits["train"].paths != c.splits["train"].paths
    assert sorted(a.splits["train"].paths) == sorted(train.paths)
    pairs = dict(zip(train.paths, train.labels.tolist()))
    assert all(pairs[p] == label for p, label in zip(a.splits["train"].paths, a.splits["train"].labels.tolist()))
    # train and val draw from different streams
    assert a.splits["val"].paths != shuffle_listing(listing, 7).splits["val"].paths[::-1]


def test_shuffled_chunks_mix_classes(sample_root):
    # the point of shuffling once: a contiguous chunk is a random mix, not one class
    s = shuffle_listing(list_dataset(sample_root), 0).splits["train"]
    chunks = [s.labels[i:i + 8] for i in range(0, len(s.labels) - 7, 8)]
    assert all(len(np.unique(c)) >= 3 for c in chunks)
    assert len(np.unique(list_dataset(sample_root).splits["train"].labels[:4])) == 1  # sorted order is not mixed


def test_fingerprint_changes_when_a_file_is_added_and_only_then(own_sample):
    before = fingerprint_dataset(own_sample)
    assert fingerprint_dataset(own_sample) == before
    wnid = SAMPLE_PHOTOS[1].wnid
    shutil.copy(next((own_sample / "train" / wnid).iterdir()), own_sample / "train" / wnid / "extra.JPEG")
    assert fingerprint_dataset(own_sample) != before


def test_missing_root_error_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope' does not exist; expected .*/train/<wnid>/\*\.JPEG"):
        list_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty' has no train/ folder; expected .*/train/<wnid>/\*\.JPEG"):
        fingerprint_dataset(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file' is not a folder"):
        list_dataset(tmp_path / "file")


def test_written_listing_reads_back_in_shuffled_order(sample_root, tiers):
    stage = run_stage(tiers, ListingStage(root=str(sample_root), fingerprint=fingerprint_dataset(sample_root), seed=3))
    expected = shuffle_listing(list_dataset(sample_root), 3)
    assert read_classes(stage.path) == expected.classes
    for split in ("train", "val"):
        got = read_split(stage.path, split)
        assert got.paths == expected.splits[split].paths
        np.testing.assert_array_equal(got.labels, expected.splits[split].labels)
    m = stage.manifest()
    assert m["counts"] == {"train": 4 * N_CLASSES + 5, "val": 2 * N_CLASSES}
    assert m["seed"] == 3 and m["elapsed_s"] >= m["list_s"] >= 0
    assert sum(m["per_class"]["val"]) == 2 * N_CLASSES


def test_interrupted_listing_is_redone(sample_root, tiers):
    spec = ListingStage(root=str(sample_root), fingerprint="f", seed=0)
    stage = spec.stage_dir(tiers)
    prepared(spec, tiers)
    (stage.path / "train.tsv").write_text("garbage from a killed run\n")
    run_stage(tiers, spec)
    assert stage.is_complete
    assert read_split(stage.path, "train").paths == shuffle_listing(list_dataset(sample_root), 0).splits["train"].paths


def test_finished_listing_is_not_redone(sample_root, tiers):
    spec = ListingStage(root=str(sample_root), fingerprint="f", seed=0)
    stage = run_stage(tiers, spec)
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stage.path.iterdir()}
    run_stage(tiers, spec)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stage.path.iterdir()} == files


def test_empty_class_folders_are_reported_not_dropped_silently(own_sample, tiers):
    (own_sample / "train" / "n99999999").mkdir()
    (own_sample / "val" / "n88888888").mkdir()
    listing = list_dataset(own_sample)
    assert listing.empty == {"train": ["n99999999"], "val": ["n88888888"]}
    assert "n99999999" not in listing.classes  # a folder without images is no class
    stage = run_stage(tiers, ListingStage(root=str(own_sample), fingerprint=fingerprint_dataset(own_sample)))
    assert stage.manifest()["empty_class_folders"] == {"train": ["n99999999"], "val": ["n88888888"]}


def test_names_a_tsv_cannot_hold_are_skipped_and_reported(own_sample, tiers):
    wnid = sorted(p.name for p in (own_sample / "train").iterdir())[0]
    photo = next((own_sample / "train" / wnid).glob("*.JPEG"))
    before = len(list_dataset(own_sample).splits["train"].paths)
    for name in ("tab\there.JPEG", "new\nline.JPEG"):
        shutil.copy(photo, own_sample / "train" / wnid / name)
    stage = run_stage(tiers, ListingStage(root=str(own_sample), fingerprint=fingerprint_dataset(own_sample)))
    assert len(read_split(stage.path, "train").paths) == before  # the TSV still reads back, row for row
    assert sorted(stage.manifest()["skipped_unsafe_names"]) == sorted(
        [repr(f"train/{wnid}/tab\there.JPEG"), repr(f"train/{wnid}/new\nline.JPEG")])


def test_every_entry_left_out_is_named_with_why(own_sample, tiers):
    """Nested images, dangling symlinks, files where class folders belong: named, not only counted."""
    wnid = sorted(p.name for p in (own_sample / "train").iterdir())[0]
    photo = next((own_sample / "train" / wnid).glob("*.JPEG"))
    (own_sample / "train" / wnid / "more").mkdir()
    shutil.copy(photo, own_sample / "train" / wnid / "more" / "nested.JPEG")
    (own_sample / "train" / wnid / "gone.JPEG").symlink_to(own_sample / "nowhere.JPEG")
    (own_sample / "train" / "n12345678").write_text("a file, not a folder")
    (own_sample / "train" / wnid / "notes.txt").write_text("x")
    stage = run_stage(tiers, ListingStage(root=str(own_sample), fingerprint=fingerprint_dataset(own_sample)))
    m = stage.manifest()
    left = dict(m["left_out"])
    assert left[f"train/{wnid}/more"] == "a sub-folder: images nested below <split>/<wnid>/ are not listed"
    assert left[f"train/{wnid}/gone.JPEG"] == "a dangling symlink"
    assert left["train/n12345678"] == "a file where a class folder is expected (<split>/<wnid>/)"
    assert left[f"train/{wnid}/notes.txt"].startswith("not an image file name (suffix '.txt'")
    assert m["left_out_count"] == len(m["left_out"]) == m["skipped_non_image"] == 4
    paths = read_split(stage.path, "train").paths
    assert not any("nested" in p or "gone" in p for p in paths)  # nested images are not listed (README says so)
