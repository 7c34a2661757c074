import pickle

import numpy as np
import pytest
import torch

from models.data import ChunkShuffleStream, make_loader, to_float_nchw
from storage.hdf5 import ShardWriter, join_shards

N, S = 90, 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A joined store of 90 images whose pixels encode their row: image i is filled with i."""
    d = tmp_path_factory.mktemp("store")
    shards = []
    for k, rows in enumerate((range(0, 40), range(40, 90))):
        path = d / "shards" / f"train-{k:05d}.h5"
        with ShardWriter(path, size=S, chunk_images=4) as w:
            for i in rows:
                w.add(np.full((S, S, 3), i, np.uint8), label=i % 7, index=i, relpath=f"img{i}.JPEG")
        shards.append(path)
    join_shards(shards, d / "train.h5")
    return d / "train.h5"


def _rows(batches):
    return [int(x[b, 0, 0, 0]) for x, _ in batches for b in range(len(x))]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_image_once_per_epoch_with_its_label(store, num_workers):
    loader = make_loader(store, 16, num_workers=num_workers, block_images=8, buffer_blocks=2)
    batches = list(loader)
    rows = _rows(batches)
    assert sorted(rows) == list(range(N))
    labels = [int(y) for _, ys in batches for y in ys]
    assert labels == [r % 7 for r in rows]
    x, y = batches[0]
    assert x.dtype == torch.uint8 and x.shape[1:] == (S, S, 3) and y.dtype == torch.int64


def test_persistent_workers_follow_set_epoch(store):
    loader = make_loader(store, 16, num_workers=2, block_images=8, buffer_blocks=2)
    epoch0 = _rows(loader)
    loader.dataset.set_epoch(1)
    epoch1 = _rows(loader)
    loader.dataset.set_epoch(0)
    assert sorted(epoch1) == list(range(N)) and epoch1 != epoch0
    assert _rows(loader) == epoch0  # same seed and epoch: same batches, in the same workers


def test_order_is_shuffled_reproducible_per_epoch_and_new_each_epoch(store):
    stream = ChunkShuffleStream(store, 10, block_images=8, buffer_blocks=3, seed=1)
    first = _rows(stream)
    assert first != list(range(N))  # not the stored order
    assert _rows(ChunkShuffleStream(store, 10, block_images=8, buffer_blocks=3, seed=1)) == first
    stream.set_epoch(1)
    assert _rows(stream) != first and sorted(_rows(stream)) == list(range(N))


def test_unshuffled_stream_reads_in_store_order(store):
    assert _rows(ChunkShuffleStream(store, 7, shuffle=False)) == list(range(N))


def test_subset_keeps_the_first_fraction_and_len_counts_batches(store):
    stream = ChunkShuffleStream(store, 4, subset=0.2, block_images=4)
    assert sorted(_rows(stream)) == list(range(18))
    assert len(stream) == 5 and len(ChunkShuffleStream(store, 4, subset=0.2, drop_last=True)) == 4


def test_stream_pickles_after_use_without_its_file_handle(store):
    stream = ChunkShuffleStream(store, 8)
    next(iter(stream))
    clone = pickle.loads(pickle.dumps(stream))
    assert clone._file is None and sorted(_rows(clone)) == list(range(N))


def test_bad_arguments_are_named(store):
    with pytest.raises(ValueError, match=r"subset must be a fraction in \(0, 1\], got 1.5"):
        ChunkShuffleStream(store, 8, subset=1.5)
    with pytest.raises(FileNotFoundError, match="no HDF5 image store at"):
        ChunkShuffleStream(store.parent / "missing.h5", 8)


def test_to_float_nchw_normalises_into_channels_last():
    x = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    y = to_float_nchw(x, "cpu", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert y.shape == (2, 3, 4, 4) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, torch.ones_like(y))


def test_target_store_gives_aligned_pairs(store, tmp_path):
    target = tmp_path / "target.h5"
    with ShardWriter(tmp_path / "t.h5", size=4, chunk_images=4) as w:
        for i in range(N):
            w.add(np.full((4, 4, 3), i, np.uint8), label=0, index=i, relpath=f"img{i}.JPEG")
    join_shards([tmp_path / "t.h5"], target)
    pairs = list(ChunkShuffleStream(store, 16, target_store=target, block_images=8))
    for x, y in pairs:
        assert y.dtype == torch.uint8 and y.shape[1:] == (4, 4, 3)
        assert torch.equal(x[:, 0, 0, 0], y[:, 0, 0, 0])  # row i pairs with row i
    assert sum(len(x) for x, _ in pairs) == N


@pytest.mark.parametrize("drop_last", [True, False])
def test_an_epoch_has_len_batches_with_any_number_of_workers(store, drop_last):
    """Each worker batches only its own blocks; their leftover rows are batched together in the main
    process, so a loop that expects len() batches gets them (at 11 a batch, the workers' own full
    batches fall one short of the 8 that 90 rows make)."""
    loader = make_loader(store, 11, num_workers=2, block_images=8, buffer_blocks=2, drop_last=drop_last)
    for epoch in range(2):
        loader.dataset.set_epoch(epoch)
        batches = list(loader)
        rows = _rows(batches)
        assert len(batches) == len(loader) == (8 if drop_last else 9)
        assert len(rows) == len(set(rows)) == (88 if drop_last else 90)
        assert all(len(x) == 11 for x, _ in batches[:8])
