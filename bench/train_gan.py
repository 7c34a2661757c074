"""GAN training throughput: the critic's pretraining and the GAN phase (generator and critic steps
alternating one for one), U-Net generator (ResNet-34 encoder) x4 to --size px and fastai's critic,
bf16 autocast (the critic in fp32), channels_last, end to end from aligned HDF5 stores through the
loader vs the same steps on a batch already on the device (baseline, same run).

usage: python bench/train_gan.py [--size 128] [--batch 16] [--images 2048] [--steps 40] [--warmup 8]
                                 [--workers 8] [--critic-nf 128]
Small CPU check: --size 32 --batch 4 --images 32 --steps 3 --warmup 1 --workers 1 --critic-nf 8
Ends with one line per phase: RESULT phase=... size=... images_per_s=... on_device_images_per_s=... busy=...
loader_wait=... peak_gib=...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainbench import device_info, loader_vs_resident, print_results, synthetic_store, timed_training  # noqa: E402

from models.data import make_loader, to_unit  # noqa: E402
from models.gan import CriticLoss  # noqa: E402
from models.superres import make_generator  # noqa: E402
from models.train import ModelStep  # noqa: E402
from training.gan import CriticConfig, GanStep, gan_optimizer  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--critic-nf", type=int, default=128, help="fastai's default width")
    ap.add_argument("--encoder", default="resnet34")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_info(device)}")
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        low_store = synthetic_store(Path(tmp) / "low.h5", args.images, args.size // 4)
        high_store = synthetic_store(Path(tmp) / "high.h5", args.images, args.size, seed=1)
        loader = make_loader(low_store, args.batch, target_store=high_store, num_workers=args.workers, drop_last=True)

        def pairs(low, high):  # the GAN phase: (crappified, original)
            return to_unit(low, device), to_unit(high, device)

        def critic_batch(low, high):  # critic pretraining: generated stand-ins and originals, labelled
            fake = torch.nn.functional.interpolate(to_unit(low, device), size=args.size)
            return torch.cat([fake, to_unit(high, device)]), torch.cat([torch.zeros(len(low)), torch.ones(len(high))])

        def critic_step():
            torch.manual_seed(0)
            critic = CriticConfig(nf=args.critic_nf).fitted(args.size).critic()
            return ModelStep(critic, torch.optim.AdamW(critic.parameters(), lr=1e-3), CriticLoss())

        def gan_step():
            torch.manual_seed(0)
            generator = make_generator("unet", 4, encoder=args.encoder, pretrained=False)
            critic = CriticConfig(nf=args.critic_nf).fitted(args.size).critic()
            # threshold above any BCE: the switcher alternates one critic step, one generator step
            return GanStep(generator, critic, gan_optimizer(generator, 1e-4, 1e-3), gan_optimizer(critic, 5e-4, 1e-3),
                           critic_thresh=1e9)

        for phase, make, prepare, per_step in (("critic", critic_step, critic_batch, 2 * args.batch),
                                               ("gan", gan_step, pairs, args.batch)):
            def run(batches, make=make, per_step=per_step):
                return timed_training(make(), batches, steps=args.steps, warmup=args.warmup, batch_size=per_step,
                                      device=device)

            result = {"phase": phase, "size": args.size} | loader_vs_resident(run, loader, prepare, device)
            print(f"{phase} at {args.size} px, batch {args.batch}: {result['images_per_s']:,.1f} img/s end to end, "
                  f"{result['on_device_images_per_s']:,.1f} on-device; loader wait {result['loader_wait']:.1%}")
            results.append(result)
    print_results(results)
    return results


if __name__ == "__main__":
    main()
