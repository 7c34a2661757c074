"""Operations on the two tiers: a trained model archived to bulk (checksummed) with its older
checkpoints pruned, ``gc --keep N`` freeing the fast tier without removing anything a kept stage
reads, ``status`` listing stages; run names, tags and the demo's summary rows."""

import json
import os
from pathlib import Path

import pytest

from flows.summary import format_table, key_figure, stage_row
from storage.archive import (
    ARCHIVE_RECORD,
    collect_garbage,
    needed_stages,
    note_stage_used,
    recent_runs,
    stage_inventory,
    verify_archive,
)
from storage.stage import open_stage, run_stage
from storage.tiers import Tiers
from tests.helpers import run_listing, run_resize
from training.gan import WganConfig, WganStage


def test_a_trained_model_is_archived_to_bulk_checksummed_and_older_checkpoints_pruned(tmp_path, resized):
    tiers = Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")
    spec = WganStage(images=str(resized(32).path), config=WganConfig(epochs=2, batch_size=16, nf=8, n_critic=1,
                                                                      critic_warmup=1, grid=4))
    stage = run_stage(tiers, spec)
    record = json.loads((stage.path / ARCHIVE_RECORD).read_text())
    dest = Path(record["archived_to"])
    assert dest == tiers.bulk / "archive" / "wgan" / stage.key
    for name in ("model.pt", "history.json", "manifest.json"):
        assert (dest / name).read_bytes() == (stage.path / name).read_bytes()
    assert any(dest.rglob("epoch-*.png")) and any(dest.rglob("events.out.tfevents.*"))
    assert not any(dest.rglob("last.pt"))  # resume state is not a result
    assert verify_archive(dest) == []
    assert record["kept_checkpoint"] and (stage.path / record["kept_checkpoint"]).is_file()
    assert open_stage(stage.path).manifest()["build_s"] > 0
    # a flipped byte on the bulk disk is found
    png = next(dest.rglob("epoch-*.png"))
    data = bytearray(png.read_bytes())
    data[len(data) // 2] ^= 0xFF
    png.write_bytes(bytes(data))
    assert verify_archive(dest) == [str(png.relative_to(dest))]


def test_only_the_newest_checkpoint_is_kept_when_a_stage_had_several(tmp_path):
    from storage.archive import archive_stage
    from storage.stage import StageDir

    path = tmp_path / "fast" / "superres" / ("0" * 16)
    for i, leg in enumerate(("leg-0-32", "leg-1-64")):
        (path / leg / "train").mkdir(parents=True)
        (path / leg / "train" / "last.pt").write_bytes(b"x" * 10)
        os.utime(path / leg / "train" / "last.pt", (1000 + i, 1000 + i))
    (path / "model.pt").write_bytes(b"model")
    record = archive_stage(StageDir(stage="superres", key="0" * 16, path=path), Tiers(tmp_path / "fast",
                                                                                    tmp_path / "bulk"))
    assert record["pruned_checkpoints"] == ["leg-0-32/train/last.pt"]
    assert (path / "leg-1-64" / "train" / "last.pt").is_file() and not (path / "leg-0-32" / "train" / "last.pt").exists()


def test_gc_keeps_what_the_last_runs_used_and_everything_their_stages_read(tmp_path, sample_root):
    tiers = Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")
    listing = run_listing(tiers, sample_root)
    old = run_resize(tiers, listing, size=16, cores=1)
    new = run_resize(tiers, listing, size=24, cores=1)
    other_listing = run_listing(tiers, sample_root, seed=5)
    note_stage_used(tiers, "run-1", "pipeline", old.path)
    note_stage_used(tiers, "run-1", "pipeline", listing.path)
    note_stage_used(tiers, "run-1", "pipeline", other_listing.path)
    note_stage_used(tiers, "run-2", "superres", new.path)  # only the store: its listing is read through its key
    (tiers.fast / "prefect" / "cache-keys").mkdir(parents=True)
    unfinished = tiers.fast / "resize" / ("f" * 16)
    unfinished.mkdir()
    assert [r["run_id"] for r in recent_runs(tiers, 1)] == ["run-2"]
    assert needed_stages(tiers, [str(new.path)]) == {new.path.resolve(), listing.path.resolve()}

    preview = collect_garbage(tiers, 1, dry_run=True)
    assert sorted(preview["removed"]) == sorted([str(old.path), str(other_listing.path)])
    assert old.path.is_dir()  # a dry run removes nothing

    result = collect_garbage(tiers, 1)
    assert sorted(result["removed"]) == sorted([str(old.path), str(other_listing.path)])
    assert result["freed_bytes"] > 0 and result["skipped_unfinished"] == [str(unfinished)]
    assert not old.path.exists() and not other_listing.path.exists()
    assert new.path.is_dir() and listing.path.is_dir() and unfinished.is_dir()
    assert open_stage(new.path).is_complete and open_stage(listing.path).is_complete  # what run 2 needs is whole
    assert not (tiers.fast / "prefect" / "cache-keys").exists()  # no cached result names a removed directory
    # keeping both runs removes nothing
    assert collect_garbage(tiers, 2)["removed"] == []
    with pytest.raises(ValueError, match="keep must be >= 1"):
        collect_garbage(tiers, 0)


def test_gc_and_status_commands(tmp_path, sample_root, monkeypatch, capsys):
    from imagesmith.cli import main

    tiers = Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")
    monkeypatch.setenv("IMAGESMITH_FAST_DIR", str(tiers.fast))
    monkeypatch.setenv("IMAGESMITH_BULK_DIR", str(tiers.bulk))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing answers there
    listing = run_listing(tiers, sample_root)
    note_stage_used(tiers, "run-1", "pipeline", listing.path)
    inventory = stage_inventory(tiers)
    assert [(r["stage"], r["tier"], r["state"]) for r in inventory] == [("listing", "fast", "complete")]
    assert main(["gc", "--keep", "1"]) == 0
    assert "removed 0 stage(s)" in capsys.readouterr().out and listing.path.is_dir()
    with pytest.raises(SystemExit) as bad:
        main(["gc", "--keep", "0"])
    assert bad.value.code == 2 and "--keep: 0 is out of range" in capsys.readouterr().err
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"listing          {listing.key}  complete" in out and "fast tier: 1 stage(s)" in out
    assert "PREFECT_API_URL=http://127.0.0.1:9/api does not answer" in out


def test_summary_rows_say_built_or_cached_with_the_key_figure(tmp_path, sample_root):
    tiers = Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")
    listing = run_listing(tiers, sample_root)
    stored = run_resize(tiers, listing, size=16, cores=1)
    since = open_stage(stored.path).manifest()["completed_unix"]
    row = stage_row("pipeline", "resize", stored.path, since)
    m = open_stage(stored.path).manifest()
    written = sum(v["written"] for v in m["counts"].values())
    assert row["state"] == "built" and row["seconds"] is not None and row["figure"].startswith(f"{written} images")
    assert stage_row("pipeline", "listing", listing.path, since + 1)["state"] == "cached"
    assert stage_row("pipeline", "dataset", sample_root, since) is None  # a user's folder is not a stage
    table = format_table([row])
    assert table.splitlines()[0].split() == ["family", "stage", "state", "time", "result"] and "resize" in table
    assert key_figure({"stage": "superres", "evaluation": {"psnr_model": 23.5, "psnr_bicubic": 23.3}}) == \
        "PSNR 23.50 dB vs bicubic 23.30"


def test_stage_tags_say_what_a_stage_needs():
    from prep.listing import ListingStage
    from prep.resize import ResizeConfig, ResizeStage
    from tasks.stages import stage_tag
    from training.style import FastStyleConfig, FastStyleStage

    assert stage_tag(ListingStage(root="/x", fingerprint="f")) == "io"
    assert stage_tag(ResizeStage(listing="/x", config=ResizeConfig(size=16))) == "cpu-heavy"
    assert stage_tag(FastStyleStage(images="/x", style_digest="0", config=FastStyleConfig())) == "gpu"


@pytest.mark.parametrize("flow_module,flow_name,params,field", [
    ("flows.devise", "devise", {"finetune_epochs": 1}, "finetune_epochs"),
    ("flows.devise", "devise", {"backbone": "resnet_9000"}, "backbone"),
    ("flows.superres", "superres", {"epochs": 1}, "epochs"),
    ("flows.superres", "superres", {"arch": "srgan"}, "arch"),
    ("flows.gan", "wgan", {"size": 48}, "size"),
    ("flows.style", "style", {"style_weights": [1.0]}, "style_weights"),
])
def test_every_flow_refuses_bad_parameters_by_name_before_running(flow_module, flow_name, params, field):
    import importlib

    from prefect.exceptions import ParameterTypeError

    flow = getattr(importlib.import_module(flow_module), flow_name)
    with pytest.raises(ParameterTypeError, match=field):
        flow.validate_parameters(params)
    schema = flow.parameters.model_dump()["properties"]
    if field in ("backbone", "arch", "size"):  # the UI's run form offers the accepted values
        assert "enum" in json.dumps(schema[field])
