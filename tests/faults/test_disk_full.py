"""A full disk: the stage fails cleanly (one line naming the stage, the path and the free space; no
manifest; no retry), and a rerun once there is space completes with the same bytes."""

import errno
import subprocess
from pathlib import Path

import h5py
import pytest

from prep.resize import ResizeConfig, ResizeStage
from storage.stage import DiskFull, StageBusy, run_stage
from storage.tiers import Tiers
from tasks.stages import retry_helps

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (a real full disk, as root), resized on demand; else a write hook with ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode
    if ok != 0:
        pytest.fail("cannot mount a tmpfs here (needs root); the ENOSPC path is covered by "
                    "test_enospc_from_a_write_hook_is_named_too")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)

    yield mount, grow
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_fails_cleanly_and_a_rerun_with_space_completes(sample_listing, small_disk, tmp_path):
    mount, grow = small_disk
    tiers = Tiers(fast=mount / "fast", bulk=mount / "bulk")
    spec = ResizeStage(listing=str(sample_listing.path), config=ResizeConfig(size=224), cores=1)  # 2 shards of 9.6 MB
    stage = spec.stage_dir(tiers)
    with pytest.raises(DiskFull) as failed:
        run_stage(tiers, spec)
    message = str(failed.value)
    assert failed.value.errno == errno.ENOSPC and "stage 'resize': no space left writing under" in message
    assert str(stage.path) in message and "MiB free on that disk" in message and "\n" not in message
    assert not stage.is_complete
    assert not retry_helps(None, None, _failed(failed.value))  # Prefect will not retry it
    grow()
    run_stage(tiers, spec)
    assert stage.is_complete
    fresh = run_stage(Tiers(fast=tmp_path / "fresh", bulk=tmp_path / "fresh-bulk"), spec)
    with h5py.File(stage.path / "train.h5") as a, h5py.File(fresh.path / "train.h5") as b:
        assert a["images"][()].tobytes() == b["images"][()].tobytes()


def test_enospc_from_a_write_hook_is_named_too(sample_listing, tiers, monkeypatch):
    """The same failure where a tmpfs cannot be mounted: the shard writer's write raises ENOSPC."""
    import storage.hdf5

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.hdf5.ShardWriter, "_flush", full)
    spec = ResizeStage(listing=str(sample_listing.path), config=ResizeConfig(size=16), cores=1)
    with pytest.raises(DiskFull, match=r"stage 'resize': no space left writing under .* MiB free on that disk"):
        run_stage(tiers, spec)
    assert not spec.stage_dir(tiers).is_complete
    assert not list(Path(spec.stage_dir(tiers).path).rglob("*.h5"))  # no half-written shard kept


def _failed(error: BaseException):
    from prefect.states import Failed

    return Failed(data=error)


@pytest.mark.parametrize("error,retry", [
    (OSError(errno.ENOSPC, "full"), False), (OSError(errno.EACCES, "denied"), False),
    (OSError(errno.EROFS, "read-only"), False), (PermissionError(errno.EPERM, "no"), False),
    (ValueError("size must be between 8 and 4096"), False), (StageBusy("held by pid 1"), False),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), False),
    (RuntimeError("DataLoader worker exited unexpectedly"), True), (OSError(errno.EIO, "I/O error"), True),
])
def test_retries_only_where_a_second_try_can_help(error, retry):
    assert retry_helps(None, None, _failed(error)) is retry
