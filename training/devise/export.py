"""A DeViSE model on disk: ``model.pt`` with its weights and what rebuilds and uses it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from models.devise import Devise, DeviseConfig
from models.train import load_export, save_checkpoint


def export_devise(out: Path, model: Devise, *, classes: list[str], image_size: int, words_dir: str | Path) -> Path:
    """Weights + what search needs to rebuild and use the model."""
    save_checkpoint(out, model=model.state_dict(),
                    devise={"config": asdict(model.config), "classes": classes, "image_size": image_size,
                            "words": str(words_dir)})
    return out


def load_devise(path: str | Path) -> tuple[Devise, dict[str, Any]]:
    """A model exported by the DeViSE stages (``model.pt`` or its folder) and its metadata."""
    state, meta, _ = load_export(path, "devise", "DeViSE model")
    model = Devise(DeviseConfig(**{**meta["config"], "pretrained": False}))
    model.load_state_dict(state["model"])
    return model.eval(), meta
