"""A ``Reporter`` that publishes what stages report as Prefect artifacts of the current run."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage.report import Reporter


class ArtifactReporter(Reporter):
    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        create_table_artifact(key=key, table=rows, description=description)

    def markdown(self, key: str, text: str, description: str = "") -> None:
        create_markdown_artifact(key=key, markdown=text, description=description)
