"""Flow run names from the run's parameters (``superres-sample-unet-feature-32to128px``), instead of
Prefect's random ones, so the runs list in the UI says what each run is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def run_name(template: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``template`` formatted with the run's parameters plus ``data``
    (the source folder's name, or ``sample``) and ``style`` (the style image's stem, or ``scream``)."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = dict(flow_run.parameters or {})
        source = params.get("source")
        style = params.get("style_image")
        data = Path(str(source)) if source else None
        if data is not None and data.parent.name == "sample":  # the bundled sample's own stage directory
            data = Path("sample")
        values = {**params, "data": data.name if data else "sample",
                  "style": Path(str(style)).stem if style else "scream",
                  "smoke_tag": "-smoke" if params.get("smoke") else ""}
        try:
            return template.format(**values)
        except (KeyError, IndexError, ValueError):  # a name is never worth failing a run for
            return template.split("-", 1)[0]

    return name
