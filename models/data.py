"""Training batches from an HDF5 image store: contiguous reads, shuffled chunks, uint8 to the GPU.

The store is already in shuffled-listing order, so any contiguous block is a random mix of
classes. Each epoch reshuffles the order of blocks and, within a buffer of blocks, the order of
images: sequential disk reads, shuffled batches. Batches are uint8 NHWC; convert and normalise
on the device (``to_float_nchw``), where NHWC -> NCHW by ``permute`` is channels_last for free.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
import select
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from models.distributed import rank_and_world
from storage.hdf5 import DEFAULT_CHUNK_IMAGES, open_store

log = logging.getLogger(__name__)

REMAINDER = "remainder"  # a worker's rows left over after its last full batch
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ChunkShuffleStream(IterableDataset):
    """Yields ``(images uint8 (B, S, S, 3), labels int64 (B,))`` batches from ``store``, or with
    ``target_store`` (aligned, e.g. crappified -> original) ``(images, target images uint8)``.

    ``x_key`` names the dataset to read (``images``, or ``features`` of a precomputed-activations
    store). ``keep_labels``: only rows with these labels are read (e.g. DeViSE trains without the
    classes held out for zero-shot); batches stay full-sized.

    ``block_images`` rows are read per HDF5 read (default: one storage chunk); ``buffer_blocks``
    blocks are shuffled together (default 16: 1,024 images, 150 MB per worker at S=224). ``subset`` in (0, 1] keeps the first fraction of the store (a
    random subset, as the store is shuffled). Call ``set_epoch`` before each epoch; epochs with
    the same ``seed`` and epoch number give the same batches.
    """

    def __init__(self, store: str | Path, batch_size: int, *, target_store: str | Path | None = None,
                 block_images: int | None = None,
                 buffer_blocks: int = 16, subset: float = 1.0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, x_key: str = "images", keep_labels: Sequence[int] | None = None,
                 rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 < subset <= 1:
            raise ValueError(f"subset must be a fraction in (0, 1], got {subset}")
        if buffer_blocks < 1:
            raise ValueError(f"buffer_blocks must be >= 1, got {buffer_blocks}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        self.rank, self.world = rank, world
        if keep_labels is not None and target_store:
            raise ValueError("keep_labels filters by class label; a target_store pairs images instead")
        self.store, self.batch_size = str(store), batch_size
        self.target_store = str(target_store) if target_store else None
        self.buffer_blocks, self.subset, self.seed = buffer_blocks, subset, seed
        self.shuffle, self.drop_last, self.x_key = shuffle, drop_last, x_key
        # in shared memory: persistent loader workers see set_epoch() without being restarted
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        with open_store(self.store) as f:  # read the shape, then close: no handle crosses a fork
            if x_key not in f:
                raise KeyError(f"{self.store} has no dataset {x_key!r}; it has {sorted(f)}")
            images = f[x_key]
            self.n_total = images.shape[0]
            self.image_shape = images.shape[1:]
            # a joined store is a virtual dataset (no chunks of its own): its shards use the default
            chunk = images.chunks[0] if images.chunks else DEFAULT_CHUNK_IMAGES
            labels = f["labels"][:] if keep_labels is not None else None
        if self.target_store:
            with open_store(self.target_store) as t:
                if t["images"].shape[0] != self.n_total:
                    raise ValueError(f"{self.target_store} holds {t['images'].shape[0]} images; {self.store} "
                                     f"holds {self.n_total}: pairs need aligned stores")
        self.block_images = block_images or chunk
        self.n = max(1, round(self.n_total * subset)) if self.n_total else 0
        self._keep = None  # (max label + 1,) bool, indexed by label
        self._labels = None
        self.n_kept = self.n
        if keep_labels is not None:
            self._keep = np.zeros(max([int(labels.max()) if len(labels) else 0, *keep_labels]) + 1, bool)
            self._keep[list(keep_labels)] = True
            self._labels = labels[:self.n]
            self.n_kept = int(self._keep[self._labels].sum())
        self._file = self._target = None
        self._pid = None

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def rows_per_epoch(self) -> int:
        """Rows this rank sees per epoch: all of them, or on N ranks an equal 1/N (the n % N rows
        that fall last in the epoch's order are left out of that epoch, so every rank takes the
        same number of steps)."""
        return self.n_kept // self.world

    def __len__(self) -> int:
        """Batches per epoch (through ``make_loader``, with any number of workers)."""
        n = self.rows_per_epoch
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"], state["_target"], state["_pid"] = None, None, None  # h5py handles: not picklable/fork-safe
        return state

    def _open(self):
        if self._file is None or self._pid != os.getpid():
            self._file = open_store(self.store)
            self._target = open_store(self.target_store) if self.target_store else None
            self._pid = os.getpid()
        return self._file

    def rank_segments(self) -> list[tuple[int, int]]:
        """This rank's row ranges ``[a, b)`` for the epoch, in reading order. The blocks' order is a
        function of (seed, epoch) only; on N ranks the epoch's rows in that order are cut into N
        equal consecutive parts, one per rank: disjoint, together the whole epoch."""
        blocks = [(a, min(a + self.block_images, self.n)) for a in range(0, self.n, self.block_images)]
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(blocks)) if self.shuffle \
            else np.arange(len(blocks))
        if self.world == 1:
            return [blocks[i] for i in order]
        rows = np.concatenate([np.arange(*blocks[i]) for i in order]) if blocks else np.empty(0, np.int64)
        if self._keep is not None:
            rows = rows[self._keep[self._labels[rows]]]
        per = len(rows) // self.world
        mine = rows[self.rank * per:(self.rank + 1) * per]
        if not len(mine):
            return []
        breaks = np.flatnonzero(np.diff(mine) != 1) + 1  # runs of consecutive rows: contiguous reads
        starts, ends = np.r_[0, breaks], np.r_[breaks, len(mine)]
        return [(int(mine[a]), int(mine[b - 1]) + 1) for a, b in zip(starts, ends)]

    def _my_blocks(self) -> list[tuple[int, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank_segments()[worker::workers]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        f = self._open()
        # targets: class labels, or the aligned images of the target store (low -> high pairs)
        images, labels = f[self.x_key], (self._target["images"] if self._target is not None else f["labels"])
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, 1 + (info.id if info else 0)]
                                    + ([self.rank] if self.world > 1 else []))
        blocks = self._my_blocks()
        carry_x = np.empty((0, *self.image_shape), images.dtype)
        carry_y = np.empty((0, *labels.shape[1:]), labels.dtype if self._target is not None else np.int64)
        for start in range(0, len(blocks), self.buffer_blocks):
            group = blocks[start:start + self.buffer_blocks]
            x = np.concatenate([images[a:b] for a, b in group])  # contiguous reads
            y = np.concatenate([labels[a:b] for a, b in group]).astype(carry_y.dtype)
            if self._keep is not None:
                kept = self._keep[y]
                x, y = x[kept], y[kept]
            x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
            if self.shuffle:
                perm = rng.permutation(len(x))
                x, y = x[perm], y[perm]
            full = len(x) // self.batch_size * self.batch_size
            for i in range(0, full, self.batch_size):
                yield torch.from_numpy(x[i:i + self.batch_size]), torch.from_numpy(y[i:i + self.batch_size])
            carry_x, carry_y = x[full:], y[full:]
        if len(carry_x) and info is not None and info.num_workers > 1:
            # a worker's last rows cannot fill a batch alone; the loader in the main process
            # batches every worker's remainder together (StoreLoader), so an epoch has len() batches
            yield {REMAINDER: (torch.from_numpy(carry_x), torch.from_numpy(carry_y))}
        elif len(carry_x) and not self.drop_last:
            yield torch.from_numpy(carry_x), torch.from_numpy(carry_y)


class StoreLoader:
    """Batches of a ``ChunkShuffleStream`` formed in DataLoader worker processes, exactly ``len()``
    per epoch: each worker yields the full batches of its own blocks, and the rows each has left
    over are batched together here, in a seeded order. (Without that, every worker would drop or
    shorten its own last batch, and an epoch's batch count would depend on how rows fell.)"""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.dataset: ChunkShuffleStream = loader.dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream, rest = self.dataset, []
        for item in self.loader:
            if isinstance(item, dict):
                rest.append(item[REMAINDER])
            else:
                yield item
        if not rest:
            return
        x, y = torch.cat([r[0] for r in rest]), torch.cat([r[1] for r in rest])
        if stream.shuffle:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(stream.seed * 1_000_003 + stream.epoch))
            x, y = x[order], y[order]
        bs = stream.batch_size
        stop = len(x) if not stream.drop_last else len(x) // bs * bs
        for a in range(0, stop, bs):
            yield x[a:a + bs], y[a:a + bs]


