"""kill -9 in the middle of every stage that writes for a while, then a rerun: the outputs equal
an uninterrupted run's, and finished work is not redone."""

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from prep.crappify import CrappifyConfig, CrappifyStage
from prep.resize import ResizeConfig, ResizeStage
from prep.sample import SAMPLE_PHOTOS, SampleStage, build_sample
from storage.stage import run_stage
from storage.tiers import Tiers
from tests.helpers import run_listing

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def kill_when(code: str, ready: Callable[[], bool], *, timeout: float = 180) -> None:
    """Run ``code`` in a new Python process and kill -9 it as soon as ``ready()`` holds."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.002)
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill: it must be longer"
    left = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # nothing the run started outlives it (DataLoader workers, their fork server, shard processes)
    deadline = time.monotonic() + 15
    while (alive := [p for p in left if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"processes of the killed run are still running: {alive}"


def descendants(pid: int) -> list[int]:
    """Process ids of everything ``pid`` started, and what those started (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _tiers(root: Path, name: str) -> Tiers:
    return Tiers(fast=root / name / "fast", bulk=root / name / "bulk")


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.JPEG"))}


def test_sample_stage_killed_mid_build_is_redone_identically(tmp_path):
    """The sample is redone as a whole (an interrupted build left an unknown subset of files)."""
    tiers = _tiers(tmp_path, "a")
    spec = SampleStage(seed=5, train_per_class=30, val_per_class=0)
    stage = spec.stage_dir(tiers)
    kill_when(f"from storage.stage import run_stage\nfrom storage.tiers import Tiers\nfrom prep.sample import SampleStage\n"
              f"run_stage(Tiers(fast={str(tiers.fast)!r}, bulk={str(tiers.bulk)!r}), {spec!r})",
              lambda: len(list(stage.path.glob("train/*/*.JPEG"))) >= 20)
    written = len(list(stage.path.glob("train/*/*.JPEG")))
    assert 20 <= written < 30 * len(SAMPLE_PHOTOS), "the kill should land mid-build"
    assert not stage.is_complete
    run_stage(tiers, spec)
    assert stage.is_complete
    build_sample(tmp_path / "fresh", seed=5, train_per_class=30, val_per_class=0)
    assert _digests(stage.path) == _digests(tmp_path / "fresh")


@pytest.fixture(scope="module")
def big_listing(tmp_path_factory):
    """A listing of 210 real images (14 per class): enough work for a kill to land mid-stage."""
    root = tmp_path_factory.mktemp("big")
    build_sample(root / "ds", seed=2, train_per_class=14, val_per_class=0, plant_bad_inputs=False)
    return run_listing(_tiers(root, "shared"), root / "ds")


def test_resize_killed_mid_stage_redoes_only_missing_shards_and_matches(big_listing, tmp_path):
    tiers = _tiers(tmp_path, "a")
    spec = ResizeStage(listing=str(big_listing.path), config=ResizeConfig(size=224, shard_images=12), cores=1)
    stage = spec.stage_dir(tiers)
    shards = stage.path / "shards"
    kill_when(f"from storage.stage import run_stage\nfrom storage.tiers import Tiers\n"
              f"from prep.resize import ResizeConfig, ResizeStage\n"
              f"run_stage(Tiers(fast={str(tiers.fast)!r}, bulk={str(tiers.bulk)!r}), {spec!r})",
              lambda: len(list(shards.glob("train-*.h5"))) >= 3)
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("train-*.h5")}
    assert 3 <= len(done) < 18, "the kill should land mid-stage (210 images in 18 shards)"
    assert not stage.is_complete and not (stage.path / "train.h5").exists()

    run_stage(tiers, spec)
    assert stage.is_complete
    assert {name: (shards / name).stat().st_mtime_ns for name in done} == done  # finished shards not redone
    assert len(list(shards.glob("train-*.h5"))) == 18
    assert not list(shards.glob(".tmp-*"))  # the killed writer's temporary file was cleared
    fresh = run_stage(_tiers(tmp_path, "b"), spec)
    with h5py.File(stage.path / "train.h5") as a, h5py.File(fresh.path / "train.h5") as b:
        assert a["images"].shape == (210, 224, 224, 3)
        assert a["images"][()].tobytes() == b["images"][()].tobytes()
        np.testing.assert_array_equal(a["labels"][()], b["labels"][()])


