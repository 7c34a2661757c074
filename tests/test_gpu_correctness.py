"""Defects a CPU run does not show by itself (found by reading the code against fastai v1, the lesson
and the papers), each pinned by a test that failed on the code before its fix: hooks that move or
re-mode a trained model, the GAN pixel term's units, ranks that draw the same noise, the DDP
learning-rate rule, the lesson's frozen phase, gram matrices under autocast, the decoder's widths
and the DCGAN init."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from models.schedule import Phase, PhaseSchedule
from models.train import ModelStep, TrainConfig, train
from tests.test_train import Tiny

REPO = Path(__file__).resolve().parents[1]


def _batches(epoch, phase):
    g = torch.Generator().manual_seed(epoch)
    for _ in range(3):
        yield torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)


def _tiny_run(tmp_path, **hooks):
    torch.manual_seed(0)
    model = Tiny()
    step = ModelStep(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)
    train(step, PhaseSchedule([Phase(2, 0.1)], 3), _batches,
          TrainConfig(checkpoint_dir=tmp_path, device="cpu", progress=False), **hooks)
    return model


# --- 1. hooks never move or re-mode a trained module ------------------------------------------


def test_the_loop_stops_a_hook_that_moves_a_trained_module_and_names_the_hook(tmp_path):
    def moves(record):
        record_model[0].to("meta")

    record_model = []
    torch.manual_seed(0)
    model = Tiny()
    record_model.append(model)
    step = ModelStep(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)
    with pytest.raises(RuntimeError, match=r"the on_epoch hook moved the trained module 'model' from \['cpu'\] "
                                           r"to \['meta'\]"):
        train(step, PhaseSchedule([Phase(2, 0.1)], 3), _batches,
              TrainConfig(checkpoint_dir=tmp_path, device="cpu", progress=False), on_epoch=moves)


def test_the_loop_stops_a_hook_that_changes_a_trained_modules_mode(tmp_path):
    seen = []

    def flips(step_fn):
        step_fn.model.train()  # the loop put it in eval mode for evaluation
        seen.append(True)
        return {}

    with pytest.raises(RuntimeError, match="the evaluate hook changed the train/eval mode of the trained module"):
        _tiny_run(tmp_path, evaluate=flips)
    assert seen == [True]  # caught after the first evaluation, not later


def test_a_hook_that_restores_what_it_changes_passes(tmp_path):
    from models.train import eval_mode

    def looks(record):
        with eval_mode(model_ref[0]):
            model_ref[0](torch.zeros(1, 3, 8, 8))

    model_ref = []
    torch.manual_seed(0)
    model = Tiny()
    model_ref.append(model)
    step = ModelStep(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)
    history = train(step, PhaseSchedule([Phase(2, 0.1)], 3), _batches,
                    TrainConfig(checkpoint_dir=tmp_path, device="cpu", progress=False), on_epoch=looks)
    assert len(history) == 2 and model.training


def test_sample_grids_leave_a_model_in_training_mode_where_it_is(tmp_path):
    # the GAN phase's on_epoch drew its grid with model.cpu().eval(): on CUDA the generator being
    # trained moved to the CPU (optimizer state and batches stayed on the GPU), and it left eval mode on
    from storage.hdf5 import ShardWriter
    from training.superres import sample_grid_png

    import numpy as np

    for name, size in (("low", 8), ("high", 16)):
        with ShardWriter(tmp_path / f"{name}.h5", size=size) as w:
            for i in range(4):
                w.add(np.full((size, size, 3), 40 * i, np.uint8), 0, i, f"x/{i}.JPEG")
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train()
    frozen_part = model[2].eval()  # a submodule kept in eval mode stays so
    png = sample_grid_png([model], tmp_path / "low.h5", tmp_path / "high.h5", n=4)
    assert png[:4] == b"\x89PNG"
    assert model.training and model[1].training and not frozen_part.training


def test_the_gan_phase_trains_two_epochs_with_samples_and_evaluation_without_tripping_the_guard(tmp_path):
    """The on_epoch and evaluate hooks of the GAN stage run under the loop's guard (2 epochs, a val split)."""
    from tests.test_gan import TinyGenerator, _pairs
    from training.gan import GanStep, gan_optimizer
    from models.gan import Critic
    from training.superres import predict

    torch.manual_seed(0)
    g, c = TinyGenerator(), Critic(nf=4, n_blocks=1)
    step = GanStep(g, c, gan_optimizer(g, 1e-3, 1e-3), gan_optimizer(c, 5e-3, 1e-3), critic_thresh=1e9)
    low, high = _pairs(8)
    grids = []

    def on_epoch(record):
        grids.append(predict(step.generator, low[:2]))

    def evaluate(step_fn):
        return {"psnr": float(-10 * torch.log10(F.mse_loss(predict(step_fn.generator, low), high)))}

    history = train(step, PhaseSchedule([Phase(2, 1e-3)], 2),
                    lambda e, p: iter([(low[:4], high[:4]), (low[4:], high[4:])]),
                    TrainConfig(checkpoint_dir=tmp_path, device="cpu", progress=False),
                    evaluate=evaluate, on_epoch=on_epoch)
    assert len(history) == 2 and len(grids) == 2 and all(math.isfinite(h["valid_psnr"]) for h in history)


