"""The one training loop every trainer shares: phases, checkpoints, exact resume.

``train(step, ...)`` runs a ``PhaseSchedule`` (models/schedule.py) over the batches a caller
provides per epoch. What happens to one batch is a ``TrainingStep``: it owns its model(s),
optimizer(s) and loss, and is handed the schedule's learning rate, momentum and per-group scales
(``ModelStep``: one model, one optimizer, one loss; a GAN's step holds two models and switches
between them). The loop owns the rest: every loss term logged (each averaged over the samples it
was computed on), TensorBoard, and atomic checkpoints ``{the step's whole state, step, epoch, RNG
states, partial epoch sums, history, config}`` at the end of each epoch and every
``checkpoint_every`` steps. Resuming restores all of it and skips the batches of the interrupted
epoch already taken, so an interrupted run ends with the same weights as an uninterrupted one
(deterministic settings on CPU).

On CUDA: bf16 autocast and channels_last. On CPU (tests): plain float32.
"""

from __future__ import annotations

import logging
import math
import pickle
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import distributed
from models.schedule import Phase, PhaseSchedule
from storage.atomic import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
MODEL_FILE = "model.pt"  # an exported model: weights + what rebuilds it (``load_export``)
Batches = Callable[[int, Phase], Iterable[tuple[torch.Tensor, torch.Tensor]]]
LossFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | dict[str, torch.Tensor]"]


class NonFiniteLoss(ValueError):
    """A loss term became NaN or infinite: training stops (a retry would diverge the same way)."""