def test_crappify_killed_mid_stage_redoes_only_missing_shards_and_matches(big_listing, tmp_path):
    source = run_stage(_tiers(tmp_path, "src"), ResizeStage(listing=str(big_listing.path),
                                                            config=ResizeConfig(size=64)))
    tiers = _tiers(tmp_path, "a")
    spec = CrappifyStage(source=str(source.path), config=CrappifyConfig(size=32, shard_images=10), cores=1)
    stage = spec.stage_dir(tiers)
    shards = stage.path / "shards"
    # each image takes 10 ms more in the killed process, so that the kill lands among its 21 shards
    # (the bytes do not depend on how long an image takes)
    slow = ("import time, prep.crappify as c\nmake = c.make_crappifier\n"
            "def slow(name, size):\n    f = make(name, size)\n"
            "    return lambda image, rng: (time.sleep(0.01), f(image, rng))[1]\n"
            "c.make_crappifier = slow\n")
    kill_when(slow + f"from storage.stage import run_stage\nfrom storage.tiers import Tiers\n"
                     f"from prep.crappify import CrappifyConfig, CrappifyStage\n"
                     f"run_stage(Tiers(fast={str(tiers.fast)!r}, bulk={str(tiers.bulk)!r}), {spec!r})",
              lambda: len(list(shards.glob("train-*.h5"))) >= 3)
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("train-*.h5")}
    assert 3 <= len(done) < 21 and not stage.is_complete
    run_stage(tiers, spec)
    assert {name: (shards / name).stat().st_mtime_ns for name in done} == done
    fresh = run_stage(_tiers(tmp_path, "b"), spec)
    with h5py.File(stage.path / "train.h5") as a, h5py.File(fresh.path / "train.h5") as b:
        assert a["images"][()].tobytes() == b["images"][()].tobytes()


# --- trainers: kill -9 after a checkpoint, resume in this process, equal to a straight run ---------


def _same_model(a: Path, b: Path) -> None:
    from models.train import load_checkpoint

    sa, sb = load_checkpoint(a / "model.pt")["model"], load_checkpoint(b / "model.pt")["model"]
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _kill_resume_compare(spec, checkpoint: str, tmp_path: Path, imports: str) -> None:
    tiers = _tiers(tmp_path, "killed")
    stage = spec.stage_dir(tiers)
    kill_when(f"{imports}\nfrom storage.stage import run_stage\nfrom storage.tiers import Tiers\n"
              f"run_stage(Tiers(fast={str(tiers.fast)!r}, bulk={str(tiers.bulk)!r}), {spec!r})",
              lambda: (stage.path / checkpoint / "last.pt").is_file())
    assert not stage.is_complete, "the kill should land after a checkpoint, before the end"
    resumed = run_stage(tiers, spec)
    straight = run_stage(_tiers(tmp_path, "straight"), spec)
    _same_model(resumed.path, straight.path)


def test_superres_killed_after_a_checkpoint_resumes_to_the_same_weights(resized, tmp_path):
    from models.schedule import Phase
    from training.superres import SuperResConfig, SuperResStage

    high = resized(32)
    low = run_stage(_tiers(tmp_path, "src"), CrappifyStage(source=str(high.path), cores=1,
                                                           config=CrappifyConfig(crappifier="downscale", size=8)))
    config = SuperResConfig(arch="johnson", loss="pixel", batch_size=4, pretrained=False, num_workers=2,
                            phases=(Phase(8, (3e-3, 1e-4), "cosine"),))
    spec = SuperResStage(pairs=(str(low.path),), config=config, device="cpu")
    _kill_resume_compare(spec, "leg-0-store", tmp_path,
                         "from models.schedule import Phase\nfrom training.superres import SuperResConfig, SuperResStage")


def test_fast_style_killed_after_a_checkpoint_resumes_to_the_same_weights(resized, tmp_path):
    from training.style import FastStyleConfig, FastStyleStage, default_style, file_digest

    style = default_style()
    config = FastStyleConfig(epochs=4, batch_size=8, nf=8, n_res=1, eval_images=4, grid_rows=2, num_workers=2)
    spec = FastStyleStage(images=str(resized(32).path), style_digest=file_digest(style), config=config,
                          style=str(style), device="cpu")
    _kill_resume_compare(spec, "train", tmp_path, "from training.style import FastStyleConfig, FastStyleStage")


@pytest.fixture(scope="module")
def devise_features(resized, tmp_path_factory):
    from training.devise.features import FeaturesConfig, FeaturesStage

    root = tmp_path_factory.mktemp("features")
    return run_stage(_tiers(root, "f"), FeaturesStage(resize=str(resized(32).path), device="cpu",
                                                       config=FeaturesConfig(backbone="resnet18", pretrained=False,
                                                                             batch_size=16)))


def test_devise_head_killed_after_a_checkpoint_resumes_to_the_same_weights(devise_features, word_table, tmp_path):
    from training.devise.head import DeviseStage, HeadConfig

    config = HeadConfig(epochs=60, batch_size=8, hidden=32, dropout=0.2, zero_shot=("n03790512",),
                        softmax_baseline=False)
    spec = DeviseStage(features=str(devise_features.path), words=str(word_table.path), config=config, device="cpu")
    _kill_resume_compare(spec, "devise", tmp_path, "from training.devise.head import DeviseStage, HeadConfig")


