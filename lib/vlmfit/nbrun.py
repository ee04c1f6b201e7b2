"""Run a parameterized notebook headlessly (papermill) and render it to static HTML (nbconvert).

    python -m vlmfit notebook notebooks/sft.ipynb --name sft-smolvlm -p model smolvlm -p max_steps 50

Writes ``reports/<name>.ipynb`` (executed) and ``reports/<name>.html`` atomically.
Unlike papermill, an unknown parameter name is an error (papermill only warns), and
values are parsed as Python literals where they look like one ("1" -> 1, "none" -> None).
The HTML opens offline: no external scripts, styles or fonts.
"""

from __future__ import annotations

import argparse
import ast
import html
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPORTS = Path("reports")


class ParameterError(ValueError):
    pass


def notebook_parameters(path: str | Path) -> dict[str, dict[str, Any]]:
    """The parameters cell's names, with inferred types and defaults (papermill.inspect)."""
    import papermill

    return papermill.inspect_notebook(str(path))


def parse_value(text: str) -> Any:
    """Make-variable strings into Python values: literals, booleans, None, else the string."""
    low = text.strip().lower()
    if low in {"none", "null"}:
        return None
    if low in {"true", "false"}:
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_parameters(path: str | Path, params: dict[str, Any]) -> None:
    known = notebook_parameters(path)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ParameterError(
            f"{path}: unknown parameter(s) {', '.join(unknown)}; "
            f"the notebook takes: {', '.join(sorted(known))}"
        )


_EXTERNAL = re.compile(
    r"<script[^>]+src=[\"']https?://[^>]*>\s*</script>|<link[^>]+href=[\"']https?://[^>]*>",
    re.IGNORECASE,
)


_EXTERNAL_IMPORT = re.compile(
    r"<script\b[^>]*>(?:(?!</script>).)*?\bimport\s*\(\s*[\"']https?://(?:(?!</script>).)*</script>",
    re.IGNORECASE | re.DOTALL,
)


def to_html(nb_path: str | Path, title: str | None = None) -> str:
    """Static HTML of an executed notebook: code folded away visually, nothing external."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(nb_path), as_version=4)
    exporter = HTMLExporter(template_name="lab")
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title or ""}})
    # MathJax / require.js come from CDNs in nbconvert's template; reports need neither.
    body = _EXTERNAL.sub("", body)
    # The lab template also import()s mermaid from a CDN when a page has a diagram.
    body = _EXTERNAL_IMPORT.sub("", body)
    return body


def _atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def run_notebook(
    notebook: str | Path,
    name: str | None = None,
    params: dict[str, Any] | None = None,
    reports_dir: str | Path = REPORTS,
    *,
    kernel: str | None = None,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Execute ``notebook`` with ``params``; returns (executed .ipynb, .html)."""
    import papermill

    notebook = Path(notebook)
    params = dict(params or {})
    check_parameters(notebook, params)
    reports_dir = Path(reports_dir)
    name = name or notebook.stem
    out_nb = reports_dir / f"{name}.ipynb"
    out_html = reports_dir / f"{name}.html"
    reports_dir.mkdir(parents=True, exist_ok=True)
    tmp_nb = reports_dir / f".{name}.running.ipynb"
    t0 = time.time()
    try:
        papermill.execute_notebook(
            str(notebook),
            str(tmp_nb),
            parameters=params,
            kernel_name=kernel or "python3",
            progress_bar=progress,
            cwd=str(Path.cwd()),
            log_output=False,
        )
    except papermill.PapermillExecutionError:
        # Keep the failing notebook (and its HTML) for inspection, then re-raise.
        os.replace(tmp_nb, out_nb)
        _atomic_write(out_html, to_html(out_nb, name))
        raise
    os.replace(tmp_nb, out_nb)
    _atomic_write(out_html, to_html(out_nb, name))
    print(f"{notebook} -> {out_html} ({time.time() - t0:.0f} s)")
    return out_nb, out_html


def write_index(reports_dir: str | Path = REPORTS, runs_dir: str | Path = "runs") -> Path:
    """``reports/index.html`` linking every report, with each run's headline figures."""
    reports_dir = Path(reports_dir)
    pages = sorted(p for p in reports_dir.glob("*.html") if p.name != "index.html")
    rows = []
    for p in pages:
        rows.append(f'<li><a href="{html.escape(p.name)}">{html.escape(p.stem)}</a></li>')
    run_rows = []
    for s in sorted(Path(runs_dir).glob("*/summary.json")):
        d = json.loads(s.read_text())
        before = d.get("eval_before", {}).get("exact_match")
        after = d.get("eval_after", {}).get("exact_match")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        run_rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(x))}</td>"
                for x in (
                    d.get("run"),
                    d.get("model"),
                    d.get("method"),
                    d.get("finetune"),
                    d.get("global_step"),
                    fmt(before),
                    fmt(after),
                    fmt(d.get("peak_memory_gib")),
                    f"{d.get('runtime_s', 0):.0f}",
                )
            )
            + "</tr>"
        )
    head = (
        "<tr><th>run</th><th>model</th><th>method</th><th>finetune</th><th>steps</th>"
        "<th>exact match before</th><th>after</th><th>peak memory (GiB)</th>"
        "<th>train time (s)</th></tr>"
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vlmfit reports</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}
</style></head><body>
<h1>vlmfit reports</h1>
<h2>Reports</h2><ul>{"".join(rows) or "<li>none yet</li>"}</ul>
<h2>Runs</h2><table>{head}{"".join(run_rows)}</table>
<p>Generated {time.strftime("%Y-%m-%d %H:%M:%S")}.</p>
</body></html>
"""
    out = reports_dir / "index.html"
    _atomic_write(out, page)
    return out


def cli_notebook(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmfit notebook", description=__doc__)
    parser.add_argument("notebook")
    parser.add_argument("--name", help="report name (default: notebook stem)")
    parser.add_argument("--reports", default=str(REPORTS))
    parser.add_argument(
        "-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE")
    )
    parser.add_argument("--no-progress", action="store_true")
    a = parser.parse_args(argv)
    params = {k: parse_value(v) for k, v in a.param}
    try:
        run_notebook(a.notebook, a.name, params, a.reports, progress=not a.no_progress)
    except ParameterError as e:
        print(f"vlmfit notebook: {e}", file=sys.stderr)
        return 2
    write_index(a.reports)
    return 0


def cli_index(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmfit index")
    parser.add_argument("--reports", default=str(REPORTS))
    parser.add_argument("--runs", default="runs")
    a = parser.parse_args(argv)
    print(write_index(a.reports, a.runs))
    return 0
