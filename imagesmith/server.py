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
