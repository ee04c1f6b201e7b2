"""``reports/index.html``: every report with its status, in pipeline order, then the runs."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from vlmfit.files import atomic_write
from vlmfit.report.render import report_meta, report_status
from vlmfit.report.runner import REPORTS, clock

# Report order in the index: the pipeline's order, then anything else by name.
PIPELINE = ("preprocess", "profile", "sft", "dpo")


def _kind(html_path: Path) -> str:
    stem = report_meta(html_path).get("notebook") or html_path.stem.split("-")[0]
    return stem if stem in PIPELINE else "other"


def write_index(reports_dir: str | Path = REPORTS, runs_dir: str | Path = "runs") -> Path:
    """``reports/index.html``: reports in pipeline order with their status, then the runs."""
    reports_dir = Path(reports_dir)
    pages = [p for p in reports_dir.glob("*.html") if p.name != "index.html"]
    order = {k: i for i, k in enumerate((*PIPELINE, "other"))}
    pages.sort(key=lambda p: (order[_kind(p)], p.stem))
    rows, report_of_run = [], {}
    for p in pages:
        meta, status = report_meta(p), report_status(p)
        if meta.get("run"):
            report_of_run[meta["run"]] = p.name
        when = meta.get("finished", "")
        took = clock(meta["seconds"]) if "seconds" in meta else ""
        badge = "ok" if status == "ok" else "<b class=failed>FAILED</b>"
        err = f"<br><small>{html.escape(meta.get('error', ''))}</small>" if status != "ok" else ""
        rows.append(
            f"<tr class={status}><td>{_kind(p)}</td>"
            f'<td class=l><a href="{html.escape(p.name)}">{html.escape(p.stem)}</a>{err}</td>'
            f"<td>{badge}</td><td>{took}</td><td>{when}</td></tr>"
        )
    run_rows = []
    for s in sorted(Path(runs_dir).glob("*/summary.json")):
        d = json.loads(s.read_text())
        run = str(d.get("run") or s.parent.name)
        page = report_of_run.get(run) or (
            f"{run}.html" if (reports_dir / f"{run}.html").exists() else None
        )
        link = f'<a href="{html.escape(page)}">{html.escape(run)}</a>' if page else html.escape(run)
        before = d.get("eval_before", {}).get("exact_match")
        after = d.get("eval_after", {}).get("exact_match")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        peak = d.get("peak_memory_gib")
        cells = [
            d.get("model"),
            d.get("method"),
            d.get("finetune"),
            d.get("global_step"),
            fmt(before),
            fmt(after),
            "-" if peak is None else f"{peak:.2f}",
            clock(d.get("runtime_s", 0)),
        ]
        run_rows.append(
            f"<tr><td class=l>{link}</td>"
            + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells)
            + "</tr>"
        )
    head = (
        "<tr><th>run (report)</th><th>model</th><th>method</th><th>finetune</th><th>steps</th>"
        "<th>exact match before</th><th>after</th><th>peak memory (GiB)</th>"
        "<th>train time</th></tr>"
    )
    n_failed = sum(report_status(p) != "ok" for p in pages)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vlmfit reports</title>
<style>body{{font-family:sans-serif;max-width:64em;margin:2em auto;}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}
td.l{{text-align:left}}tr.failed{{background:#fee}}.failed{{color:#c00}}
</style></head><body>
<h1>vlmfit reports</h1>
<h2>Reports</h2>
<p>{len(pages)} report(s) in pipeline order{f", <b class=failed>{n_failed} failed</b>" if n_failed else ""}.</p>
<table><tr><th>step</th><th>report</th><th>status</th><th>took</th><th>finished</th></tr>
{"".join(rows) or "<tr><td colspan=5>none yet</td></tr>"}</table>
<h2>Runs</h2><table>{head}{"".join(run_rows) or "<tr><td colspan=9>none yet</td></tr>"}</table>
<p>Generated {time.strftime("%Y-%m-%d %H:%M:%S")}.</p>
</body></html>
"""
    out = reports_dir / "index.html"
    atomic_write(out, page)
    return out