class TrainingStopped(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM reached a training run: it checkpointed at the step it was on and
    stopped; the same command resumes from there. ``signal`` is the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextmanager
def _stop_requests():
    """SIGINT and SIGTERM set a flag the loop reads between steps (instead of killing it mid-write);
    the previous handlers come back after. Only the main thread can take signals: elsewhere (a
    worker thread) nothing is installed and the flag stays unset."""
    import signal
    import threading

    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signum"] is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        flag["signum"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass(frozen=True)
class TrainConfig:
    checkpoint_dir: Path
    checkpoint_every: int = 0  # steps; 0: only at the end of each epoch (and by time, below)
    # also checkpoint mid-epoch once this many minutes passed since the last one (0: never), so a
    # crash or kill loses minutes, not an epoch (hours on ImageNet); SIGINT/SIGTERM checkpoint too
    checkpoint_minutes: float = 10.0
    seed: int = 0
    device: str | None = None  # None: CUDA when available, else CPU (decided when training starts)
    bf16: bool = True  # autocast on CUDA only
    channels_last: bool = True  # CUDA only
    progress: bool | None = None  # a progress line on stderr; None: when stderr is a terminal
    tensorboard_dir: Path | None = None  # per-step loss/lr and per-epoch records, when set
    # on N ranks (DDP): "auto" = "linear" for plain SGD, "none" for adaptive optimizers (Adam, AdamW,
    # RMSprop: every optimizer this project trains with); "linear" = every lr x N (Goyal et al., meant
    # for SGD with a warm-up); "sqrt" = x sqrt(N); "none" = as given (models/distributed.py)
    lr_scaling: str = "auto"


def default_device(device: str | None = None) -> str:
    """``device``, or CUDA when this process can use it, else CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on CUDA (when ``enabled``); a no-op context on the CPU."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


LR_SCALINGS = ("auto", "none", "linear", "sqrt")
ADAPTIVE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
                       torch.optim.Adadelta, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)


def lr_factor(rule: str, world: int, optimizers: Iterable[torch.optim.Optimizer]) -> float:
    """The factor every learning rate of the schedule is multiplied by on ``world`` ranks.

    The batch a config states is per rank, so N ranks take N x the images a step. The linear rule
    (Goyal et al. 2017) is derived for SGD and needs a warm-up; adaptive optimizers normalise the
    step by the gradient's running scale, and scaling their rate by N (a GAN critic at 4e-3 on 8
    GPUs) diverges rather than speeds up. So ``auto`` scales plain SGD linearly and leaves adaptive
    optimizers as given; ``linear`` and ``sqrt`` are there to be asked for.
    """
    if rule not in LR_SCALINGS:
        raise ValueError(f"lr_scaling must be one of {list(LR_SCALINGS)}, got {rule!r}")
    if world <= 1 or rule == "none":
        return 1.0
    if rule == "auto":
        adaptive = [isinstance(o, ADAPTIVE_OPTIMIZERS) for o in optimizers]
        return 1.0 if all(adaptive) else float(world)
    return float(world) if rule == "linear" else float(world) ** 0.5


RANK_SEED_STRIDE = 1_000_003  # a prime: (seed, rank) pairs do not collide for seeds below it


def rank_seed(seed: int, rank: int | None = None) -> int:
    """The seed of this rank's own random stream (noise, dropout, augmentation): ``seed`` itself on
    rank 0 (so a 1-process run is unchanged), another stream on every other rank. Under DDP every rank
    starts from the same weights (DDP broadcasts rank 0's) but must not draw the same noise: N ranks
    would compute one rank's gradient for the random parts."""
    rank = distributed.rank_and_world()[0] if rank is None else rank
    return seed + RANK_SEED_STRIDE * rank


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (the one process's outside DDP), for rank 0's checkpoint."""
    mine = _rng_state()
    if not distributed.is_distributed():
        return [mine]
    return distributed.gather_objects(mine)


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    """Paths as strings, containers walked: what a ``weights_only`` load accepts besides tensors."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def save_checkpoint(path: Path, **state: Any) -> None:
    """Tensors and plain values only (so ``load_checkpoint`` never needs to unpickle code), written
    under a temporary name and renamed: a crash leaves the previous checkpoint whole."""
    with atomic_path(path) as tmp:
        torch.save(_plain(state), tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint or export: tensors and plain values only (``weights_only``). Anything else, e.g. a
    pickle that names a function to call, is refused: a file we are handed must never run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not a plain weights file: it holds objects beyond tensors and plain values, "
                         "which could run code when loaded; refusing to load it") from None
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001  (torch.load of junk raises KeyError, EOFError, RuntimeError ...)
        raise ValueError(f"{path} is not a readable weights file ({type(e).__name__}); expected a model.pt "
                         "or checkpoint written by imagesmith") from None


def load_export(path: str | Path, kind: str, what: str) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(state, metadata, file) of an exported model: ``path`` is the file or the folder holding ``model.pt``;
    ``kind`` the metadata entry the export must carry (``superres``, ``devise``)."""
    path = Path(path)
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no exported {what} at {path}; train one first (it is written when training ends)")
    state = load_checkpoint(path)
    if state.get(kind) is None:
        raise ValueError(f"{path} holds no {what} (no {kind!r} entry)")
    return state, state[kind], path


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None,
                         group_scales: tuple[float, ...] | None = None) -> None:
    if group_scales is not None and len(group_scales) != len(optimizer.param_groups):
        raise ValueError(f"the phase scales {len(group_scales)} parameter groups; the optimizer has "
                         f"{len(optimizer.param_groups)}")
    for i, group in enumerate(optimizer.param_groups):
        # a scale of 0 freezes the group (no step moves it: every update is multiplied by lr)
        group["lr"] = lr * (group_scales[i] if group_scales is not None else group.get("lr_scale", 1.0))
        if momentum is not None:
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            elif "momentum" in group:
                group["momentum"] = momentum


def _terms(out: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    terms = out if isinstance(out, dict) else {"loss": out}
    if "loss" not in terms:
        raise ValueError(f"the loss function returned terms {sorted(terms)}; one must be named 'loss'")
    return terms


class TrainingStep:
    """What the loop does with one batch. Subclasses own their models, optimizers and losses."""

    def modules(self) -> dict[str, nn.Module]:
        """The trained modules by name (their state goes into checkpoints under these names)."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def step(self, x: torch.Tensor, y: torch.Tensor, *, lr: float, momentum: float | None,
             group_scales: tuple[float, ...] | None, device: torch.device, bf16: bool) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch (already on ``device``); returns its loss terms, one named
        ``loss`` (terms may differ from step to step: each is averaged over the steps it appears in)."""
        raise NotImplementedError

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap each trained module for data-parallel training (DDP, models/distributed.py); a step
        calls ``self.wrapped(name)`` for the forward pass of the model it is training, and the
        plain module for one it is not (no gradient to synchronise)."""
        self._wrapped = {name: wrap(m) for name, m in self.modules().items()}

    def wrapped(self, name: str) -> nn.Module:
        wrapped = getattr(self, "_wrapped", {}).get(name)
        return wrapped if wrapped is not None else self.modules()[name]

    def enter_phase(self, phase: Phase) -> bool:
        """Called as the loop enters each phase (and on a resume); returns whether the set of trained
        parameters changed (under DDP the loop then wraps the modules anew: DDP reduces only the
        parameters that required gradients when it was built)."""
        return False

    def extra_state(self) -> dict[str, Any]:
        """Plain values beyond the modules and optimizers a resume needs (e.g. a GAN switcher's mode)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {**{k: m.state_dict() for k, m in self.modules().items()},
                **{k: o.state_dict() for k, o in self.optimizers().items()}, "step_state": self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, m in self.modules().items():
            m.load_state_dict(state[k])
        for k, o in self.optimizers().items():
            o.load_state_dict(state[k])
        self.load_extra_state(state.get("step_state") or {})

    def to(self, device: torch.device, *, channels_last: bool = False) -> TrainingStep:
        for m in self.modules().values():
            m.to(device)
            if channels_last:
                m.to(memory_format=torch.channels_last)
        return self

    def train(self) -> TrainingStep:
        for m in self.modules().values():
            m.train()
        return self

    def eval(self) -> TrainingStep:
        for m in self.modules().values():
            m.eval()
        return self


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)  # trained in frozen groups too


class ModelStep(TrainingStep):
    """The usual step: one model, one optimizer, one loss, one ``backward``.

    ``loss_fn(model(x), y)`` returns a tensor or a dict of terms with a ``loss``. ``grad_clip``:
    clip the gradients' total norm before the update.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, *,
                 grad_clip: float | None = None):
        self.model, self.optimizer, self.loss_fn, self.grad_clip = model, optimizer, loss_fn, grad_clip
        self._frozen: tuple[int, ...] | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def enter_phase(self, phase: Phase) -> bool:
        """Freeze the optimizer groups the phase names (``Phase.frozen_groups``), as fastai's
        ``freeze_to`` with ``train_bn=True``: their parameters get no gradient at all (no backward
        work), except those of BatchNorm layers, which keep training at their group's rate."""
        frozen = tuple(phase.frozen_groups)
        if frozen == self._frozen:
            return False
        if frozen and max(frozen) >= len(self.optimizer.param_groups):
            raise ValueError(f"the phase freezes groups {frozen}; the optimizer has "
                             f"{len(self.optimizer.param_groups)} parameter groups")
        norm = {id(p) for m in self.model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()}
        for i, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                p.requires_grad_(i not in frozen or id(p) in norm)
        changed = self._frozen is not None or bool(frozen)
        self._frozen = frozen
        return changed

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def step(self, x, y, *, lr, momentum, group_scales, device, bf16):
        set_hyperparameters(self.optimizer, lr, momentum, group_scales)
        with autocast(device, bf16):
            terms = _terms(self.loss_fn(self.wrapped("model")(x), y))
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return terms


