"""Task runners: local threads by default, a Dask cluster when a scheduler address is given."""

from __future__ import annotations

import os

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from tasks.shards import local_parallelism

DASK_ENV = "IMAGESMITH_DASK_ADDRESS"


def shard_runner(n_shards: int, dask_address: str | None = None) -> tuple[TaskRunner, int | None]:
    """(task runner, decode threads per shard task) for ``n_shards`` shard tasks.

    With a Dask scheduler address (argument or ``IMAGESMITH_DASK_ADDRESS``, e.g.
    ``tcp://10.0.0.5:8786``) each shard runs on a cluster worker with that worker's cores; the
    workers must see the same dataset and tier paths (a shared filesystem). Locally, a process per
    shard (see tasks/shards.py for the measurement), or one shard at a time with threads.
    """
    address = dask_address or os.environ.get(DASK_ENV)
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address), None
    processes, threads = local_parallelism(n_shards)
    if processes > 1:
        return ProcessPoolTaskRunner(max_workers=processes), threads
    return ThreadPoolTaskRunner(max_workers=1), threads
