"""The operator's view, with real parts: a real `prefect server start` on 127.0.0.1 (its UI
included), the `imagesmith demo --smoke` command, headless Chromium on the UI's pages, and a worker
killed with -9 in the middle of a deployment's run.

``IMAGESMITH_UI_SHOTS=docs/ui make test PYTEST_ARGS="-k ui_pages"`` refreshes the README's screenshots.
"""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagesmith.server import ensure_operations, start_server, stop_server

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed (Debian package chromium; `make setup` installs it as root)"
    return path


def render(url: str, *, screenshot: Path | None = None, budget_ms: int = 25000) -> str:
    """The page's DOM after Chromium ran its scripts (the UI is a single-page app that reads the API)."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", f"--virtual-time-budget={budget_ms}", "--window-size=1440,1000"]
    if screenshot is not None and os.environ.get("IMAGESMITH_UI_SHOTS"):  # only when refreshing docs/ui
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    done = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def visible_text(dom: str) -> str:
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real local Prefect server with the UI, as `imagesmith server start` runs it."""
    home = tmp_path_factory.mktemp("prefect-home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    port = _free_port()
    try:
        url, started = start_server(port=port)
        assert started
        created = ensure_operations(url)  # what `imagesmith server start` does next
        yield {"url": url, "ui": url.removesuffix("/api"), "home": home, "port": port, "created": created}
    finally:
        stop_server()
        if old is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = old


def _client_env(server, tmp_path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": server["url"], "PREFECT_HOME": str(server["home"]),
            "IMAGESMITH_FAST_DIR": str(tmp_path / "fast"), "IMAGESMITH_BULK_DIR": str(tmp_path / "bulk")}


def _api(server, coro_fn):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings({PREFECT_API_URL: server["url"]}):
        return asyncio.run(go())


def test_server_start_creates_the_limits_and_the_zombie_automation_once(server):
    from imagesmith.server import ZOMBIE_AUTOMATION
    from tasks.stages import CPU_LIMIT, GPU_LIMIT

    assert len(server["created"]) == 3  # two limits and the automation
    assert ensure_operations(server["url"]) == []  # a second call changes nothing

    async def read(client):
        return ([a for a in await client.read_automations_by_name(ZOMBIE_AUTOMATION)],
                {n: (await client.read_global_concurrency_limit_by_name(n)).limit for n in (GPU_LIMIT, CPU_LIMIT)})

    automations, limits = _api(server, read)
    assert len(automations) == 1 and automations[0].trigger.within.total_seconds() == 180
    assert limits == {GPU_LIMIT: 1, CPU_LIMIT: 1}  # no GPU here: one training at a time, on the cores


def test_demo_smoke_runs_every_family_and_the_ui_pages_render(server, tmp_path):
    env = _client_env(server, tmp_path)
    done = subprocess.run([str(Path(sys.executable).with_name("imagesmith")), "demo", "--smoke", "--port",
                           str(server["port"])], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    header = next(line for line in out.splitlines() if line.startswith("family"))
    assert header.split() == ["family", "stage", "state", "time", "result"]
    for family, stage in [("pipeline", "resize"), ("pipeline", "words"), ("devise", "devise-finetune"),
                          ("superres", "superres"), ("gan", "critic"), ("gan", "gan"), ("wgan", "wgan"),
                          ("style", "style")]:
        assert re.search(rf"^{family}\s+{stage}\s+built\s+\d+ s", out, re.M), (family, stage, out)
    assert re.search(r"^superres\s+superres\s+built.*PSNR [\d.]+ dB vs bicubic [\d.]+", out, re.M)
    assert re.search(r"^gan\s+critic\s+built.*critic accuracy 0\.\d+", out, re.M)
    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", out).group(1)

    async def read(client):
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

        flow_run = await client.read_flow_run(run_id)
        runs = await client.read_task_runs()
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["demo-summary"])))
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return flow_run, runs, arts, children

    flow_run, task_runs, arts, _ = _api(server, read)
    assert flow_run.name == "demo-seed0-smoke" and flow_run.state.is_completed()
    shots = Path(os.environ["IMAGESMITH_UI_SHOTS"]) if os.environ.get("IMAGESMITH_UI_SHOTS") else tmp_path / "shots"

    page = visible_text(render(f"{server['ui']}/runs/flow-run/{run_id}", screenshot=shots / "flow-run.png"))
    assert "demo-seed0-smoke" in page and "Completed" in page, page[:2000]
    # the task pages that used to be blank in the default UI (a subflow's result as input)
    for name in ("join-resize", "devise-features", "superres"):
        task = next(t for t in task_runs if t.name.startswith(f"{name}/"))
        assert not any(i.input_type == "flow_run" for inputs in task.task_inputs.values() for i in inputs)
        shot = shots / f"task-{name}.png" if name in ("join-resize", "superres") else None
        page = visible_text(render(f"{server['ui']}/runs/task-run/{task.id}", screenshot=shot))
        assert task.name in page and task.state.name in page and "Tags" in page, (name, page[:2000])
    # the operator's overview: the stages on both tiers and the last runs from the API
    status = subprocess.run([str(Path(sys.executable).with_name("imagesmith")), "status"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^\s+superres\s+[0-9a-f]{16}\s+complete", status.stdout, re.M), status.stdout
    assert "archived -> " in status.stdout and "demo-seed0-smoke" in status.stdout
    summary = arts[0]
    page = visible_text(render(f"{server['ui']}/artifacts/artifact/{summary.id}", screenshot=shots / "summary.png"))
    assert "imagesmith demo" in page and "devise-finetune" in page and "wgan" in page, page[:2000]


def test_a_worker_killed_mid_run_leaves_a_crashed_run_that_retries_to_completed(server, tmp_path):
    """kill -9 of a process worker and its flow run: without the automation the run would stay
    Running forever. With it (heartbeat 30 s, silence 32 s here), the run becomes Crashed, and
    `prefect flow-run retry` runs it again to Completed."""
    from flows.pipeline import pipeline

    ensure_operations(server["url"], heartbeat_s=30, within_s=32)
    env = {**_client_env(server, tmp_path), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    prefect = str(Path(sys.executable).with_name("prefect"))
    subprocess.run([prefect, "work-pool", "create", "zombie-pool", "--type", "process"], env=env, check=True,
                   capture_output=True, timeout=120)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["url"]}):
        deployment_id = pipeline.from_source(source=str(REPO), entrypoint="flows/pipeline.py:pipeline").deploy(
            name="zombie", work_pool_name="zombie-pool", print_next_steps=False,
            parameters={"size": 48, "crappifier": "jpeg_text", "crappify_size": 24},
            job_variables={"env": {k: env[k] for k in ("IMAGESMITH_FAST_DIR", "IMAGESMITH_BULK_DIR",
                                                       "PREFECT_FLOWS_HEARTBEAT_FREQUENCY")}})

    async def start(client):
        return await client.create_flow_run_from_deployment(deployment_id)

    run = _api(server, start)

    def state():
        return _api(server, lambda client: client.read_flow_run(run.id)).state

    def worker():
        return subprocess.Popen([prefect, "worker", "start", "--pool", "zombie-pool"], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    first = worker()
    deadline = time.monotonic() + 240
    while not state().is_running() and time.monotonic() < deadline:
        time.sleep(1)
    assert state().is_running()
    time.sleep(8)  # the run has sent its first heartbeat and is at work
    from tests.faults.test_kill import descendants

    for pid in [first.pid, *descendants(first.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    first.wait()
    deadline = time.monotonic() + 150
    while not (s := state()).is_crashed() and time.monotonic() < deadline:
        assert s.is_running(), s  # nothing else may happen to it in between
        time.sleep(2)
    crashed = state()
    assert crashed.is_crashed() and "no heartbeat" in (crashed.message or ""), crashed

    retried = subprocess.run([prefect, "flow-run", "retry", str(run.id)], env=env, capture_output=True, text=True,
                             timeout=120)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    second = worker()
    try:
        deadline = time.monotonic() + 300
        while not (s := state()).is_final() and time.monotonic() < deadline:
            time.sleep(2)
        assert state().is_completed(), state()

        async def tree(client):
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

            ids, frontier = [run.id], [run.id]
            while frontier:
                kids = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
                frontier = [k.id for k in kids if k.id not in ids]
                ids += frontier
            flows = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            return flows, tasks

        # the dead attempt's task and subflow runs were settled as Crashed when the retry began: none
        # is left Running in the UI
        flows, tasks = _api(server, tree)
        assert all(r.state.is_final() for r in [*flows, *tasks]), [(r.name, r.state.name) for r in [*flows, *tasks]]
        assert any(t.state.is_crashed() and "retried" in (t.state.message or "") for t in tasks) or \
            all(t.state.is_completed() for t in tasks)
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()


def test_prefect_deploy_all_accepts_the_project_file_with_portable_paths(server, tmp_path):
    """`prefect deploy --all` as the README says: every deployment registers, with the tiers written
    out relative, the worker's own directory, and the ImageNet schedules inactive."""
    env = _client_env(server, tmp_path)
    prefect = str(Path(sys.executable).with_name("prefect"))
    subprocess.run([prefect, "work-pool", "create", "imagesmith-local", "--type", "process"], env=env, cwd=REPO,
                   capture_output=True, timeout=120)
    done = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    async def read(client):
        return await client.read_deployments()

    deployments = {d.name: d for d in _api(server, read)}
    assert {"demo-nightly", "pipeline-sample", "superres-sample", "devise-sample", "gan-sample", "wgan-sample",
            "style-sample", "imagenet-weekly", "devise-imagenet-weekly"} <= set(deployments)
    for d in deployments.values():
        if d.name == "zombie":
            continue
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "."}}], d.pull_steps
        env_vars = d.job_variables["env"]
        assert not env_vars["IMAGESMITH_FAST_DIR"].startswith("/")
        assert str(REPO) not in json.dumps(d.pull_steps)
    assert not deployments["imagenet-weekly"].schedules[0].active
    assert deployments["demo-nightly"].schedules[0].active
    assert deployments["demo-nightly"].parameters == {"refresh": True, "scratch": True}


def test_a_training_stage_waits_while_another_run_holds_the_gpu(server, tmp_path):
    """Two training runs never share the GPU: while another process holds the slot of imagesmith-gpu
    (as another run's training stage would), a training stage does not start; released, it runs."""
    env = _client_env(server, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom prefect.concurrency.sync import concurrency\n"
                               "with concurrency('imagesmith-gpu', occupy=1):\n"
                               "    print('held', flush=True)\n    sys.stdin.readline()\n"],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"

    async def slots(client):
        return (await client.read_global_concurrency_limit_by_name("imagesmith-gpu")).active_slots

    assert _api(server, slots) == 1  # held on this server
    code = "from flows.gan import wgan; wgan(size=32, epochs=1, batch_size=8, nf=8, critic_warmup=2)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any((tmp_path / "fast").glob("resize/*/manifest.json")):
            time.sleep(1)
        time.sleep(12)  # the pipeline is done; the training stage alone takes ~3 s
        assert proc.poll() is None, proc.stdout.read()
        assert not any((tmp_path / "fast").glob("wgan/*/manifest.json"))  # it waits for the slot
    finally:
        holder.communicate("release\n", timeout=60)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "taking 1 slot(s) of the concurrency limit 'imagesmith-gpu'" in out
    assert any((tmp_path / "fast").glob("wgan/*/manifest.json"))
