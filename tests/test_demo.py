"""The embedded default, end to end: `make demo` on CPU with a tiny model (slow, ~3-4 min).

pytest -q -m slow tests/test_demo.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_learns_and_writes_linked_offline_reports(tmp_path, tiny_cache):
    (tmp_path / "notebooks").symlink_to(ROOT / "notebooks")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--reports", "reports"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[demo]   after SFT" in proc.stdout
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
    from vlmfit import browser

    if browser.find_chromium() is None:
        pytest.skip(
            "chromium missing (scripts/ensure_browser.sh): reports not checked in a browser"
        )
    assert browser.check_reports(tmp_path / "reports") == []
