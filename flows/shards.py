"""A sharded stage as Prefect runs it: plan, the shard tasks in a subflow on the right task
runner (a process per shard, or a Dask cluster), join."""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

from prefect import flow, unmapped
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from prep.shards import Shard, ShardedStage, local_parallelism
from storage.tiers import Tiers
from tasks.artifacts import ArtifactReporter
from tasks.runs import begin_flow_run
from tasks.stages import holding_slots, join_task, note_used, plan_task, shard_task

DASK_ENV = "IMAGESMITH_DASK_ADDRESS"


def dask_scheduler(dask_address: str | None = None) -> str | None:
    """The Dask scheduler the shards go to: the argument, else ``IMAGESMITH_DASK_ADDRESS``, else None (local)."""
    return dask_address or os.environ.get(DASK_ENV) or None


def shard_runner(n_shards: int, dask_address: str | None = None) -> tuple[TaskRunner, int | None]:
    """(task runner, decode threads per shard task) for ``n_shards`` shard tasks.

    With a Dask scheduler address (argument or ``IMAGESMITH_DASK_ADDRESS``, e.g.
    ``tcp://10.0.0.5:8786``) each shard runs on a cluster worker with that worker's cores; the
    workers must see the same dataset and tier paths (a shared filesystem). Locally, a process per
    shard (see prep/shards.py for the measurement), or one shard at a time with threads.
    """
    address = dask_scheduler(dask_address)
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address), None
    processes, threads = local_parallelism(n_shards)
    if processes > 1:
        return ProcessPoolTaskRunner(max_workers=processes), threads
    return ThreadPoolTaskRunner(max_workers=1), threads


def run_shards(spec: ShardedStage, tiers: Tiers, shards: list[Shard], *, dask_address: str | None = None,
               refresh: bool = False) -> list[dict[str, Any]]:
    """Every shard task of a stage, in the subflow ``<stage>-shards`` on the right runner."""
    runner, workers = shard_runner(len(shards), dask_address)

    name = f"{spec.name}-{spec.stage_dir(tiers).key[:8]}-{len(shards)}-shards"

    @flow(name=f"{spec.name}-shards", flow_run_name=name, task_runner=runner, validate_parameters=False)
    def shards_flow(spec: Any, tiers: Any, shards: list, workers: int | None) -> list[dict[str, Any]]:
        begin_flow_run()
        futures = shard_task(spec, tiers, refresh=refresh).map(unmapped(spec), unmapped(tiers), shards,
                                                                unmapped(workers))
        # one progress artifact for the stage, updated in place as shards finish
        progress = ArtifactReporter(spec.stage_dir(tiers).key[:8])
        what = f"{spec.name}: shards done of {len(shards)}"
        progress.progress(f"{spec.name}-shards", 0.0, what)
        for done, _ in enumerate(as_completed(futures), start=1):
            progress.progress(f"{spec.name}-shards", done / len(shards), f"{what} ({done} done)")
        return futures.result()

    return shards_flow(spec, tiers, shards, workers)


def run_sharded(spec: ShardedStage, tiers: Tiers, *, dask_address: str | None = None, refresh: bool = False,
                wait: bool = True) -> str:
    """plan -> every shard -> join, holding the stage's lock throughout (``wait``: for another run
    building it, else ``StageBusy``); returns the stage directory. A finished stage plans no shard."""
    stage = spec.stage_dir(tiers)
    refresh_join = refresh or not stage.is_complete  # a build in this run: its join must run (storage/stage.py)
    with nullcontext() if stage.is_complete else stage.lock(wait=wait):
        shards = plan_task(spec)(spec, tiers)
        if shards:  # on this machine's cores: one sharded stage at a time across runs (tasks/stages.py)
            with nullcontext() if dask_scheduler(dask_address) else holding_slots(spec):
                run_shards(spec, tiers, shards, dask_address=dask_address, refresh=refresh)
        path = join_task(spec, tiers, refresh=refresh_join)(spec, tiers, shards)
    note_used(tiers, path)
    return path
