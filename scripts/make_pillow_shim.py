"""Write a metadata-only wheel named ``pillow`` that stands for pillow-simd.

pillow-simd installs the ``PIL`` package under the distribution name ``pillow-simd``, so pip
thinks torchvision's ``pillow`` requirement is unmet and reinstalls Pillow over it at the next
``pip install``. This wheel installs no files; it only declares ``pillow`` (at a ``+simd``
local version) and requires pillow-simd, so pip's resolver is satisfied and leaves PIL alone.

usage: make_pillow_shim.py VERSION REQUIREMENT OUTDIR
"""

import base64
import hashlib
import sys
import zipfile
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_shim(version: str, requirement: str, outdir: Path) -> Path:
    info = f"pillow-{version}.dist-info"
    files = {
        f"{info}/METADATA": (
            "Metadata-Version: 2.1\n"
            "Name: pillow\n"
            f"Version: {version}\n"
            "Summary: Placeholder for Pillow: PIL is provided by pillow-simd (imagesmith bootstrap)\n"
            f"Requires-Dist: {requirement}\n"
        ).encode(),
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: imagesmith\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ).encode(),
    }
    record = "\n".join(_record_line(n, d) for n, d in files.items()) + f"\n{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"pillow-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(make_shim(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