def make_loader(store: str | Path, batch_size: int, *, num_workers: int = 2, pin_memory: bool | None = None,
                **stream_kwargs) -> StoreLoader:
    """Batches from ``store`` through a DataLoader over ``ChunkShuffleStream`` (batches are formed in
    the workers; see ``StoreLoader``).

    Workers start from a fork server, not by forking this process: inside a Prefect flow the
    process runs threads (log shipping, the event loop), and a fork copies their locks mid-use
    (seen here as workers dying at shutdown). They persist across epochs, so the start-up
    (~1-2 s: each imports torch) is paid once; ``loader.dataset.set_epoch(e)`` reaches them.
    """
    if "rank" not in stream_kwargs and "world" not in stream_kwargs:  # under DDP: this rank's rows
        stream_kwargs["rank"], stream_kwargs["world"] = rank_and_world()
    stream = ChunkShuffleStream(store, batch_size, **stream_kwargs)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    workers = {}
    if num_workers:
        ctx = multiprocessing.get_context("forkserver")
        # the fork server imports torch/h5py once; workers fork from it warm (no effect once it runs)
        ctx.set_forkserver_preload(["models.data"])
        workers = {"prefetch_factor": 4, "persistent_workers": True, "multiprocessing_context": ctx,
                   "worker_init_fn": functools.partial(exit_with, os.getpid())}
    # The loader draws its workers' base seed when it is first iterated. From the global RNG, that
    # draw would come after a resumed run restored the checkpoint's RNG state and shift every later
    # draw (dropout...): exact resume needs the loader to have its own generator.
    generator = torch.Generator().manual_seed(stream.seed)
    return StoreLoader(DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                  generator=generator, **workers))


