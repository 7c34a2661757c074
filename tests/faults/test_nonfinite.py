"""A loss that becomes NaN or infinite stops the run with one line naming the step and the term,
instead of training on (or writing a black image with exit 0); non-finite parameters never get in."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from models.schedule import Phase, PhaseSchedule
from models.train import CHECKPOINT, ModelStep, NonFiniteLoss, TrainConfig, load_checkpoint, train


def test_a_loss_that_becomes_nan_stops_training_naming_the_step_and_term(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    calls = {"n": 0}

    def loss(pred, y):
        calls["n"] += 1
        mse = F.mse_loss(pred, y)
        blown = mse * float("nan") if calls["n"] == 7 else mse * 0  # the 7th step's term diverges
        return {"loss": mse + blown, "mse": mse, "blown": blown}

    def batches(epoch, phase):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(5):
            yield torch.randn(2, 4, generator=g), torch.randn(2, 1, generator=g)

    with pytest.raises(NonFiniteLoss) as caught:
        train(ModelStep(model, torch.optim.SGD(model.parameters(), lr=0.1), loss), PhaseSchedule([Phase(3, 0.1)], 5),
              batches, TrainConfig(checkpoint_dir=tmp_path, device="cpu", progress=False))
    message = str(caught.value)
    assert "\n" not in message and "at step 7 (epoch 2, batch 2 of 5)" in message
    assert "loss = nan" in message and "blown = nan" in message and "mse =" not in message
    assert calls["n"] == 7  # stopped there, not trained on
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 5  # the last good checkpoint is kept


def test_gatys_with_a_nan_weight_stops_instead_of_writing_a_black_image():
    from models.style import BlockFeatures
    from training.style import GatysConfig, gatys

    g = torch.Generator().manual_seed(0)
    content, style = torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)
    config = GatysConfig(size=32, steps=3, optimizer="adam", style_weights=(float("nan"), 1, 1, 1, 1))
    with pytest.raises(NonFiniteLoss, match=r"style transfer diverged at iteration 1 \(scale 0\): .*nan"):
        gatys(content, style, config, features=BlockFeatures("vgg19_caffe", pretrained=False))


def test_flow_parameters_refuse_non_finite_and_absurd_values():
    from prefect.exceptions import ParameterTypeError

    from flows.style import style
    from flows.superres import superres

    for flow, params in ((superres, {"lr": float("inf")}), (superres, {"lr": float("nan")}),
                         (superres, {"epochs": 10**12}), (style, {"tv_weight": float("inf")}),
                         (style, {"style_weights": [float("nan"), 1, 1, 1, 1]})):
        with pytest.raises(ParameterTypeError):
            flow.validate_parameters(params)
