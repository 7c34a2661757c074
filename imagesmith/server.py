"""A local Prefect server on 127.0.0.1 with the project's own PREFECT_HOME (SQLite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200


def api_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"http://{host}:{port}/api"


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when a Prefect API answers its health check at ``url``."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200 and json.loads(response.read() or b"null") is True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.cwd() / ".prefect").resolve()


def _pid_file(home: Path) -> Path:
    return home / "server.pid"


def start_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout: float = 120.0) -> tuple[str, bool]:
    """Start ``prefect server start`` in the background unless one already answers.

    Returns (api url, started_now). The server's log is ``$PREFECT_HOME/server.log``.
    """
    url = api_url(host, port)
    if is_healthy(url):
        return url, False
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "server.log"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)  # the server must not try to talk to itself as a client
    env["PREFECT_UI_API_URL"] = url  # else the UI it serves reads the API on port 4200, whatever --port says
    prefect_cli = Path(sys.executable).with_name("prefect")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(prefect_cli), "server", "start", "--host", host, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    _pid_file(home).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(url):
            return url, True
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}; see {log_path}")
        time.sleep(0.5)
    raise TimeoutError(f"prefect server did not answer at {url} within {timeout:.0f} s; see {log_path}")


ZOMBIE_AUTOMATION = "imagesmith: crash deployment runs whose heartbeats stopped"
HEARTBEAT_S = 60  # prefect.toml [flows] heartbeat_frequency: a running flow run says so every minute
MISSED_HEARTBEATS = 3  # ... and is marked Crashed after this many minutes of silence


def ensure_operations(url: str, *, heartbeat_s: int = HEARTBEAT_S, within_s: float | None = None,
                      gpus: int | None = None) -> list[str]:
    """Make the server ready for imagesmith's runs, idempotently; returns what it created or changed.

    - The automation that marks a deployment's flow run Crashed when its heartbeats stop (a killed
      worker or machine): without it such a run stays Running forever, cannot be retried, and a
      cancel hangs. (A run started from the command line dies with it: rerun the command.)
    - The global concurrency limits the stages take slots of (tasks/stages.py): ``imagesmith-gpu``
      with one slot per GPU here (1 on a machine without one: training then uses all the cores) and
      ``imagesmith-cpu`` with 1 slot (one core-hungry stage at a time across runs).

    ``within_s``: the silence that counts as dead (default: ``MISSED_HEARTBEATS`` x ``heartbeat_s``).
    """
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.stages import CPU_LIMIT, GPU_LIMIT

    if gpus is None:
        from models.distributed import cuda_devices

        gpus = cuda_devices()
    changed = []
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        for name, limit in ((GPU_LIMIT, max(gpus, 1)), (CPU_LIMIT, 1)):
            try:
                current = client.read_global_concurrency_limit_by_name(name)
                if current.limit != limit or not current.active:
                    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
                    changed.append(f"concurrency limit {name}: {current.limit} -> {limit}")
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
                changed.append(f"concurrency limit {name} = {limit}")
        within = timedelta(seconds=within_s or heartbeat_s * MISSED_HEARTBEATS)
        existing = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if existing and existing[0].trigger.within == within:
            return changed
        for automation in existing:  # another heartbeat period: replace it
            client.delete_automation(automation.id)
        client.create_automation(AutomationCore(
            name=ZOMBIE_AUTOMATION,
            description=f"A flow run that sent a heartbeat and then nothing for {within.total_seconds():.0f} s "
                        "(no heartbeat, no final state) is marked Crashed, so it can be retried.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                # runs a worker executes (a deployment's), the ones a retry can restart: their subflows
                # are settled by the retry (tasks/runs.py), and leaving every subflow's heartbeats and
                # state events out keeps the trigger's writes off SQLite (they stalled it for a minute)
                match_related=ResourceSpecification({"prefect.resource.role": "deployment"}),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=within,
            ),
            actions=[ChangeFlowRunState(state="CRASHED",
                                        message=f"no heartbeat for {within.total_seconds():.0f} s: its process "
                                                "or machine died (marked by imagesmith's automation)")],
        ))
        changed.append(f"automation {ZOMBIE_AUTOMATION!r} (within {within.total_seconds():.0f} s)")
    return changed


def stop_server() -> bool:
    """Stop the server started by ``start_server`` (its process group). False if none was recorded."""
    pid_file = _pid_file(prefect_home())
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    pid_file.unlink()
    return True
