"""Data-parallel training (DDP) on CPU with gloo, 2 processes launched by torchrun: the ranks'
rows, one step against a 1-process step, a whole stage against a 1-process run, the spec handed
to the ranks, and a kill -9 of a DDP run resumed to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import ChunkShuffleStream
from storage.hdf5 import ShardWriter
from storage.stage import run_stage, spec_from_json, spec_to_json
from storage.tiers import Tiers

REPO = Path(__file__).resolve().parents[1]


def _numbered_store(path: Path, n: int) -> Path:
    """A store whose row i is an image holding i (pixel [0, 0]: i % 256, i // 256), label i % 7."""
    with ShardWriter(path, size=4, chunk_images=16) as w:
        for i in range(n):
            img = np.zeros((4, 4, 3), np.uint8)
            img[0, 0, 0], img[0, 0, 1] = i % 256, i // 256
            w.add(img, i % 7, i, f"x/{i}.JPEG")
    return path


def _rows(stream: ChunkShuffleStream) -> list[int]:
    return [int(x[k, 0, 0, 0]) + 256 * int(x[k, 0, 0, 1]) for x, _ in stream for k in range(len(x))]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_see_disjoint_rows_that_together_cover_the_epoch(tmp_path, world):
    store = _numbered_store(tmp_path / "s.h5", 203)
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            s = ChunkShuffleStream(store, 5, rank=rank, world=world, seed=3, buffer_blocks=2)
            s.set_epoch(epoch)
            rows = _rows(s)
            assert len(rows) == 203 // world == s.rows_per_epoch  # every rank the same count
            seen.append(rows)
        flat = [r for rows in seen for r in rows]
        assert len(set(flat)) == len(flat) == 203 // world * world  # disjoint; the n % world rest left out
        if epoch == 0:
            first = [set(r) for r in seen]
    assert [set(r) for r in seen] != first  # another epoch, another split (a function of seed and epoch)
    # one rank of one: the whole store, as before
    assert sorted(_rows(ChunkShuffleStream(store, 5, seed=3))) == list(range(203))


def test_ranks_split_the_kept_rows_when_classes_are_held_out(tmp_path):
    store = _numbered_store(tmp_path / "s.h5", 140)
    keep = [0, 1, 2, 3, 4]  # labels 5 and 6 held out: 100 rows kept
    rows = [_rows(ChunkShuffleStream(store, 4, rank=r, world=2, keep_labels=keep)) for r in range(2)]
    assert len(rows[0]) == len(rows[1]) == 50 and not set(rows[0]) & set(rows[1])
    assert all(r % 7 in keep for r in rows[0] + rows[1])


def _torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


ONE_STEP = '''
import sys, torch
from models import distributed
from models.train import ModelStep
distributed.setup()
rank, world = distributed.rank_and_world()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
step = ModelStep(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss)
step.distribute(lambda m: distributed.wrap(m, torch.device("cpu")))
g = torch.Generator().manual_seed(1)
x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
half = len(x) // world
step.step(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half], lr=0.1, momentum=None,
          group_scales=None, device=torch.device("cpu"), bf16=False)
if rank == 0:
    torch.save(model.state_dict(), sys.argv[1])
distributed.teardown()
import os
os._exit(0)  # as training.distributed.main: no interpreter finalisation with gloo threads about
'''


@pytest.mark.slow
def test_a_ddp_step_on_half_batches_equals_one_step_on_the_whole_batch_batchnorm_included(tmp_path):
    from models.train import ModelStep

    script = tmp_path / "one_step.py"
    script.write_text(ONE_STEP)
    done = _torchrun(script, str(tmp_path / "ddp.pt"))
    assert done.returncode == 0, done.stdout + done.stderr
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    ModelStep(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss).step(
        x, y, lr=0.1, momentum=None, group_scales=None, device=torch.device("cpu"), bf16=False)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, value in model.state_dict().items():
        # gradients averaged over the ranks; BatchNorm statistics (and running stats) over both halves
        assert torch.allclose(ddp[name].float(), value.float(), atol=1e-6), (name, ddp[name], value)


@pytest.fixture(scope="module")
def pairs(resized, tmp_path_factory):
    from prep.crappify import CrappifyConfig, CrappifyStage

    root = tmp_path_factory.mktemp("ddp")
    tiers = Tiers(fast=root / "fast", bulk=root / "bulk")
    return run_stage(tiers, CrappifyStage(source=str(resized(32).path), cores=1,
                                          config=CrappifyConfig(crappifier="downscale", size=8)))


def _superres(pairs, batch_size: int, lr: float, epochs: int = 3):
    from models.schedule import Phase
    from training.superres import SuperResConfig, SuperResStage

    config = SuperResConfig(arch="johnson", loss="pixel", batch_size=batch_size, pretrained=False, num_workers=1,
                            augment=False, phases=(Phase(epochs, lr, "constant"),))
    return SuperResStage(pairs=(str(pairs.path),), config=config, device="cpu")


def test_a_spec_survives_the_trip_to_the_ranks(pairs, tmp_path):
    spec = _superres(pairs, 4, 1e-3)
    back = spec_from_json(spec_to_json(spec))
    assert back == spec and back.config.phases == spec.config.phases
    tiers = Tiers(fast=tmp_path / "f", bulk=tmp_path / "b")
    assert back.stage_dir(tiers).path == spec.stage_dir(tiers).path
    with pytest.raises(ValueError, match="only hold imagesmith classes"):
        spec_from_json(json.dumps({"__dataclass__": "os:system", "fields": {}}))


@pytest.mark.slow
def test_superres_on_2_ranks_tracks_a_1_process_run_with_the_same_global_batch(pairs, tmp_path):
    from training.distributed import run_distributed

    def losses(stage):
        return [h["loss"] for h in json.loads((stage.path / "history.json").read_text())]

    # 2 ranks x 4 images vs 1 process x 8 images, both at 2e-3 (AdamW: no lr scaling on 2 ranks)
    lines: list[str] = []
    two = run_distributed(Tiers(fast=tmp_path / "2", bulk=tmp_path / "2b"), _superres(pairs, 4, 2e-3, 12), 2,
                          log_line=lines.append)
    one = run_stage(Tiers(fast=tmp_path / "1", bulk=tmp_path / "1b"), _superres(pairs, 8, 2e-3, 12))
    m2, ddp, single = two.manifest(), losses(two), losses(one)
    assert m2["epochs"] == 12 and (two.path / "model.pt").is_file()
    assert any("'ranks': 2" in line and "'lr': 0.002" in line for line in lines), lines
    # each rank reads its own rows, so the batches differ from the 1-process run's: the curves agree
    # as two runs with different shuffles do. Measured: epoch 1 0.127 vs 0.081 (7 steps from random
    # weights), mean of the last 4 epochs 0.0322 vs 0.0308 (4.5%). Same batches: the next test.
    tail_ddp, tail_one = sum(ddp[-4:]) / 4, sum(single[-4:]) / 4
    assert ddp[-1] < ddp[0] / 2 and abs(tail_ddp / tail_one - 1) < 0.15, (ddp, single)


LOOP = '''
import os, sys, torch
from pathlib import Path
from models import distributed
from models.losses import pixel_mse
from models.schedule import Phase, PhaseSchedule
from models.superres import JohnsonNet
from models.train import ModelStep, TrainConfig, train
distributed.setup()
rank, world = distributed.rank_and_world()
torch.manual_seed(0)
model = JohnsonNet(4)  # BatchNorm inside: synchronised over the ranks
g = torch.Generator().manual_seed(1)
X, Y = torch.rand(56, 3, 8, 8, generator=g), torch.rand(56, 3, 32, 32, generator=g)
b = 8 // world

def batches(epoch, phase):  # the same global batches of 8 on 1 or 2 ranks, each rank its half
    for i in range(7):
        yield X[i * 8:(i + 1) * 8][rank * b:(rank + 1) * b], Y[i * 8:(i + 1) * 8][rank * b:(rank + 1) * b]

history = train(ModelStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), pixel_mse),
                PhaseSchedule([Phase(3, 2e-3)], 7), batches,
                TrainConfig(checkpoint_dir=Path(sys.argv[1]) / f"rank{rank}", device="cpu", progress=False))
if rank == 0:
    Path(sys.argv[2]).write_text(",".join(str(h["loss"]) for h in history))
distributed.teardown()
os._exit(0)
'''


@pytest.mark.slow
def test_the_loop_on_2_ranks_with_the_same_global_batches_gives_the_1_process_curve(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    done = _torchrun(script, str(tmp_path / "ckpt2"), str(tmp_path / "two.txt"))
    assert done.returncode == 0, done.stdout + done.stderr
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt1"), str(tmp_path / "one.txt")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two_curve = [float(v) for v in (tmp_path / "two.txt").read_text().split(",")]
    one_curve = [float(v) for v in (tmp_path / "one.txt").read_text().split(",")]
    # the same lr (AdamW: not scaled on 2 ranks); gradients and BatchNorm statistics over both halves:
    # the same curve up to float summation order (measured: 0.151489 vs 0.151493 ... 0.106142 vs 0.105829)
    assert len(two_curve) == 3 and all(abs(a / b - 1) < 0.01 for a, b in zip(two_curve, one_curve)), \
        (two_curve, one_curve)


@pytest.mark.slow
def test_a_ddp_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(pairs, tmp_path):
    from tests.faults.test_kill import descendants
    from training.distributed import run_distributed

    spec = _superres(pairs, 4, 1e-3, epochs=4)
    killed = Tiers(fast=tmp_path / "k", bulk=tmp_path / "kb")
    stage = spec.stage_dir(killed)
    code = (f"from storage.stage import spec_from_json\nfrom storage.tiers import Tiers\n"
            f"from training.distributed import run_distributed\n"
            f"run_distributed(Tiers(fast={str(killed.fast)!r}, bulk={str(killed.bulk)!r}), "
            f"spec_from_json({spec_to_json(spec)!r}), 2)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and \
            not (stage.path / "leg-0-store" / "last.pt").is_file():
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the kill"
    left = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, torchrun and both ranks, at once
    proc.wait()
    for pid in left:  # and nothing of it lives on
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    assert not stage.is_complete
    resumed = run_distributed(killed, spec, 2)
    straight = run_distributed(Tiers(fast=tmp_path / "s", bulk=tmp_path / "sb"), spec, 2)
    from models.train import load_checkpoint

    a, b = load_checkpoint(resumed.path / "model.pt")["model"], load_checkpoint(straight.path / "model.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_devise_finetune_on_2_ranks_tracks_a_1_process_run_with_the_same_global_batch(resized, word_table, tmp_path):
    from training.devise.features import FeaturesConfig, FeaturesStage
    from training.devise.finetune import FinetuneConfig, FinetuneStage
    from training.devise.head import DeviseStage, HeadConfig
    from training.distributed import run_distributed

    tiers = Tiers(fast=tmp_path / "f", bulk=tmp_path / "b")
    features = run_stage(tiers, FeaturesStage(resize=str(resized(32).path), device="cpu", config=FeaturesConfig(
        backbone="resnet18", pretrained=False, batch_size=16)))
    head = run_stage(tiers, DeviseStage(features=str(features.path), words=str(word_table.path), device="cpu",
                                        config=HeadConfig(epochs=4, batch_size=8, hidden=32, zero_shot=("n03790512",),
                                                          softmax_baseline=False)))

    def finetune(batch_size: int, lr: float, gpus: int = 1):
        return FinetuneStage(devise=str(head.path), device="cpu", gpus=gpus,
                             config=FinetuneConfig(epochs=8, batch_size=batch_size, num_workers=1, lr=lr))

    two = run_distributed(Tiers(fast=tmp_path / "2", bulk=tmp_path / "2b"), finetune(4, 1e-3, gpus=2), 2)
    one = run_stage(Tiers(fast=tmp_path / "1", bulk=tmp_path / "1b"), finetune(8, 1e-3))
    ddp = [h["loss"] for h in json.loads((two.path / "metrics.json").read_text())["history"]]
    single = [h["loss"] for h in json.loads((one.path / "metrics.json").read_text())["history"]]
    assert [h["ranks"] for h in json.loads((two.path / "metrics.json").read_text())["history"]] == [2] * 8
    # the body's BatchNorm is frozen (as on one process), the head's synchronised; the rows differ.
    # Measured: mean of the last 3 epochs 0.581 (2 ranks) vs 0.594 (1 process)
    tail_ddp, tail_one = sum(ddp[-3:]) / 3, sum(single[-3:]) / 3
    assert ddp[-1] < ddp[0] and abs(tail_ddp / tail_one - 1) < 0.15, (ddp, single)
    assert two.manifest()["metrics"] and (two.path / "model.pt").is_file()
