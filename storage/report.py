"""What a running stage shows a person: tables and pictures, beside the log lines.

Compute code reports through a ``Reporter``; the plain one does nothing (the log already says
what happens), and the Prefect layer (tasks/) publishes the same calls as flow-run artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Reporter:
    """Publishes nothing; subclasses publish (tasks/artifacts.py: Prefect artifacts)."""

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        """A table under ``key``; publishing again under the same key replaces what is shown."""

    def markdown(self, key: str, text: str, description: str = "") -> None:
        """A markdown page under ``key`` (pictures inline as data: URLs)."""

    def progress(self, key: str, fraction: float, description: str = "") -> None:
        """How far a long piece of work is (0 to 1), under ``key``; updated in place."""


def epoch_table(report: Reporter, key: str, description: str) -> Callable[[dict[str, Any]], None]:
    """An ``on_epoch`` callback for the training loop that republishes the table of every epoch
    so far under ``key`` (a person watching sees it grow while the run goes on)."""
    history: list[dict[str, Any]] = []

    def publish(record: dict[str, Any]) -> None:
        history.append(record)
        report.table(key, [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}
                           for r in history], description)
        if record.get("of_epochs"):
            report.progress(f"{key}-progress", (record["epoch"] + 1) / record["of_epochs"],
                            f"{description}: epoch {record['epoch'] + 1} of {record['of_epochs']}")

    return publish
