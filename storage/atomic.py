"""Atomic file writes: a reader sees the old file, the complete new file, or nothing; never half."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_discard = False  # set in processes that compute alongside a writer but must not write (DDP ranks > 0)


@contextmanager
def discarding_writes() -> Iterator[None]:
    """Inside this, every atomic write is carried out in its temporary file and then dropped: the
    destination is never touched. For the ranks of a distributed run other than rank 0, which run
    the same stage code while rank 0 alone writes its files."""
    global _discard
    before, _discard = _discard, True
    try:
        yield
    finally:
        _discard = before


@contextmanager
def atomic_path(path: Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. A crash (kill -9)
    leaves only a ``.tmp-*`` file that no reader looks for. ``durable=False`` skips the fsyncs: a
    process crash still leaves old-or-new, but after a power loss the renamed file may miss data,
    so the caller must check it (storage/hdf5.py: shard checksums) and fsync it later (``fsync_files``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be read by others
    try:
        yield tmp
        if _discard:
            tmp.unlink(missing_ok=True)
            return
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def fsync_files(paths: Iterable[Path]) -> None:
    """Make files written with ``durable=False`` (and their directory entries) durable."""
    dirs = set()
    for p in paths:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        dirs.add(Path(p).parent)
    for d in dirs:
        _fsync_dir(d)


def _fsync_dir(directory: Path) -> None:
    # the rename itself is durable only once the directory entry is flushed
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
