"""An executed notebook as a static HTML report: results only, nothing external."""

from __future__ import annotations

import copy
import html
import json
import re
from pathlib import Path
from typing import Any

_EXTERNAL = re.compile(
    r"<script[^>]+src=[\"']https?://[^>]*>\s*</script>|<link[^>]+href=[\"']https?://[^>]*>",
    re.IGNORECASE,
)
_EXTERNAL_IMPORT = re.compile(
    r"<script\b[^>]*>(?:(?!</script>).)*?\bimport\s*\(\s*[\"']https?://(?:(?!</script>).)*</script>",
    re.IGNORECASE | re.DOTALL,
)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ERROR_TAG = "papermill-error-cell-tag"
STATUS_MARK = '<meta name="vlmfit-status" content="{}">'
_STYLE = """<style>
.vlmfit-failed{border:2px solid #c00;background:#fee;padding:.6em 1em;margin:1em 0}
.jp-OutputArea-output table td,.jp-OutputArea-output table th{text-align:right}
details.vlmfit-config summary{cursor:pointer;font-weight:bold}
</style>"""


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def report_notebook(nb):
    """The report's view of an executed notebook: results only.

    Drops stderr (library warnings, progress bars, "Loading weights"), papermill's error
    markers and cells left without output; turns an error into one line; moves cells
    tagged ``summary`` right after the title and ``appendix`` cells to the end.
    """
    nb = copy.deepcopy(nb)
    failed = [
        i
        for i, c in enumerate(nb.cells)
        if any(o.get("output_type") == "error" for o in c.get("outputs", []))
    ]
    if failed:  # what ran, up to the failure: later sections never ran
        nb.cells = nb.cells[: failed[0] + 1]
    cells = []
    for cell in nb.cells:
        if ERROR_TAG in _tags(cell):
            continue
        if cell.cell_type == "code":
            outs = []
            for o in cell.get("outputs", []):
                if o.get("output_type") == "stream" and o.get("name") == "stderr":
                    continue
                if o.get("output_type") == "error":
                    msg = ANSI.sub("", f"{o.get('ename')}: {o.get('evalue')}")
                    o = {
                        "output_type": "display_data",
                        "metadata": {},
                        "data": {
                            "text/html": f'<div class="vlmfit-failed"><b>Failed here</b>: '
                            f"{html.escape(msg)}</div>",
                            "text/plain": msg,
                        },
                    }
                    from nbformat import from_dict

                    o = from_dict(o)
                outs.append(o)
            cell.outputs = outs
            if not outs:
                continue
        cells.append(cell)
    title = [c for c in cells[:1] if c.cell_type == "markdown"]
    rest = cells[len(title) :]
    summary = [c for c in rest if "summary" in _tags(c)]
    appendix = [c for c in rest if "appendix" in _tags(c)]
    body = [c for c in rest if c not in summary and c not in appendix]
    nb.cells = title + summary + body + appendix
    return nb


def to_html(nb_path: str | Path, title: str | None = None) -> str:
    """Static HTML of an executed notebook: no code, no stderr, nothing external."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(nb_path), as_version=4)
    status = nb.metadata.get("vlmfit", {}).get("status", "ok")
    view = report_notebook(nb)
    if status == "failed":
        err = html.escape(nb.metadata["vlmfit"].get("error", ""))
        banner = nbformat.v4.new_markdown_cell(
            f'<div class="vlmfit-failed"><b>This notebook failed</b>: {err}. '
            "What ran before the failure is below; the full traceback is in "
            f"<code>{html.escape(Path(nb_path).name)}</code>.</div>"
        )
        view.cells.insert(1 if view.cells else 0, banner)
    exporter = HTMLExporter(template_name="lab")
    exporter.exclude_input = True
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(view, resources={"metadata": {"name": title or ""}})
    # MathJax / require.js come from CDNs in nbconvert's template; reports need neither.
    body = _EXTERNAL.sub("", body)
    # The lab template also import()s mermaid from a CDN when a page has a diagram.
    body = _EXTERNAL_IMPORT.sub("", body)
    return body.replace("</head>", STATUS_MARK.format(status) + _STYLE + "</head>", 1)


def report_status(html_path: str | Path) -> str:
    """``ok`` / ``failed`` of a report (its executed notebook beside it, else its HTML)."""
    html_path = Path(html_path)
    nb = html_path.with_suffix(".ipynb")
    try:
        meta = json.loads(nb.read_text()).get("metadata", {})
        if meta.get("papermill", {}).get("exception"):
            return "failed"
        if "vlmfit" in meta:
            return meta["vlmfit"].get("status", "ok")
    except (OSError, ValueError):
        pass
    text = html_path.read_text(errors="replace")[:20000] if html_path.exists() else ""
    return "failed" if STATUS_MARK.format("failed") in text else "ok"


def report_meta(html_path: Path) -> dict[str, Any]:
    try:
        return json.loads(html_path.with_suffix(".ipynb").read_text())["metadata"].get("vlmfit", {})
    except (OSError, ValueError, KeyError):
        return {}
