"""The GAN family on tiny CPU models: the switcher, frozen models, exact resume, the critic's grid
and spectral norm, WGAN clipping, and the restoration chain's stages on the sample."""

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from models.gan import Critic, DCGANCritic, DCGANGenerator
from models.schedule import Phase, PhaseSchedule
from models.train import TrainConfig, load_checkpoint, train
from training.gan import GanStep, WganStep, gan_optimizer


class TinyGenerator(nn.Module):
    scale = 2

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                 nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def _gan(thresh: float, seed: int = 0) -> GanStep:
    torch.manual_seed(seed)
    g, c = TinyGenerator(), Critic(nf=4, n_blocks=1)
    return GanStep(g, c, gan_optimizer(g, 1e-3, 1e-3), gan_optimizer(c, 5e-3, 1e-3), critic_thresh=thresh)


def _pairs(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    high = torch.rand(n, 3, 16, 16, generator=g)
    return torch.nn.functional.avg_pool2d(high, 2), high


def _step(gan: GanStep, low, high):
    return gan.step(low, high, lr=1e-3, momentum=None, group_scales=None, device=torch.device("cpu"), bf16=False)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_the_critic_trains_until_its_loss_falls_below_the_threshold_then_one_generator_step():
    low, high = _pairs()
    never = _gan(thresh=0.0)  # a BCE loss is never below 0: only critic steps
    g_before = _params(never.generator)
    assert [float(_step(never, low, high)["gen_step"]) for _ in range(4)] == [0.0] * 4
    assert all(torch.equal(a, b) for a, b in zip(g_before, never.generator.parameters()))
    assert all(p.grad is None for p in never.generator.parameters())  # the frozen model gets no gradients

    always = _gan(thresh=1e9)  # every critic loss is below: critic, generator, critic, generator ...
    modes = []
    for _ in range(4):
        c_before = _params(always.critic)
        terms = _step(always, low, high)
        modes.append(int(terms["gen_step"]))
        if modes[-1] == 1:  # the generator's step leaves the critic alone
            assert all(torch.equal(a, b) for a, b in zip(c_before, always.critic.parameters()))
            assert {"gen_adversarial", "gen_pixel_mse"} <= set(terms)
    assert modes == [0, 1, 0, 1]
    # during the critic's steps the generator ran in eval mode: its BatchNorm statistics did not move
    bn = always.generator.net[2]
    stats = bn.running_mean.clone()
    _step(always, low, high)  # a critic step
    assert torch.equal(bn.running_mean, stats)


def test_a_gan_phase_killed_after_a_checkpoint_resumes_to_the_same_two_models(tmp_path):
    data = [_pairs(4, seed=i) for i in range(5)]

    def batches(epoch, phase):
        for i in torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch)).tolist():
            yield data[i]

    def run(directory, **kwargs):
        gan = _gan(thresh=0.7)
        config = TrainConfig(checkpoint_dir=directory, device="cpu", progress=False, checkpoint_every=2)
        history = train(gan, PhaseSchedule([Phase(2, 1e-3)], 5), batches, config, **kwargs)
        return gan, history

    straight, history = run(tmp_path / "a")
    run(tmp_path / "b", stop_after_steps=7)  # "killed" after the checkpoint at step 7
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 7
    resumed, resumed_history = run(tmp_path / "b")
    assert {k for k in load_checkpoint(tmp_path / "b" / "last.pt")} >= {"generator", "critic", "gen_opt",
                                                                         "critic_opt", "step_state"}
    for name in ("generator", "critic"):
        for (key, a), b in zip(straight.modules()[name].state_dict().items(), resumed.modules()[name].state_dict().values()):
            assert torch.equal(a, b), (name, key)
    assert straight.gen_opt.state_dict()["state"].keys() == resumed.gen_opt.state_dict()["state"].keys()
    for key, state in straight.critic_opt.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], resumed.critic_opt.state_dict()["state"][key]["exp_avg"])
    assert straight.gen_mode == resumed.gen_mode
    assert [h["gen_step"] for h in history] == [h["gen_step"] for h in resumed_history]


