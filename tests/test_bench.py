"""The GPU benchmarks run here only as tiny CPU checks, so that they still work when a GPU is lent."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))


@pytest.mark.slow
def test_train_devise_benchmark_runs_end_to_end_and_on_device(tmp_path, monkeypatch):
    import train_devise

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    r = train_devise.main(["--images", "48", "--size", "32", "--batch", "8", "--steps", "4", "--warmup", "1",
                           "--workers", "1", "--backbone", "resnet18", "--dims", "50"])
    assert r["images_per_s"] > 0 and r["on_device_images_per_s"] > 0 and 0 <= r["loader_wait"] < 1


@pytest.mark.slow
def test_train_superres_benchmark_runs_each_size(tmp_path, monkeypatch):
    import train_superres

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    results = train_superres.main(["--sizes", "32", "64", "--batches", "4", "2", "--images", "16", "--steps", "3",
                                   "--warmup", "1", "--workers", "1", "--arch", "johnson"])
    assert [r["size"] for r in results] == [32, 64] and all(r["images_per_s"] > 0 for r in results)


@pytest.mark.slow
def test_train_gan_benchmark_times_both_phases(tmp_path, monkeypatch):
    import train_gan

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    results = train_gan.main(["--size", "32", "--batch", "4", "--images", "16", "--steps", "3", "--warmup", "1",
                              "--workers", "1", "--critic-nf", "8", "--encoder", "efficientnet_lite0"])
    assert [r["phase"] for r in results] == ["critic", "gan"] and all(r["images_per_s"] > 0 for r in results)


@pytest.mark.slow
def test_style_benchmark_times_gatys_and_the_fast_network(tmp_path, monkeypatch):
    import style  # bench/style.py

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    results = style.main(["--size", "48", "--iterations", "2", "--train-size", "32", "--batch", "2", "--steps", "3",
                          "--warmup", "1", "--workers", "1", "--images", "16"])
    assert [r["bench"] for r in results] == ["gatys", "fast_style_train", "fast_style_apply"]
    assert results[0]["s_per_iteration"] > 0 and results[0]["overhead"] > 0
    assert results[1]["images_per_s"] > 0 and results[2]["images_per_s"] > 0
