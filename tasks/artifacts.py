"""Prefect artifacts the training tasks share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.artifacts import create_table_artifact


def epoch_table(key: str, description: str) -> Callable[[dict[str, Any]], None]:
    """An ``on_epoch`` callback that republishes the table of every epoch so far under ``key``
    (the Prefect UI shows the latest version while the run goes on)."""
    history: list[dict[str, Any]] = []

    def publish(record: dict[str, Any]) -> None:
        history.append(record)
        create_table_artifact(key=key, description=description,
                              table=[{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}
                                     for r in history])

    return publish
