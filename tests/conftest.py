from flows.offline import apply_offline_defaults

# Offline Prefect before anything imports it (bare pytest too, not only `make test`).
apply_offline_defaults()

import pytest  # noqa: E402

from storage.tiers import Tiers  # noqa: E402
from tasks.sample import build_sample  # noqa: E402

SMALL_SAMPLE = {"seed": 0, "train_per_class": 4, "val_per_class": 2}


@pytest.fixture
def tiers(tmp_path):
    return Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")


@pytest.fixture(scope="session")
def sample_build(tmp_path_factory):
    """A small real sample (7 classes x (4 train + 2 val) + 5 planted bad files), built once. Read-only."""
    root = tmp_path_factory.mktemp("sample")
    return root, build_sample(root, **SMALL_SAMPLE)


@pytest.fixture(scope="session")
def sample_root(sample_build):
    return sample_build[0]


@pytest.fixture(scope="session")
def planted(sample_build):
    """{relative path: kind} of the planted bad inputs in the session sample."""
    return {p["path"]: p["kind"] for p in sample_build[1]["planted"]}


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server subprocess on 127.0.0.1 with a temporary SQLite DB, for the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield
