"""A ``Reporter`` that publishes what stages report as Prefect artifacts of the current run.

Keys carry the stage's key (``superres-epochs-3f2a9c1d``), so "the latest superres-epochs" in the
UI's artifact list is this stage's, not whatever ran last. Within one run, publishing under a key
again updates that artifact in place (one loss table per run, growing, not one card per epoch).
"""

from __future__ import annotations

import json
import re
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

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        key = artifact_key(key, self.suffix)
        if key in self._ids:
            _update(self._ids[key], json.dumps(rows, default=str), description)
        else:
            self._ids[key] = create_table_artifact(key=key, table=rows, description=description)

    def markdown(self, key: str, text: str, description: str = "") -> None:
        key = artifact_key(key, self.suffix)
        if key in self._ids:
            _update(self._ids[key], text, description)
        else:
            self._ids[key] = create_markdown_artifact(key=key, markdown=text, description=description)

    def progress(self, key: str, fraction: float, description: str = "") -> None:
        key = artifact_key(key, self.suffix)
        fraction = max(0.0, min(100.0, 100.0 * fraction))
        if key in self._ids:
            update_progress_artifact(self._ids[key], fraction, description=description)
        else:
            self._ids[key] = create_progress_artifact(fraction, key=key, description=description)
