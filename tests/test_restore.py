"""Super-resolution training and evaluation on tiny real stores (sample photos, CPU)."""

import pytest
import torch
from torch.nn import functional as F

from models.metrics import psnr
from models.schedule import Phase
from prep.crappify import CrappifyConfig, CrappifyStage
from prep.sample import SAMPLE_PHOTOS
from storage.stage import run_stage
from training.superres import (
    SuperResConfig,
    enhance,
    evaluate_superres,
    load_generator,
    progressive_phases,
    store_scale,
    train_superres,
)


@pytest.fixture(scope="module")
def pairs(resized, tmp_path_factory):
    from storage.tiers import Tiers

    root = tmp_path_factory.mktemp("pairs")
    tiers = Tiers(fast=root / "fast", bulk=root / "bulk")

    def crappified(size: int, low: int):
        high = resized(size)
        return high, run_stage(tiers, CrappifyStage(source=str(high.path), cores=1,
                                                    config=CrappifyConfig(crappifier="downscale", size=low)))

    high, low = crappified(32, 8)
    pairs = {split: (low.path / f"{split}.h5", high.path / f"{split}.h5") for split in ("train", "val")}
    high, low = crappified(64, 16)  # a second, larger pair for progressive resizing: 16 -> 64
    pairs["train64"] = (low.path / "train.h5", high.path / "train.h5")
    return pairs


def test_scale_comes_from_the_stores(pairs):
    assert store_scale(*pairs["train"]) == 4


def test_johnson_trains_resumes_exports_and_evaluates_against_bicubic(pairs, tmp_path):
    config = SuperResConfig(arch="johnson", loss="pixel", batch_size=8, pretrained=False,
                            phases=(Phase(2, (3e-3, 1e-4), "cosine"),))
    model, history = train_superres(pairs["train"], config, tmp_path / "run", device="cpu")
    assert [h["epoch"] for h in history] == [0, 1] and {"loss", "pixel_mse"} <= set(history[0])
    assert history[1]["loss"] < history[0]["loss"]
    reloaded = load_generator(tmp_path / "run")
    low = torch.rand(1, 3, 8, 8)
    assert torch.allclose(reloaded(low), model.eval()(low))
    result = evaluate_superres(reloaded, *pairs["val"])
    assert result["images"] == len(result["per_image"]) == 2 * len(SAMPLE_PHOTOS)  # the val split
    first = result["per_image"][0]
    import h5py

    with h5py.File(pairs["val"][0]) as lo, h5py.File(pairs["val"][1]) as hi:
        x = torch.from_numpy(lo["images"][:1]).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(hi["images"][:1]).permute(0, 3, 1, 2).float() / 255
    bicubic = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    assert first["psnr_bicubic"] == pytest.approx(float(psnr(bicubic, y)[0]), rel=1e-5)
    assert 5 < result["psnr_model"] < 60 and 0 < result["ssim_model"] <= 1


@pytest.mark.slow
def test_unet_with_feature_loss_runs_one_epoch_and_logs_every_term(pairs, tmp_path):
    config = SuperResConfig(arch="unet", loss="feature", batch_size=8, pretrained=False)
    _, history = train_superres(pairs["val"], config, tmp_path, device="cpu")
    assert {"pixel", "feat_0", "feat_1", "feat_2", "gram_0", "gram_1", "gram_2"} <= set(history[0])


def test_tiled_enhance_equals_one_pass_on_a_fully_convolutional_model():
    from models.superres import JohnsonNet

    torch.manual_seed(0)
    model = JohnsonNet(2, n_res=1).eval()
    image = torch.rand(3, 40, 52)
    whole = model(image[None])[0].clamp(0, 1)
    calls = []
    tiled = enhance(model, image, tile=24, overlap=10, progress=lambda done, total: calls.append((done, total)))
    assert tiled.shape == (3, 80, 104)
    assert torch.allclose(tiled, whole, atol=1e-5)
    # progress: every tile reported, of the right total (step 24 - 2 x 10 = 4 px: 10 x 13 tiles)
    assert calls == [(i, 130) for i in range(1, 131)]


