"""A ``Reporter`` that publishes what stages report as Prefect artifacts of the current run.

Keys carry the stage's key (``superres-epochs-3f2a9c1d``), so "the latest superres-epochs" in the
UI's artifact list is this stage's, not whatever ran last. Within one run, publishing under a key
again updates that artifact in place (one loss table per run, growing, not one card per epoch).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from storage.report import Reporter


def artifact_key(key: str, suffix: str = "") -> str:
    """A Prefect artifact key (lower-case letters, digits, dashes) of ``key`` and ``suffix``."""
    text = f"{key}-{suffix}" if suffix else key
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def _update(artifact_id: UUID, data: str, description: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactUpdate

    with get_client(sync_client=True) as client:
        client.update_artifact(artifact_id, ArtifactUpdate(data=data, description=description))


class ArtifactReporter(Reporter):
    """``suffix``: appended to every key (the stage key's first 8 characters)."""

    def __init__(self, suffix: str = ""):
        self.suffix = suffix
        self._ids: dict[str, UUID] = {}

    def _publish(self, key: str, create: Callable[[str], UUID], update: Callable[[UUID], None]) -> None:
        """Create the artifact the first time this run publishes ``key``, update it in place after."""
        key = artifact_key(key, self.suffix)
        if key in self._ids:
            update(self._ids[key])
        else:
            self._ids[key] = create(key)

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        self._publish(key, lambda k: create_table_artifact(key=k, table=rows, description=description),
                      lambda i: _update(i, json.dumps(rows, default=str), description))

    def markdown(self, key: str, text: str, description: str = "") -> None:
        self._publish(key, lambda k: create_markdown_artifact(key=k, markdown=text, description=description),
                      lambda i: _update(i, text, description))

    def progress(self, key: str, fraction: float, description: str = "") -> None:
        percent = max(0.0, min(100.0, 100.0 * fraction))
        self._publish(key, lambda k: create_progress_artifact(percent, key=k, description=description),
                      lambda i: update_progress_artifact(i, percent, description=description))
