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


@pytest.fixture(scope="session")
def word_tiers(tmp_path_factory):
    """Tiers holding the real word table: WordNet 3.0 (Debian) + the bundled GloVe 6B 50-d. ~30 s, once."""
    from tasks.embeddings import DEFAULT_MAX_WORDS, embedding_stage, glove_stage, run_embeddings, run_glove
    from tasks.wordnet import run_wordnet, wordnet_source, wordnet_stage

    root = tmp_path_factory.mktemp("words")
    tiers = Tiers(fast=root / "fast", bulk=root / "bulk")
    source = wordnet_source()
    wordnet = run_wordnet(wordnet_stage(tiers, source), source)
    glove = run_glove(glove_stage(tiers))
    kwargs = {"vectors": glove.path, "wordnet": wordnet.path, "max_words": DEFAULT_MAX_WORDS}
    run_embeddings(embedding_stage(tiers, **kwargs), **kwargs)
    return tiers


@pytest.fixture(scope="session")
def word_table(word_tiers):
    from tasks.embeddings import WordTable

    (stage,) = (word_tiers.fast / "embeddings").iterdir()
    return WordTable(stage)
