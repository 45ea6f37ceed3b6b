"""The documentation: every code block marked ``# runs on CPU`` runs as written, and the site builds
with warnings as errors (the latter where Sphinx is installed: `make docs` installs it)."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARK = "# runs on CPU"


def _runnable_blocks():
    for page in sorted((ROOT / "docs").glob("*.md")):
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)):
            if block.startswith(MARK):
                yield pytest.param(block, id=f"{page.name}:{i}")


BLOCKS = list(_runnable_blocks())


def test_the_quick_start_has_runnable_blocks():
    assert sum(p.id.startswith("quickstart.md") for p in BLOCKS) >= 4


@pytest.mark.parametrize("code", BLOCKS)
def test_block_runs(code, tmp_path):
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.mark.slow
def test_the_site_builds_without_warnings(tmp_path):
    sphinx = shutil.which("sphinx-build", path=str(pathlib.Path(sys.executable).parent))
    if sphinx is None:
        pytest.skip("sphinx is not installed here (make docs installs it)")
    run = subprocess.run([sphinx, "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
