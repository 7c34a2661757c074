"""The layers: compute runs without Prefect; the Prefect layer is thin."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPUTE = ("storage", "models", "prep", "training")

_BLOCK_PREFECT = textwrap.dedent("""
    import importlib, pkgutil, sys

    class BlockPrefect:
        def find_spec(self, name, path=None, target=None):
            if name == "prefect" or name.startswith(("prefect.", "prefect_")):
                raise ImportError(f"{name} is not importable in this test")

    sys.meta_path.insert(0, BlockPrefect())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_PREFECT + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_every_compute_module_imports_with_prefect_unimportable():
    done = _run(f"""
        names = []
        for package in {COMPUTE!r}:
            root = importlib.import_module(package)
            names += [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
        for name in names:
            importlib.import_module(name)
        assert not any(m == "prefect" or m.startswith("prefect.") for m in sys.modules), "prefect was imported"
        print(len(names), "modules")
    """)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[0]) >= 30


def test_the_blocker_does_block_the_prefect_layer():
    done = _run("import tasks.stages")
    assert done.returncode != 0 and "prefect is not importable in this test" in done.stderr
