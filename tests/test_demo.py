"""The embedded default, end to end: `make demo` on CPU with a tiny model (slow, ~3-4 min).

pytest -q -m slow tests/test_demo.py

Besides learning, it checks what a user sees (issue 10): progress lines in the terminal,
DPO's reward accuracy and margin before -> after, reports without code or stderr, and
that the checkout's notebooks are left exactly as committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _git_status() -> str | None:
    if not (ROOT / ".git").exists():
        return None
    out = subprocess.run(
        ["git", "status", "--porcelain", "notebooks"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout if out.returncode == 0 else None


@pytest.mark.slow
def test_demo_learns_and_writes_linked_offline_reports(tmp_path, tiny_cache):
    (tmp_path / "notebooks").symlink_to(ROOT / "notebooks")
    status_before = _git_status()
    proc = subprocess.run(
        [sys.executable, "-m", "vlmfit", "demo", "--reports", "reports"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[demo]   after SFT" in proc.stdout
    # progress while the notebooks ran: the section, then step / loss / ETA
    assert "[sft-tiny-smolvlm]" in proc.stdout and " ETA " in proc.stdout, proc.stdout[-3000:]
    assert "reward accuracy (held-out pairs)" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert _git_status() == status_before, "the run left the notebooks as committed"
    sft = json.loads((tmp_path / "runs/sft-tiny-smolvlm/summary.json").read_text())
    dpo = json.loads((tmp_path / "runs/dpo-tiny-smolvlm/summary.json").read_text())
    before = sft["eval_before"]
    # chance is 1/3 per question type; the untrained model is at or below it
    assert all(v <= 1 / 3 + 1e-9 for v in before["by_type"].values()), before
    assert sft["eval_after"]["exact_match"] >= 0.9, sft["eval_after"]
    assert dpo["eval_after"]["exact_match"] >= sft["eval_after"]["exact_match"], dpo["eval_after"]
    assert dpo["eval_before"]["exact_match"] == pytest.approx(sft["eval_after"]["exact_match"])
    assert dpo["dpo_eval"]["eval_rewards/accuracies"] > 0.5
    # the held-out answers are balanced: chance at most 1/3 for every question type
    meta = json.loads((tmp_path / "data/shapes/meta.json").read_text())
    test_counts = meta["counts"]["sft_test"]
    assert test_counts["total"] == sft["eval_after"]["n"]
    # files users mount are readable by them (weights included: safetensors writes 0600)
    private = [
        p
        for d in ("runs", "reports")
        for p in (tmp_path / d).rglob("*")
        if p.stat().st_mode & 0o044 != 0o044
    ]
    assert private == [], private[:5]
    # every report exists and the index links them all
    index = (tmp_path / "reports/index.html").read_text()
    for name in ("preprocess-tiny-smolvlm", "sft-tiny-smolvlm", "dpo-tiny-smolvlm"):
        assert (tmp_path / f"reports/{name}.html").exists()
        assert f'href="{name}.html"' in index
    # the training reports carry their figures (loss / lr / grad-norm curves, memory timeline)
    import re

    for name in ("sft-tiny-smolvlm", "dpo-tiny-smolvlm"):
        page = (tmp_path / f"reports/{name}.html").read_text()
        plots = re.findall(r'<img (?![^>]*alt="sample")[^>]*src="data:image/png', page)
        assert len(plots) >= 2, f"{name}: {len(plots)} figures"
        assert 'alt="sample"' in page, "evaluation table with sample images"
        for noise in ("Traceback", "FutureWarning", "Loading weights", "kernels", "import "):
            assert noise not in page, f"{name}: {noise!r} in the report"
        assert page.index("Results") < page.index("Configuration"), "results first"
        # GPU memory over steps with its growth trend; a CPU run says so in one line
        assert "GPU memory over steps: growth" in page
        assert "no CUDA rows in this run" in page or "GPU memory per step" in page
    import browser

    if browser.find_chromium() is None:
        pytest.skip(
            "chromium missing (scripts/ensure_browser.sh): reports not checked in a browser"
        )
    assert browser.check_reports(tmp_path / "reports") == []
