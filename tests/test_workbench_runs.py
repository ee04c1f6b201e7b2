"""Runs are never silently replaced; the index tells what ran, in pipeline order, and
what failed; files get the user's umask (issue 10, points 3 and 10).

    pytest -q tests/test_workbench_runs.py

The notebooks here are small real ones executed by papermill through vlmfit.report
(a few seconds each): named like the pipeline's, one of them raising.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import browser
from vlmfit import files
from vlmfit.report.index import write_index
from vlmfit.report.preflight import ParameterError, preflight
from vlmfit.report.render import report_status
from vlmfit.report.runner import NotebookFailed, run_notebook
from vlmfit.train import runs

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ------------------------------------------------------------------- run protection


def _a_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "adapter").mkdir()
    return path


def test_an_existing_run_is_refused_unless_resume_or_overwrite(tmp_path):
    run = _a_run(tmp_path / "sft-x")
    with pytest.raises(runs.RunExistsError, match="RESUME=1 continues it, OVERWRITE=1 replaces"):
        runs.prepare_run_dir(run)
    assert (run / "adapter").is_dir(), "refusing touches nothing"
    assert runs.prepare_run_dir(run, resume=True) == run
    assert (run / "adapter").is_dir(), "resume keeps the run"
    runs.prepare_run_dir(run, overwrite=True)
    assert run.is_dir() and list(run.iterdir()) == [], "overwrite starts afresh"
    with pytest.raises(runs.RunExistsError, match="contradict"):
        runs.prepare_run_dir(run, resume=True, overwrite=True)
    fresh = runs.prepare_run_dir(tmp_path / "new")  # an empty or absent folder is no run
    assert fresh.is_dir()


def test_notebook_launch_refuses_an_existing_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _a_run(tmp_path / "runs" / "sft-tiny-smolvlm")
    nb = ROOT / "notebooks" / "sft.ipynb"
    params = {"model": "tiny-smolvlm"}
    with pytest.raises(ParameterError, match="runs/sft-tiny-smolvlm already holds a run"):
        preflight(nb, params)
    preflight(nb, params | {"resume": True})
    preflight(nb, params, overwrite=True, dry_run=True)
    assert (tmp_path / "runs/sft-tiny-smolvlm/adapter").exists(), "a dry run deletes nothing"
    preflight(nb, params | {"run": "another"})  # a new RUN is fine


def test_train_cli_refuses_an_existing_run(tmp_path):
    _a_run(tmp_path / "runs" / "sft-tiny-smolvlm")
    proc = subprocess.run(
        [sys.executable, "-m", "vlmfit", "train", "--model", "tiny-smolvlm"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "already holds a run" in proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------- the index


def _notebook(path: Path, body: str) -> Path:
    params = nbformat.v4.new_code_cell('run = ""\nmodel = "tiny"')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), params]
    nb.cells += [nbformat.v4.new_markdown_cell("## Work"), nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, str(path))
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """dpo, sft (failing), profile and preprocess reports, run out of order, and a run."""
    tmp = tmp_path_factory.mktemp("pipeline")
    old = os.umask(0o022)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        nbs = tmp / "nbs"
        nbs.mkdir()
        out = tmp / "reports"
        for stem, body in (
            ("dpo", "print('dpo ran')"),
            ("profile", "print('profile ran')"),
            ("preprocess", "print('preprocess ran')"),
        ):
            run_notebook(_notebook(nbs / f"{stem}.ipynb", body), f"{stem}-tiny", {}, out)
        with pytest.raises(NotebookFailed) as failed:
            run_notebook(
                _notebook(nbs / "sft.ipynb", "raise ValueError('bad learning rate')"),
                "my-sft",
                {"run": "my-sft"},
                out,
            )
        run = tmp / "runs" / "my-sft"
        run.mkdir(parents=True, exist_ok=True)
        summary = {"run": "my-sft", "model": "tiny", "method": "sft", "runtime_s": 3.0}
        (run / "summary.json").write_text(json.dumps(summary))
        index = write_index(out, tmp / "runs")
    finally:
        os.chdir(cwd)
        os.umask(old)
    return {"out": out, "index": index, "error": str(failed.value)}


def test_failure_is_one_line_and_its_report_is_marked_failed(pipeline):
    err = pipeline["error"]
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("my-sft failed: ValueError: bad learning rate (in Work)")
    assert report_status(pipeline["out"] / "my-sft.html") == "failed"
    assert report_status(pipeline["out"] / "dpo-tiny.html") == "ok"
    page = (pipeline["out"] / "my-sft.html").read_text()
    assert "This notebook failed" in page and "bad learning rate" in page
    assert "Traceback" not in page and "raise ValueError" not in page


def test_index_lists_reports_in_pipeline_order_with_status_and_run_links(pipeline):
    page = pipeline["index"].read_text()
    order = [page.index(f'href="{n}.html"') for n in ("preprocess-tiny", "profile-tiny", "my-sft")]
    order.append(page.index('href="dpo-tiny.html"'))
    assert order == sorted(order), "preprocess, profile, SFT, DPO"
    failed_row = page[
        page.index('href="my-sft.html"') - 200 : page.index('href="my-sft.html"') + 400
    ]
    assert "FAILED" in failed_row and "bad learning rate" in failed_row
    assert "1 failed" in page
    runs_table = page[page.index("<h2>Runs</h2>") :]
    assert '<a href="my-sft.html">my-sft</a>' in runs_table, "each run links to its report"


def test_reports_and_index_get_the_users_umask(pipeline):
    for p in pipeline["out"].iterdir():
        assert _mode(p) == 0o644, f"{p.name}: {oct(_mode(p))}"


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        files.write_json(tmp_path / "a.json", {"x": 1})
        files.atomic_write(tmp_path / "b.html", "<p>")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o664 and _mode(tmp_path / "b.html") == 0o664
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temp left"


@pytest.mark.browser
@pytest.mark.skipif(
    browser.find_chromium() is None, reason="chromium missing: scripts/ensure_browser.sh"
)
def test_check_reports_counts_a_crashed_notebook(pipeline):
    problems = browser.check_reports(pipeline["out"])
    assert problems == ["my-sft.html: its notebook crashed (see my-sft.ipynb)"], problems


def test_apply_umask_fixes_what_writers_left_private(tmp_path, umask):
    import tempfile

    import torch
    from safetensors.torch import save_file

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    weights = run / "adapter" / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    private = Path(tempfile.mkdtemp(dir=run))
    script = run / "go.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o700)
    assert files.apply_umask(run) >= 2
    assert _mode(weights) == 0o644 and _mode(private) == 0o755 and _mode(script) == 0o755
    assert files.apply_umask(run) == 0, "idempotent"


def test_generated_data_and_caches_get_the_users_umask(tmp_path, monkeypatch):
    """mkdtemp folders are 0700; the bundled dataset and the preprocessing cache are
    renamed from them, so they must be opened up to the umask first."""
    import os
    import stat

    from vlmfit import preprocess
    from vlmfit.data import synth

    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        synth.generate("shapes", seed=0, n_train=4, n_test=12, n_dpo_train=4, n_dpo_test=12)
        res = preprocess.preprocess("shapes/sft_train.json", "tiny-qwen2-vl", progress=False)
    finally:
        os.umask(old)
    for path in (tmp_path / "shapes", res.path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
