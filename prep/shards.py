"""Sharded stages: plan -> one shard file per few thousand rows (any core, process or machine) -> join.

Resize and crappify are both this shape. A shard writes its own HDF5 file under a temporary name
and renames it when complete, so workers never share a file and a resume keeps every finished
shard (storage/hdf5.py verifies each by its CRC-32). The join makes one store per split from its
shards (a virtual dataset: no copy) and then the stage is complete.

Running shards on this machine: a process per shard, or threads inside a lone shard. Measured on
2 cores (bench/resize.py, docs/BENCHMARKS.md): a process per shard scaled 1.79x, two threads
inside one shard 1.35x, as PIL's Python-level load loop and h5py hold the GIL.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from storage.hdf5 import join_shards
from storage.report import Reporter
from storage.stage import StageSpec

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_SHARD_IMAGES = 5000


@dataclass(frozen=True)
class Shard:
    """One unit of work: rows [start, stop) of one split, written to the shard file ``path``."""

    split: str
    index: int
    start: int
    stop: int
    path: str

    @property
    def label(self) -> str:
        return f"{self.split}-{self.index:05d}"


def local_parallelism(n_shards: int, cores: int | None = None) -> tuple[int, int]:
    """(shard processes, threads per shard) for running ``n_shards`` on this machine."""
    cores = cores or os.cpu_count() or 1
    if n_shards >= 2 and cores >= 2:
        return min(cores, n_shards), 1
    return 1, cores


def map_shards(fn: Callable[..., dict[str, Any]], shards: Sequence[T], *, cores: int | None = None,
               pool: Executor | None = None) -> list[dict[str, Any]]:
    """``fn(shard, workers=...)`` for every shard, in order, on all cores.

    ``pool``: a process pool to reuse (its start-up, ~2 s per process, is then paid once).
    """
    processes, threads = local_parallelism(len(shards), cores)
    if processes == 1:
        return [fn(shard, workers=threads) for shard in shards]
    run = functools.partial(fn, workers=1)
    if pool is not None:
        return list(pool.map(run, shards))
    # spawn, not fork: the parent may hold threads (Prefect's) and h5py state that a fork would copy
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as own:
        return list(own.map(run, shards))


@contextmanager
def worker_map(workers: int | None) -> Iterator[Callable[[Callable[[T], R], Iterable[T]], Iterable[R]]]:
    """``map`` over ``workers`` threads inside one shard; the pool is shut down however the shard ends.

    One worker maps inline: a pool of one only adds a thread hand-off per image.
    """
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        yield map
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield pool.map


def shards_by_split(shards: Sequence[Shard]) -> dict[str, list[Shard]]:
    """Shards grouped by split, each in shard order."""
    groups: dict[str, list[Shard]] = {}
    for shard in sorted(shards, key=lambda s: (s.split, s.index)):
        groups.setdefault(shard.split, []).append(shard)
    return groups


class ShardedStage(StageSpec):
    """A stage built shard by shard. Subclasses say how many rows each split has, how one shard is
    written, and what the joined stores carry and must satisfy; the plan, the local run on all
    cores and the join are here, once. The orchestrator may instead run ``plan``, each
    ``build_shard`` (on a process pool or a Dask cluster) and ``join`` as separate tasks."""

    cores: int | None = None  # overridden by a runtime field in subclasses

    def split_rows(self) -> dict[str, int]:
        """``{split: rows}`` to shard."""
        raise NotImplementedError

    def shard_images(self) -> int:
        return DEFAULT_SHARD_IMAGES

    def build_shard(self, shard: Shard, *, workers: int | None = None) -> dict[str, Any]:
        """Write one shard file (skipped when it exists and verifies); returns what happened."""
        raise NotImplementedError

    def store_attrs(self, split: str) -> dict[str, Any]:
        """Attributes of the joined store of ``split``."""
        return {}

    def check_store(self, split: str, store: Path, counts: dict[str, int]) -> dict[str, Any]:
        """Check a joined store's invariant (raise when broken); returns its counts for the manifest."""
        return counts

    def finish(self, out: Path, counts: dict[str, Any]) -> dict[str, Any]:
        """The manifest facts, once every split is joined (``counts``: per split)."""
        return {"counts": counts, "stores": {split: f"{split}.h5" for split in counts}}

    def plan(self, out: Path) -> list[Shard]:
        """Every shard of every split, in order; shard files go to ``out/shards/``."""
        step = self.shard_images()
        return [Shard(split, i, start, min(start + step, n), str(out / "shards" / f"{split}-{i:05d}.h5"))
                for split, n in self.split_rows().items() for i, start in enumerate(range(0, n, step))]

    def join(self, out: Path, shards: Sequence[Shard]) -> dict[str, Any]:
        """One store per split from its shards (which must all be written); returns the manifest facts."""
        counts = {}
        for split, mine in shards_by_split(shards).items():
            store = out / f"{split}.h5"
            written = join_shards([Path(s.path) for s in mine], store, attrs=self.store_attrs(split))
            counts[split] = self.check_store(split, store, written)
        return self.finish(out, counts)

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        """The whole stage in this process's reach: plan, every shard on all cores, join."""
        shards = self.plan(out)
        map_shards(self.build_shard, shards, cores=self.cores)
        return self.join(out, shards)
