import math
import time

import pytest
import torch
from torch import nn

from models.schedule import Phase, PhaseSchedule, anneal, one_cycle, sgdr
from models.train import (
    CHECKPOINT,
    ModelStep,
    TrainConfig,
    default_device,
    load_checkpoint,
    param_groups,
    train,
)

SPE = 5  # steps per epoch


@pytest.mark.parametrize("decay", ["linear", "cosine", "exponential", "polynomial"])
def test_annealing_goes_from_start_to_end(decay):
    assert anneal(1.0, 0.01, 0.0, decay) == pytest.approx(1.0)
    assert anneal(1.0, 0.01, 1.0, decay) == pytest.approx(0.01)
    assert 0.01 < anneal(1.0, 0.01, 0.5, decay) < 1.0
    assert anneal(1.0, 0.5, 0.5, "cosine") == pytest.approx(0.75)


def _fastai_one_cycle(i: int, n: int, lr_max: float, pct_start: float = 0.3, div: float = 25.0,
                      moms=(0.95, 0.85)) -> tuple[float, float]:
    """fastai v1's OneCycleScheduler, written out: (lr, momentum) at batch ``i`` of ``n``."""
    def cos(start, end, pct):
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    a1 = int(n * pct_start)
    if i < a1:
        return cos(lr_max / div, lr_max, i / a1), cos(moms[0], moms[1], i / a1)
    return cos(lr_max, lr_max / (div * 1e4), (i - a1) / (n - a1)), cos(moms[1], moms[0], (i - a1) / (n - a1))


@pytest.mark.parametrize("epochs,spe,pct", [(10, 10, 0.3), (10, 7, 0.9), (3, 13, 0.25), (1, 50, 0.3)])
def test_one_cycle_follows_fastais_formula_step_by_step(epochs, spe, pct):
    schedule = PhaseSchedule(one_cycle(epochs, 1e-2, pct_start=pct), steps_per_epoch=spe)
    n = epochs * spe
    assert schedule.total_steps == n
    for i in sorted({0, 1, int(n * pct) - 1, int(n * pct), n // 2, n - 2, n - 1}):
        lr, mom = _fastai_one_cycle(i, n, 1e-2, pct)
        _, ours_lr, ours_mom = schedule.at(i)
        assert ours_lr == pytest.approx(lr, rel=1e-12) and ours_mom == pytest.approx(mom, rel=1e-12), i
    lrs = [schedule.at(s)[1] for s in range(n)]
    assert lrs.index(max(lrs)) == int(n * pct) and max(lrs) == pytest.approx(1e-2)  # the peak starts phase 2
    assert lrs[0] == pytest.approx(1e-2 / 25) and lrs[-1] == min(lrs[int(n * pct):])  # falls to the end


def test_a_data_change_mid_epoch_and_partial_epochs_are_refused():
    with pytest.raises(ValueError, match="they must make whole epochs"):
        PhaseSchedule([Phase(1.5, 0.1)], 4)
    with pytest.raises(ValueError, match="changes the image or batch size mid-epoch"):
        PhaseSchedule([Phase(0.5, 0.1, image_size=32), Phase(0.5, 0.1, image_size=64)], 4)


def test_sgdr_restarts_with_growing_cycles_and_bad_values_are_named():
    phases = sgdr(3, 1, 0.1, cycle_mult=2)
    assert [p.epochs for p in phases] == [1, 2, 4]
    schedule = PhaseSchedule(phases, steps_per_epoch=4)
    assert schedule.at(4)[1] == pytest.approx(0.1)  # restart at the second cycle
    with pytest.raises(ValueError, match=r"unknown decay 'step'; choose one of \['constant', 'linear'"):
        Phase(1, (0.1, 0.01), "step")
    with pytest.raises(ValueError, match="1cycle needs at least 1 epoch"):
        one_cycle(0, 0.1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 3, 8, 8, generator=g), torch.randint(0, 2, (40,), generator=g)


def _batches(x, y):
    def batches(epoch, phase):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + epoch))  # order = f(epoch)
        size = phase.batch_size or 8
        for i in range(0, len(x), size):
            yield x[order[i:i + size]], y[order[i:i + size]]
    return batches


def _run(tmp_path, loss_fn=None, **kwargs):
    torch.manual_seed(1)
    model = Tiny()
    opt = torch.optim.SGD(param_groups((model.body, 0.1), (model.head, 1.0)), lr=0.1, momentum=0.9)
    schedule = PhaseSchedule([Phase(1, 0.05, momentum=0.9), Phase(2, (0.05, 0.001), "cosine")], SPE)
    config = TrainConfig(checkpoint_dir=tmp_path, checkpoint_every=3, device="cpu", progress=False)
    history = train(ModelStep(model, opt, loss_fn or nn.functional.cross_entropy), schedule, _batches(*_data()), config,
                    **kwargs)
    return model, opt, history


def test_a_crash_between_checkpoints_then_resume_gives_identical_weights(tmp_path):
    straight, _, history = _run(tmp_path / "a")
    calls = {"n": 0}

    def crashing_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 8:  # step 8: the last checkpoint was at step 6 (every 3 steps), mid-epoch 2
            raise RuntimeError("simulated crash")
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "b", crashing_loss)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["step"] == 6
    resumed, _, resumed_history = _run(tmp_path / "b")  # new model, new optimizer: everything from the file
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [h["epoch"] for h in resumed_history] == [0, 1, 2]
    assert resumed_history[1]["loss"] == pytest.approx(history[1]["loss"], rel=1e-6)  # partial sums survived


