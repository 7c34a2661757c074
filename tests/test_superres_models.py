import logging

import pytest
import torch
from torch import nn

from models.blocks import PixelShuffleUp, SelfAttention, icnr_
from models.losses import FeatureLoss, gram_matrix
from models.metrics import psnr, ssim
from models.superres import JohnsonNet, make_generator


def test_icnr_makes_pixel_shuffle_start_as_nearest_neighbour_upsampling():
    conv = nn.Conv2d(4, 3 * 4, 1, bias=False)
    icnr_(conv.weight, scale=2)
    x = torch.randn(1, 4, 5, 5)
    up = nn.PixelShuffle(2)(conv(x))  # (1, 3, 10, 10)
    # each 2x2 output block is one value: what nearest-neighbour upsampling of a 5x5 map gives
    assert torch.allclose(up, nn.functional.interpolate(up[:, :, ::2, ::2], scale_factor=2, mode="nearest"))


def test_blocks_keep_shapes_and_attention_starts_as_identity():
    x = torch.randn(2, 16, 6, 6)
    assert PixelShuffleUp(16, 8)(x).shape == (2, 8, 12, 12)
    assert torch.equal(SelfAttention(16)(x), x)


@pytest.mark.parametrize("arch,size", [("unet", 24), ("johnson", 24), ("unet", 19)])
def test_generators_upscale_by_four_into_unit_range(arch, size):
    model = make_generator(arch, 4, pretrained=False).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, size, size))
    assert y.shape == (2, 3, 4 * size, 4 * size) and 0 <= float(y.min()) and float(y.max()) <= 1


def test_missing_pretrained_weights_are_an_error_and_random_weights_say_so(tmp_path, monkeypatch, caplog):
    from models.weights import MissingWeights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("IMAGESMITH_WEIGHTS_DIR", raising=False)
    with pytest.raises(MissingWeights, match="no weights for resnet34: place resnet34-b627a593.pth in"):
        make_generator("unet", 2, encoder="resnet34", pretrained=True)
    with caplog.at_level(logging.WARNING):
        model = make_generator("unet", 2, encoder="resnet34", pretrained=False)
    assert model.unet.weights is None and "resnet34: RANDOM weights" in caplog.text


def test_pretrained_weights_load_from_the_local_folder(tmp_path, monkeypatch):
    import torchvision

    reference = torchvision.models.resnet34(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet34-b627a593.pth")
    monkeypatch.setenv("IMAGESMITH_WEIGHTS_DIR", str(tmp_path))
    model = make_generator("unet", 2, encoder="resnet34", pretrained=True)
    assert model.unet.weights.origin == "file" and model.unet.weights.path == str(tmp_path / "resnet34-b627a593.pth")
    assert torch.equal(model.unet.encoder.stages[0][0].weight, reference.conv1.weight)


def test_johnson_rejects_scales_that_are_not_powers_of_two_and_bad_arch_is_named():
    with pytest.raises(ValueError, match="powers of 2; got scale 3"):
        JohnsonNet(3)
    with pytest.raises(ValueError, match=r"unknown super-resolution architecture 'srgan'; choose one of \['johnson', 'unet'\]"):
        make_generator("srgan", 4)


def test_feature_loss_terms_are_zero_for_identical_images_and_sum_to_the_loss():
    loss = FeatureLoss(pretrained=False)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    same = loss(a, a)
    assert float(same["loss"]) == pytest.approx(0.0, abs=1e-6)
    terms = loss(a, b)
    assert set(terms) == {"loss", "pixel", "feat_0", "feat_1", "feat_2", "gram_0", "gram_1", "gram_2"}
    assert float(terms["loss"]) == pytest.approx(sum(float(v) for k, v in terms.items() if k != "loss"), rel=1e-5)
    b.requires_grad_(True)
    loss(b, a)["loss"].backward()
    assert b.grad is not None and all(p.grad is None for p in loss.features.parameters())


def test_gram_matrix_is_normalised_by_c_h_w():
    x = torch.ones(1, 2, 3, 4)
    assert torch.allclose(gram_matrix(x), torch.full((1, 2, 2), 12 / 24))


def test_psnr_and_ssim_known_values():
    x = torch.rand(3, 3, 32, 32)
    assert torch.isinf(psnr(x, x)).logical_not().all() and float(psnr(x, x)[0]) > 100
    noisy = (x + 0.1).clamp(0, 1)
    assert float(psnr(torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.1))) == pytest.approx(20.0)
    assert torch.allclose(ssim(x, x), torch.ones(3))
    assert (ssim(x, noisy) < 1).all() and (ssim(x, torch.rand_like(x)) < 0.1).all()


def test_pair_augmentation_moves_input_and_target_alike():
    from torch.nn import functional as F

    from models.augment import PairAugment

    # a smooth picture at two resolutions: the low one is the high one averaged 4 x 4
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    high = torch.stack([torch.sin(3 * xx + 1), torch.cos(2 * yy), xx * yy]).unsqueeze(0).repeat(6, 1, 1, 1)
    low = F.avg_pool2d(high, 4)
    aug = PairAugment(max_zoom=2.0, flip=0.5)
    a_low, a_high = aug(low, high, torch.Generator().manual_seed(3))
    assert a_low.shape == low.shape and a_high.shape == high.shape
    assert not torch.allclose(a_high, high, atol=1e-2)  # something moved
    # the same window of the same picture: averaging the augmented target gives the augmented input
    assert (F.avg_pool2d(a_high, 4) - a_low).abs().max() < 0.03
    other_low, _ = aug(low, high, torch.Generator().manual_seed(4))  # another draw: another window
    assert (F.avg_pool2d(a_high, 4) - other_low).abs().max() > 0.1
    plain = PairAugment(max_zoom=1.0, flip=1.0)  # zoom 1 with a flip: exactly the mirror images
    f_low, f_high = plain(low, high, torch.Generator().manual_seed(0))
    assert torch.allclose(f_low, low.flip(3), atol=1e-5) and torch.allclose(f_high, high.flip(3), atol=1e-5)


def test_the_unet_starts_as_bicubic_and_a_saturated_pixel_still_gets_a_gradient():
    from torch.nn import functional as F

    model = make_generator("unet", 2, encoder="efficientnet_lite0", pretrained=False)
    low = torch.rand(2, 3, 32, 32)
    bicubic = F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False)
    assert torch.allclose(model.eval()(low), bicubic.clamp(0, 1), atol=1e-5)  # a correction that starts at 0
    with torch.no_grad():
        model.unet.head[0].bias.fill_(10.0)  # push every output far above 1 (10 std of the normalised range)
    out = model.train()(low)
    assert out.min() > 1  # not clamped while training
    F.mse_loss(out, torch.ones_like(out)).backward()
    assert model.unet.head[0].bias.grad.abs().min() > 0  # a target inside the range still pulls it back
    assert float(model.eval()(low).max()) == 1.0  # clamped when evaluating