def test_the_critic_gives_a_grid_of_logits_and_every_conv_is_spectral_normed():
    critic = Critic(nf=8, n_blocks=3)
    assert critic(torch.rand(2, 3, 128, 128)).shape == (2, 25)  # a 5 x 5 grid, no pooling
    convs = [m for m in critic.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(c, "weight") for c in convs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert critic(torch.rand(1, 3, 64, 64)).dtype == torch.float32  # fp32 under autocast


def test_wgan_critic_weights_stay_within_the_clip_and_the_schedule_warms_the_critic_up():
    torch.manual_seed(0)
    g, c = DCGANGenerator(16, nz=8, nf=4), DCGANCritic(16, nf=4)
    step = WganStep(g, c, torch.optim.RMSprop(g.parameters(), lr=1e-2), torch.optim.RMSprop(c.parameters(), lr=1e-2),
                    clip=0.01, n_critic=2, critic_warmup=3)
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    kinds = []
    for _ in range(10):
        terms = step.step(real, torch.zeros(4), lr=1e-2, momentum=None, group_scales=None,
                          device=torch.device("cpu"), bf16=False)
        kinds.append("g" if "generator" in terms else "c")
        assert all(float(p.detach().abs().max()) <= 0.01 + 1e-7 for p in c.parameters())
    assert kinds == ["c", "c", "c", "g"] * 2 + ["c", "c"]  # 3 critic steps before each early generator step


@pytest.fixture(scope="module")
def chain(resized, tmp_path_factory):
    from prep.crappify import CrappifyConfig, CrappifyStage
    from storage.stage import run_stage
    from storage.tiers import Tiers
    from training.gan import CriticConfig, CriticStage, GanConfig, GanStage, GeneratedStage
    from training.superres import SuperResStage, superres_plan

    root = tmp_path_factory.mktemp("gan")
    tiers = Tiers(fast=root / "fast", bulk=root / "bulk")
    high = resized(32)
    pairs = run_stage(tiers, CrappifyStage(source=str(high.path), cores=1,
                                           config=CrappifyConfig(crappifier="downscale", size=16)))
    _, config = superres_plan(arch="unet", loss="pixel", high_size=32, low_size=16, epochs=1, batch_size=8)
    generator = run_stage(tiers, SuperResStage(pairs=(str(pairs.path),), config=config, device="cpu"))
    generated = run_stage(tiers, GeneratedStage(generator=str(generator.path), source=str(pairs.path)))
    critic = run_stage(tiers, CriticStage(generated=str(generated.path), device="cpu",
                                          config=CriticConfig(epochs=1, nf=8, batch_size=8)))
    gan = run_stage(tiers, GanStage(generator=str(generator.path), critic=str(critic.path), pairs=str(pairs.path),
                                    config=GanConfig(epochs=1, critic_thresh=5.0, eval_images=8), device="cpu"))
    return {"pairs": pairs, "generator": generator, "generated": generated, "critic": critic, "gan": gan}


def test_the_generated_store_is_aligned_with_the_crappified_one_and_paired_with_the_originals(chain):
    from storage.catalog import crappified_pair
    from training.superres import load_generator

    for split in ("train", "val"):
        fake, real = crappified_pair(chain["generated"].path, split)
        low, original = crappified_pair(chain["pairs"].path, split)
        assert real == original
        with h5py.File(fake) as f, h5py.File(low) as lo:
            for name in ("index", "labels"):
                np.testing.assert_array_equal(f[name][()], lo[name][()])
            assert f["paths"].asstr()[()].tolist() == lo["paths"].asstr()[()].tolist()
            assert f["images"].shape == (len(lo["images"]), 32, 32, 3)
            with torch.no_grad():  # row 0 is the generator's output for crappified row 0
                expected = load_generator(chain["generator"].path)(
                    torch.from_numpy(lo["images"][:1]).permute(0, 3, 1, 2).float() / 255)
            np.testing.assert_allclose(f["images"][0].astype(float),
                                       (expected[0].permute(1, 2, 0).numpy() * 255).round(), atol=1)


def test_the_gan_stage_records_its_evidence_and_exports_an_enhance_model(chain, tmp_path, capsys):
    from PIL import Image

    from imagesmith.cli import main
    from storage.stage import open_stage

    critic = open_stage(chain["critic"].path).manifest()
    assert 0 <= critic["critic_acc"] <= 1 and {"critic_acc_fake", "critic_acc_real"} <= set(critic)
    m = open_stage(chain["gan"].path).manifest()
    assert set(m["evaluation"]) >= {"psnr_bicubic", "psnr_pretrained", "psnr_gan", "ssim_pretrained", "ssim_gan"}
    assert len(m["critic_steps_per_gen_step"]) == 1  # one epoch: the switcher's count
    assert (chain["gan"].path / "samples" / "epoch-000.png").is_file()
    Image.fromarray((np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    assert main(["enhance", str(chain["gan"].path), str(tmp_path / "in.png"), str(tmp_path / "out.png")]) == 0
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (20, 24)
