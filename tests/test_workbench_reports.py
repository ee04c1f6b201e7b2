"""Reports read like results (issue 10, point 4) and progress is visible (point 5).

    pytest -q tests/test_workbench_reports.py

No code, no stderr (warnings, progress bars, library messages) in the HTML, a results
summary first and the configuration folded last; numbers rounded for people; plots
that show their data; training progress lines with step, loss and ETA.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from vlmfit import report
from vlmfit.config import resolve
from vlmfit.report.render import report_notebook, to_html
from vlmfit.report.runner import Progress, progress_line

ROOT = Path(__file__).resolve().parents[1]


def _executed_notebook() -> nbformat.NotebookNode:
    """An executed notebook as papermill leaves it (outputs written by hand, no kernel)."""
    nb = new_notebook()
    train = new_code_cell("summary = train.run(cfg)  # CODE-MARKER")
    train.outputs = [
        new_output("stream", name="stderr", text="Loading weights: 100%|####| 3/3\n"),
        new_output("stream", name="stderr", text="FutureWarning: deprecated\n"),
        new_output("stream", name="stdout", text="trained 30 steps\n"),
    ]
    results = new_code_cell("display(summary)")
    results.metadata["tags"] = ["summary"]
    results.outputs = [new_output("display_data", data={"text/html": "<p>RESULTS-HERE</p>"})]
    heading = new_markdown_cell("## Results")
    heading.metadata["tags"] = ["summary"]
    quiet = new_code_cell("import warnings")  # no output at all: leaves no empty block
    nb.cells = [new_markdown_cell("# Title"), quiet, new_markdown_cell("## Train"), train]
    nb.cells += [heading, results, new_markdown_cell("## Curves")]
    return nb


def test_report_view_drops_stderr_and_puts_results_first():
    view = report_notebook(_executed_notebook())
    sources = [c.source for c in view.cells]
    assert sources[:3] == ["# Title", "## Results", "display(summary)"], sources
    train = next(c for c in view.cells if "CODE-MARKER" in c.source)
    assert [o.get("name") for o in train.outputs] == ["stdout"]
    assert "import warnings" not in sources


def test_html_has_no_code_and_no_stderr(tmp_path):
    nb = _executed_notebook()
    nb.metadata["vlmfit"] = {"status": "ok"}
    path = tmp_path / "r.ipynb"
    nbformat.write(nb, str(path))
    page = to_html(path, "r")
    assert "RESULTS-HERE" in page and "trained 30 steps" in page
    for noise in ("CODE-MARKER", "Loading weights", "FutureWarning", "import warnings"):
        assert noise not in page, noise
    assert page.index("RESULTS-HERE") < page.index("trained 30 steps")
    assert '<meta name="vlmfit-status" content="ok">' in page


def test_numbers_are_rounded_for_people():
    assert report.human(0.123456) == "0.123"
    assert report.human(1.234e-5) == "1.23e-05"
    assert report.human(169.2345, "runtime_s") == "2 min 49 s"
    assert report.human(4.2, "load_s") == "4.2 s"
    assert report.human(0.6789, "peak_memory_gib") == "0.68 GiB"
    assert report.human(0.0123, "peak_memory_gib") == "13 MiB"
    assert report.human(847_123) == "847 K" and report.count(1_234_567) == "1.23 M"
    assert report.human(None) == "-" and report.human("cpu") == "cpu"


def _run(tmp_path: Path, method: str = "sft", flat_rss: bool = True) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": s, "time": 100.0 + s, "loss": 2.0 / s, "learning_rate": 1e-4, "epoch": s / 20}
        | {"mem_rss_gib": 0.681 + (0.0001 * s if flat_rss else 0.1 * s)}
        | (
            {"rewards/accuracies": 0.5 + s / 40, "rewards/margins": s / 10}
            if method == "dpo"
            else {}
        )
        for s in range(2, 21, 2)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "run": "r",
        "model": "tiny-smolvlm",
        "weights": "hub",
        "method": method,
        "finetune": "lora",
        "global_step": 20,
        "train_loss": 0.4321987,
        "runtime_s": 125.7,
        "peak_memory_gib": 0.6812345,
        "device": "cpu",
        "trainable_params": {"trainable": 65_536, "total": 847_000},
        "eval_before": {"exact_match": 0.0, "n": 120},
        "eval_after": {"exact_match": 0.9416666, "n": 120},
        "dpo_eval": {"eval_rewards/accuracies": 0.975, "eval_rewards/margins": 1.23456},
    }
    if method == "dpo":
        summary["dpo_eval_before"] = {"eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_results_summary_shows_what_changed(tmp_path):
    html = report.results_summary(_run(tmp_path))
    assert "2 min 6 s" in html and "0.432" in html and "0.68 GiB" in html
    assert "65.5 K of 847 K parameters trained (7.7 %)" in html
    assert "<td>0.000</td><td>0.942</td>" in html, "exact match before / after"


def test_dpo_summary_shows_reward_accuracy_and_margin_before_and_after(tmp_path):
    html = report.results_summary(_run(tmp_path, "dpo"))
    assert "reward accuracy (held-out pairs)</th><td>0</td><td>0.975</td>" in html
    assert "margin (held-out pairs)</th><td>0</td><td>1.23</td>" in html
    assert "training batches, first / last log" in html


def test_configuration_is_folded():
    cfg, origin = resolve({"model": "tiny-smolvlm", "lora_r": 8})
    html = report.config_table(cfg, origin)
    assert html.startswith('<details class="vlmfit-config"><summary>')
    assert html.index("lora_r") < html.index("lora_alpha"), "values set for the run first"


def test_memory_plot_starts_at_zero(tmp_path):
    fig = report.memory_timeline(_run(tmp_path, flat_rss=True))
    lo, hi = fig.axes[0].get_ylim()
    assert lo == 0 and 0.68 < hi < 1.0, (lo, hi)


def test_sequence_length_histogram_shows_short_samples():
    rows = [
        {"total_before": 90 + i % 30, "total_budget": 90 + i % 30, "total_after": 90 + i % 30}
        | {"status": "kept"}
        for i in range(200)
    ]
    fig = report.sequence_lengths(rows, max_length=2048)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert hi < 200, f"x-axis runs to {hi}: the bars would be a sliver"
    widths = [p.get_width() for p in ax.patches if p.get_height() > 0]
    assert widths and min(widths) > (hi - lo) / 100
    assert "max_length=2,048 is off the chart" in ax.get_title()
    long = [r | {"total_before": 1500 + i, "total_after": 1500 + i} for i, r in enumerate(rows)]
    ax = report.sequence_lengths(long, max_length=2048).axes[0]
    assert any(abs(line.get_xdata()[0] - 2048) < 1e-9 for line in ax.lines), "limit drawn"


def test_progress_line_has_step_loss_and_eta():
    rows = [
        {"step": s, "time": 10.0 + 2 * s, "loss": 1 / s, "epoch": s / 60} for s in (5, 10, 15, 20)
    ]
    line = progress_line(rows)
    assert line.startswith("step 20/60 (33%) loss 0.05"), line
    assert "2 s/step, ETA 1:20" in line
    assert progress_line(rows, max_steps=40).startswith("step 20/40 (50%)")


def test_progress_thread_follows_a_growing_metrics_file(tmp_path):
    log = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    watcher = Progress("sft-x", tmp_path / "nb.ipynb", log, max_steps=30, every=0.0, out=out)
    watcher.start()
    with log.open("a") as f:
        for s in (5, 10):
            f.write(json.dumps({"step": s, "time": time.time(), "loss": 1.0 / s}) + "\n")
            f.flush()
            time.sleep(1.3)
    watcher.finish()
    text = out.getvalue()
    assert "[sft-x]" in text and "step 10/30 (33%) loss 0.1" in text, text


def test_watch_prints_the_latest_step(tmp_path):
    run = _run(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "vlmfit", "watch", str(run), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("run: step 20/20 (100%) loss 0.1")


def test_watch_mirrors_metrics_into_tensorboard(tmp_path):
    """`vlmfit watch --tensorboard DIR` writes event files TensorBoard reads back."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        import pytest

        pytest.skip("tensorboard is not installed (optional: pip install tensorboard)")
    run = _run(tmp_path)
    tb = tmp_path / "tb"
    proc = subprocess.run(
        [sys.executable, "-m", "vlmfit", "watch", str(run), "--once", "--tensorboard", str(tb)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    acc = EventAccumulator(str(tb))
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == list(range(2, 21, 2))
    assert loss[-1].value == pytest_approx(0.1)
    assert "mem_rss_gib" in acc.Tags()["scalars"]


def pytest_approx(v):
    import pytest

    return pytest.approx(v, rel=1e-5)
