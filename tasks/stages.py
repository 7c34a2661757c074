"""Every stage as a Prefect task, made by one factory: the same cache policy, result storage,
retries and run names for all of them. The work is the stage spec's (storage/stage.py); these
wrappers add only what the orchestrator gives: caching, retries, logs and artifacts.

Cache key = the stage directory (tier, stage name, key of the parameters and upstream stages),
plus the shard and its build for shard tasks. A stage that is not complete and whole (never built,
interrupted, damaged: storage/stage.py) always runs its task (the cache is refreshed, see
``must_run``), so Prefect answers "Cached" only for a finished, whole stage, and a damaged one is
rebuilt instead of handed on.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.utilities.hashing import hash_objects

from prep.listing import fingerprint_dataset
from prep.shards import Shard, ShardedStage
from storage.stage import STARTED_NAME, StageBusy, StageIncomplete, StageSpec, naming_full_disks, run_stage
from storage.tiers import Tiers
from tasks.artifacts import ArtifactReporter
from tasks.logs import route_stage_logs

log = logging.getLogger(__name__)

SHARD_RETRIES = 2  # a shard is redone from scratch (its file appears only when whole): always safe
# errors a second try cannot mend: full disk or quota, permissions, a read-only disk
FINAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
# bad parameters or inputs, a missing upstream, a busy stage, memory: retrying repeats the failure
FINAL_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, StageIncomplete, StageBusy,
                MemoryError)


# Global concurrency limits (created by `imagesmith server start`, storage-free without them: Prefect
# lets a run through when a limit does not exist). A training or inference stage holds slots of
# GPU_LIMIT (one per GPU it trains on), so two runs never share a GPU; a sharded stage, which uses
# every core, holds CPU_LIMIT, and so does a training stage on a machine without a GPU.
GPU_LIMIT, CPU_LIMIT = "imagesmith-gpu", "imagesmith-cpu"
# task timeouts: far past any honest run of the stage, so a hung one fails instead of holding its slots
STAGE_TIMEOUT_S = {"io": 6 * 3600, "cpu-heavy": 2 * 3600, "gpu": 8 * 24 * 3600}
SHARD_TIMEOUT_S = 3600  # one shard is at most a few thousand images
# a held slot's lease, renewed while its holder lives: a killed run's slots come free this long after
SLOT_LEASE_S = 60  # the server's minimum


def stage_tag(spec: StageSpec) -> str:
    """``gpu`` (trains or runs a network: the spec has a device), ``cpu-heavy`` (a sharded stage,
    every core) or ``io`` (listing, downloads, tables): the task's tag in the UI and for tag limits."""
    if isinstance(spec, ShardedStage) and not hasattr(spec, "device"):
        return "cpu-heavy"
    return "gpu" if hasattr(spec, "device") else "io"


@contextmanager
def holding_slots(spec: StageSpec, gpus: int = 1) -> Iterator[None]:
    """Hold the stage's global concurrency slots while it runs (see GPU_LIMIT, CPU_LIMIT)."""
    from prefect.concurrency.sync import concurrency

    from models.distributed import cuda_devices

    tag = stage_tag(spec)
    names = []
    if tag == "gpu":
        on_gpus = cuda_devices() > 0
        names.append((GPU_LIMIT, gpus if on_gpus else 1))
        if not on_gpus:  # training on the cores
            names.append((CPU_LIMIT, 1))
    elif tag == "cpu-heavy":
        names.append((CPU_LIMIT, 1))
    with ExitStack() as stack:
        for name, slots in names:
            log.info("%s: taking %d slot(s) of the concurrency limit %r (waits while other runs hold them)",
                     spec.name, slots, name)
            stack.enter_context(concurrency(name, occupy=slots, lease_duration=SLOT_LEASE_S))
        yield


