"""DeViSE on the sample (real photos, real WordNet + GloVe, CPU, the bundled pretrained
EfficientNet-Lite0 at 64 px).

The tests check the mechanics on a tiny run: the loss falls, hit@k beats chance, zero-shot classes
never train, search finds a class's own images, the exported model reproduces the stored features,
and the manifest records the weights used.
"""

import numpy as np
import pytest
import torch

from models.data import ChunkShuffleStream, to_float_nchw
from models.devise import Devise, DeviseConfig, make_body
from models.losses import LabelVectorLoss, cosine_loss
from models.metrics import hit_at_k
from prep.sample import SAMPLE_PHOTOS, photo_path
from prep.wordnet import imagenet_wnids
from storage.catalog import store_classes
from storage.hdf5 import open_store
from storage.image_vectors import read_embeddings
from storage.report import Reporter
from storage.stage import run_stage
from storage.tiers import Tiers
from storage.vector_index import VectorIndex, brute_force, build_index
from training.devise.classes import plan_classes
from training.devise.export import load_devise
from training.devise.features import FeaturesConfig, FeaturesStage
from training.devise.finetune import FinetuneConfig, FinetuneStage
from training.devise.head import DeviseStage, HeadConfig
from training.devise.search import DeviseSearch, IndexStage

TABBY, ESPRESSO, MOTORCYCLE, PALACE, GIRAFFE = "n02123045", "n07920052", "n03790512", "n03877845", "n02439033"
ZERO_SHOT = (MOTORCYCLE, GIRAFFE)  # outside ImageNet-1k (classes inside it are refused as zero-shot)


@pytest.fixture(scope="module")
def run(resized, word_table, tmp_path_factory):
    root = tmp_path_factory.mktemp("devise")
    tiers = Tiers(fast=root / "fast", bulk=root / "bulk")
    resized = resized(64)
    fc = FeaturesConfig(backbone="efficientnet_lite0", flips=True, batch_size=16)  # the bundled pretrained weights
    features = run_stage(tiers, FeaturesStage(resize=str(resized.path), config=fc, device="cpu"))
    hc = HeadConfig(epochs=20, lr=1e-2, batch_size=8, hidden=64, dropout=0.1, zero_shot=ZERO_SHOT)
    devise = run_stage(tiers, DeviseStage(features=str(features.path), words=str(word_table.path), config=hc,
                                          device="cpu"))
    index = run_stage(tiers, IndexStage(model=str(devise.path), ann_above=10))
    return {"tiers": tiers, "resize": resized.path, "features": features.path, "devise": devise.path,
            "index": index.path, "classes": store_classes(resized.path)}


def test_body_of_any_torchvision_cnn_feeds_the_head():
    for name, channels in (("resnet18", 512), ("mobilenet_v3_small", 576)):
        model = Devise(DeviseConfig(backbone=name, dims=50, hidden=32, pretrained=False))
        assert model.features == channels
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 50)
        assert model.pooled(torch.rand(2, 3, 64, 64)).shape == (2, 2 * channels)  # concat pool: avg + max


def test_backbone_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="unknown backbone 'resnet5000'"):
        make_body("resnet5000", pretrained=False)
    with pytest.raises(ValueError, match="'vit_b_16' has neither"):
        make_body("vit_b_16", pretrained=False)


