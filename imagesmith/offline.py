"""Offline defaults for Prefect, applied by the ``imagesmith`` command and the tests.

``prefect.toml`` carries the same Prefect settings for commands run from the repository root;
these environment defaults cover runs from anywhere else. The user's own values always win.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",  # not a Prefect setting: environment only
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "flows,tasks,models,storage,prep,training,imagesmith",
    # our plain functions also run outside flows (CLI, tests): no warning when there is no run to log to
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def apply_offline_defaults() -> None:
    """Set each offline default unless the environment already has the variable. Call before importing prefect."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
