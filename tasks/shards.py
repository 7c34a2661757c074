"""Running shard functions on every core of this machine: a process per shard, or threads.

A stage's shard function takes one spec and writes one shard file (its own HDF5 file: workers
never share one). Measured on 2 cores (bench/resize.py, docs/BENCHMARKS.md): a process per shard
scaled 1.79x, two threads inside one shard 1.35x, as PIL's Python-level load loop and h5py hold the
GIL. A lone shard falls back to threads inside it.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, TypeVar

S = TypeVar("S")


def local_parallelism(n_shards: int, cores: int | None = None) -> tuple[int, int]:
    """(shard processes, threads per shard) for running ``n_shards`` on this machine."""
    cores = cores or os.cpu_count() or 1
    if n_shards >= 2 and cores >= 2:
        return min(cores, n_shards), 1
    return 1, cores


def map_shards(fn: Callable[..., dict[str, Any]], specs: Sequence[S], *, cores: int | None = None,
               pool: Executor | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """``fn(spec, workers=..., **kwargs)`` for every spec, in order, on all cores.

    ``pool``: a process pool to reuse (its start-up, ~2 s per process, is then paid once).
    """
    processes, threads = local_parallelism(len(specs), cores)
    if processes == 1:
        return [fn(spec, workers=threads, **kwargs) for spec in specs]
    run = functools.partial(fn, workers=1, **kwargs)
    if pool is not None:
        return list(pool.map(run, specs))
    # spawn, not fork: the parent may hold threads (Prefect's) and h5py state that a fork would copy
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as own:
        return list(own.map(run, specs))


def shards_by_split(specs: Sequence[S]) -> dict[str, list[S]]:
    """Shard specs (with ``split`` and ``shard`` fields) grouped by split, each in shard order."""
    groups: dict[str, list[S]] = {}
    for spec in sorted(specs, key=lambda s: (s.split, s.shard)):
        groups.setdefault(spec.split, []).append(spec)
    return groups
