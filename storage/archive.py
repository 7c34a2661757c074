"""Artifacts move from the fast disk to the bulk disk (DESIGN.md section 4), and the fast disk is
freed of what no recent run uses.

- ``archive_stage``: after a training stage completes, its files (final model, history, evaluation,
  sample grids, TensorBoard events; not its resume checkpoints) are copied to
  ``<bulk>/archive/<stage>/<key>/`` with a ``SHA256SUMS`` file, read back and verified, and the
  copy is recorded in the fast stage's ``archive.json``. Then the intermediate checkpoints are
  pruned: every ``last.pt`` but the newest (policy: keep the last).
- ``collect_garbage``: removes from the fast tier the finished stages that none of the last N
  recorded runs used, nor any stage those runs' stages read (upstream keys, followed to the end).
  Stages being built (locked) or unfinished are never touched.
- ``stage_inventory``: every stage directory on both tiers, with its state, size and completion time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from storage.atomic import atomic_write_json, atomic_write_text
from storage.stage import MANIFEST_NAME, StageDir
from storage.tiers import TIER_NAMES, Tiers

log = logging.getLogger(__name__)

ARCHIVE_DIR = "archive"
ARCHIVE_RECORD = "archive.json"
SUMS_FILE = "SHA256SUMS"
CHECKPOINT_NAME = "last.pt"  # models/train.py CHECKPOINT: resume state, not a result
RUNS_DIR = "runs"  # <fast>/runs/<run id>.jsonl: which stages each run used (for gc)
_UPSTREAM = re.compile(r"^([a-z0-9_-]+):([0-9a-f]{16})$")
_NOT_STAGES = {"prefect", RUNS_DIR, ARCHIVE_DIR}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def archive_stage(stage: StageDir, tiers: Tiers) -> dict[str, Any]:
    """Copy a finished stage's results to the bulk tier (checksummed, verified), then prune its
    checkpoints but the newest. Returns the record also written to ``archive.json``."""
    src = stage.path
    dest = tiers.bulk / ARCHIVE_DIR / stage.stage / stage.key
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != CHECKPOINT_NAME
                   and not p.name.startswith(".") and p.name != ARCHIVE_RECORD)
    sums = []
    for path in files:
        rel = path.relative_to(src)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        shutil.copyfile(path, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = _sha256(path)
        if _sha256(tmp) != digest:
            tmp.unlink()
            raise OSError(f"archive of {path} to {target}: the copy does not match (bad bulk disk?)")
        os.replace(tmp, target)
        sums.append(f"{digest}  {rel.as_posix()}")
    atomic_write_text(dest / SUMS_FILE, "\n".join(sums) + "\n")
    checkpoints = sorted(src.rglob(CHECKPOINT_NAME), key=lambda p: p.stat().st_mtime)
    pruned = []
    for old in checkpoints[:-1]:
        pruned.append(str(old.relative_to(src)))
        old.unlink()
    record = {"archived_to": str(dest), "files": len(files), "bytes": sum(p.stat().st_size for p in files),
              "pruned_checkpoints": pruned, "kept_checkpoint": str(checkpoints[-1].relative_to(src)) if checkpoints
              else None, "archived_unix": round(time.time(), 3)}
    atomic_write_json(src / ARCHIVE_RECORD, record)
    log.info("%s: archived %d files (%.1f MiB) to %s; pruned %d older checkpoint(s)", stage.stage, len(files),
             record["bytes"] / 2**20, dest, len(pruned))
    return record


def verify_archive(dest: Path) -> list[str]:
    """The files of an archive whose checksum no longer matches (empty: all good)."""
    bad = []
    for line in (Path(dest) / SUMS_FILE).read_text().splitlines():
        digest, rel = line.split("  ", 1)
        path = Path(dest) / rel
        if not path.is_file() or _sha256(path) != digest:
            bad.append(rel)
    return bad


# --- which runs used which stages ------------------------------------------------------------


def note_stage_used(tiers: Tiers, run_id: str, flow: str, path: str | Path) -> None:
    """Note that run ``run_id`` (the top-level flow run) used a stage directory: one appended line in
    ``<fast>/runs/<run_id>.jsonl``, written as each stage is reached, so a run in progress is already
    one of the recent runs whose stages ``collect_garbage`` keeps."""
    runs = tiers.fast / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time(), "flow": flow, "stage": str(path)}) + "\n"
    with open(runs / f"{run_id}.jsonl", "a") as f:  # one small append: atomic among appenders
        f.write(line)


def recent_runs(tiers: Tiers, keep: int) -> list[dict[str, Any]]:
    """The last ``keep`` runs (by when each began), each ``{"run_id", "flow", "time", "stages"}``."""
    runs = []
    folder = tiers.fast / RUNS_DIR
    for path in folder.glob("*.jsonl") if folder.is_dir() else []:
        lines = []
        for text in path.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except ValueError:  # a line cut by a crash: the others still count
                continue
        if lines:
            runs.append({"run_id": path.stem, "flow": lines[0]["flow"], "time": lines[0]["time"],
                         "stages": sorted({entry["stage"] for entry in lines})})
    runs.sort(key=lambda r: r["time"])
    return runs[-keep:] if keep else []


def stage_dirs(tiers: Tiers, tier: str) -> list[Path]:
    """Every ``<tier>/<stage>/<key>`` directory (finished or not)."""
    root = tiers.root(tier)
    if not root.is_dir():
        return []
    return sorted(p for s in root.iterdir() if s.is_dir() and s.name not in _NOT_STAGES
                  for p in s.iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{16}", p.name))


def _upstream_refs(value: Any) -> list[tuple[str, str]]:
    if isinstance(value, str):
        m = _UPSTREAM.match(value)
        return [(m.group(1), m.group(2))] if m else []
    if isinstance(value, dict):
        return [r for v in value.values() for r in _upstream_refs(v)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _upstream_refs(v)]
    return []


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def needed_stages(tiers: Tiers, roots: list[str]) -> set[Path]:
    """``roots`` and every stage they read, transitively (by the upstream keys in their manifests)."""
    by_key = {(p.parent.name, p.name): p for tier in TIER_NAMES for p in stage_dirs(tiers, tier)}
    needed: set[Path] = set()
    todo = [Path(r).resolve() for r in roots]
    while todo:
        path = todo.pop()
        if path in needed:
            continue
        needed.add(path)
        manifest = _manifest(path) or {}
        for ref in _upstream_refs(manifest.get("params", {})):
            if ref in by_key:
                todo.append(by_key[ref].resolve())
    return needed


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def collect_garbage(tiers: Tiers, keep: int, *, dry_run: bool = False) -> dict[str, Any]:
    """Remove the fast tier's finished stages that the last ``keep`` runs do not need. Returns
    what was (or, with ``dry_run``, would be) removed and kept, and the bytes freed."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the runs whose stages stay), got {keep}")
    runs = recent_runs(tiers, keep)
    needed = needed_stages(tiers, [p for r in runs for p in r.get("stages", [])])
    removed, kept, busy, freed = [], [], [], 0
    for path in stage_dirs(tiers, "fast"):
        stage = StageDir(stage=path.parent.name, key=path.name, path=path)
        if path.resolve() in needed:
            kept.append(str(path))
            continue
        if not stage.is_complete or stage.is_locked():
            busy.append(str(path))  # being built, or left unfinished: its resume state is not ours to drop
            continue
        size = _size(path)
        if not dry_run:
            shutil.rmtree(path)
        removed.append(str(path))
        freed += size
    if removed and not dry_run:
        # cached task results name the removed directories: drop them, so a later run re-checks each
        # stage (finished ones answer at once from their manifest) instead of trusting a stale path
        shutil.rmtree(tiers.prefect_cache_keys, ignore_errors=True)
    return {"runs": len(runs), "removed": removed, "kept": kept, "skipped_unfinished": busy, "freed_bytes": freed,
            "dry_run": dry_run}


def stage_inventory(tiers: Tiers) -> list[dict[str, Any]]:
    """Every stage directory on both tiers: stage, key, tier, state, size, completion time, archive."""
    rows = []
    for tier in TIER_NAMES:
        for path in stage_dirs(tiers, tier):
            stage = StageDir(stage=path.parent.name, key=path.name, path=path)
            manifest, problem = _manifest(path), stage.problem()
            if problem is None:
                state = "complete"
            elif stage.is_locked():
                state = "building"
            elif problem.startswith("damaged"):
                state = "damaged"
            else:
                state = "unfinished"
            archived = None
            try:
                archived = json.loads((path / ARCHIVE_RECORD).read_text())["archived_to"]
            except (OSError, ValueError, KeyError):
                pass
            rows.append({"stage": stage.stage, "key": stage.key, "tier": tier, "state": state,
                         "problem": problem if state == "damaged" else None, "bytes": _size(path),
                         "completed_at": (manifest or {}).get("completed_at"),
                         "completed_unix": (manifest or {}).get("completed_unix"), "archived_to": archived,
                         "path": str(path)})
    return rows
