"""Training phases (lesson 13, 2018 "TrainingPhase"): a schedule is a list of phases.

Each phase has a length in epochs, a learning rate that is constant or anneals from a start to an
end value (LINEAR, COSINE, EXPONENTIAL or POLYNOMIAL), optionally a momentum (constant or
annealed the same way), and optionally an image size and batch size, so a phase can switch the
data (progressive resizing). 1cycle and SGDR are just lists of phases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DECAYS = ("constant", "linear", "cosine", "exponential", "polynomial")


def anneal(start: float, end: float, pct: float, decay: str, power: float = 2.0) -> float:
    """The value ``pct`` (0..1) of the way from ``start`` to ``end``."""
    if decay == "constant":
        return start
    if decay == "linear":
        return start + (end - start) * pct
    if decay == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * pct)) / 2
    if decay == "exponential":
        return start * (end / start) ** pct
    if decay == "polynomial":
        return end + (start - end) * (1 - pct) ** power
    raise ValueError(f"unknown decay {decay!r}; choose one of {list(DECAYS)}")


@dataclass(frozen=True)
class Phase:
    epochs: float  # may be a fraction: a 1cycle's warm-up is pct_start of all its steps
    lr: float | tuple[float, float]
    decay: str = "cosine"
    momentum: float | tuple[float, float] | None = None
    power: float = 2.0
    image_size: int | None = None
    batch_size: int | None = None
    # learning-rate multipliers per optimizer parameter group for this phase (e.g. (0, 0, 1): encoder
    # frozen; (0.01, 0.1, 1): discriminative); None keeps each group's own ``lr_scale``
    group_scales: tuple[float, ...] | None = None
    # optimizer parameter groups frozen in this phase: no gradients for their parameters, except the
    # norm layers' (fastai's freeze with train_bn=True); ModelStep.enter_phase applies it
    frozen_groups: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise ValueError(f"a phase lasts more than 0 epochs, got {self.epochs}")
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}; choose one of {list(DECAYS)}")
        if self.decay == "exponential" and isinstance(self.lr, tuple) and min(self.lr) <= 0:
            raise ValueError(f"exponential decay needs positive learning rates, got {self.lr}")

    @property
    def data(self) -> tuple[int | None, int | None]:
        return self.image_size, self.batch_size

    def lr_at(self, pct: float) -> float:
        start, end = self.lr if isinstance(self.lr, tuple) else (self.lr, self.lr)
        return anneal(start, end, pct, self.decay if start != end else "constant", self.power)

    def momentum_at(self, pct: float) -> float | None:
        if self.momentum is None:
            return None
        start, end = self.momentum if isinstance(self.momentum, tuple) else (self.momentum, self.momentum)
        return anneal(start, end, pct, self.decay if start != end else "constant", self.power)


class PhaseSchedule:
    """Step -> (phase index, lr, momentum) for a list of phases and a number of steps per epoch.

    Phases are laid out in steps: phase i starts at step ``int(epochs before it * steps_per_epoch)``
    (fastai's ``int(n * pct_start)`` for a 1cycle), and inside a phase the value at its j-th of n
    steps is ``anneal(start, end, j / n)``, as fastai's schedulers step. The phases must add up to
    whole epochs, and a phase that changes the data (image or batch size) must start an epoch.
    """

    def __init__(self, phases: Sequence[Phase], steps_per_epoch: int):
        if not phases:
            raise ValueError("a schedule needs at least one phase")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.phases, self.steps_per_epoch = list(phases), steps_per_epoch
        cumulative = [0.0]
        for p in self.phases:
            cumulative.append(cumulative[-1] + p.epochs)
        if abs(cumulative[-1] - round(cumulative[-1])) > 1e-9:
            raise ValueError(f"the phases add up to {cumulative[-1]} epochs; they must make whole epochs")
        self._epochs = round(cumulative[-1])
        self.step_starts = [int(c * steps_per_epoch + 1e-9) for c in cumulative]
        for i in range(1, len(self.phases)):
            if self.phases[i].data != self.phases[i - 1].data and abs(cumulative[i] - round(cumulative[i])) > 1e-9:
                raise ValueError(f"phase {i} changes the image or batch size mid-epoch (at epoch {cumulative[i]})")

    @property
    def epochs(self) -> int:
        return self._epochs

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def phase_at(self, step: int) -> int:
        for i in range(len(self.phases)):
            if step < self.step_starts[i + 1]:
                return i
        raise IndexError(f"step {step} is past the schedule's {self.total_steps} steps")

    def phase_of_epoch(self, epoch: int) -> int:
        """The phase at the epoch's first step (it sets the epoch's data: image and batch size)."""
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"epoch {epoch} is past the schedule's {self.epochs} epochs")
        return self.phase_at(epoch * self.steps_per_epoch)

    def at(self, step: int) -> tuple[int, float, float | None]:
        i = self.phase_at(step)
        first, length = self.step_starts[i], self.step_starts[i + 1] - self.step_starts[i]
        pct = (step - first) / max(length, 1)
        return i, self.phases[i].lr_at(pct), self.phases[i].momentum_at(pct)


def one_cycle(epochs: int, max_lr: float, *, pct_start: float = 0.3, div: float = 25.0,
              final_div: float | None = None, moms: tuple[float, float] = (0.95, 0.85), **data) -> list[Phase]:
    """1cycle (Smith 2018) as fastai v1's ``fit_one_cycle``: for ``pct_start`` of all steps, cosine
    from ``max_lr / div`` up to ``max_lr`` while momentum falls ``moms[0] -> moms[1]``; then cosine
    down to ``max_lr / final_div`` (default ``div * 1e4``) while momentum rises back."""
    if epochs < 1:
        raise ValueError(f"1cycle needs at least 1 epoch, got {epochs}")
    if not 0 < pct_start < 1:
        raise ValueError(f"pct_start must be a fraction in (0, 1), got {pct_start}")
    final_div = div * 1e4 if final_div is None else final_div
    return [
        Phase(epochs * pct_start, (max_lr / div, max_lr), "cosine", momentum=moms, **data),
        Phase(epochs * (1 - pct_start), (max_lr, max_lr / final_div), "cosine", momentum=(moms[1], moms[0]), **data),
    ]


def sgdr(cycles: int, cycle_len: int, lr_max: float, *, cycle_mult: int = 2, lr_min: float = 0.0, **data) -> list[Phase]:
    """SGDR (Loshchilov & Hutter): cosine restarts, each cycle ``cycle_mult`` times longer."""
    return [Phase(cycle_len * cycle_mult**i, (lr_max, lr_min), "cosine", **data) for i in range(cycles)]
