"""A fresh clone stays clean after the workbench runs (issue 10, point 6).

    pytest -q tests/test_workbench_git.py

`make setup` installs nbstripout as git's clean filter for *.ipynb. Notebooks committed
in any other form (cell ids "cell-00" where nbstripout writes "0") show as modified as
soon as git looks at them again. They are committed in nbstripout's own form, so the
filter is a no-op on them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_in_nbstripouts_form(nb):
    proc = subprocess.run(
        [sys.executable, "-m", "nbstripout", "-t", str(nb)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout == nb.read_text(), f"run `nbstripout {nb.relative_to(ROOT)}` and commit"


@pytest.mark.skipif(
    not (ROOT / ".git").exists() or shutil.which("git") is None,
    reason="not a git checkout (the container image excludes .git)",
)
def test_a_fresh_clone_with_the_filter_stays_clean(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(
        [sys.executable, "-m", "nbstripout", "--install", "--attributes", ".gitattributes"],
        cwd=clone,
        check=True,
    )
    for nb in (clone / "notebooks").glob("*.ipynb"):
        os.utime(nb)  # what a run does to the index's view: git re-reads through the filter
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout
    assert status == "", status