def test_missing_backbone_weights_are_an_error_naming_the_file_and_random_weights_must_be_asked_for(
        caplog, tmp_path, monkeypatch):
    from models.weights import MissingWeights

    monkeypatch.setenv("IMAGESMITH_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeights, match=r"no weights for resnet18: place resnet18-f37072fd.pth in \$IMAGESMITH"):
        make_body("resnet18", pretrained=True)
    body = make_body("resnet18", pretrained=False)
    assert body.source is None and "resnet18: RANDOM weights" in caplog.text


def test_cosine_loss_is_one_minus_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert cosine_loss(a[:1], b[:1]).item() == pytest.approx(0.0)
    assert cosine_loss(a[1:2], b[1:2]).item() == pytest.approx(1.0)
    assert cosine_loss(a, b).item() == pytest.approx((0 + 1 + 2) / 3)
    loss = LabelVectorLoss(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert loss(torch.tensor([[5.0, 0.0]]), torch.tensor([1])).item() == pytest.approx(0.0)


def test_hit_at_k_ranks_ties_against_the_truth():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.2, 0.6], [0.1, 0.3, 0.8]])
    hits = hit_at_k(scores, torch.tensor([0, 1, 0]), ks=(1, 2, 3))
    assert hits == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(1.0)}


def test_stream_keeps_only_the_requested_classes_in_full_batches(run):
    store = run["resize"] / "train.h5"
    with open_store(store) as f:
        labels = f["labels"][:]
    keep = sorted(set(labels.tolist()))[:3]
    stream = ChunkShuffleStream(store, 4, keep_labels=keep, drop_last=True, block_images=8, buffer_blocks=1)
    assert stream.n_kept == int(np.isin(labels, keep).sum())
    batches = list(stream)
    assert len(batches) == len(stream) == stream.n_kept // 4
    assert all(len(y) == 4 and set(y.tolist()) <= set(keep) for _, y in batches)


def test_default_zero_shot_classes_are_those_outside_imagenet_1k(run, word_table):
    plan = plan_classes(run["classes"], word_table, None)
    outside = [p.wnid for p in SAMPLE_PHOTOS if p.wnid not in imagenet_wnids("1k")]
    assert sorted(plan.classes[i] for i in plan.zero_shot) == sorted(outside) and MOTORCYCLE in outside
    assert len(outside) == 5 and len(plan.trained) == len(run["classes"]) - 5 and not plan.no_vector
    with pytest.raises(ValueError, match="n99999999"):
        plan_classes(run["classes"], word_table, ["n99999999"])
    # a 1k class is known to the pretrained body and ConSE's classifier: not zero-shot
    with pytest.raises(ValueError, match=r"zero-shot classes \['n07920052'\] are ImageNet-1k classes"):
        plan_classes(run["classes"], word_table, [MOTORCYCLE, ESPRESSO])


def test_features_hold_both_views_and_the_export_reproduces_them(run):
    with open_store(run["features"] / "val.h5") as f, open_store(run["resize"] / "val.h5") as r:
        feats, labels = f["features"][:], f["labels"][:]
        images, store_labels = r["images"][:2], r["labels"][:]
    assert feats.shape == (len(store_labels), 2, 2 * 1280) and feats.dtype == np.float16  # EfficientNet-Lite0
    np.testing.assert_array_equal(labels, store_labels)
    assert not np.allclose(feats[:, 0], feats[:, 1])  # the flipped view is a different input
    model, meta = load_devise(run["devise"])
    assert meta["image_size"] == 64 and meta["classes"] == run["classes"]
    with torch.no_grad():
        pooled = model.eval().pooled(to_float_nchw(torch.from_numpy(images), "cpu")).numpy()
    np.testing.assert_allclose(pooled, feats[:2, 0].astype(np.float32), rtol=2e-2, atol=2e-2)


