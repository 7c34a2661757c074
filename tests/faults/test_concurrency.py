"""Two runs of one stage at once: the stage lock makes the second wait (or, asked not to wait,
fail with a clear message), the work is done once, and a killed holder never blocks anyone."""

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from prep.sample import SampleStage, build_sample
from storage.stage import StageBusy, run_stage
from storage.tiers import Tiers
from tests.faults.test_kill import _digests, kill_when

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _sample_run(tiers: Tiers, spec: SampleStage, *, wait: bool = True) -> subprocess.Popen:
    code = ("import logging, sys\nlogging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
            "from storage.stage import run_stage\nfrom storage.tiers import Tiers\nfrom prep.sample import SampleStage\n"
            f"run_stage(Tiers(fast={str(tiers.fast)!r}, bulk={str(tiers.bulk)!r}), {spec!r}, wait={wait})\n")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@contextmanager
def held_by_another_process(spec, tiers: Tiers):
    """Another process holds ``spec``'s stage lock for the duration; yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom prep.sample import SampleStage\nfrom storage.tiers import Tiers\n"
        f"stage = {spec!r}.stage_dir(Tiers(fast={str(tiers.fast)!r}, bulk={str(tiers.bulk)!r}))\n"
        "with stage.lock():\n    print('held', flush=True)\n    time.sleep(300)\n")], cwd=REPO, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_two_processes_on_one_stage_both_finish_and_the_work_is_done_once(tmp_path):
    tiers = Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")
    spec = SampleStage(seed=3, train_per_class=12, val_per_class=2)
    first = _sample_run(tiers, spec)
    stage = spec.stage_dir(tiers)
    deadline = time.monotonic() + 120
    while not stage.lock_path.is_file() or not stage.lock_path.read_text():  # the first holds the lock
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.01)
    second = _sample_run(tiers, spec)
    outs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    built = [out for out in outs if "sample: built" in out]
    assert len(built) == 1, outs  # the work is done once
    waited = outs[1]
    assert f"waiting for pid {first.pid}" in waited and "was completed by another run" in waited, waited
    build_sample(tmp_path / "single", seed=3, train_per_class=12, val_per_class=2)
    assert _digests(stage.path) == _digests(tmp_path / "single")  # bytes equal a single run


def test_no_wait_fails_at_once_naming_the_holder(tmp_path):
    tiers = Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")
    spec = SampleStage(seed=4, train_per_class=1, val_per_class=0)
    stage = spec.stage_dir(tiers)
    with held_by_another_process(spec, tiers) as pid:
        start = time.monotonic()
        with pytest.raises(StageBusy, match=rf"is being built by pid {pid} on .* since .*--no-wait"):
            run_stage(tiers, spec, wait=False)
        assert time.monotonic() - start < 5 and not stage.is_complete
        assert json.loads(stage.lock_path.read_text())["pid"] == pid
    run_stage(tiers, spec, wait=False)  # the holder is gone: its lock went with it
    assert stage.is_complete


def test_a_killed_holder_does_not_block_the_next_run(tmp_path):
    tiers = Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")
    spec = SampleStage(seed=6, train_per_class=30, val_per_class=0)
    stage = spec.stage_dir(tiers)
    kill_when(f"from storage.stage import run_stage\nfrom storage.tiers import Tiers\nfrom prep.sample import SampleStage\n"
              f"run_stage(Tiers(fast={str(tiers.fast)!r}, bulk={str(tiers.bulk)!r}), {spec!r})",
              lambda: len(list(stage.path.glob("train/*/*.JPEG"))) >= 5)
    assert stage.lock_path.is_file() and not stage.is_complete  # the lock file stays; the lock does not
    run_stage(tiers, spec, wait=False)
    assert stage.is_complete


def test_two_pipeline_flow_runs_at_once_both_complete(prefect_server, tmp_path):
    """Two flow runs of the same pipeline, started 1 s apart against the real server (each its own
    process, as two deployments' runs would be): both end Completed with the same stage directories."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "IMAGESMITH_FAST_DIR": str(tmp_path / "fast"),
           "IMAGESMITH_BULK_DIR": str(tmp_path / "bulk")}
    code = ("import json\nfrom flows.pipeline import pipeline\n"
            "state = pipeline(sample_train_per_class=6, sample_val_per_class=2, size=32, shard_images=10,"
            " crappifier='downscale', crappify_size=16, return_state=True)\n"
            "print('RESULT', state.name, json.dumps(state.result()))\n")
    runs = []
    for _ in range(2):
        runs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
        time.sleep(1)
    outs = [p.communicate(timeout=400)[0] for p in runs]
    results = [line.split(" ", 2) for out in outs for line in out.splitlines() if line.startswith("RESULT ")]
    assert [p.returncode for p in runs] == [0, 0] and len(results) == 2, outs
    assert [r[1] for r in results] == ["Completed", "Completed"]
    assert json.loads(results[0][2]) == json.loads(results[1][2])


def test_run_with_no_wait_exits_75_naming_the_holder(prefect_server, tmp_path, monkeypatch, capsys):
    from imagesmith.cli import main

    tiers = Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")
    monkeypatch.setenv("IMAGESMITH_FAST_DIR", str(tiers.fast))
    monkeypatch.setenv("IMAGESMITH_BULK_DIR", str(tiers.bulk))
    with held_by_another_process(SampleStage(), tiers) as pid:  # the sample `imagesmith run` builds first
        assert main(["run", "--no-wait", "--size", "16"]) == 75
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: stage 'sample'") and f"is being built by pid {pid}" in last, last