def exit_with(main_pid: int, _worker_id: int = 0) -> None:
    """Make this DataLoader worker exit as soon as process ``main_pid`` ends, however it ends.

    A worker's parent is the fork server, not the training process, so torch's own check (is my
    parent alive?) never fires when the training process is killed (-9, OOM killer): the fork
    server lives on while its workers hold its pipe open, and the workers wait on it. Each orphan
    keeps ~300 MB and open HDF5 files. A daemon thread waits on a pidfd of the training process."""
    try:
        fd = os.pidfd_open(main_pid)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll instead
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while True:
                try:
                    os.kill(main_pid, 0)
                except ProcessLookupError:
                    break
                threading.Event().wait(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-trainer", daemon=True).start()


def store_batches(images, batch_size: int, device: torch.device | str, *, what: str,
                  log_every: float = 0.1) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, ImageNet-normalised float batch on ``device``) for consecutive batches of a store's
    uint8 ``images`` dataset, in row order (inference passes); logs progress every 10%."""
    n, logged = len(images), 0
    for a in range(0, n, batch_size):
        yield a, to_float_nchw(torch.from_numpy(images[a:a + batch_size]), device)
        done = min(a + batch_size, n)
        if done / max(n, 1) >= logged + log_every or done == n:
            logged = done / max(n, 1)
            log.info("%s: %d/%d images", what, done, n)


def to_unit(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1] on ``device`` (restoration models' range)."""
    return images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)


def to_float_nchw(images: torch.Tensor, device: torch.device | str, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, C) -> normalised float (B, C, H, W) on ``device``, channels_last in memory."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).to(dtype).div_(255)
    m = torch.tensor(mean, device=x.device, dtype=dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)
