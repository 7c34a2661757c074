"""A finished stage damaged by hand is never used: a deleted shard, a truncated store, a manifest that
does not parse, bytes changed in place. The cheap checks (files there, at their recorded sizes) run
on every use; ``imagesmith verify`` checks CRC-32s. A damaged stage is moved aside (not deleted) and
rebuilt, and ``imagesmith status`` names it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from storage.hdf5 import open_store
from storage.stage import DAMAGED_DIR, StageDamaged, open_stage
from storage.tiers import Tiers
from tests.helpers import run_listing, run_resize


@pytest.fixture
def built(sample_root, tmp_path):
    tiers = Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")
    listing = run_listing(tiers, sample_root)
    stage = run_resize(tiers, listing, size=16, cores=1)
    return tiers, listing, stage


def _rebuilt(tiers, listing, stage):
    again = run_resize(tiers, listing, size=16, cores=1)
    assert again.path == stage.path and again.is_complete
    aside = list((tiers.fast / DAMAGED_DIR / "resize").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(stage.key)  # the damaged copy kept, not deleted
    return again, aside[0]


def test_a_deleted_shard_makes_the_stage_damaged_and_the_next_run_rebuilds_it(built):
    tiers, listing, stage = built
    with open_store(stage.path / "val.h5") as f:
        before = f["images"][:]
    (stage.path / "shards" / "val-00000.h5").unlink()
    # before the fix: complete, and val.h5 read back as all-zero images with label 0
    assert not stage.is_complete
    assert stage.problem() == f"damaged: {stage.path / 'shards' / 'val-00000.h5'} is missing"
    with pytest.raises(StageDamaged, match=r"val-00000.h5 is missing; it is not used"):
        open_stage(stage.path)
    again, aside = _rebuilt(tiers, listing, stage)
    assert not (aside / "shards" / "val-00000.h5").exists() and (aside / "shards").is_dir()
    with open_store(again.path / "val.h5") as f:
        assert np.array_equal(f["images"][:], before) and f["images"][:].any()


def test_a_truncated_store_is_damaged_and_rebuilt(built):
    tiers, listing, stage = built
    shard = sorted((stage.path / "shards").glob("train-*.h5"))[0]
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    assert stage.problem() == f"damaged: {shard} has {size // 2} bytes; it was written with {size}"
    again, _ = _rebuilt(tiers, listing, stage)
    assert (again.path / "shards" / shard.name).stat().st_size == size


def test_a_manifest_that_does_not_parse_names_its_file_in_one_line_and_the_stage_is_rebuilt(built):
    tiers, listing, stage = built
    stage.manifest_path.write_text('{"garbage": tru')
    with pytest.raises(StageDamaged) as caught:
        open_stage(stage.path)
    message = str(caught.value)
    assert "\n" not in message and f"{stage.manifest_path} does not parse" in message
    _rebuilt(tiers, listing, stage)


def test_verify_finds_bytes_changed_in_place_that_the_cheap_checks_cannot(built, capsys):
    from imagesmith.cli import main

    tiers, _, stage = built
    assert main(["verify", str(stage.path)]) == 0
    assert "ok (" in capsys.readouterr().out
    shard = sorted((stage.path / "shards").glob("train-*.h5"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    assert stage.is_complete  # the cheap checks (existence, size) pass
    assert main(["verify", str(stage.path)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED: {shard} does not match its CRC-32" in out and "1 damaged" in out
    assert main(["verify", str(stage.path.parent)]) == 2  # not a stage directory: one line, exit 2
    assert "is not a stage directory" in capsys.readouterr().err


def test_status_shows_a_damaged_stage_with_its_file(built, monkeypatch, capsys):
    from imagesmith.cli import main

    tiers, _, stage = built
    (stage.path / "shards" / "val-00000.h5").unlink()
    monkeypatch.setenv("IMAGESMITH_FAST_DIR", str(tiers.fast))
    monkeypatch.setenv("IMAGESMITH_BULK_DIR", str(tiers.bulk))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no server: status still lists stages
    main(["status", "--json"])
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[stage.key]["state"] == "damaged" and "val-00000.h5 is missing" in rows[stage.key]["problem"]


def test_a_flow_rerun_after_damage_is_not_cached_and_rebuilds_the_stage(prefect_server, sample_root, tmp_path,
                                                                         monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.setenv("IMAGESMITH_FAST_DIR", str(tmp_path / "fast"))
    monkeypatch.setenv("IMAGESMITH_BULK_DIR", str(tmp_path / "bulk"))
    first = pipeline(source=str(sample_root), size=16, words=False)
    resize = open_stage(first["resize"])
    (resize.path / "shards" / "val-00000.h5").unlink()
    second = pipeline(source=str(sample_root), size=16, words=False)
    assert second["resize"] == first["resize"] and open_stage(second["resize"]).is_complete
    assert (resize.path / "shards" / "val-00000.h5").is_file()
    assert len(list((tmp_path / "fast" / DAMAGED_DIR / "resize").iterdir())) == 1