# --- 2. the GAN pixel term in the lesson's units ------------------------------------------------


def test_the_normalised_mse_is_the_per_channel_mse_over_std_squared_about_20x_the_unit_mse():
    from models.losses import normalized_mse
    from models.superres import IMAGENET_STD

    g = torch.Generator().manual_seed(0)
    fake, target = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    per_channel = ((fake - target) ** 2).mean(dim=(0, 2, 3)) / IMAGENET_STD.flatten() ** 2
    assert float(normalized_mse(fake, target)) == pytest.approx(float(per_channel.mean()), rel=1e-5)
    # the lesson's 50 on this is ~980 on the [0, 1] MSE (DESIGN.md 3.7)
    assert float(normalized_mse(fake, target)) / float(F.mse_loss(fake, target)) == pytest.approx(19.6, rel=0.1)


def test_the_gan_step_logs_the_normalised_pixel_term_it_optimises():
    from tests.test_gan import TinyGenerator, _pairs
    from models.gan import Critic
    from models.losses import normalized_mse
    from training.gan import GanStep, gan_optimizer

    torch.manual_seed(0)
    g, c = TinyGenerator(), Critic(nf=4, n_blocks=1)
    gan = GanStep(g, c, gan_optimizer(g, 0.0, 0.0), gan_optimizer(c, 0.0, 0.0), critic_thresh=1e9)
    gan.gen_mode = True  # a generator step first; lr 0 keeps the weights, so the output can be recomputed
    low, high = _pairs()
    state = {k: v.clone() for k, v in g.state_dict().items()}
    terms = gan.step(low, high, lr=0.0, momentum=None, group_scales=None, device=torch.device("cpu"), bf16=False)
    g.load_state_dict(state)  # the BatchNorm running statistics moved in the step
    g.train()
    fake = g(low).float()
    assert float(terms["gen_pixel_mse"]) == pytest.approx(float(normalized_mse(fake, high)), rel=1e-5)
    assert float(terms["gen_pixel_mse"]) > 10 * float(F.mse_loss(fake, high))  # not the [0, 1] MSE


def test_the_critic_judges_clamped_images_in_the_generator_step_as_it_was_pretrained():
    from models.gan import Critic
    from training.gan import GanStep, gan_optimizer

    class Overshoots(nn.Module):  # a generator whose training output leaves [0, 1]
        scale = 1

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * 3 * self.w - 1

    seen = []
    critic = Critic(nf=4, n_blocks=1)
    critic.register_forward_pre_hook(lambda m, args: seen.append((float(args[0].min()), float(args[0].max()))))
    g = Overshoots()
    gan = GanStep(g, critic, gan_optimizer(g, 1e-3, 0.0), gan_optimizer(critic, 1e-3, 0.0), critic_thresh=1e9)
    gan.gen_mode = True
    x = torch.rand(2, 3, 16, 16)
    gan.step(x, x, lr=1e-3, momentum=None, group_scales=None, device=torch.device("cpu"), bf16=False)
    assert seen and all(0.0 <= lo and hi <= 1.0 for lo, hi in seen), seen


# --- 3./4. DDP: each rank its own noise; the learning-rate rule -------------------------------


