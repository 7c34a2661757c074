"""Stages: what each one is (a ``StageSpec``), where it lives (``StageDir``), and the one lifecycle
that runs it (``run_stage``).

A stage writes into its own directory ``<tier>/<stage>/<key>/``. The key is a hash of everything
its output depends on: the spec's parameters, the keys of the stages it reads, and a code version.
A stage whose ``manifest.json`` exists, parses, and whose files are all there at the sizes it
recorded is done; one without a manifest was never finished (or was interrupted) and is redone.
The manifest is written last, atomically. A stage whose manifest does not parse, or one of whose
recorded files is missing or has another size (a shard deleted by hand, a truncated store), is
*damaged*: it is never used; the next run moves it aside (``<tier>/.damaged/``, not deleted) and
rebuilds it. The manifest also records each file's CRC-32, which ``verify_stage`` (``imagesmith
verify``) checks in full.

A spec states its parameters once (the fields of a frozen dataclass): the same object names the
directory and builds it, so a build can never land under another parameter set's key.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from storage.atomic import atomic_write_json
from storage.report import Reporter
from storage.tiers import Tiers

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
STARTED_NAME = ".started"  # when the current build began (removed when the manifest is written)
_STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
DAMAGED_DIR = ".damaged"  # <tier>/.damaged/<stage>/<key>-<time>/: damaged stages moved aside
# files written into a finished stage later, by design: not part of its integrity record
MUTABLE_FILES = ("last.pt", "archive.json")  # checkpoints (pruned once archived), the archive record


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _recorded_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
                  and not p.name.startswith(".") and p.name not in MUTABLE_FILES)


def integrity_record(root: Path) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of every result file of a stage directory."""
    return {p.relative_to(root).as_posix(): [p.stat().st_size, _crc32(p)] for p in _recorded_files(root)}


class StageIncomplete(RuntimeError):
    """A stage directory has no (readable) manifest, or it is damaged: it is not to be used."""


class StageDamaged(StageIncomplete):
    """A finished stage whose manifest does not parse, or whose recorded files are missing or changed."""


class StageBusy(RuntimeError):
    """Another process holds the stage's lock (raised instead of waiting, when asked not to wait)."""


class DiskFull(OSError):
    """A stage ran out of space (or quota) on its tier: says which stage, where, and how much is free."""


