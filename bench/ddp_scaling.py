"""Data-parallel scaling: super-resolution training images/s on 1 process vs N (torchrun, DDP,
the shared loop), the same per-rank batch, end to end from one HDF5 store pair (each rank reads
its own rows). Efficiency = images/s on N / (N x images/s on 1): 1.0 is perfect scaling.

usage: python bench/ddp_scaling.py [--nproc 2] [--size 128] [--batch 32] [--steps 30] [--images 4096]
Small CPU check (gloo): --nproc 2 --size 32 --batch 2 --steps 4 --warmup 1 --images 64 --workers 0
Ends with: RESULT bench=ddp_scaling nproc=... images_per_s_1=... images_per_s_n=... efficiency=...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainbench import device_info, print_results, synthetic_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One rank (or the only process): time ``steps`` steps after ``warmup``; rank 0 writes images/s."""
    from models import distributed
    from models.data import make_loader, to_unit
    from models.schedule import Phase, PhaseSchedule
    from models.train import ModelStep, TrainConfig, train
    from training.superres import SuperResConfig, make_trainer

    distributed.setup()
    rank, world = distributed.rank_and_world()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, optimizer, loss_fn = make_trainer(SuperResConfig(arch=args.arch, loss=args.loss, pretrained=False), 4)
    loss_fn = loss_fn.to(device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
    loader = make_loader(args.low, args.batch, target_store=args.high, num_workers=args.workers, drop_last=True)
    marks: dict[str, float] = {}

    def batches(epoch, phase):
        loader.dataset.set_epoch(epoch)
        n = 0
        while True:
            for lo, hi in loader:
                if n == args.warmup:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    distributed.barrier()
                    marks["t0"] = time.perf_counter()
                yield to_unit(lo, device), to_unit(hi, device)
                n += 1

    with tempfile.TemporaryDirectory() as tmp:
        train(ModelStep(model, optimizer, loss_fn), PhaseSchedule([Phase(1, 1e-4)], args.steps), batches,
              TrainConfig(checkpoint_dir=Path(tmp) / f"rank{rank}", device=str(device), progress=False), resume=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier()
    seconds = time.perf_counter() - marks["t0"]
    if rank == 0:
        Path(args.out).write_text(json.dumps({"images_per_s": (args.steps - args.warmup) * args.batch * world / seconds}))
    distributed.teardown()
    sys.stdout.flush()
    os._exit(0)  # as training.distributed.main: no interpreter finalisation with gloo threads about


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="high-res side (inputs a quarter)")
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=4, help="loader workers per rank")
    ap.add_argument("--arch", default="unet")
    ap.add_argument("--loss", default="pixel")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_info(device)}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        low = synthetic_store(tmp / "low.h5", args.images, args.size // 4)
        high = synthetic_store(tmp / "high.h5", args.images, args.size, seed=1)
        common = [f"--low={low}", f"--high={high}", f"--batch={args.batch}", f"--steps={args.steps}",
                  f"--warmup={args.warmup}", f"--workers={args.workers}", f"--arch={args.arch}", f"--loss={args.loss}"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        rates = {}
        for n in (1, args.nproc):
            out = tmp / f"n{n}.json"
            launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc-per-node={n}"]
            done = subprocess.run([*launch, __file__, "--worker", f"--out={out}", *common], cwd=REPO, env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the {n}-process run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            rates[n] = json.loads(out.read_text())["images_per_s"]
    result = {"bench": "ddp_scaling", "nproc": args.nproc, "size": args.size, "batch_per_rank": args.batch,
              "images_per_s_1": rates[1], "images_per_s_n": rates[args.nproc],
              "efficiency": rates[args.nproc] / (args.nproc * rates[1])}
    print(f"super-res {args.arch}/{args.loss} at {args.size} px, {args.batch} a rank: 1 process "
          f"{rates[1]:,.1f} img/s, {args.nproc} processes {rates[args.nproc]:,.1f} img/s "
          f"(efficiency {result['efficiency']:.2f})")
    print_results([result])
    return [result]


if __name__ == "__main__":
    if "--worker" in sys.argv:
        wp = argparse.ArgumentParser()
        for name in ("--out", "--low", "--high", "--arch", "--loss"):
            wp.add_argument(name)
        for name in ("--batch", "--steps", "--warmup", "--workers"):
            wp.add_argument(name, type=int)
        wp.add_argument("--worker", action="store_true")
        worker(wp.parse_args())
    else:
        main()