def test_adaptive_optimizers_keep_their_rate_on_n_ranks_and_sgd_scales_linearly():
    from models.train import lr_factor

    p = [nn.Parameter(torch.zeros(1))]
    adam, sgd = torch.optim.AdamW(p), torch.optim.SGD(p, lr=0.1)
    rms = torch.optim.RMSprop(p)
    assert lr_factor("auto", 8, [adam]) == 1.0 and lr_factor("auto", 8, [rms, adam]) == 1.0
    assert lr_factor("auto", 8, [sgd]) == 8.0
    assert lr_factor("linear", 4, [adam]) == 4.0 and lr_factor("sqrt", 4, [adam]) == 2.0
    assert lr_factor("none", 4, [sgd]) == 1.0 and lr_factor("linear", 1, [sgd]) == 1.0
    assert TrainConfig(checkpoint_dir=Path(".")).lr_scaling == "auto"
    with pytest.raises(ValueError, match=r"lr_scaling must be one of \['auto', 'none', 'linear', 'sqrt'\], got 'cubic'"):
        lr_factor("cubic", 2, [adam])


NOISE = '''
import os, sys, json, torch
from pathlib import Path
from models import distributed
from models.schedule import Phase, PhaseSchedule
from models.train import TrainingStep, TrainConfig, set_hyperparameters, train, _terms
distributed.setup()
rank, world = distributed.rank_and_world()

class NoisyStep(TrainingStep):
    """A step whose update depends on the global RNG (as a WGAN's z, dropout): it records its draws."""
    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.draws = []
    def modules(self): return {"model": self.model}
    def optimizers(self): return {"opt": self.opt}
    def step(self, x, y, *, lr, momentum, group_scales, device, bf16):
        set_hyperparameters(self.opt, lr, None)
        z = torch.randn(len(x), 4)  # the noise batch
        self.draws.append(z[0, 0].item())
        loss = (self.wrapped("model")(x + z) - y).pow(2).mean()
        self.opt.zero_grad(); loss.backward(); self.opt.step()
        return {"loss": loss}

def batches(epoch, phase):
    g = torch.Generator().manual_seed(epoch)
    for _ in range(4):
        yield torch.randn(2, 4, generator=g), torch.randn(2, 1, generator=g)

out, stop = Path(sys.argv[1]), (int(sys.argv[2]) or None)
step = NoisyStep()
train(step, PhaseSchedule([Phase(3, 1e-2, "constant")], 4), batches,
      TrainConfig(checkpoint_dir=out / "ckpt", device="cpu", progress=False), stop_after_steps=stop)
(out / f"draws{rank}-{stop}.json").write_text(json.dumps(step.draws))
if rank == 0 and stop is None:
    torch.save(step.model.state_dict(), out / "final.pt")
distributed.teardown()
os._exit(0)
'''


