"""Which imaging backend is active (pillow-simd or Pillow), with versions and SIMD flags."""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
from pathlib import Path
from typing import Any

import PIL
from PIL import features


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def cpu_has_avx2() -> bool:
    try:
        return " avx2 " in f" {Path('/proc/cpuinfo').read_text()} ".replace("\n", " ")
    except OSError:
        return False


def imaging_backend() -> dict[str, Any]:
    """Describe the PIL in use: backend name, versions, libjpeg-turbo, AVX2 (CPU and build)."""
    simd = _dist_version("pillow-simd")
    pillow = _dist_version("pillow")
    # pillow-simd and Pillow both install PIL/; the one whose version PIL reports is the one in use
    backend = "pillow-simd" if simd is not None and PIL.__version__ == simd else "pillow"
    record_path = Path(sys.prefix) / "imagesmith-imaging.json"
    build = json.loads(record_path.read_text()) if record_path.is_file() else {}
    return {
        "backend": backend,
        "pil_version": PIL.__version__,
        "pillow_simd_dist": simd,
        "pillow_dist": pillow,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "libjpeg_version": features.version("jpg"),
        "cpu_avx2": cpu_has_avx2(),
        "built_with_avx2": "-mavx2" in build.get("cc", ""),
        "build_note": build.get("note", "no bootstrap record (PIL not installed by scripts/bootstrap.sh)"),
    }