def test_discriminative_learning_rates_and_every_loss_term_are_logged(tmp_path):
    def loss_terms(out, y):
        ce = nn.functional.cross_entropy(out, y)
        reg = out.pow(2).mean() * 1e-3
        return {"loss": ce + reg, "cross_entropy": ce, "l2": reg}

    _, opt, history = _run(tmp_path, loss_terms)
    body, head = opt.param_groups
    last = anneal(0.05, 0.001, (2 * SPE - 1) / (2 * SPE), "cosine")  # the last step of the 2-epoch phase
    assert body["lr"] == pytest.approx(0.1 * head["lr"]) and head["lr"] == pytest.approx(last)
    assert {"loss", "cross_entropy", "l2", "lr", "phase"} <= set(history[-1])
    assert [h["phase"] for h in history] == [0, 1, 1]
    assert history[0]["loss"] == pytest.approx(history[0]["cross_entropy"] + history[0]["l2"], rel=1e-5)
    assert not math.isnan(history[-1]["loss"])


def test_finished_run_resumes_to_nothing_and_short_epochs_are_an_error(tmp_path):
    _run(tmp_path)
    _, _, history = _run(tmp_path)  # everything is in the checkpoint already
    assert len(history) == 3
    model = Tiny()
    with pytest.raises(ValueError, match="epoch 0 gave 2 batches; the schedule expects 5 per epoch"):
        train(ModelStep(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy),
              PhaseSchedule([Phase(1, 0.1)], 5),
              lambda epoch, phase: iter([(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))] * 2),
              TrainConfig(checkpoint_dir=tmp_path / "x", device="cpu", progress=False))


def test_a_phase_with_group_scale_zero_freezes_that_group(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    body_before = [p.clone() for p in model.body.parameters() if p.requires_grad]
    opt = torch.optim.Adam(param_groups((model.body, 1.0), (model.head, 1.0)), lr=1e-2)
    schedule = PhaseSchedule([Phase(1, 1e-2, group_scales=(0.0, 1.0)), Phase(1, 1e-2)], SPE)
    config = TrainConfig(checkpoint_dir=tmp_path, device="cpu", progress=False)
    train(ModelStep(model, opt, nn.functional.cross_entropy), schedule, _batches(*_data()), config, stop_after_steps=SPE)
    conv_w = model.body[0].weight
    assert torch.equal(conv_w, body_before[0])  # frozen for the first phase
    head_w = model.head.weight.clone()
    model2 = Tiny()
    opt2 = torch.optim.Adam(param_groups((model2.body, 1.0), (model2.head, 1.0)), lr=1e-2)
    train(ModelStep(model2, opt2, nn.functional.cross_entropy), schedule, _batches(*_data()), config)  # resumes
    assert not torch.equal(model2.body[0].weight, body_before[0]) and not torch.equal(model2.head.weight, head_w)


@pytest.mark.slow
def test_tensorboard_gets_step_and_epoch_scalars_and_a_resume_does_not_duplicate_them(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"

    def run(loss=nn.functional.cross_entropy, **kwargs):
        # TensorBoard reads event files in name order: <unix second>.<host>.<pid>.<per-process counter>.
        # Runs in one second of one process sort by that counter as text (…9 after …10), so each
        # run starts in a new second, as a real resume does.
        time.sleep(1.01)
        torch.manual_seed(1)
        model = Tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        config = TrainConfig(checkpoint_dir=tmp_path / "ckpt", device="cpu", progress=False, tensorboard_dir=tb)
        schedule = PhaseSchedule([Phase(2, (0.05, 0.001))], SPE)
        return train(ModelStep(model, opt, loss), schedule, _batches(*_data()), config, **kwargs)

    run(stop_after_steps=7)  # 1 epoch + 2 steps logged, checkpoint at step 7
    calls = {"n": 0}

    def crash_on_second_call(out, y):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("crash after logging step 8")
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="crash after logging step 8"):
        run(crash_on_second_call)  # logs step 8, then dies: the checkpoint stays at 7
    run()  # resumes at step 7: its step 8 replaces the crashed run's
    events = EventAccumulator(str(tb))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert sorted(steps) == list(range(1, 2 * SPE + 1))  # each step exactly once
    assert [e.step for e in events.Scalars("epoch/loss")] == [0, 1]
    assert {"train/lr", "epoch/loss"} <= set(events.Tags()["scalars"])


def test_a_term_on_some_steps_only_is_averaged_over_its_own_samples(tmp_path):
    """A GAN logs generator and critic terms on alternate steps: each term's epoch mean counts only
    the samples it was computed on."""
    calls = {"n": 0}

    def alternating(out, y):
        calls["n"] += 1
        terms = {"loss": nn.functional.cross_entropy(out, y)}
        if calls["n"] % 2:
            terms["aux"] = torch.full((), 2.0)
        return terms

    _, _, history = _run(tmp_path, alternating)
    assert [h["aux"] for h in history] == pytest.approx([2.0] * 3)  # not 2.0 x (steps with aux / all steps)


def test_the_default_device_is_decided_when_training_starts_not_at_import(tmp_path, monkeypatch):
    config = TrainConfig(checkpoint_dir=tmp_path)
    assert config.device is None and config.progress is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device(config.device) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device(config.device) == "cpu" and default_device("cuda:1") == "cuda:1"