def _torchrun(script: Path, *args: str, nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_ranks_draw_their_own_noise_and_a_stopped_2_rank_run_resumes_each_ranks_stream(tmp_path):
    import json

    script = tmp_path / "noise.py"
    script.write_text(NOISE)
    straight, split = tmp_path / "straight", tmp_path / "split"
    _torchrun(script, str(straight), "0")
    draws = [json.loads((straight / f"draws{r}-None.json").read_text()) for r in (0, 1)]
    assert len(draws[0]) == len(draws[1]) == 12
    assert all(a != b for a, b in zip(*draws)), draws  # every step, each rank its own noise
    # rank 0 keeps the 1-process stream: a 1-process run draws what rank 0 drew
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "0"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert json.loads((tmp_path / "one" / "draws0-None.json").read_text()) == draws[0]
    # stopped after 6 steps (mid-epoch, checkpointed), then resumed: each rank continues its own stream
    _torchrun(script, str(split), "6")
    _torchrun(script, str(split), "0")
    for r in (0, 1):
        first = json.loads((split / f"draws{r}-6.json").read_text())
        rest = json.loads((split / f"draws{r}-None.json").read_text())
        assert first + rest == draws[r], (r, first, rest, draws[r])
    a, b = (torch.load(d / "final.pt", weights_only=True) for d in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- 6. lesson 7's frozen phase ---------------------------------------------------------------


def test_the_lesson_trains_step_1a_at_ten_times_lr_and_2a_at_lr():
    from training.superres import ENCODER_GROUPS, FROZEN, UNFROZEN, lesson_phases, progressive_phases

    first = lesson_phases(10, 1e-3)
    frozen, unfrozen = first[:2], first[2:]
    assert max(p.lr[1] if isinstance(p.lr, tuple) else p.lr for p in frozen) == pytest.approx(1e-2)  # slice(lr*10)
    assert all(p.frozen_groups == ENCODER_GROUPS and p.group_scales == FROZEN for p in frozen)
    assert all(p.frozen_groups == () and p.group_scales == UNFROZEN for p in unfrozen)
    assert max(p.lr[1] for p in unfrozen[:1]) == pytest.approx(1e-3)  # slice(1e-5, lr)
    second = progressive_phases([(64, 16), (128, 8)], 10, 1e-3)[4:]
    assert second[0].lr[1] == pytest.approx(1e-3) and second[2].lr[1] == pytest.approx(1e-4)  # 2a slice(lr); 2b


def test_a_frozen_phase_computes_no_gradient_for_the_encoder_but_trains_its_batchnorm(tmp_path):
    from models.train import param_groups

    torch.manual_seed(0)
    model = Tiny()
    conv_before = model.body[0].weight.detach().clone()
    bn_before = model.body[1].weight.detach().clone()
    opt = torch.optim.AdamW(param_groups((model.body, 0.1), (model.head, 1.0)), lr=1e-2)
    seen_grads = []

    class Watch(ModelStep):
        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            seen_grads.append(model.body[0].weight.grad is None)
            return out

    schedule = PhaseSchedule([Phase(1, 1e-2, group_scales=(0.1, 1.0), frozen_groups=(0,)), Phase(1, 1e-2)], 3)
    train(Watch(model, opt, F.cross_entropy), schedule, _batches,
          TrainConfig(checkpoint_dir=tmp_path, device="cpu", progress=False), stop_after_steps=3 + 1)
    assert seen_grads[:3] == [True] * 3  # frozen: no gradient computed at all
    assert not torch.equal(model.body[1].weight, bn_before)  # BatchNorm trained (fastai's train_bn)
    assert seen_grads[3] is False  # unfrozen in the next phase
    assert not torch.equal(model.body[0].weight, conv_before)


# --- 7. precision and init --------------------------------------------------------------------


def test_gram_matrices_are_float32_under_bf16_autocast():
    from models.losses import gram_matrix

    x = torch.randn(2, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = gram_matrix(x.to(torch.bfloat16))
    assert g.dtype == torch.float32
    reference = gram_matrix(x.to(torch.bfloat16).float())
    assert torch.allclose(g, reference, rtol=1e-5, atol=1e-7)


def test_the_unet_decoder_has_fastais_widths_weight_norm_and_spectral_self_attention():
    from torch.nn.utils import parametrize

    from models.superres import DynamicUnet

    unet = DynamicUnet("resnet34", pretrained=False, announce=False, y_range=None)
    # fastai's DynamicUnet on a ResNet-34: up/2 + skip per block, half that in the last
    assert [b.out_channels for b in unet.decoder] == [512, 384, 256, 96]
    middle_convs = [m for m in unet.middle.modules() if isinstance(m, nn.Conv2d)]
    assert len(middle_convs) == 2 and all(parametrize.is_parametrized(c, "weight") for c in middle_convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in unet.middle[2:].modules())  # BN only before
    attn = unet.decoder[1].attn
    assert all(parametrize.is_parametrized(getattr(attn, n), "weight") for n in ("query", "key", "value"))


def test_the_dcgan_nets_start_from_n_0_002():
    from models.gan import DCGANCritic, DCGANGenerator

    torch.manual_seed(0)
    for net in (DCGANGenerator(32, nz=16, nf=32), DCGANCritic(32, nf=32)):
        convs = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        flat = torch.cat([w.flatten() for w in convs])
        assert float(flat.std()) == pytest.approx(0.02, rel=0.05) and abs(float(flat.mean())) < 2e-3
        bns = [m.weight for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(float((w - 1).abs().max()) < 0.15 for w in bns)
