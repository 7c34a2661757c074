"""HDF5 image stores: shard files written by one worker each, joined by a virtual dataset.

A store holds ``images (N, S, S, 3) uint8``, ``labels (N,) int16``, ``index (N,) int64`` (the row
of each image in the shuffled listing) and ``paths (N,)`` (relative to the dataset root), in the
listing's order. Rejected inputs go to the ``rejects`` group (``paths``, ``reasons``, ``index``).

Workers never share an open file: each shard is written under a temporary name and renamed when
complete. Shards are not fsynced one by one (a worker would sit idle while the disk flushes, 7-8%
of a shard's time measured): each records a CRC-32 of its image bytes, a resume trusts only a
shard whose bytes still match (``verify_shard``), and ``join_shards`` fsyncs every shard before
the store that names them is written. The store joins the shards with an h5py virtual dataset: no copy, so the fast disk
never needs room for the data twice (193 GB for ImageNet at S=224), and the join takes
milliseconds. The price, measured by ``bench/hdf5_layout.py`` (docs/BENCHMARKS.md): sequential
reads through the virtual dataset run at ~0.5x of one concatenated file (8,200 vs 15,900 img/s
at S=224 on the dev machine), still 3x what one H100 consumes training ResNet-50.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from storage.atomic import atomic_path, fsync_files

log = logging.getLogger(__name__)

STORE_FORMAT = 1
# 64 images a chunk (9.6 MB at S=224), uncompressed: chosen by bench/hdf5_layout.py (fastest
# sequential reads; uncompressed chunks serve single-image reads without reading the whole chunk)
DEFAULT_CHUNK_IMAGES = 64
COMPRESSIONS = (None, "lzf", "gzip")
_STR = h5py.string_dtype("utf-8")


def _check_compression(compression: str | None) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown HDF5 compression {compression!r}; choose one of {list(COMPRESSIONS)}")


class ShardWriter:
    """Append images to one shard file in whole chunks; the file appears under ``path`` on close.

    ``with ShardWriter(path, size=224) as w: w.add(img, label, index, relpath) ... w.reject(...)``
    """

    def __init__(self, path: Path, *, size: int, chunk_images: int = DEFAULT_CHUNK_IMAGES,
                 compression: str | None = None, attrs: Mapping[str, Any] | None = None):
        _check_compression(compression)
        self.path, self.size, self.chunk_images = Path(path), size, chunk_images
        self.compression, self.attrs = compression, dict(attrs or {})
        self._buffer = np.empty((chunk_images, size, size, 3), np.uint8)  # one chunk, filled in place
        self._pending = 0
        self._labels: list[int] = []
        self._index: list[int] = []
        self._paths: list[str] = []
        self._rejects: list[tuple[int, str, str]] = []
        self._written = 0
        self._crc = 0  # CRC-32 of the image bytes in row order (2.3 GB/s: 0.06 ms per 224 px image)

    def __enter__(self) -> ShardWriter:
        self._tmp_ctx = atomic_path(self.path, durable=False)  # made durable by join_shards
        tmp = self._tmp_ctx.__enter__()
        self._file = h5py.File(tmp, "w")
        s = self.size
        # a chunk cache that holds a whole chunk: with compression, the 1 MiB default turns
        # chunked writes into ~6 img/s (measured; DESIGN.md 3.2)
        self._images = self._file.create_dataset(
            "images", shape=(0, s, s, 3), maxshape=(None, s, s, 3), dtype=np.uint8,
            chunks=(self.chunk_images, s, s, 3), compression=self.compression,
        )
        self._fd = self._file.id.get_vfd_handle()  # the OS file descriptor of the default (sec2) driver
        return self

    def add(self, image: np.ndarray, label: int, index: int, relpath: str) -> None:
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ValueError(f"image for {relpath} is {image.shape} {image.dtype}; the store holds "
                             f"({self.size}, {self.size}, 3) uint8")
        self._buffer[self._pending] = image
        self._pending += 1
        self._labels.append(label)
        self._index.append(index)
        self._paths.append(relpath)
        if self._pending == self.chunk_images:
            self._flush()

    def reject(self, index: int, relpath: str, reason: str) -> None:
        self._rejects.append((index, relpath, reason))

    def _flush(self) -> None:
        n = self._pending
        if not n:
            return
        self._images.resize(self._written + n, axis=0)
        self._crc = zlib.crc32(self._buffer[:n], self._crc)
        if n == self.chunk_images and self.compression is None:
            # a whole uncompressed chunk: hand the bytes straight to the file, no filter pipeline
            self._images.id.write_direct_chunk((self._written, 0, 0, 0), self._buffer)
        else:
            self._images[self._written:self._written + n] = self._buffer[:n]
        self._written += n
        self._pending = 0
        # Start writing this chunk to disk now (asynchronously) and keep it out of the page cache:
        # otherwise all of a shard's data waits for the fsync before the rename, which measured
        # 0.42 ms/image at S=224 (half the write speed), and a 193 GB run floods the cache.
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._flush()
                f = self._file
                f.create_dataset("labels", data=np.asarray(self._labels, dtype=np.int16))
                f.create_dataset("index", data=np.asarray(self._index, dtype=np.int64))
                f.create_dataset("paths", data=self._paths, dtype=_STR)
                rej = f.create_group("rejects")
                rej.create_dataset("index", data=np.asarray([r[0] for r in self._rejects], dtype=np.int64))
                rej.create_dataset("paths", data=[r[1] for r in self._rejects], dtype=_STR)
                rej.create_dataset("reasons", data=[r[2] for r in self._rejects], dtype=_STR)
                f.attrs.update({"format": STORE_FORMAT, "size": self.size, "images_crc32": self._crc, **self.attrs})
            self._file.close()
        except BaseException as failed:  # finishing the file failed (a full disk...): it must not appear
            self._file.close()
            self._tmp_ctx.__exit__(type(failed), failed, failed.__traceback__)
            raise
        self._tmp_ctx.__exit__(exc_type, exc, tb)

    @property
    def counts(self) -> tuple[int, int]:
        """(images written so far, including pending; inputs rejected)."""
        return self._written + self._pending, len(self._rejects)


def verify_shard(path: Path, *, block: int = DEFAULT_CHUNK_IMAGES) -> str | None:
    """None when a shard file is whole (readable, image bytes matching their CRC-32), else why not.

    A resume runs this on every shard it finds: after a power loss a renamed shard may miss data
    that never reached the disk.
    """
    try:
        with h5py.File(path, "r") as f:
            images = f["images"]
            expected = f.attrs.get("images_crc32")
            if expected is None:
                return "no images_crc32 attribute (written by an older version, or not a shard)"
            for name in ("labels", "index", "paths", "rejects/index"):
                f[name][()]
            crc = 0
            for a in range(0, images.shape[0], block):
                crc = zlib.crc32(images[a:a + block], crc)
    except (OSError, KeyError, ValueError) as e:  # truncated or unreadable HDF5
        return f"unreadable: {type(e).__name__}: {e}"
    if crc != int(expected):
        return f"image bytes do not match their CRC-32 ({crc:#010x} != {int(expected):#010x})"
    return None


def reusable_shard(path: Path) -> bool:
    """True when a finished shard exists at ``path`` and verifies; a shard that fails is removed (and logged)."""
    path = Path(path)
    if not path.is_file():
        return False
    problem = verify_shard(path)
    if problem is None:
        return True
    log.warning("shard %s is damaged (%s): writing it again", path, problem)
    path.unlink()
    return False


def read_shard_summary(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return {"written": int(f["images"].shape[0]), "rejected": int(f["rejects/index"].shape[0]),
                **{k: _py(v) for k, v in f.attrs.items()}}


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def join_shards(shards: Sequence[Path], out: Path, *, attrs: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Join shard files (in order) into one store at ``out`` (written atomically).

    ``images``, ``labels`` and ``index`` are virtual datasets over the shards, referenced by
    paths relative to ``out``'s folder so the stage directory can be moved as a whole; ``paths``
    and the rejects are small and copied.
    """
    out = Path(out)
    if not shards:
        raise ValueError("no shards to join")
    missing = [str(p) for p in shards if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot join {out.name}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    fsync_files(shards)  # durable before a store names them (most pages are on disk already)
    metas = []
    for shard in shards:
        with h5py.File(shard, "r") as f:
            metas.append((Path(shard), f["images"].shape, f["paths"].asstr()[()].tolist(),
                          {k: f[f"rejects/{k}"][()] for k in ("index", "paths", "reasons")}))
    size = metas[0][1][1]
    if any(m[1][1:] != (size, size, 3) for m in metas):
        raise ValueError(f"shards disagree on image size: {sorted({m[1][1:] for m in metas})}")
    n = sum(m[1][0] for m in metas)
    layouts = {
        "images": h5py.VirtualLayout(shape=(n, size, size, 3), dtype=np.uint8),
        "labels": h5py.VirtualLayout(shape=(n,), dtype=np.int16),
        "index": h5py.VirtualLayout(shape=(n,), dtype=np.int64),
    }
    offset = 0
    for shard, shape, _, _ in metas:
        rel = os.path.relpath(shard, out.parent)
        k = shape[0]
        if k:
            for name, layout in layouts.items():
                layout[offset:offset + k] = h5py.VirtualSource(rel, name, shape=(k, *layout.shape[1:]))
        offset += k
    rejects = {k: np.concatenate([m[3][k] for m in metas]) for k in ("index", "paths", "reasons")}
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        for name, layout in layouts.items():
            f.create_virtual_dataset(name, layout, fillvalue=0)
        f.create_dataset("paths", data=[p for m in metas for p in m[2]], dtype=_STR)
        rej = f.create_group("rejects")
        rej.create_dataset("index", data=rejects["index"].astype(np.int64))
        rej.create_dataset("paths", data=rejects["paths"], dtype=_STR)
        rej.create_dataset("reasons", data=rejects["reasons"], dtype=_STR)
        f.attrs.update({"format": STORE_FORMAT, "size": size, "shards": len(metas), **(attrs or {})})
    return {"written": n, "rejected": int(rejects["index"].shape[0])}


def read_store_rejects(path: Path | str) -> list[tuple[int, str, str]]:
    """(listing row, path, reason) of every input a store rejected."""
    with h5py.File(path, "r") as f:
        rej = f["rejects"]
        return [(int(i), p, r) for i, p, r in zip(rej["index"][()], rej["paths"].asstr()[()],
                                                  rej["reasons"].asstr()[()])]


def open_store(path: Path | str, *, cache_bytes: int = 64 * 2**20) -> h5py.File:
    """Open a store read-only. Open it in the process that reads it (h5py handles do not survive fork)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no HDF5 image store at {path}")
    try:
        return h5py.File(path, "r", rdcc_nbytes=cache_bytes)
    except OSError as e:  # h5py's message does not name the file
        raise OSError(e.errno, f"{path} is not a readable HDF5 store: {e}") from None
