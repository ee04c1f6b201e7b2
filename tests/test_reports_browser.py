"""The HTML reports in a real headless browser (Debian's chromium, via tests/browser.py).

Reports are static HTML that open offline: each page loads, every image renders, links
between reports resolve, no request leaves file:/data: (no external scripts, styles or
fonts) and nothing is logged at level error. Skipped with a reason where chromium is
absent: run ``scripts/ensure_browser.sh``.

    pytest -q -m browser tests
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.request import pathname2url

import nbformat
import pytest

import browser
from vlmfit.report.index import write_index
from vlmfit.report.runner import run_notebook

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        browser.find_chromium() is None,
        reason="chromium not found: run scripts/ensure_browser.sh (or set VLMFIT_CHROMIUM)",
    ),
]

_PLOT = """\
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(3, 2))
ax.plot(range(n), [i * i for i in range(n)])
ax.set_title(title)
plt.show()
"""
_TABLE = """\
import base64
import io

from IPython.display import HTML, display

buf = io.BytesIO()
fig.savefig(buf, format="png", dpi=50)
src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
display(HTML(
    "<table><tr><th>n</th><th>thumbnail</th></tr>"
    f"<tr><td>{n}</td><td><img src='{src}' alt='thumbnail' width='90'></td></tr></table>"
))
"""


def _notebook(path: Path, extra_markdown: str = "") -> Path:
    """A tiny parameterized notebook: a plot and an HTML table with an inline image."""
    params = nbformat.v4.new_code_cell('title = "report"\nn = 5')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            "# Browser check\n\nBack to [all reports](index.html)." + extra_markdown
        ),
        params,
        nbformat.v4.new_code_cell(_PLOT),
        nbformat.v4.new_code_cell(_TABLE),
    ]
    nbformat.write(nb, str(path))
    return path


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two executed reports and their index, built with vlmfit.report like `make` does."""
    tmp = tmp_path_factory.mktemp("browser")
    nb = _notebook(tmp / "check.ipynb")
    out = tmp / "reports"
    run_notebook(nb, "first", {"n": 3}, out, progress=False)
    run_notebook(nb, "second", {"n": 7, "title": "second"}, out, progress=False)
    run = tmp / "runs" / "sft-tiny"
    run.mkdir(parents=True)
    summary = {"run": "sft-tiny", "model": "tiny", "method": "sft", "finetune": "lora"}
    (run / "summary.json").write_text(json.dumps(summary | {"runtime_s": 1.0}))
    write_index(out, runs_dir=tmp / "runs")
    return out


def _url(path: Path) -> str:
    return "file://" + pathname2url(str(path.resolve()))


def test_reports_render_offline(reports: Path) -> None:
    assert browser.check_reports(reports) == []
    # ... and the checks were not vacuous: images and links were really there.
    with browser.Chromium() as chromium:
        index = chromium.inspect(_url(reports / "index.html"))
        hrefs = {link["raw"] for link in index["links"]}
        assert {"first.html", "second.html"} <= hrefs
        for name in ("first", "second"):
            page = chromium.inspect(_url(reports / f"{name}.html"))
            assert page["title"] == name
            assert len(page["images"]) >= 2, page["images"]  # the plot and the thumbnail
            assert all(i["complete"] and i["width"] > 0 for i in page["images"])
            assert "index.html" in {link["raw"] for link in page["links"]}
            external = [u for u in page["requests"] if not u.startswith(browser.LOCAL_SCHEMES)]
            assert external == [] and page["errors"] == []


def test_check_reports_finds_problems(tmp_path: Path) -> None:
    """The checker itself: a page with every kind of fault is reported for each of them."""
    (tmp_path / "index.html").write_text(
        "<!doctype html><html><head><title>index</title></head><body>"
        '<a href="bad.html">bad</a> <a href="gone.html">gone</a></body></html>'
    )
    (tmp_path / "bad.html").write_text(
        "<!doctype html><html><head><title>bad</title>"
        '<script src="https://cdn.example.com/x.js"></script>'
        '<link rel="stylesheet" href="https://fonts.example.com/css?family=Roboto">'
        "<style>@import url(https://fonts.example.com/more.css);</style></head><body><p>x</p>"
        '<img src="missing.png"><img src="data:image/png;base64,AAAA">'
        '<script>console.error("boom")</script></body></html>'
    )
    (tmp_path / "orphan.html").write_text("<title>orphan</title><p>not linked</p>")
    problems = "\n".join(browser.check_reports(tmp_path))
    for expected in (
        "bad.html: image 1 ('missing.png') did not render",
        "bad.html: image 2 ('data:image/png;base64,AAAA') did not render",
        "bad.html: external request https://cdn.example.com/x.js",
        "bad.html: external request https://fonts.example.com/css?family=Roboto",
        "bad.html: external request https://fonts.example.com/more.css",
        "bad.html: console.error: boom",
        "index.html: link 'gone.html' -> missing",
        "index.html: does not link orphan.html",
    ):
        assert expected in problems
    assert "orphan.html: " not in problems  # an unlinked page still loads fine


def test_mermaid_report_stays_offline(tmp_path: Path) -> None:
    nb = _notebook(tmp_path / "mermaid.ipynb", "\n\n```mermaid\ngraph LR; data-->model\n```")
    run_notebook(nb, "mermaid", {}, tmp_path / "reports", progress=False)
    write_index(tmp_path / "reports", runs_dir=tmp_path / "runs")
    assert browser.check_reports(tmp_path / "reports") == []


def test_real_reports_render() -> None:
    """The repository's own reports (after `make demo`), checked the same way."""
    folder = ROOT / "reports"
    if not (folder / "index.html").exists():
        pytest.skip("no reports/index.html in the repository: run `make demo` first")
    assert browser.check_reports(folder) == []