# stage locks this process holds: path -> (open lock file, depth). flock locks belong to an open
# file, so a second open() of the same lock file in this process would wait for itself.
_held: dict[Path, list] = {}
_held_guard = threading.Lock()
LOCK_POLL_S = 0.5


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

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest, None) when the stage is complete and whole; (None, why) otherwise. ``why`` starts
        with ``unfinished`` (no manifest) or ``damaged`` (a manifest that does not parse, a recorded
        file missing or of another size: the cheap checks made on every use)."""
        try:
            text = self.manifest_path.read_text()
        except FileNotFoundError:
            return None, f"unfinished: no {MANIFEST_NAME}"
        try:
            manifest = json.loads(text)
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        except ValueError as e:
            return None, f"damaged: {self.manifest_path} does not parse ({str(e).splitlines()[0][:120]})"
        for rel, (size, _crc) in (manifest.get("integrity") or {}).items():
            path = self.path / rel
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                return None, f"damaged: {path} is missing"
            if actual != size:
                return None, f"damaged: {path} has {actual} bytes; it was written with {size}"
        return manifest, None

    @property
    def is_complete(self) -> bool:
        return self._read()[0] is not None

    def problem(self) -> str | None:
        """None for a complete, whole stage; else why it is not (``unfinished: ...`` or ``damaged: ...``)."""
        return self._read()[1]

    def manifest(self) -> dict[str, Any]:
        manifest, why = self._read()
        if manifest is not None:
            return manifest
        if why.startswith("damaged"):
            raise StageDamaged(f"stage {self.stage!r} at {self.path} is {why}; it is not used. Rerun the flow: the "
                               f"damaged copy is moved aside to <tier>/{DAMAGED_DIR}/ and the stage is rebuilt")
        raise StageIncomplete(
            f"stage {self.stage!r} at {self.path} has no {MANIFEST_NAME}: it never finished. "
            "Rerun the flow to build it (add --refresh if Prefect's cache still points here)."
        )

    def move_aside(self) -> Path:
        """Move a damaged stage directory to ``<tier>/.damaged/<stage>/<key>-<time>/`` (kept for a
        person to look at, never deleted); the caller holds the stage's lock."""
        dest = self.path.parent.parent / DAMAGED_DIR / self.stage / f"{self.key}-{time.strftime('%Y%m%dT%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.path, dest)
        return dest

    @property
    def lock_path(self) -> Path:
        # <tier>/.locks/<stage>-<key>.lock: not in the stage directory (a clean rebuild removes it),
        # nor beside it (a listing of the stage's runs would find it)
        return self.path.parent.parent / ".locks" / f"{self.stage}-{self.key}.lock"

    @contextmanager
    def lock(self, *, wait: bool = True) -> Iterator[None]:
        """Hold the stage's lock: an OS file lock (``flock``), so it dies with its process and a
        kill -9 never leaves it stale. Re-entrant within a process. Another process holding it
        makes this wait (logging who holds it) or, with ``wait=False``, raise ``StageBusy``."""
        path = self.lock_path
        with _held_guard:
            if path in _held:
                _held[path][1] += 1
                held = True
            else:
                held = False
        if held:
            try:
                yield
            finally:
                with _held_guard:
                    _held[path][1] -= 1
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
        try:
            logged = False
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = _holder(path)
                    if not wait:
                        raise StageBusy(f"stage {self.stage!r} at {self.path} is being built by {holder}; "
                                        "rerun later, or without --no-wait to wait for it") from None
                    if not logged:
                        log.info("%s: waiting for %s, which is building %s", self.stage, holder, self.path)
                        logged = True
                    time.sleep(LOCK_POLL_S)
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:300]}))
            f.flush()
            with _held_guard:
                _held[path] = [f, 1]
            try:
                yield
            finally:
                with _held_guard:
                    del _held[path]
                f.truncate(0)
                fcntl.flock(f, fcntl.LOCK_UN)
        finally:
            f.close()

    def is_locked(self) -> bool:
        """True when some process (this one included) holds the stage's lock right now."""
        if self.locked_here:
            return True
        try:
            with open(self.lock_path) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(f, fcntl.LOCK_UN)
                return False
        except FileNotFoundError:  # never locked since the tier was made
            return False

    @property
    def locked_here(self) -> bool:
        """True when this process holds the stage's lock."""
        with _held_guard:
            return self.lock_path in _held

    def prepare(self, *, clean: bool = False, restart_clock: bool = True) -> Path:
        """Create the directory before any worker writes into it; the caller holds the stage's lock.

        Removes the temporary files a killed writer left (``.tmp-*``, see storage.atomic); with
        ``clean``, removes everything an interrupted run left (for stages redone as a whole). Only
        the lock holder may do this: another live run's temporary files are its work in progress.
        """
        if self.is_complete:
            raise RuntimeError(f"stage {self.stage!r} at {self.path} is complete; refusing to modify it")
        if not self.locked_here:
            raise RuntimeError(f"stage {self.stage!r} at {self.path}: prepare() needs the stage's lock "
                               "(with stage.lock(): ...)")
        why = self.problem()
        if why and why.startswith("damaged"):
            aside = self.move_aside()
            log.warning("%s: %s is %s; moved it aside to %s and rebuilding it", self.stage, self.path, why, aside)
        if clean and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.rglob(".tmp-*"):
            stale.unlink()
        started = self.path / STARTED_NAME
        if restart_clock or not started.exists():  # build_s in the manifest counts from here
            started.write_text(f"{time.time()}\n")
        return self.path

    def complete(self, **fields: Any) -> dict[str, Any]:
        """Write the manifest (last, atomically): from now on the stage counts as done. It records
        when (``completed_unix``) and how long the build took since ``prepare`` (``build_s``: for a
        sharded stage, plan to join; for a resumed one, since the resuming run started)."""
        now, started = time.time(), None
        try:
            started = float((self.path / STARTED_NAME).read_text())
        except (OSError, ValueError):
            pass
        manifest = {
            "stage": self.stage,
            "key": self.key,
            "params": dict(self.params),
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "completed_unix": round(now, 3),
            "build_s": round(now - started, 3) if started else None,
            **fields,
            "integrity": integrity_record(self.path),
        }
        atomic_write_json(self.manifest_path, manifest)
        (self.path / STARTED_NAME).unlink(missing_ok=True)
        return manifest