def test_head_learns_and_beats_chance_next_to_the_softmax_baseline(run):
    from storage.stage import open_stage

    m = open_stage(run["devise"]).manifest()
    history = __import__("json").loads((run["devise"] / "metrics.json").read_text())["history"]
    assert history[-1]["loss"] < 0.75 * history[0]["loss"]
    rows = {(r["model"], r["task"], r["candidates"]): r for r in m["metrics"]}
    flat = rows["devise", "flat", "imagenet-1k + trained"]
    assert flat["n_candidates"] >= 985 and flat["images"] > 0
    assert flat["hit@5"] > 10 * 5 / flat["n_candidates"]  # far above chance
    assert [flat[f"hit@{k}"] for k in (1, 2, 5, 10, 20)] == sorted(flat[f"hit@{k}"] for k in (1, 2, 5, 10, 20))
    softmax = rows["softmax", "flat", "trained classes"]
    assert softmax["n_candidates"] == len(run["classes"]) - 2 and softmax["images"] == flat["images"]
    held_out = rows["devise", "zero-shot", "held-out classes"]
    assert held_out["n_candidates"] == 2 and held_out["hit@1"] is not None and held_out["hit@2"] is None  # trivial
    assert rows["devise", "zero-shot", "imagenet-21k"]["n_candidates"] > 10_000
    assert rows["devise", "zero-shot", "all WordNet nouns"]["n_candidates"] > 70_000
    roles = {r["wnid"]: r["role"] for r in m["classes"]}
    assert roles[MOTORCYCLE] == roles[GIRAFFE] == "zero_shot" and roles[TABBY] == roles[ESPRESSO] == "trained"


def test_training_embeddings_land_nearest_their_class_vector(run, word_table):
    train_vectors, train_labels = read_embeddings(run["devise"] / "embeddings.h5")["train"]
    plan = plan_classes(run["classes"], word_table, ZERO_SHOT)
    trained = np.isin(train_labels, plan.trained)
    matrix = np.stack([word_table.vector(run["classes"][i]) for i in plan.trained])
    nearest = np.array(plan.trained)[(train_vectors[trained] @ matrix.T).argmax(axis=1)]
    assert (nearest == train_labels[trained]).mean() > 0.8


def test_text_search_finds_the_class_images(run, word_table):
    search = DeviseSearch(run["index"])
    trained = [w for w in run["classes"] if w not in ZERO_SHOT]
    for wnid in trained:  # e.g. "tabby", "palace", "missile": the class's own words
        hits = search.images_for_text(word_table.names[wnid], k=len(search.index))
        # images of never-trained (zero-shot) classes may land anywhere; among the rest, the class comes first
        top = [h for h in hits if h.wnid in trained][:3]
        assert [h.wnid for h in top] == [wnid] * 3, (wnid, [h.wnid for h in hits[:10]])
        assert all(h.path.endswith(".JPEG") and f"/{wnid}/" in h.path for h in top)


def test_image_search_names_its_class_and_finds_its_own_images(run):
    search = DeviseSearch(run["index"])
    rows = [r for r in search.images if r[0] == "train" and r[2] == TABBY]
    own = sum(TABBY in [w for w, _, _ in search.words_for_image(r[3], k=5)] for r in rows)
    assert own >= len(rows) - 1
    hits = search.images_for_vector(search.embed_image(rows[0][3]), k=3)
    assert hits[0].path == rows[0][3] and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert sum(h.wnid == TABBY for h in hits) >= 2


def test_hnsw_index_agrees_with_brute_force(run, word_table, tmp_path):
    from storage.stage import open_stage

    assert open_stage(run["index"]).manifest()["kind"] == "hnsw"  # ann_above=10 < the sample's images
    # real vectors: every matched WordNet noun
    _, nouns = word_table.vocabulary("wordnet")
    facts = build_index(tmp_path, nouns[:20_000], ann_above=1_000, recall_queries=300)
    assert facts["kind"] == "hnsw" and facts["recall_at_10"] >= 0.95
    index = VectorIndex(tmp_path)
    queries = np.asarray(nouns[20_000:20_200])
    _, approx = index.search(queries, 10)
    exact_scores, exact = index.search(queries, 10, exact=True)
    # many nouns share one vector (same lemma): compare scores, as ties may come in any order
    np.testing.assert_allclose(exact_scores, brute_force(np.asarray(nouns[:20_000]), queries, 10)[0], atol=1e-5)
    assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist())]) >= 0.95
    small = build_index(tmp_path / "small", nouns[:500], ann_above=1_000)
    assert small["kind"] == "brute_force" and not (tmp_path / "small" / "hnsw.faiss").exists()


