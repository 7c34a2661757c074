"""Route the plain compute functions' log lines (``logging.getLogger(__name__)``) into Prefect runs."""

from __future__ import annotations

import logging

STAGE_LOGGERS = ("flows", "tasks", "models", "storage", "prep", "training", "imagesmith")


def route_stage_logs(level: int = logging.INFO) -> None:
    """Give our package loggers Prefect's handlers (API + console) and an INFO level.

    ``PREFECT_LOGGING_EXTRA_LOGGERS`` copies the handlers but leaves the level unset, so INFO
    lines would stop at the root logger's WARNING; this sets both, whatever the settings say.
    """
    prefect_handlers = logging.getLogger("prefect.extra").handlers
    for name in STAGE_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for handler in prefect_handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