def _holder(lock_path: Path) -> str:
    """Who holds a stage lock, as its holder wrote it (best effort: it may be mid-write)."""
    try:
        info = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('command')})"


@contextmanager
def naming_full_disks(stage: str, path: Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) met inside into ``DiskFull``: one line with the stage, the
    path and the free space left, which no retry will change."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        probe = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(probe).free
        raise DiskFull(e.errno, f"stage {stage!r}: no space left writing under {path} "
                                f"({free / 2**20:.1f} MiB free on that disk): {os.strerror(e.errno)}") from e


def stage_dir(tiers: Tiers, tier: str, stage: str, params: Mapping[str, Any]) -> StageDir:
    """The directory of ``stage`` for these parameters under ``tier`` (``fast`` or ``bulk``)."""
    if not _STAGE_NAME.match(stage):
        raise ValueError(f"bad stage name {stage!r}: use lower-case letters, digits, '-' and '_'")
    key = stage_key(params)
    return StageDir(stage=stage, key=key, path=tiers.root(tier) / stage / key, params=dict(params))


def verify_stage(stage: StageDir) -> list[str]:
    """The full check (``imagesmith verify``): every recorded file's size and CRC-32. Returns what is
    wrong (empty: the stage is whole); a stage built before the record existed says so."""
    manifest, why = stage._read()
    if manifest is None:
        return [why]
    record = manifest.get("integrity")
    if record is None:
        return []  # built before checksums were recorded: the cheap checks are all there is
    bad = []
    for rel, (size, crc) in record.items():
        path = stage.path / rel
        if not path.is_file():
            bad.append(f"{path} is missing")
        elif path.stat().st_size != size:
            bad.append(f"{path} has {path.stat().st_size} bytes; it was written with {size}")
        elif _crc32(path) != crc:
            bad.append(f"{path} does not match its CRC-32 (its bytes changed since the stage was written)")
    return bad


def open_stage(path: Path | str) -> StageDir:
    """A finished stage directory from its path (as passed between tasks); raises if unfinished."""
    path = Path(path)
    done = StageDir(stage=path.parent.name, key=path.name, path=path)
    manifest = done.manifest()
    return StageDir(stage=manifest["stage"], key=manifest["key"], path=path, params=manifest.get("params", {}))


# --- what a stage is ------------------------------------------------------------------------


def upstream(*, optional: bool = False, **kwargs: Any) -> Any:
    """A spec field naming a finished stage directory this stage reads: its key (not its path) goes
    into this stage's key, so a moved tier keeps its keys. A list of directories works too.
    ``optional``: None by default, and then left out of the key (existing keys stay)."""
    if optional:
        return field(default=None, metadata={"upstream": True, "omit_default": True}, **kwargs)
    return field(metadata={"upstream": True}, **kwargs)


def runtime(default: Any = None) -> Any:
    """A spec field that changes how a stage runs, not what it writes (cores, device): not in the key."""
    return field(default=default, compare=False, metadata={"key": False})


def scale_out(default: int = 1) -> Any:
    """A spec field for the number of training processes (one per GPU; DDP, training/distributed.py).
    It changes what a stage writes (N x the batch a step), so
    it is in the key, except at its default: stages trained on one device keep their keys."""
    return field(default=default, metadata={"omit_default": True})


def upstream_key(path: str | Path | list) -> str | list:
    """``<stage>:<key>`` of a finished stage directory (or of each of a list of them)."""
    if isinstance(path, (list, tuple)):
        return [upstream_key(p) for p in path]
    done = open_stage(path)
    return f"{done.stage}:{done.key}"


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


