"""Data-parallel training with ``torch.distributed`` (DDP), as ``torchrun`` launches it.

One process per device (a rank). The shared loop (models/train.py) wraps the trained model(s) in
``DistributedDataParallel``; the loader (models/data.py) gives each rank its own disjoint rows of
the store per epoch; only rank 0 writes (checkpoints, TensorBoard, exports, artifacts); every
rank resumes from the same checkpoint; epoch metrics are averaged over the ranks before they are
logged. NCCL on GPUs, gloo on CPUs (the tests run 2 CPU ranks).

The learning rate: the batch size a config states is per rank, so a run on N ranks takes
N x batch images a step. The linear scaling rule (Goyal et al. 2017, "Accurate, large minibatch
SGD": every lr x N, with a warm-up) is derived for SGD; every optimizer this project trains with is
adaptive (Adam, AdamW, RMSprop), whose step is normalised by the gradient's own scale, so the
default (``TrainConfig.lr_scaling="auto"``) leaves their rates as given and scales plain SGD
linearly; ``"linear"``, ``"sqrt"`` and ``"none"`` can be asked for (``models.train.lr_factor``).
So ``--gpus 4`` with the same config trains on 4x the images a step at the same rate; to
reproduce a 1-device run exactly, divide the batch size by N instead.

Randomness: every rank starts from rank 0's weights (DDP broadcasts them) but draws its own noise,
dropout masks and augmentations (``models.train.rank_seed``: seed + a stride x rank; rank 0 keeps
the seed, so a 1-process run is unchanged). Rank 0's checkpoint holds every rank's RNG state, so
a resumed run continues each rank's own stream.

BatchNorm: the models' BatchNorm layers normalise over the global batch, as on one device:
torch's ``SyncBatchNorm`` on GPUs, ``SyncBatchNormCPU`` (below; torch's runs on GPUs only) on
CPUs. A layer whose module is frozen in eval mode (e.g. a pretrained body's, kept fixed) uses its
running statistics, as on one device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn


def cuda_devices() -> int:
    """How many CUDA GPUs this machine has (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of ranks): (0, 1) outside a distributed run."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    return int(environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in environ


def setup(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...):
    NCCL with this rank's GPU (``LOCAL_RANK``) when CUDA is available, else gloo. A no-op outside
    torchrun. Returns (rank, world)."""
    if not launched_by_torchrun(environ) or dist.is_initialized():
        return rank_and_world()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return rank_and_world()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel (BatchNorm synchronised on GPUs); itself outside a
    distributed run. The wrapper shares the module's parameters: optimizers and state dicts keep
    using the module."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DistributedDataParallel(module, device_ids=[device.index if device.index is not None
                                                           else torch.cuda.current_device()])
    return DistributedDataParallel(sync_batchnorm_cpu(module))


def gather_objects(value: object) -> list:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` outside a distributed run."""
    if not is_distributed():
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def mean_over_ranks(sums: Mapping[str, float], counts: Mapping[str, int]) -> tuple[dict[str, float], dict[str, int]]:
    """Per term: (sum over every rank's samples, count over every rank) (terms absent on a rank count 0)."""
    if not is_distributed():
        return dict(sums), dict(counts)
    gathered = gather_objects(({k: float(v) for k, v in sums.items()}, dict(counts)))
    total_s: dict[str, float] = {}
    total_c: dict[str, int] = {}
    for s, c in gathered:
        for k, v in s.items():
            total_s[k] = total_s.get(k, 0.0) + v
            total_c[k] = total_c.get(k, 0) + c.get(k, 0)
    return total_s, total_c


def mean_scalar(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the ranks (itself outside a distributed run): for decisions every
    rank must take alike, e.g. a GAN switcher's."""
    if not is_distributed():
        return value
    v = value.detach().float().clone()
    dist.all_reduce(v)
    return v / dist.get_world_size()


# --- BatchNorm over every rank's batch, on CPUs too ----------------------------------------------


class _SyncBatchNorm(torch.autograd.Function):
    """Batch normalisation with statistics over the global batch: the per-channel sums, sums of
    squares and counts are all-reduced in the forward pass, the two gradient sums in the backward
    (the same algebra as torch's SyncBatchNorm, which runs on GPUs only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        dist.all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.n, ctx.dims, ctx.shape = n, dims, shape
        out = xhat * weight.view(shape) + bias.view(shape) if weight is not None else xhat
        return out, mean, var * n / (n - 1).clamp_min(1)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape, n = ctx.dims, ctx.shape, ctx.n
        local = torch.cat([grad_out.sum(dims), (grad_out * xhat).sum(dims)])
        sums = local.clone()
        dist.all_reduce(sums)
        c = xhat.shape[1]
        sum_dy, sum_dy_xhat = sums[:c], sums[c:]
        w = weight if weight is not None else torch.ones_like(invstd)
        grad_x = (w * invstd).view(shape) / n * (n * grad_out - sum_dy.view(shape) - xhat * sum_dy_xhat.view(shape))
        # the parameters' gradients are this rank's own: DDP averages them over the ranks
        grad_w = local[c:] if weight is not None else None
        grad_b = local[:c] if weight is not None else None
        return grad_x, grad_w, grad_b, None


class SyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer whose training statistics cover every rank's batch (gloo); outside
    training or outside a distributed run, an ordinary BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        out, mean, var = _SyncBatchNorm.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(var.to(self.running_var.dtype), alpha=m)
        return out


def sync_batchnorm_cpu(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer of ``module`` made a ``SyncBatchNormCPU`` (parameters and buffers
    shared: optimizers and state dicts are unchanged)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNormCPU):
        new = SyncBatchNormCPU(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = sync_batchnorm_cpu(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