def test_bad_loss_name_and_missing_model_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown loss 'ssim'; choose one of \['feature', 'pixel'\]"):
        SuperResConfig(loss="ssim")
    with pytest.raises(FileNotFoundError, match="no exported generator at"):
        load_generator(tmp_path)


def test_evaluate_and_enhance_commands(pairs, tmp_path, capsys):
    from PIL import Image

    from imagesmith.cli import main

    _, history = train_superres(pairs["val"], SuperResConfig(arch="johnson", loss="pixel", pretrained=False),
                                tmp_path / "run", device="cpu")
    assert main(["evaluate-superres", str(tmp_path / "run"), str(pairs["val"][0]), "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "5 images of" in out and out.strip().splitlines()[-1].startswith("RESULT psnr_model=")
    assert main(["evaluate-superres", str(tmp_path / "run"), str(pairs["val"][1])]) == 2  # a high-res store
    Image.fromarray((torch.rand(20, 30, 3) * 255).byte().numpy()).save(tmp_path / "in.png")
    assert main(["enhance", str(tmp_path / "run"), str(tmp_path / "in.png"), str(tmp_path / "out.png")]) == 0
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (120, 80)


@pytest.mark.slow
def test_progressive_resizing_trains_small_then_large_and_resumes_across_sizes(pairs, tmp_path):
    phases = progressive_phases([(32, 8), (64, 8)], epochs=2, lr=1e-3)
    # [encoder low, encoder high, decoder]: frozen = the encoder's groups without gradients but for
    # their BatchNorm layers, at slice(lr) (lr/10 for them, lr for the decoder)
    frozen, unfrozen = ((0.1, 0.1, 1.0), (0, 1)), ((0.01, 0.1, 1.0), ())
    assert [(p.image_size, (p.group_scales, p.frozen_groups)) for p in phases] == [
        (32, frozen), (32, frozen), (32, unfrozen), (32, unfrozen),
        (64, frozen), (64, frozen), (64, unfrozen), (64, unfrozen)]
    peaks = [p.lr[1] for p in phases[::2]]  # each 1cycle's maximum: 1a slice(lr*10), 1b lr; 2a lr, 2b lr/10
    assert peaks == pytest.approx([1e-2, 1e-3, 1e-3, 1e-4])
    # the Johnson net keeps it quick on a CPU (it ignores the U-Net's encoder/decoder group scales)
    config = SuperResConfig(arch="johnson", loss="pixel", batch_size=4, pretrained=False, phases=phases)
    stores = {32: pairs["train"], 64: pairs["train64"]}
    straight, history = train_superres(stores, config, tmp_path / "straight", device="cpu", tensorboard=False)
    assert [(h["epoch"], h["leg"], h["size"]) for h in history] == [(e, e // 4, 32 if e < 4 else 64) for e in range(8)]

    class Crash(Exception):
        pass

    def crash_in_the_second_size(record):
        if record["epoch"] == 5:
            raise Crash

    with pytest.raises(Crash):
        train_superres(stores, config, tmp_path / "resumed", device="cpu", tensorboard=False,
                       on_epoch=crash_in_the_second_size)
    resumed, history2 = train_superres(stores, config, tmp_path / "resumed", device="cpu", tensorboard=False)
    assert [h["epoch"] for h in history2] == list(range(8))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_phase_size_without_stores_is_named(pairs, tmp_path):
    config = SuperResConfig(arch="johnson", loss="pixel", pretrained=False, phases=(Phase(1, 1e-3, image_size=64),))
    with pytest.raises(ValueError, match=r"image_size 64; store pairs exist for \[32\]"):
        train_superres(pairs["train"], config, tmp_path, device="cpu")