class StageSpec:
    """What one stage is: its name, tier and code version (class attributes), its inputs and
    parameters (the fields of a frozen dataclass subclass), and how to build it.

    ``build(out, report)`` writes everything into ``out`` and returns the facts for the manifest;
    ``summarize(stage, report)`` publishes what a finished stage shows a person (tables, pictures),
    from its files. ``run_stage`` owns everything else: skip when done, prepare, build, complete.
    """

    name: ClassVar[str]
    tier: ClassVar[str] = "fast"
    version: ClassVar[int] = 1
    clean: ClassVar[bool] = False  # an interrupted build starts over (True) or resumes in place (False)
    retries: ClassVar[int] = 0  # orchestrator retries: only where a second try can help (resumable work)
    archive: ClassVar[bool] = False  # a trained model: copied to the bulk tier when built (storage/archive.py)

    def key_params(self) -> dict[str, Any]:
        """What the key hashes: the code version, every keyed field, upstream stages by their key."""
        params: dict[str, Any] = {"version": self.version}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.metadata.get("key", True):
                continue
            value = getattr(self, f.name)
            if f.metadata.get("omit_default") and value == f.default:
                continue
            params[f.name] = upstream_key(value) if f.metadata.get("upstream") else _plain(value)
        return params

    def stage_dir(self, tiers: Tiers) -> StageDir:
        return stage_dir(tiers, self.tier, self.name, self.key_params())

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        raise NotImplementedError

    def summarize(self, stage: StageDir, report: Reporter) -> None:
        """Publish what a finished stage shows (default: nothing beyond the log)."""


Build = Callable[[Path, Reporter], Mapping[str, Any]]


def run_stage(tiers: Tiers, spec: StageSpec, report: Reporter | None = None, *,
              build: Build | None = None, wait: bool = True) -> StageDir:
    """The stage lifecycle, the only copy: a finished stage is left alone; otherwise take its lock
    (``wait``: for another run building it, else ``StageBusy``), prepare its directory, build it
    (``spec.build``, or ``build``: the last step of a stage whose earlier steps ran elsewhere, e.g.
    the join of a sharded stage), and write the manifest last. A full disk ends in ``DiskFull``."""
    report = report or Reporter()
    stage = spec.stage_dir(tiers)
    if stage.is_complete:
        log.info("%s: %s is complete; nothing to do", spec.name, stage.path)
    else:
        with stage.lock(wait=wait):
            if stage.is_complete:  # another run finished it while this one waited
                log.info("%s: %s was completed by another run", spec.name, stage.path)
            else:
                # the last step of a stage begun elsewhere (a join after its shards) keeps the plan's clock
                stage.prepare(clean=spec.clean, restart_clock=build is None)
                start = time.perf_counter()
                with naming_full_disks(spec.name, stage.path):
                    stage.complete(**(build or spec.build)(stage.path, report))
                log.info("%s: built %s in %.1f s", spec.name, stage.path, time.perf_counter() - start)
                if spec.archive:
                    _archive(stage, tiers)
    spec.summarize(stage, report)
    return stage


def _archive(stage: StageDir, tiers: Tiers) -> None:
    """Archive a built model to the bulk tier. The stage is complete either way: a failed copy is a
    warning (the fast copy stays whole), retried by ``imagesmith archive``."""
    from storage.archive import archive_stage

    try:
        archive_stage(stage, tiers)
    except OSError as e:
        log.warning("%s: archiving %s to the bulk tier failed (%s); the stage is complete on the fast tier",
                    stage.stage, stage.path, e)


# --- a spec as text (to hand a stage to another process, e.g. the ranks torchrun starts) --------

_SPEC_MODULES = ("prep.", "training.", "models.", "storage.")


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"__dict__": {str(k): _encode(v) for k, v in value.items()}}
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot encode {type(value).__name__} {value!r} in a stage spec")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    module, _, name = value["__dataclass__"].partition(":")
    if not module.startswith(_SPEC_MODULES):  # only our own classes: the text names no arbitrary code
        raise ValueError(f"a stage spec may only hold imagesmith classes, not {module}:{name}")
    import importlib

    cls: Any = importlib.import_module(module)
    for part in name.split("."):
        cls = getattr(cls, part)
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"{module}:{name} is not a dataclass")
    return cls(**{k: _decode(v) for k, v in value["fields"].items()})


def spec_to_json(spec: StageSpec) -> str:
    """The spec as JSON (dataclasses by module:name, tuples tagged): ``spec_from_json`` rebuilds an
    equal spec, with the same stage key."""
    return json.dumps(_encode(spec))


def spec_from_json(text: str) -> StageSpec:
    spec = _decode(json.loads(text))
    if not isinstance(spec, StageSpec):
        raise ValueError(f"not a stage spec: {type(spec).__name__}")
    return spec
