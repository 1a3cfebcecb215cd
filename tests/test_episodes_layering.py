"""`episodes` is a data package below the toolkit: it must never import `fewshot_nsl`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import episodes

REPO = Path(__file__).resolve().parents[1]

_CHECK = """
import pkgutil, importlib, sys
import episodes
names = [m.name for m in pkgutil.walk_packages(episodes.__path__, "episodes.")]
for name in names:
    importlib.import_module(name)
above = sorted(m for m in sys.modules if m == "fewshot_nsl" or m.startswith("fewshot_nsl."))
print(len(names), "modules;", "imported:", above)
sys.exit(1 if above else 0)
"""


def test_importing_every_episodes_module_never_imports_fewshot_nsl():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(done.stdout.split()[0]) >= 10  # the walk really saw the package's modules


def test_the_public_names_are_all_importable():
    for name in episodes.__all__:
        assert getattr(episodes, name) is not None, name


def test_no_episodes_source_file_names_fewshot_nsl_in_an_import():
    """Also lazy imports inside functions, which the import check above cannot see."""
    for path in Path(episodes.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "fewshot_nsl" for n in names), path.name
