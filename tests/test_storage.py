import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from storage.atomic import atomic_path, atomic_write_json, atomic_write_text
from storage.stage import StageIncomplete, open_stage, stage_dir, stage_key
from storage.tiers import Tiers


def test_stage_key_ignores_param_order_and_changes_with_values():
    assert stage_key({"a": 1, "b": "x"}) == stage_key({"b": "x", "a": 1})
    assert stage_key({"a": 1, "b": "x"}) != stage_key({"a": 2, "b": "x"})
    assert len(stage_key({})) == 16


def test_tiers_default_to_data_folders_and_follow_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Tiers.from_env({}) == Tiers(fast=tmp_path / "data/fast", bulk=tmp_path / "data/bulk")
    tiers = Tiers.from_env({"IMAGESMITH_FAST_DIR": "/ssd/x", "IMAGESMITH_BULK_DIR": "/hdd/y"})
    assert (tiers.fast, tiers.bulk) == (Path("/ssd/x"), Path("/hdd/y"))


def test_prefect_cache_keys_are_not_inside_results_folder(tiers):
    assert tiers.prefect_results not in tiers.prefect_cache_keys.parents
    assert tiers.prefect_cache_keys != tiers.prefect_results


def test_unknown_tier_is_rejected_with_the_choices(tiers):
    with pytest.raises(ValueError, match=r"unknown storage tier 'ssd'; choose one of \['fast', 'bulk'\]"):
        stage_dir(tiers, "ssd", "listing", {})


def test_bad_stage_name_is_rejected(tiers):
    with pytest.raises(ValueError, match="bad stage name 'My Stage'"):
        stage_dir(tiers, "fast", "My Stage", {})


def test_stage_dir_lives_under_tier_stage_and_key(tiers):
    stage = stage_dir(tiers, "bulk", "sample", {"seed": 3})
    assert stage.path == tiers.bulk / "sample" / stage_key({"seed": 3})


def test_stage_counts_as_done_only_once_its_manifest_is_written(tiers):
    stage = stage_dir(tiers, "fast", "demo", {"n": 1})
    with stage.lock():
        stage.prepare()
    (stage.path / "data.txt").write_text("payload")
    assert not stage.is_complete
    with pytest.raises(StageIncomplete, match="never finished"):
        open_stage(stage.path)
    stage.complete(rows=5)
    reopened = open_stage(stage.path)
    assert reopened.is_complete and reopened.key == stage.key and reopened.params == {"n": 1}
    assert reopened.manifest()["rows"] == 5


def test_prepare_refuses_to_touch_a_finished_stage(tiers):
    stage = stage_dir(tiers, "fast", "demo", {})
    with stage.lock():
        stage.prepare()
    stage.complete()
    with pytest.raises(RuntimeError, match="is complete; refusing to modify it"), stage.lock():
        stage.prepare(clean=True)


def test_prepare_removes_temp_files_of_killed_writers_but_keeps_finished_files(tiers):
    stage = stage_dir(tiers, "fast", "demo", {})
    (stage.path / "shards").mkdir(parents=True)
    (stage.path / "shards" / "a.h5").write_bytes(b"done")
    (stage.path / "shards" / ".tmp-b.h5.x1y2").write_bytes(b"half")
    with stage.lock():
        stage.prepare()
    assert [p.name for p in (stage.path / "shards").iterdir()] == ["a.h5"]


def test_prepare_clean_removes_what_an_interrupted_run_left(tiers):
    stage = stage_dir(tiers, "fast", "demo", {})
    with stage.lock():
        stage.prepare()
    (stage.path / "partial.bin").write_bytes(b"half")
    with stage.lock():
        stage.prepare(clean=True)
    assert [p.name for p in stage.path.iterdir()] == [".started"]  # only the new build's start time


def test_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "table.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError, match="crash mid-write"):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json"]


def test_kill_9_during_atomic_write_leaves_no_target(tmp_path):
    target = tmp_path / "manifest.json"
    code = (
        "import os, signal, sys\n"
        "from storage.atomic import atomic_path\n"
        "with atomic_path(__import__('pathlib').Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_text('{\"partial\": ')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=os.getcwd())
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()  # a reader sees no manifest: the stage is not done
    assert [p.name.startswith(".tmp-manifest.json.") for p in tmp_path.iterdir()] == [True]


def test_atomic_write_replaces_content_whole(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_prepare_needs_the_stage_lock(tiers):
    stage = stage_dir(tiers, "fast", "demo", {})
    with pytest.raises(RuntimeError, match=r"prepare\(\) needs the stage's lock"):
        stage.prepare()
    with stage.lock(), stage.lock():  # re-entrant within a process
        assert stage.locked_here and stage.prepare() == stage.path
    assert not stage.locked_here