def test_devise_finetune_with_loader_workers_killed_after_a_checkpoint_resumes_to_the_same_weights(
        devise_features, word_table, tmp_path):
    """The real DataLoader with 2 worker processes: resume is exact only if the loader draws nothing
    from the global RNG (it used to draw its workers' base seed after the RNG state was restored)."""
    from training.devise.finetune import FinetuneConfig, FinetuneStage
    from training.devise.head import DeviseStage, HeadConfig

    head = run_stage(_tiers(tmp_path, "head"), DeviseStage(
        features=str(devise_features.path), words=str(word_table.path), device="cpu",
        config=HeadConfig(epochs=4, batch_size=8, hidden=32, zero_shot=("n03790512",), softmax_baseline=False)))
    spec = FinetuneStage(devise=str(head.path), device="cpu",
                         config=FinetuneConfig(epochs=6, batch_size=6, num_workers=2, lr=1e-3))
    _kill_resume_compare(spec, "finetune", tmp_path, "from training.devise.finetune import FinetuneConfig, FinetuneStage")


STOPPABLE = '''
import sys, torch
from pathlib import Path
from models.losses import pixel_mse
from models.schedule import Phase, PhaseSchedule
from models.superres import JohnsonNet
from models.train import ModelStep, TrainConfig, TrainingStopped, train
torch.manual_seed(0)
model = JohnsonNet(2, n_res=1, nf=8)
g = torch.Generator().manual_seed(1)
X, Y = torch.rand(200, 3, 8, 8, generator=g), torch.rand(200, 3, 16, 16, generator=g)

def batches(epoch, phase):
    order = torch.randperm(200, generator=torch.Generator().manual_seed(epoch))
    for i in range(50):
        yield X[order[i * 4:(i + 1) * 4]], Y[order[i * 4:(i + 1) * 4]]

try:
    train(ModelStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), pixel_mse),
          PhaseSchedule([Phase(3, 1e-3)], 50), batches,
          TrainConfig(checkpoint_dir=Path(sys.argv[1]), device="cpu", progress=True))
except TrainingStopped as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)
torch.save(model.state_dict(), Path(sys.argv[1]) / "final.pt")
'''


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_checkpoints_that_step_and_the_resume_is_exact(tmp_path, signum):
    from models.train import load_checkpoint

    script = tmp_path / "stoppable.py"
    script.write_text(STOPPABLE)
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    proc = subprocess.Popen([sys.executable, str(script), str(stopped)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "step 11/50" not in seen:  # the progress line: the 11th step of epoch 1 is done
        seen += proc.stderr.read(1)
        assert seen or proc.poll() is None
    proc.send_signal(signum)
    err = seen + proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signum, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("stopped:")]
    name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
    assert len(lines) == 1 and f"{name}: training stopped at step" in lines[0] and "Traceback" not in err, err
    state = load_checkpoint(stopped / "last.pt")
    assert 11 <= state["step"] < 50  # mid-epoch 1: before the fix, no checkpoint until the epoch's end
    for d in (stopped, straight):
        done = subprocess.run([sys.executable, str(script), str(d)], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
    a, b = (torch.load(d / "final.pt", weights_only=True) for d in (stopped, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_checkpoints_by_wall_time_mid_epoch(tmp_path):
    from models.losses import pixel_mse
    from models.schedule import Phase, PhaseSchedule
    from models.superres import JohnsonNet
    from models.train import ModelStep, TrainConfig, load_checkpoint, train

    torch.manual_seed(0)
    model = JohnsonNet(2, n_res=1, nf=8)
    seen = []  # the checkpoint's step as each batch of the one epoch is drawn

    def batches(epoch, phase):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(6):
            ckpt = tmp_path / "last.pt"
            seen.append(load_checkpoint(ckpt)["step"] if ckpt.is_file() else None)
            time.sleep(0.06)
            yield torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 16, 16, generator=g)

    config = TrainConfig(checkpoint_dir=tmp_path, device="cpu", progress=False, checkpoint_minutes=0.1 / 60)
    train(ModelStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), pixel_mse), PhaseSchedule([Phase(1, 1e-3)], 6),
          batches, config)
    # checkpoints every 0.1 s of a 6-step epoch, not only at its end
    assert seen[0] is None and any(s is not None and 0 < s < 6 for s in seen), seen
    assert TrainConfig(checkpoint_dir=tmp_path).checkpoint_minutes == 10.0  # the default