def retry_helps(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry only what a second try can mend (a crashed worker, a
    flaky network disk). Never a full disk, a permission error, bad parameters or CUDA out of memory."""
    error = state.data if isinstance(state.data, BaseException) else None
    if isinstance(error, OSError) and error.errno in FINAL_ERRNOS:
        return False
    if isinstance(error, FINAL_ERRORS) or type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return False
    return True


def _cache_key(_context: Any, inputs: dict[str, Any]) -> str | None:
    spec, tiers, shard = inputs["spec"], inputs["tiers"], inputs.get("shard")
    if shard is None:
        return hash_objects("imagesmith-stage", str(spec.stage_dir(tiers).path), "whole")
    # a shard: cached within one build of its stage (the build's start marker), never across builds
    try:
        build = (spec.stage_dir(tiers).path / STARTED_NAME).read_text()
    except OSError:
        return None
    return hash_objects("imagesmith-stage", str(spec.stage_dir(tiers).path), shard.label, build)


def must_run(spec: StageSpec, tiers: Tiers) -> bool:
    """Whether a stage's task must run whatever Prefect's cache holds: the stage is not complete and
    whole (never built, interrupted, or damaged: storage/stage.py). Its task then refreshes the cache
    record; a complete stage answers "Cached"."""
    return not spec.stage_dir(tiers).is_complete


def cache_options(tiers: Tiers, refresh: bool = False) -> dict[str, Any]:
    """``Task.with_options`` arguments that cache a stage task on its stage directory.

    Results (small: paths) persist under the fast tier; the cache-key records live in a sibling
    folder, never inside the results folder.
    """
    return {
        "cache_policy": CacheKeyFnPolicy(cache_key_fn=_cache_key).configure(key_storage=tiers.prefect_cache_keys),
        "result_storage": tiers.prefect_results,  # a pathlib.Path: Prefect stores results as local files
        "result_serializer": "json",  # results are paths and counts: never a pickle to load back
        "persist_result": True,
        "refresh_cache": refresh,
    }


def _run_name(task_name: str):
    """Task run names ``<task>/<stage key>`` (or ``/<shard>``): the run in the UI names its directory on disk."""

    def name(parameters: dict[str, Any]) -> str:
        spec, tiers, shard = parameters["spec"], parameters["tiers"], parameters.get("shard")
        which = shard.label if shard else spec.stage_dir(tiers).key[:8]
        return f"{task_name.format(stage=spec.name)}/{which}"

    return name


@task(task_run_name=_run_name("{stage}"), retry_condition_fn=retry_helps)
def _stage(spec: StageSpec, tiers: Tiers, wait: bool = True) -> str:
    route_stage_logs()
    gpus = getattr(spec, "gpus", 1)
    with holding_slots(spec, gpus):
        return _run_whole(spec, tiers, gpus, wait)


def _run_whole(spec: StageSpec, tiers: Tiers, gpus: int, wait: bool) -> str:
    if gpus > 1:  # torchrun with one process per GPU; rank 0's log lines and reports come back here
        from prefect import get_run_logger

        from training.distributed import run_distributed

        logger = get_run_logger()
        return str(run_distributed(tiers, spec, gpus, report=ArtifactReporter(spec.stage_dir(tiers).key[:8]), log_line=logger.info,
                                   wait=wait).path)
    return str(run_stage(tiers, spec, ArtifactReporter(spec.stage_dir(tiers).key[:8]), wait=wait).path)


@task(task_run_name=_run_name("plan-{stage}"))
def _plan(spec: ShardedStage, tiers: Tiers) -> list[Shard]:
    """The shards still to write (none when the stage is complete); creates the stage directory.
    The caller holds the stage's lock from here to the join (flows/shards.py)."""
    stage = spec.stage_dir(tiers)
    if stage.is_complete:
        return []
    return spec.plan(stage.prepare())


@task(task_run_name=_run_name("{stage}-shard"), retry_condition_fn=retry_helps)
def _shard(spec: ShardedStage, tiers: Tiers, shard: Shard, workers: int | None = None) -> dict[str, Any]:
    route_stage_logs()
    with naming_full_disks(spec.name, Path(shard.path).parent):
        return spec.build_shard(shard, workers=workers)


@task(task_run_name=_run_name("join-{stage}"))
def _join(spec: ShardedStage, tiers: Tiers, shards: list[Shard]) -> str:
    route_stage_logs()
    return str(run_stage(tiers, spec, ArtifactReporter(spec.stage_dir(tiers).key[:8]), build=lambda out, report: spec.join(out, shards)).path)


def stage_task(spec: StageSpec, tiers: Tiers, *, refresh: bool = False) -> Task:
    """The task that runs ``spec`` whole (call it with ``(spec, tiers, wait)``); returns the stage directory."""
    tag = stage_tag(spec)
    return _stage.with_options(name=spec.name, retries=spec.retries, retry_delay_seconds=5, tags=[tag],
                               timeout_seconds=STAGE_TIMEOUT_S[tag], **cache_options(tiers, refresh))


def plan_task(spec: ShardedStage) -> Task:
    """Not cached: it is what prepares the directory the shards write into."""
    return _plan.with_options(name=f"plan-{spec.name}", tags=["io"])


def shard_task(spec: ShardedStage, tiers: Tiers, *, refresh: bool = False) -> Task:
    """Call (or map) with ``(spec, tiers, shard, workers)``."""
    return _shard.with_options(name=f"{spec.name}-shard", retries=SHARD_RETRIES, retry_delay_seconds=5,
                               tags=[stage_tag(spec)], timeout_seconds=SHARD_TIMEOUT_S, **cache_options(tiers, refresh))


def join_task(spec: ShardedStage, tiers: Tiers, *, refresh: bool = False) -> Task:
    """Joins the shards (all written: it runs after the shard tasks) and completes the stage.
    Its cache key is the stage directory's: the shards' results (timings, workers) are not inputs."""
    return _join.with_options(name=f"join-{spec.name}", tags=["io"], **cache_options(tiers, refresh))


fingerprint_task = task(name="fingerprint-dataset")(fingerprint_dataset)  # uncached: it tells a changed folder


def stage(spec: StageSpec, tiers: Tiers, *, refresh: bool = False, wait: bool = True) -> str:
    """Run ``spec`` as its Prefect task (inside a flow); returns the stage directory. ``wait``: for
    another run building the same stage (else the task fails with ``StageBusy``)."""
    path = stage_task(spec, tiers, refresh=refresh or must_run(spec, tiers))(spec, tiers, wait)
    note_used(tiers, path)
    return path


_roots: dict[str, str] = {}


def note_used(tiers: Tiers, path: str) -> None:
    """Record that the current top-level flow run used this stage (``imagesmith gc`` keeps what the
    last N runs used). Outside a flow run (a plain call), nothing is recorded."""
    from prefect.runtime import flow_run

    from storage.archive import note_stage_used

    run_id = flow_run.get_id()
    if not run_id:
        return
    if run_id not in _roots:
        try:
            _roots[run_id] = str(flow_run.get_root_flow_run_id() or run_id)
        except Exception:  # noqa: BLE001  (no API to ask: this run is its own root)
            _roots[run_id] = run_id
    note_stage_used(tiers, _roots[run_id], flow_run.get_flow_name() or "?", path)
