"""Stage directories: ``<tier>/<stage>/<key>/`` with a manifest written last, atomically.

The key is a hash of everything the stage's output depends on (inputs, parameters, a code
version). A stage whose ``manifest.json`` exists is done; one without a manifest was never
finished (or was interrupted) and is redone.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.atomic import atomic_write_json
from storage.tiers import Tiers

MANIFEST_NAME = "manifest.json"
_STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class StageIncomplete(RuntimeError):
    """A stage directory has no manifest: its stage never finished."""


def stage_key(params: Mapping[str, Any]) -> str:
    """16 hex chars of SHA-256 over the canonical JSON of ``params`` (key order does not matter)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class StageDir:
    stage: str
    key: str
    path: Path
    params: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        if not self.is_complete:
            raise StageIncomplete(
                f"stage {self.stage!r} at {self.path} has no {MANIFEST_NAME}: it never finished. "
                "Rerun the flow to build it (add --refresh if Prefect's cache still points here)."
            )
        return json.loads(self.manifest_path.read_text())

    def prepare(self, *, clean: bool = False) -> Path:
        """Create the directory before any worker writes into it.

        Removes the temporary files a killed writer left (``.tmp-*``, see storage.atomic); with
        ``clean``, removes everything an interrupted run left (for stages redone as a whole).
        """
        if self.is_complete:
            raise RuntimeError(f"stage {self.stage!r} at {self.path} is complete; refusing to modify it")
        if clean and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.rglob(".tmp-*"):
            stale.unlink()
        return self.path

    def complete(self, **fields: Any) -> dict[str, Any]:
        """Write the manifest (last, atomically): from now on the stage counts as done."""
        manifest = {
            "stage": self.stage,
            "key": self.key,
            "params": dict(self.params),
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **fields,
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest


def stage_dir(tiers: Tiers, tier: str, stage: str, params: Mapping[str, Any]) -> StageDir:
    """The directory of ``stage`` for these parameters under ``tier`` (``fast`` or ``bulk``)."""
    if not _STAGE_NAME.match(stage):
        raise ValueError(f"bad stage name {stage!r}: use lower-case letters, digits, '-' and '_'")
    key = stage_key(params)
    return StageDir(stage=stage, key=key, path=tiers.root(tier) / stage / key, params=dict(params))


def open_stage(path: Path | str) -> StageDir:
    """A finished stage directory from its path (as passed between tasks); raises if unfinished."""
    path = Path(path)
    done = StageDir(stage=path.parent.name, key=path.name, path=path)
    manifest = done.manifest()
    return StageDir(stage=manifest["stage"], key=manifest["key"], path=path, params=manifest.get("params", {}))
