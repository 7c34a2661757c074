import os

# Offline Prefect before anything imports it (the Makefile sets the same; this covers bare pytest).
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import pytest  # noqa: E402

from storage.tiers import Tiers  # noqa: E402
from tasks.sample import build_sample  # noqa: E402

SMALL_SAMPLE = {"seed": 0, "train_per_class": 4, "val_per_class": 2}


@pytest.fixture
def tiers(tmp_path):
    return Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    """A small real sample (7 classes x (4 train + 2 val) + 5 planted bad files), built once. Read-only."""
    root = tmp_path_factory.mktemp("sample")
    build_sample(root, **SMALL_SAMPLE)
    return root


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server subprocess on 127.0.0.1 with a temporary SQLite DB, for the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield
