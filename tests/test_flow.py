"""The pipeline flow against a real Prefect server (one per session, on 127.0.0.1)."""

import asyncio
import json
import shutil
import time
from pathlib import Path

import h5py
import pytest

from prep.sample import SAMPLE_PHOTOS
from storage.listing import read_split
from storage.stage import open_stage


def _task_states(flow_run_id):
    """{task name: sorted state names} of the task runs of one flow run and of its subflow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    async def read():
        async with get_client() as client:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
            )
            ids = [flow_run_id, *(child.id for child in children)]
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            states: dict[str, list[str]] = {}
            for run in runs:
                if run.name.startswith(("resize-shards", "crappify-shards")):  # subflows' placeholder task runs
                    continue
                # task run names are "<task name>/<stage key or shard>" ("<task name>-<suffix>" when not ours)
                name = run.name.split("/")[0] if "/" in run.name else run.name.rsplit("-", 1)[0]
                states.setdefault(name, []).append(run.state.name)
            return {name: sorted(v) for name, v in states.items()}

    # Prefect 3 records task-run states asynchronously: a just-finished run can still read as Pending
    for _ in range(40):
        states = asyncio.run(read())
        if not any(s in ("Pending", "Scheduled", "Running") for v in states.values() for s in v):
            break
        time.sleep(0.25)
    return states


def _run_ids(flow_run_id):
    """The flow run and every subflow run below it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async def children(ids):
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=ids)))
            return [r.id for r in runs]

    ids, frontier = [flow_run_id], [flow_run_id]
    while frontier:
        frontier = [i for i in asyncio.run(children(frontier)) if i not in ids]
        ids += frontier
    return ids


def _task_inputs(flow_run_id):
    """{task run name: {input_type of each recorded input}} over a run and its subflows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ids = _run_ids(flow_run_id)

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))

    return {run.name: {i.input_type for inputs in run.task_inputs.values() for i in inputs}
            for run in asyncio.run(read())}


def _flow_run_names(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))

    ids = _run_ids(flow_run_id)
    return sorted(r.name for r in asyncio.run(read()))


def _artifacts(flow_run_id, every_key=False):
    """{key without its stage-key suffix: artifact} of one run and its subflows (``every_key``: by
    the whole key). Each key appears once per run: a table republished every epoch is updated in
    place, not added again."""
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    ids = _run_ids(flow_run_id)

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))

    arts = asyncio.run(read())
    keys = [(a.flow_run_id, a.key) for a in arts if a.key]
    assert len(keys) == len(set(keys)), sorted(keys)  # one card per key per (sub)flow run
    return {a.key if every_key else re.sub(r"-[0-9a-f]{8}$", "", a.key): a for a in arts if a.key}


@pytest.fixture
def tier_env(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_FAST_DIR", str(tmp_path / "fast"))
    monkeypatch.setenv("IMAGESMITH_BULK_DIR", str(tmp_path / "bulk"))
    return tmp_path


def test_pipeline_runs_every_stage_then_a_rerun_is_cached(prefect_server, tier_env):
    from flows.pipeline import pipeline

    params = {"sample_train_per_class": 3, "sample_val_per_class": 1, "size": 32, "shard_images": 10, "words": False,
              "crappifier": "jpeg_text", "crappify_size": 16}
    state = pipeline(**params, return_state=True)
    outputs = state.result()
    assert outputs["dataset"].startswith(str(tier_env / "bulk" / "sample"))
    assert outputs["listing"].startswith(str(tier_env / "fast" / "listing"))
    assert outputs["resize"].startswith(str(tier_env / "fast" / "resize"))
    classes = len(SAMPLE_PHOTOS)
    listing = open_stage(outputs["listing"]).manifest()
    assert listing["counts"] == {"train": 3 * classes + 5, "val": classes}  # + the 5 planted bad files
    assert len(read_split(outputs["listing"], "train").paths) == 3 * classes + 5
    resized = open_stage(outputs["resize"]).manifest()
    assert resized["counts"]["train"] == {"inputs": 3 * classes + 5, "written": 3 * classes + 3, "rejected": 2}
    with h5py.File(Path(outputs["resize"]) / "train.h5") as f:
        assert f["images"].shape == (3 * classes + 3, 32, 32, 3)
    with h5py.File(Path(outputs["crappify"]) / "train.h5") as f:
        assert f["images"].shape == (3 * classes + 3, 16, 16, 3)
    shards = -(-(3 * classes + 5) // 10) + -(-classes // 10)  # 10 listed images a shard, per split
    first = _task_states(state.state_details.flow_run_id)
    assert first == {"sample": ["Completed"], "fingerprint-dataset": ["Completed"],
                     "listing": ["Completed"], "plan-resize": ["Completed"],
                     "resize-shard": ["Completed"] * shards, "join-resize": ["Completed"],
                     "plan-crappify": ["Completed"], "crappify-shard": ["Completed"] * 2,  # train + val
                     "join-crappify": ["Completed"]}
    results = list((tier_env / "fast" / "prefect" / "results").iterdir())
    records = list((tier_env / "fast" / "prefect" / "cache-keys").iterdir())
    assert results and records
    for path in results:  # persisted as JSON (paths and counts), never a pickle to load back
        json.loads(path.read_text())
    assert {json.loads(p.read_text())["serializer"]["type"] for p in records} == {"json"}

    rerun = pipeline(**params, return_state=True)
    assert rerun.result() == outputs
    # finished stages plan no shard: only the joins answer, from the cache
    assert _task_states(rerun.state_details.flow_run_id) == {
        "sample": ["Cached"], "fingerprint-dataset": ["Completed"], "listing": ["Cached"],
        "plan-resize": ["Completed"], "join-resize": ["Cached"],
        "plan-crappify": ["Completed"], "join-crappify": ["Cached"],
    }


def test_pipeline_relists_a_user_folder_after_it_changes(prefect_server, tier_env, sample_root):
    from flows.pipeline import pipeline

    root = tier_env / "imagenet"
    shutil.copytree(sample_root, root)
    first = pipeline(source=str(root), seed=1, size=16, words=False)
    assert set(first) == {"dataset", "listing", "resize"}
    wnid = sorted(p.name for p in (root / "train").iterdir())[0]
    shutil.copy(next((root / "train" / wnid).glob("*.JPEG")), root / "train" / wnid / "new.JPEG")
    second = pipeline(source=str(root), seed=1, size=16, words=False)
    assert second["listing"] != first["listing"]
    assert open_stage(second["listing"]).manifest()["counts"]["train"] == \
        open_stage(first["listing"]).manifest()["counts"]["train"] + 1


def test_stage_log_lines_reach_the_flow_run(prefect_server, tier_env):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.pipeline import pipeline

    state = pipeline(sample_train_per_class=1, sample_val_per_class=1, seed=4, size=16, words=False,
                     return_state=True)
    flow_run_id = state.state_details.flow_run_id

    async def read(ids):
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
            return [(log.name, log.message, log.task_run_id) for log in logs]

    for _ in range(20):  # the API log handler ships records in the background
        logs = asyncio.run(read(_run_ids(flow_run_id)))
        if any(name == "prep.listing" for name, _, _ in logs) and any(name == "prep.resize" for name, _, _ in logs):
            break
        __import__("time").sleep(0.5)
    assert any(name == "prep.listing" and "listing:" in msg for name, msg, _ in logs), logs
    assert any(name == "prep.sample" and "train + " in msg for name, msg, _ in logs), logs
    # the shard processes' own lines (written, rejected, img/s) reach the run, under their task run
    shard_lines = [(msg, task) for name, msg, task in logs if name == "prep.resize" and " shard " in msg]
    assert shard_lines and all(task is not None for _, task in shard_lines), logs
    assert any("written" in msg and "img/s" in msg for msg, _ in shard_lines)
    progress = _artifacts(flow_run_id)["resize-shards"]  # the shard subflow's progress, updated in place
    assert progress.type == "progress" and progress.data == 100.0


def test_pipeline_word_stage_publishes_the_match_counts(prefect_server, word_tiers, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.setenv("IMAGESMITH_FAST_DIR", str(word_tiers.fast))
    monkeypatch.setenv("IMAGESMITH_BULK_DIR", str(word_tiers.bulk))
    state = pipeline(sample_train_per_class=1, sample_val_per_class=0, size=16, return_state=True)
    outputs = state.result()
    assert open_stage(outputs["words"]).manifest()["report"]["imagenet_1k"]["total"] == 1000
    latest = _artifacts(state.state_details.flow_run_id)
    assert "word-table-matches" in latest
    rows = __import__("json").loads(latest["word-table-matches"].data)
    assert {r["scope"] for r in rows} == {"imagenet_1k", "wordnet_nouns"}


def test_superres_flow_resizes_progressively_evaluates_and_publishes_artifacts(prefect_server, tier_env,
                                                                              sample_root):

    from flows.superres import superres

    # 8 -> 32 px targets, then 16 -> 64: at each size a 1cycle of 2 epochs (no encoder to freeze)
    state = superres(source=str(sample_root), arch="johnson", loss="pixel", high_size=64, low_size=16,
                     progressive_from=32, crappifier="downscale", epochs=2, batch_size=4, pretrained=False,
                     return_state=True)
    out = state.result()
    assert (Path(out["superres"]) / "model.pt").is_file() and open_stage(out["superres"]).manifest()["epochs"] == 4
    history = json.loads((Path(out["superres"]) / "history.json").read_text())
    assert [h["size"] for h in history] == [32] * 2 + [64] * 2
    assert any((Path(out["superres"]) / "leg-1-64" / "tensorboard").glob("events.out.tfevents.*"))
    assert set(out["metrics"]) == {"psnr_model", "psnr_bicubic", "ssim_model", "ssim_bicubic"}
    latest = _artifacts(state.state_details.flow_run_id)
    assert "data:image/png;base64," in latest["superres-samples"].data
    assert len(json.loads(latest["superres-epochs"].data)) == 4  # one table, updated in place every epoch
    assert latest["superres-epochs-progress"].data == 100.0
    assert latest["superres-epochs"].key == f"superres-epochs-{Path(out['superres']).name[:8]}"  # this stage's


def test_a_training_stage_asked_for_2_gpus_runs_on_2_ranks_inside_its_task(prefect_server, tier_env, sample_root):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from flows.superres import superres

    params = {"source": str(sample_root), "arch": "johnson", "loss": "pixel", "high_size": 32, "low_size": 8,
              "crappifier": "downscale", "epochs": 2, "batch_size": 4, "pretrained": False}
    state = superres(**params, gpus=2, return_state=True)
    out = state.result()
    m = open_stage(out["superres"]).manifest()
    assert m["params"]["gpus"] == 2 and (Path(out["superres"]) / "model.pt").is_file()
    history = json.loads((Path(out["superres"]) / "history.json").read_text())
    assert [h["ranks"] for h in history] == [2, 2]
    flow_run_id = state.state_details.flow_run_id

    async def logs_and_artifacts():
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [entry.message for entry in logs], runs

    for _ in range(120):  # logs are shipped asynchronously
        messages, runs = asyncio.run(logs_and_artifacts())
        if any("rank 0/2" in msg and "epoch 2/2" in msg for msg in messages):
            break
        time.sleep(0.25)
    assert any("rank 0/2" in msg and "epoch 2/2" in msg for msg in messages), messages[-20:]
    arts = _artifacts(flow_run_id)
    assert "data:image/png;base64," in arts["superres-samples"].data  # rank 0's report, republished by the task
    assert len(json.loads(arts["superres-epochs"].data)) == 2
    # the 1-GPU stage is another stage (a different batch and learning rate): its own key
    one = superres(**params)
    assert one["superres"] != out["superres"]


def test_devise_flow_trains_finetunes_indexes_and_publishes_hits(prefect_server, word_tiers, sample_root, monkeypatch):

    from flows.devise import devise
    from training.devise.search import DeviseSearch

    # the word table is already built in these tiers (session fixture): the flow finds it done
    monkeypatch.setenv("IMAGESMITH_FAST_DIR", str(word_tiers.fast))
    monkeypatch.setenv("IMAGESMITH_BULK_DIR", str(word_tiers.bulk))
    state = devise(source=str(sample_root), size=32, backbone="resnet18", pretrained=False, epochs=4, batch_size=8,
                   hidden=32, zero_shot=["n03790512"], finetune_epochs=2, finetune_batch_size=8, ann_above=10,
                   return_state=True)
    out = state.result()
    assert {"devise-features", "devise", "devise-finetune", "devise-index"} <= set(out)
    index = open_stage(out["devise-index"]).manifest()
    assert index["kind"] == "hnsw" and index["model"].startswith(out["devise-finetune"])
    assert len(DeviseSearch(out["devise-index"]).images_for_text("palace", k=3)) == 3
    latest = _artifacts(state.state_details.flow_run_id, every_key=True)
    hits = json.loads(latest[f"devise-hits-{Path(out['devise-finetune']).name[:8]}"].data)  # the fine-tuned model's
    assert {(r["model"], r["task"]) for r in hits} == {("devise", "flat"), ("devise", "zero-shot")}  # fine-tuned
    assert len(json.loads(latest[f"devise-epochs-{Path(out['devise']).name[:8]}"].data)) == 4
    assert len(json.loads(latest[f"devise-finetune-epochs-{Path(out['devise-finetune']).name[:8]}"].data)) == 2


def test_devise_command_prints_the_hit_table_and_the_index(prefect_server, word_tiers, sample_root, monkeypatch,
                                                           capsys):
    from imagesmith.cli import main

    monkeypatch.setenv("IMAGESMITH_FAST_DIR", str(word_tiers.fast))
    monkeypatch.setenv("IMAGESMITH_BULK_DIR", str(word_tiers.bulk))
    assert main(["devise", "--source", str(sample_root), "--size", "32", "--backbone", "resnet18", "--no-pretrained",
                 "--epochs", "2", "--batch-size", "8", "--zero-shot", "n03790512", "n02439033"]) == 0
    out = capsys.readouterr().out
    assert "hit@5" in out and "softmax" in out and "held-out classes (2)" in out and "search index:" in out
    index = out.split("search index:")[1].split()[0]
    assert main(["search", "--text", "palace", "-k", "1", "--index", index]) == 0


def test_run_command_on_a_folder_of_ones_own_exits_0_and_prints_the_stages(prefect_server, word_tiers, sample_root,
                                                                           monkeypatch, capsys):
    from imagesmith.cli import main

    monkeypatch.setenv("IMAGESMITH_FAST_DIR", str(word_tiers.fast))  # the word stages are done there
    monkeypatch.setenv("IMAGESMITH_BULK_DIR", str(word_tiers.bulk))
    assert main(["run", "--source", str(sample_root), "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert f"dataset  {sample_root}  (your folder)" in out
    for stage in ("listing", "resize", "words"):
        assert f"  {stage:<8} {word_tiers.fast / ('embeddings' if stage == 'words' else stage)}" in out, out


@pytest.mark.parametrize("params,field", [({"size": 0}, "size"), ({"size": 100_000}, "size"),
                                          ({"crappifier": "blur"}, "crappifier"), ({"seed": -1}, "seed")])
def test_the_flow_checks_its_parameters_before_any_stage_runs(prefect_server, tier_env, params, field):
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import pipeline

    with pytest.raises(ParameterTypeError, match=field):
        pipeline(**params)
    assert not (tier_env / "bulk").exists() and not (tier_env / "fast").exists()  # nothing was built


def test_gan_chain_flow_runs_every_stage_and_a_rerun_is_all_cached(prefect_server, tier_env, sample_root):

    from flows.gan import gan, wgan

    params = {"source": str(sample_root), "high_size": 32, "low_size": 16, "generator_epochs": 1, "critic_epochs": 1,
              "critic_nf": 8, "gan_epochs": 1, "batch_size": 8}
    state = gan(**params, return_state=True)
    out = state.result()
    for name in ("generator", "generated", "critic", "gan"):
        assert open_stage(out[name]).is_complete
    first = _task_states(state.state_details.flow_run_id)
    assert first["superres"] == first["generated"] == first["critic"] == first["gan"] == ["Completed"]
    # the stages after the pipeline subflow take its paths as plain values: Prefect's default UI
    # cannot draw a task whose input is a subflow's result (a blank page, "Invalid TaskInputResponse")
    inputs = _task_inputs(state.state_details.flow_run_id)
    assert inputs and not any("flow_run" in types for types in inputs.values()), inputs
    assert any(name.startswith("gan/") for name in inputs)
    # runs are named by what they do, not at random
    names = _flow_run_names(state.state_details.flow_run_id)
    root = sample_root.name
    assert f"gan-{root}-16to32px-seed0" in names and f"pipeline-{root}-32px-seed0" in names, names
    assert any(n.startswith("resize-") and n.endswith("-shards") for n in names), names
    rerun = gan(**params, return_state=True)
    assert rerun.result() == out
    again = _task_states(rerun.state_details.flow_run_id)
    assert all(again[name] == ["Cached"] for name in ("listing", "join-resize", "join-crappify", "superres",
                                                      "generated", "critic", "gan")), again
    latest = _artifacts(state.state_details.flow_run_id)
    assert "data:image/png;base64," in latest["gan-samples"].data
    assert {"psnr_gan", "psnr_pretrained", "critic_acc"} & set(json.loads(latest["gan-evaluation"].data)[0])

    w_state = wgan(source=str(sample_root), size=32, epochs=2, batch_size=8, critic_warmup=2, return_state=True)
    assert open_stage(w_state.result()["wgan"]).manifest()["generator_steps"] > 0
    assert "data:image/png;base64," in _artifacts(w_state.state_details.flow_run_id)["wgan-samples"].data


def test_style_flow_trains_publishes_samples_and_a_rerun_is_cached(prefect_server, tier_env, sample_root, tmp_path):

    from flows.style import style
    from training.style import default_style, file_digest

    with pytest.raises(ValueError, match="style image '.*nope.jpg' does not exist"):
        style(source=str(sample_root), style_image=str(tmp_path / "nope.jpg"))
    assert not (tier_env / "fast").exists()  # checked before any stage ran

    painting = tmp_path / "painting.jpg"
    shutil.copy(default_style(), painting)
    params = {"source": str(sample_root), "style_image": str(painting), "size": 32, "epochs": 1, "batch_size": 8}
    state = style(**params, return_state=True)
    out = state.result()
    m = open_stage(out["style"]).manifest()
    assert m["style_digest"] == file_digest(painting) and m["epochs"] == 1
    assert (Path(out["style"]) / "model.pt").is_file()
    assert "data:image/png;base64," in _artifacts(state.state_details.flow_run_id)["style-samples"].data
    rerun = style(**params, return_state=True)
    assert rerun.result() == out
    assert _task_states(rerun.state_details.flow_run_id)["style"] == ["Cached"]
