"""The two storage tiers (DESIGN.md section 4).

``fast`` (SSD/NVMe) holds what is read often or in random order: HDF5 image stores, embedding
tables, listings, the latest checkpoint, Prefect's persisted results. ``bulk`` (big slow disks)
holds what is big and read sequentially: raw image folders, word-vector sources, archives.
Both are plain directories; on a one-disk machine they may be the same.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TIER_NAMES = ("fast", "bulk")
FAST_ENV = "IMAGESMITH_FAST_DIR"
BULK_ENV = "IMAGESMITH_BULK_DIR"
DEFAULT_FAST = "data/fast"
DEFAULT_BULK = "data/bulk"


@dataclass(frozen=True)
class Tiers:
    fast: Path
    bulk: Path

    def __post_init__(self) -> None:  # accept str paths from CLIs and configs
        object.__setattr__(self, "fast", Path(self.fast))
        object.__setattr__(self, "bulk", Path(self.bulk))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Tiers:
        """Tiers from ``IMAGESMITH_FAST_DIR`` / ``IMAGESMITH_BULK_DIR`` (default ./data/fast, ./data/bulk)."""
        fast = environ.get(FAST_ENV) or DEFAULT_FAST
        bulk = environ.get(BULK_ENV) or DEFAULT_BULK
        tiers = cls(fast=Path(fast).expanduser().resolve(), bulk=Path(bulk).expanduser().resolve())
        for name, path in ((FAST_ENV, tiers.fast), (BULK_ENV, tiers.bulk)):
            blocked = next((p for p in (path, *path.parents) if p.exists()), None)
            if blocked is not None and not blocked.is_dir():
                raise NotADirectoryError(f"{name}={path}: {blocked} is a file, not a folder; point {name} at a "
                                         f"directory (created when missing)")
        return tiers

    def root(self, tier: str) -> Path:
        if tier == "fast":
            return self.fast
        if tier == "bulk":
            return self.bulk
        raise ValueError(f"unknown storage tier {tier!r}; choose one of {list(TIER_NAMES)}")

    @property
    def prefect_results(self) -> Path:
        """Prefect's persisted task results (small: paths and keys, never arrays)."""
        return self.fast / "prefect" / "results"

    @property
    def prefect_cache_keys(self) -> Path:
        """Prefect's cache-key records; kept apart from the results folder on purpose."""
        return self.fast / "prefect" / "cache-keys"
