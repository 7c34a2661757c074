"""Task runners: local threads by default, a Dask cluster when a scheduler address is given."""

from __future__ import annotations

import os

from prefect.task_runners import ThreadPoolTaskRunner, TaskRunner

DASK_ENV = "IMAGESMITH_DASK_ADDRESS"


def shard_runner(dask_address: str | None = None) -> TaskRunner:
    """Where shard tasks run.

    Locally one shard at a time, since each shard already uses every core (a thread per core);
    with a Dask scheduler address (argument or ``IMAGESMITH_DASK_ADDRESS``, e.g.
    ``tcp://10.0.0.5:8786``) each shard runs on a cluster worker. The workers must see the same
    dataset and tier paths (a shared filesystem).
    """
    address = dask_address or os.environ.get(DASK_ENV)
    if not address:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)