def test_finetune_trains_end_to_end_from_the_fast_path_model(run):
    config = FinetuneConfig(epochs=2, lr=1e-4, batch_size=8, num_workers=0)
    stage = run_stage(run["tiers"], FinetuneStage(devise=str(run["devise"]), config=config, device="cpu"))
    m = stage.manifest()
    assert m["mode"] == "finetune" and np.isfinite(m["final_loss"])
    embeddings = read_embeddings(stage.path / "embeddings.h5")
    assert set(embeddings) == {"train", "val"}
    before, _ = read_embeddings(run["devise"] / "embeddings.h5")["val"]
    after, _ = embeddings["val"]
    assert before.shape == after.shape and not np.allclose(before, after)  # the body moved
    assert {r["model"] for r in m["metrics"]} == {"devise"}


def test_search_command_prints_images_and_words(run, capsys):
    from imagesmith.cli import main

    assert main(["search", "--text", "palace", "-k", "2", "--index", str(run["index"])]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{PALACE}  palace ") == 2 and "images nearest to 'palace'" in out
    image = next(r[3] for r in DeviseSearch(run["index"]).images if r[2] == TABBY)
    assert main(["search", "--image", image, "-k", "3", "--index", str(run["index"])]) == 0
    out = capsys.readouterr().out
    assert "nearest ImageNet classes" in out and "nearest WordNet nouns" in out and image in out
    assert main(["search", "--text", "qwxzzy", "--index", str(run["index"])]) == 2
    assert "qwxzzy" in capsys.readouterr().err


def test_frozen_body_batchnorm_keeps_its_statistics_while_the_rest_trains():
    model = Devise(DeviseConfig(backbone="resnet18", dims=8, hidden=16, pretrained=False), frozen_body_bn=True)
    bn = model.body[1]
    before = bn.running_mean.clone()
    model.train()
    assert not bn.training and model.head[0][0].training  # the head's BatchNorm still trains
    model(torch.rand(4, 3, 32, 32) * 5).sum().backward()
    assert torch.equal(bn.running_mean, before) and bn.weight.grad is not None
    model.frozen_body_bn = False
    model.train()(torch.rand(4, 3, 32, 32) * 5)
    assert not torch.equal(bn.running_mean, before)


def test_head_training_resumes_after_a_crash_to_the_same_model(run, word_table, tmp_path):
    tiers = Tiers(fast=tmp_path / "fast", bulk=tmp_path / "bulk")
    hc = HeadConfig(epochs=4, lr=1e-2, batch_size=8, hidden=32, dropout=0.1, zero_shot=ZERO_SHOT,
                    softmax_baseline=False)
    spec = DeviseStage(features=str(run["features"]), words=str(word_table.path), config=hc, device="cpu")
    straight = run_stage(tiers, spec)

    class Crash(Exception):
        pass

    class CrashAfterEpoch2(Reporter):
        def table(self, key, rows, description=""):
            if key == "devise-epochs" and len(rows) == 3:  # epoch 2 finished and checkpointed
                raise Crash

    other = Tiers(fast=tmp_path / "fast2", bulk=tmp_path / "bulk2")
    stage = spec.stage_dir(other)
    with pytest.raises(Crash):
        run_stage(other, spec, CrashAfterEpoch2())
    assert not stage.is_complete and (stage.path / "devise" / "last.pt").is_file()
    resumed = run_stage(other, spec)
    a, _ = load_devise(straight.path)
    b, _ = load_devise(resumed.path)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_conse_weights_the_top_classes_word_vectors_by_their_probabilities():
    from training.devise.conse import conse_embed

    vectors = np.eye(4, dtype=np.float32)  # class i's word vector is the i-th axis
    has = np.array([True, True, False, True])  # class 2 has no vector: it cannot vote
    logits = np.log(np.array([[0.1, 0.5, 0.3, 0.1]], dtype=np.float32))
    out = conse_embed(logits, vectors, has, top=2)  # the top 2 with vectors: classes 1 (0.5), 0 or 3 (0.1)
    assert out.shape == (1, 4) and out[0, 2] == 0 and out[0, 1] > 0
    expected = np.array([0.1, 0.5, 0, 0], np.float32) if out[0, 0] > 0 else np.array([0, 0.5, 0, 0.1], np.float32)
    np.testing.assert_allclose(out[0], expected / np.linalg.norm(expected), rtol=1e-5)


def test_the_features_manifest_records_the_weights_and_conse_names_unseen_photos(run, word_table):
    from models.weights import find_weights
    from storage.stage import open_stage
    from training.devise.conse import ConseImages

    weights = open_stage(run["features"]).manifest()["weights"]
    packaged = find_weights("efficientnet_lite0")
    assert weights["origin"] == "package" and weights["sha256"] == packaged.sha256
    conse = ConseImages(word_table, "efficientnet_lite0")
    coffee = conse.embed_image(photo_path(next(p for p in SAMPLE_PHOTOS if p.wnid == ESPRESSO)))
    assert word_table.nearest_words(coffee, 1)[0][0] == ESPRESSO


# --- zero-shot evaluation done right (issue 21) ----------------------------------------------


def _wordnet_stage(word_table):
    (stage,) = (word_table.path.parents[2] / "bulk" / "wordnet").iterdir()
    return stage


def test_a_perfect_prediction_scores_hit_1_even_when_a_held_out_class_is_also_a_1k_candidate(word_table):
    from training.devise.classes import ClassPlan
    from training.devise.evaluate import evaluate_devise

    # ESPRESSO is in the 1k: listed among the held-out classes and the 1k, it was a candidate twice
    plan = ClassPlan([TABBY, ESPRESSO, GIRAFFE], trained=[0], zero_shot=[1, 2], no_vector=[])
    labels = np.array([1, 1, 2, 2, 0])
    vectors = np.stack([word_table.vector(plan.classes[i]) for i in labels])  # exactly the class's vector
    rows = evaluate_devise({"val": (vectors, labels)}, plan, word_table)
    row = next(r for r in rows if r["candidates"] == "held-out + imagenet-1k")
    assert row["hit@1"] == 1.0 and row["n_candidates"] == len(set(imagenet_wnids("1k")) & set(
        word_table.table.key_to_index) | {GIRAFFE})


def test_hierarchical_precision_credits_the_neighbourhood_of_the_true_class(word_table):
    from prep.wordnet import open_wordnet
    from training.devise.hierarchy import Hierarchy, hierarchical_precision

    wn = open_wordnet(_wordnet_stage(word_table))
    dog, puppy, domestic_animal, canine, car = "n02084071", "n01322604", "n01317541", "n02083346", "n02958343"
    candidates = [dog, puppy, domestic_animal, canine, car, GIRAFFE]
    h = Hierarchy(wn, candidates)
    assert h.correct_set(dog, 1) == {dog}
    near = h.correct_set(dog, 3)  # distance 1: its hypernyms (canine, domestic animal) and hyponym puppy
    assert {dog, canine, domestic_animal, puppy} <= near and car not in near and GIRAFFE not in near
    labels = candidates
    top = np.array([[labels.index(dog), labels.index(canine), labels.index(car)],
                    [labels.index(car), labels.index(GIRAFFE), labels.index(puppy)]])
    hp = hierarchical_precision(top, labels, [dog, dog], h, (1, 2, 3))
    assert hp[1] == pytest.approx(0.5)  # hp@1 = hit@1: the first image right, the second not
    assert hp[2] == pytest.approx((2 / 2 + 0 / 2) / 2)  # dog and canine both lie in dog's neighbourhood
    assert hp[3] == pytest.approx((2 / 3 + 1 / 3) / 2)  # puppy, third for the second image, counts too


def test_a_zero_shot_source_adds_held_out_classes_with_hierarchical_precision(run, word_table, tmp_path,
                                                                              sample_root):
    import shutil

    from tests.helpers import run_listing, run_resize
    from training.devise.classes import with_zero_shot_source

    # a second source of classes outside ImageNet-1k, none trained on: dog (held out of the training
    # source too: more images of it) and "house cat" (new; the tabby photos stand in for it)
    dog, house_cat = "n02084071", "n02121808"
    source = tmp_path / "zs"
    for split in ("train", "val"):
        shutil.copytree(sample_root / split / dog, source / split / dog)
        shutil.copytree(sample_root / split / TABBY, source / split / house_cat)
    tiers = run["tiers"]
    zresize = run_resize(tiers, run_listing(tiers, source), size=64, cores=1)
    fc = FeaturesConfig(backbone="efficientnet_lite0", flips=True, batch_size=16)
    zfeatures = run_stage(tiers, FeaturesStage(resize=str(zresize.path), config=fc, device="cpu"))
    hc = HeadConfig(epochs=4, lr=1e-2, batch_size=8, hidden=64, dropout=0.1, zero_shot=(*ZERO_SHOT, dog),
                    softmax_baseline=False)
    devise = run_stage(tiers, DeviseStage(features=str(run["features"]), words=str(word_table.path), config=hc,
                                          zero_shot_features=str(zfeatures.path),
                                          wordnet=str(_wordnet_stage(word_table)), device="cpu"))
    m = devise.manifest()
    rows = {(r["model"], r["task"], r["candidates"]): r for r in m["metrics"]}
    held = rows["devise", "zero-shot", "held-out classes"]
    assert held["n_candidates"] == 4  # motorcycle, giraffe, dog + the source's house cat
    with open_store(zresize.path / "train.h5") as a, open_store(zresize.path / "val.h5") as b:
        extra_images = len(a["labels"]) + len(b["labels"])
    with open_store(run["resize"] / "train.h5") as a, open_store(run["resize"] / "val.h5") as b:
        labels = np.concatenate([a["labels"][:], b["labels"][:]])
    own = int(np.isin(labels, [run["classes"].index(w) for w in (*ZERO_SHOT, dog)]).sum())
    assert held["images"] == own + extra_images
    for model in ("devise", "conse"):
        r21k = rows[model, "zero-shot", "imagenet-21k"]
        hp = [r21k[f"hp@{k}"] for k in (1, 2, 5, 10, 20)]
        assert hp[0] == r21k["hit@1"] and all(0 <= v <= 1 for v in hp)
        assert all(h >= r21k[f"hit@{k}"] / k - 1e-9 for h, k in zip(hp, (1, 2, 5, 10, 20)))
    assert {r["wnid"] for r in m["zero_shot_classes"]} == {*ZERO_SHOT, dog, house_cat}
    plan = plan_classes(run["classes"], word_table, ZERO_SHOT)
    with pytest.raises(ValueError, match=r"zero-shot source classes \['n07920052'\] are ImageNet-1k classes"):
        with_zero_shot_source(plan, [house_cat, ESPRESSO], word_table)
    with pytest.raises(ValueError, match=r"zero-shot source classes \['n02084071'\] are trained on"):
        with_zero_shot_source(plan, [dog], word_table)  # trained in that plan


def test_the_hit_table_says_how_to_get_a_zero_shot_evaluation_when_there_is_none():
    from training.devise.evaluate import format_hits

    rows = [{"model": "devise", "task": "flat", "candidates": "imagenet-1k", "n_candidates": 1000, "images": 4,
             **{f"hit@{k}": 0.5 for k in (1, 2, 5, 10, 20)}}]
    out = format_hits(rows)
    assert "zero-shot: not evaluated" in out and "--zero-shot-source DIR" in out
