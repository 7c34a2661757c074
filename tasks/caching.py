"""How stage tasks are cached by Prefect: inputs + wrapper source + the stage's code version.

Results (small: paths) persist under the fast tier; the cache-key records live in a sibling
folder, never inside the results folder. The stage manifest stays the ground truth: a cached
path whose stage directory was deleted fails downstream with a message that says to --refresh.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

from storage.tiers import Tiers


def stage_task_options(tiers: Tiers, *, code_version: int, refresh: bool = False) -> dict[str, Any]:
    """``Task.with_options`` arguments for a cached stage task."""
    version = CacheKeyFnPolicy(cache_key_fn=lambda _ctx, _params: f"code-v{code_version}")
    policy = (INPUTS + TASK_SOURCE + version).configure(key_storage=tiers.prefect_cache_keys)
    return {
        "cache_policy": policy,
        "result_storage": tiers.prefect_results,  # a pathlib.Path: Prefect stores results as local files
        "persist_result": True,
        "refresh_cache": refresh,
    }
