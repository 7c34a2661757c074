from imagesmith.offline import apply_offline_defaults

# Offline Prefect before anything imports it (bare pytest too, not only `make test`).
apply_offline_defaults()

import pytest  # noqa: E402

from prep.sample import build_sample  # noqa: E402
from storage.stage import StageDir, run_stage  # noqa: E402
from storage.tiers import Tiers  # noqa: E402
from tests.helpers import run_listing, run_resize  # noqa: E402

SMALL_SAMPLE = {"seed": 0, "train_per_class": 4, "val_per_class": 2}


def pytest_collection_modifyitems(items):
    """Every test that needs the real Prefect server is slow (the server alone takes ~10 s to start)."""
    for item in items:
        if "prefect_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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
def session_tiers(tmp_path_factory):
    """Tiers shared by the session's read-only stages (listing and resized stores of the sample)."""
    root = tmp_path_factory.mktemp("session-tiers")
    return Tiers(fast=root / "fast", bulk=root / "bulk")


@pytest.fixture(scope="session")
def sample_listing(session_tiers, sample_root):
    """The listing stage of the session sample (seed 0). Read-only."""
    return run_listing(session_tiers, sample_root)


@pytest.fixture(scope="session")
def resized(session_tiers, sample_listing):
    """``resized(size, **config)``: the session sample's resize stage at ``size`` px, built once per
    configuration and shared (read-only; write stages that read it into a test's own tiers)."""
    built: dict[tuple, StageDir] = {}

    def make(size: int, **config) -> StageDir:
        key = (size, *sorted(config.items()))
        if key not in built:
            built[key] = run_resize(session_tiers, sample_listing, size=size, cores=1, **config)
        return built[key]

    return make


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server subprocess on 127.0.0.1 with a temporary SQLite DB, for the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture(scope="session")
def word_tiers(tmp_path_factory):
    """Tiers holding the real word table: WordNet 3.0 (Debian) + the bundled GloVe 6B 50-d. ~30 s, once."""
    from prep.wordnet import WordnetStage, wordnet_source
    from prep.words import EmbeddingStage, GloveStage

    root = tmp_path_factory.mktemp("words")
    tiers = Tiers(fast=root / "fast", bulk=root / "bulk")
    wordnet = run_stage(tiers, WordnetStage(source=str(wordnet_source())))
    glove = run_stage(tiers, GloveStage())
    run_stage(tiers, EmbeddingStage(vectors=str(glove.path), wordnet=str(wordnet.path)))
    return tiers


@pytest.fixture(scope="session")
def word_table(word_tiers):
    from storage.words import WordTable

    (stage,) = (word_tiers.fast / "embeddings").iterdir()
    return WordTable(stage)