def _stopped(signum: int, step: int, epoch: int, spe: int, ckpt: Path, progress: bool):
    name = {2: "SIGINT", 15: "SIGTERM"}.get(signum, f"signal {signum}")
    if progress:
        print(file=sys.stderr)
    raise TrainingStopped(f"{name}: training stopped at step {step} (epoch {epoch + 1}, batch {step - epoch * spe} of "
                          f"{spe}) and checkpointed to {ckpt}; run the same command again to resume from there", signum)


def _check_finite(terms: dict[str, torch.Tensor], step: int, epoch: int, steps_per_epoch: int) -> None:
    """Stop at the first step whose loss terms are not all finite, naming the step and the term
    (one host sync a step: the terms are scalars). The weights after it are not checkpointed."""
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
    if bool(torch.isfinite(values).all()):
        return
    bad = ", ".join(f"{name} = {float(v)}" for name, v in terms.items() if not math.isfinite(float(v)))
    raise NonFiniteLoss(f"training diverged at step {step} (epoch {epoch + 1}, batch {step - epoch * steps_per_epoch} "
                        f"of {steps_per_epoch}): {bad}; the last checkpoint is kept. Lower the learning rate, or "
                        f"check the inputs and loss weights")


def _placement(step_fn: TrainingStep) -> dict[str, tuple[frozenset[str], tuple[bool, ...]]]:
    """Per trained module: the devices of its parameters and buffers, and every submodule's mode."""
    return {name: (frozenset(str(t.device) for t in (*m.parameters(), *m.buffers())),
                   tuple(sub.training for sub in m.modules()))
            for name, m in step_fn.modules().items()}


def _check_placement(step_fn: TrainingStep, before: dict, hook: str) -> None:
    """Raise, naming the hook, if it moved a trained module to another device or changed a mode:
    e.g. a sample grid drawn with ``model.cpu().eval()`` would leave the generator on the CPU while
    its optimizer state and the next batches stay on the GPU (it fails a step later, far from here)."""
    for name, (devices, modes) in _placement(step_fn).items():
        was_devices, was_modes = before[name]
        if devices != was_devices:
            raise RuntimeError(f"the {hook} hook moved the trained module {name!r} from {sorted(was_devices)} to "
                               f"{sorted(devices)}; hooks must leave trained modules where they are (run a copy, "
                               f"or move the inputs to the module's device)")
        if modes != was_modes:
            raise RuntimeError(f"the {hook} hook changed the train/eval mode of the trained module {name!r}; hooks "
                               f"must restore it (models.train.eval_mode)")


@contextmanager
def eval_mode(*modules: nn.Module):
    """Eval mode and no gradients for a block; every submodule's own mode restored after (a module
    being trained stays in training, a frozen part of it stays in eval)."""
    saved = [(sub, sub.training) for m in modules for sub in m.modules()]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield modules[0] if len(modules) == 1 else modules
    finally:
        for sub, mode in saved:
            sub.training = mode


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters (else buffers) are; the CPU for one with neither."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextmanager
def _tensorboard(log_dir: Path | None, step: int):
    """A SummaryWriter for ``log_dir`` (None: no writer), closed at the end.

    purge_step: a resumed run drops what the interrupted one logged after its checkpoint (steps
    are logged after their update, so the checkpoint at ``step`` already includes step ``step``).
    """
    if log_dir is None:
        yield None
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # the package is optional (absent on the GPU machine's image): curves only
        log.warning("no TensorBoard curves in %s: %s (pip install tensorboard)", log_dir, e)
        yield None
        return

    writer = SummaryWriter(str(log_dir), purge_step=step + 1 if step else None)
    try:
        yield writer
    finally:
        writer.close()


def train(step_fn: TrainingStep, schedule: PhaseSchedule, batches: Batches, config: TrainConfig, *,
          evaluate: Callable[[TrainingStep], dict[str, float]] | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None, resume: bool = True,
          stop_after_steps: int | None = None) -> list[dict[str, Any]]:
    """Train to the end of ``schedule`` (or resume to it); returns one record per epoch.

    ``batches(epoch, phase)`` must give the same batches for the same epoch (e.g. a loader whose
    order comes from ``set_epoch``): exact resume relies on it. ``stop_after_steps`` stops early
    (after checkpointing), for runs split across jobs.
    """
    device = torch.device(default_device(config.device))
    cuda = device.type == "cuda"
    rank, world = distributed.rank_and_world()
    writes = rank == 0  # under DDP only rank 0 writes checkpoints, TensorBoard, logs and artifacts
    factor = lr_factor(config.lr_scaling, world, step_fn.optimizers().values())
    progress = (sys.stderr.isatty() if config.progress is None else config.progress) and writes
    step_fn.to(device, channels_last=cuda and config.channels_last)
    ckpt = Path(config.checkpoint_dir) / CHECKPOINT
    # per loss term: its sum over the epoch's samples, and how many samples it was computed on
    # (a term may appear on some steps only, e.g. a GAN's generator and critic terms alternate)
    step, history, sums, counts = 0, [], defaultdict(float), defaultdict(int)
    if resume and ckpt.is_file():
        state = load_checkpoint(ckpt)
        step_fn.load_state_dict(state)
        step, history = state["step"], state["history"]
        sums = defaultdict(float, state["epoch_sums"])
        # checkpoints written before per-term counts held one count for every term
        counts = defaultdict(int, state.get("epoch_counts") or dict.fromkeys(sums, state.get("epoch_seen", 0)))
        ranks_rng = state.get("rng_ranks") or [state["rng"]]
        if len(ranks_rng) == world:
            _set_rng_state(ranks_rng[rank])  # each rank goes on with its own stream
        elif rank == 0:
            _set_rng_state(state["rng"])
        else:  # the world size changed: a fresh stream per rank, a function of (seed, rank, step)
            seed_everything(rank_seed(config.seed + step, rank))
        log.info("resumed from %s at step %d (epoch %d)", ckpt, step, step // schedule.steps_per_epoch)
    else:
        seed_everything(rank_seed(config.seed, rank))

    def checkpoint() -> None:  # every rank calls it (the RNG states are gathered); rank 0 writes
        rngs = _gather_rng_states()
        if not writes:
            return
        save_checkpoint(ckpt, **step_fn.state_dict(), step=step,
                        epoch=step // schedule.steps_per_epoch, rng=rngs[0], rng_ranks=rngs,
                        epoch_sums={k: float(v) for k, v in sums.items()}, epoch_counts=dict(counts),
                        history=history, config={**asdict(config), "checkpoint_dir": str(ckpt.parent)})

    entered: int | None = None

    def enter(phase_index: int) -> None:
        nonlocal entered
        if phase_index == entered:
            return
        changed = step_fn.enter_phase(schedule.phases[phase_index])
        if world > 1 and (entered is None or changed):  # DDP reduces what required gradients when built
            step_fn.distribute(lambda m: distributed.wrap(m, device))
        entered = phase_index

    def hook(name: str, fn: Callable, *args):
        before = _placement(step_fn)
        result = fn(*args)
        _check_placement(step_fn, before, name)
        return result

    last_saved = time.monotonic()

    def any_rank(flag: bool) -> bool:
        """``flag`` on any rank (one tiny all-reduce under DDP): checkpoints and stops are collective."""
        if world == 1:
            return flag
        return float(distributed.mean_scalar(torch.tensor(float(flag), device=device))) > 0

    def stop_asked(requests: dict) -> bool:
        """A stop signal reached this process, or any rank (torchrun forwards SIGTERM to every rank)."""
        if any_rank(requests["signum"] is not None) and requests["signum"] is None:
            requests["signum"] = 15
        return requests["signum"] is not None

    def save_now(requests: dict) -> bool:
        """Whether to checkpoint mid-epoch now: a stop was asked for, or the time is due."""
        due = config.checkpoint_minutes > 0 and time.monotonic() - last_saved >= 60 * config.checkpoint_minutes
        return stop_asked(requests) | any_rank(due)

    with _tensorboard(config.tensorboard_dir if writes else None, step) as writer, _stop_requests() as requests:
        spe = schedule.steps_per_epoch
        for epoch in range(step // spe, schedule.epochs):
            phase_index = schedule.phase_of_epoch(epoch)
            phase = schedule.phases[phase_index]
            skip = step - epoch * spe  # batches of this epoch taken before an interruption
            step_fn.train()
            start = time.perf_counter()
            taken = 0
            for i, (x, y) in enumerate(batches(epoch, phase)):
                if i >= spe:
                    break
                if i < skip:
                    continue
                at_phase, lr, momentum = schedule.at(step)  # phases may change mid-epoch (a 1cycle's warm-up)
                enter(at_phase)
                lr *= factor
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cuda and config.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                terms = _terms(step_fn.step(x, y, lr=lr, momentum=momentum, device=device, bf16=config.bf16,
                                            group_scales=schedule.phases[at_phase].group_scales))
                step += 1
                taken += 1
                _check_finite(terms, step, epoch, spe)
                for name, value in terms.items():  # summed on the device: no host sync per step
                    sums[name] = sums[name] + value.detach().double() * len(x)
                    counts[name] += len(x)
                if writer is not None:
                    writer.add_scalar("train/loss", float(terms["loss"].detach()), step)
                    writer.add_scalar("train/lr", lr, step)
                if progress and i % 10 == 0:
                    print(f"\repoch {epoch + 1}/{schedule.epochs} step {i + 1}/{spe} loss {float(terms['loss']):.4f}",
                          end="", file=sys.stderr)
                mid_epoch = bool(step % spe)
                if mid_epoch and (save_now(requests) or (config.checkpoint_every and
                                                         step % config.checkpoint_every == 0)):
                    checkpoint()
                    last_saved = time.monotonic()
                if mid_epoch and requests["signum"] is not None:  # checkpointed just above
                    _stopped(requests["signum"], step, epoch, spe, ckpt, progress)
                if stop_after_steps is not None and step >= stop_after_steps and step % spe:
                    checkpoint()
                    return history
            if skip + taken < spe:
                raise ValueError(f"epoch {epoch} gave {skip + taken} batches; the schedule expects {spe} per epoch")
            all_sums, all_counts = distributed.mean_over_ranks({k: float(v) for k, v in sums.items()}, counts)
            record = {"epoch": epoch, "of_epochs": schedule.epochs, "phase": phase_index, "lr": lr, "step": step,
                      **{name: total / max(all_counts[name], 1) for name, total in all_sums.items()},
                      "seconds": round(time.perf_counter() - start, 3)}
            if world > 1:
                record["ranks"] = world
            if not writes:  # the other ranks go on: rank 0 evaluates, logs and checkpoints
                history.append(record)
                sums, counts = defaultdict(float), defaultdict(int)
                checkpoint()  # this rank's RNG state goes into rank 0's checkpoint
                if stop_asked(requests) and epoch + 1 < schedule.epochs:  # as rank 0 decides below
                    _stopped(requests["signum"], step, epoch, spe, ckpt, progress)
                if stop_after_steps is not None and step >= stop_after_steps:
                    return history
                continue
            if evaluate is not None:
                step_fn.eval()
                with torch.no_grad():
                    record.update({f"valid_{k}": v for k, v in hook("evaluate", evaluate, step_fn).items()})
            history.append(record)
            if writer is not None:
                for name, value in record.items():
                    if isinstance(value, float) and name not in ("lr", "seconds"):
                        writer.add_scalar(f"epoch/{name}", value, epoch)
                writer.flush()
            sums, counts = defaultdict(float), defaultdict(int)
            checkpoint()
            last_saved = time.monotonic()
            if progress:
                print(file=sys.stderr)
            log.info("epoch %d/%d: %s", epoch + 1, schedule.epochs,
                     {k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()})
            if on_epoch is not None:
                hook("on_epoch", on_epoch, record)
            if stop_asked(requests) and epoch + 1 < schedule.epochs:  # stopped on an epoch's last step
                _stopped(requests["signum"], step, epoch, spe, ckpt, progress)
            if stop_after_steps is not None and step >= stop_after_steps:
                return history
        return history


def param_groups(*groups: tuple[nn.Module, float]) -> list[dict[str, Any]]:
    """Optimizer groups with learning-rate multipliers (discriminative learning rates).

    ``param_groups((encoder, 1e-2), (decoder, 1.0))``: the encoder trains at 1/100 of the schedule's lr.
    """
    return [{"params": [p for p in m.parameters()], "lr_scale": scale} for m, scale in groups]
