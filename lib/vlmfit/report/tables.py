"""HTML tables and one-line summaries of a run folder for the SFT and DPO reports.

Numbers are rounded for people (:func:`human`): 3 significant digits, durations in
minutes and seconds, parameter counts in K / M / B.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from vlmfit.train import runs


def human(v: Any, key: str = "") -> str:
    """A value as a person reads it: ``0.123``, ``1.23e-05``, ``2 min 49 s``, ``1.2 M``."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if key.endswith(("_s", "seconds")) or key == "runtime":
        return duration(v)
    if key.endswith("_gib"):
        return f"{v:.2f} GiB" if v >= 0.1 else f"{v * 1024:.0f} MiB"
    if isinstance(v, int):
        return count(v) if abs(v) >= 10_000 else str(v)
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:.2e}"


def rate(v: float | None) -> str:
    """A share such as exact match, always 3 decimals (0.000 .. 1.000)."""
    return "-" if v is None else f"{v:.3f}"


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def metrics(run_path: str | Path) -> list[dict[str, Any]]:
    return runs.MetricsLog(Path(run_path) / "metrics.jsonl").read()


def _thumb(path: str | None, size: int = 96) -> str:
    if not path or not Path(path).exists():
        return ""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    im.thumbnail((size, size))
    if im.width < size // 2:  # tiny images: scale up (nearest) so they can be seen
        im = im.resize((im.width * 2, im.height * 2), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return f'<img alt="sample" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def accuracy_table(run_path: str | Path) -> str:
    """Exact match before / after, overall and per question type (HTML)."""
    ev = runs.read_json(Path(run_path) / "eval.json")
    b, a = ev["before"]["metrics"], ev["after"]["metrics"]
    if not a:
        return "<p>No held-out evaluation in this run.</p>"
    rows = [("all", b.get("exact_match"), a.get("exact_match"))]
    rows += [(t, b.get("by_type", {}).get(t), v) for t, v in a.get("by_type", {}).items()]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    body = "".join(
        f"<tr><td>{html.escape(t)}</td><td>{fmt(x)}</td><td>{fmt(y)}</td></tr>" for t, x, y in rows
    )
    return (
        f"<table><tr><th>question type</th><th>exact match before</th><th>after</th></tr>"
        f"{body}</table><p>n = {a.get('n')}</p>"
    )


def sample_table(run_path: str | Path, n: int = 12) -> str:
    """Held-out samples: image, question, reference, prediction before and after (HTML)."""
    ev = runs.read_json(Path(run_path) / "eval.json")
    before = {s["where"]: s for s in ev["before"]["samples"]}
    rows = []
    for s in ev["after"]["samples"][:n]:
        pb = before.get(s["where"], {})
        mark = lambda ok: "✔" if ok else "✘"  # noqa: E731
        rows.append(
            "<tr>"
            f"<td>{_thumb(s.get('image'))}</td><td>{html.escape(s['question'])}</td>"
            f"<td>{html.escape(s['reference'])}</td>"
            f"<td>{html.escape(pb.get('prediction', ''))} {mark(pb.get('correct'))}</td>"
            f"<td>{html.escape(s['prediction'])} {mark(s['correct'])}</td>"
            "</tr>"
        )
    return (
        "<table><tr><th>image</th><th>question</th><th>reference</th>"
        "<th>before</th><th>after</th></tr>" + "".join(rows) + "</table>"
    )


def dpo_changes(s: dict[str, Any], rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(what, before DPO, after DPO) for reward accuracy and margin on held-out pairs.

    ``dpo_eval_before`` is measured before training when the run recorded it; otherwise
    the first and last training-batch values from metrics.jsonl stand in, labelled so.
    """
    after = s.get("dpo_eval") or {}
    before = s.get("dpo_eval_before") or {}
    out = []
    for key, what in (("rewards/accuracies", "reward accuracy"), ("rewards/margins", "margin")):
        a, b = after.get(f"eval_{key}"), before.get(f"eval_{key}")
        if a is not None or b is not None:
            out.append((f"{what} (held-out pairs)", human(b), human(a)))
        logged = [r[key] for r in rows if key in r]
        if logged:
            out.append((f"{what} (training batches, first / last log)", human(logged[0]),
                        human(logged[-1])))  # fmt: skip
    return out


def results_summary(run_path: str | Path) -> str:
    """The report's headline: what changed (exact match, DPO rewards), cost and time (HTML)."""
    s = runs.read_json(Path(run_path) / "summary.json")
    rows: list[tuple[str, str, str]] = []
    b, a = s.get("eval_before") or {}, s.get("eval_after") or {}
    if a.get("exact_match") is not None:
        rows.append(
            (f"held-out exact match (n = {a.get('n')})", rate(b.get("exact_match")),
             rate(a.get("exact_match")))
        )  # fmt: skip
    if s.get("method") == "dpo":
        rows += dpo_changes(s, metrics(run_path))
    what = "before" if s.get("method") != "dpo" else "before DPO"
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(x)}</td><td>{html.escape(y)}</td></tr>"
        for k, x, y in rows
    )
    table = f"<table><tr><th></th><th>{what}</th><th>after</th></tr>{body}</table>" if rows else ""
    tp = s.get("trainable_params") or {}
    facts = [
        f"{s.get('method', '').upper()} of <b>{html.escape(str(s.get('model')))}</b> "
        f"({html.escape(str(s.get('weights')))} weights), {html.escape(str(s.get('finetune')))}",
        f"{s.get('global_step')} steps in {duration(s.get('runtime_s') or 0)} "
        f"on {html.escape(str(s.get('device')))}",
        f"final train loss {human(s.get('train_loss'))}",
    ]
    if tp.get("total"):
        facts.append(
            f"{count(tp['trainable'])} of {count(tp['total'])} parameters trained "
            f"({100 * tp['trainable'] / tp['total']:.1f} %)"
        )
    if s.get("peak_memory_gib") is not None:
        facts.append(f"peak memory {human(s['peak_memory_gib'], '_gib')}")
    return f"<p>{' &middot; '.join(facts)}</p>{table}"


def summary_table(run_path: str | Path) -> str:
    """Every headline number of summary.json, rounded for people (HTML)."""
    s = runs.read_json(Path(run_path) / "summary.json")
    keep = [
        "run",
        "model",
        "weights",
        "method",
        "finetune",
        "global_step",
        "train_loss",
        "runtime_s",
        "load_s",
        "peak_memory_gib",
        "device",
    ]
    rows = "".join(
        f"<tr><th>{k}</th><td>{html.escape(human(s.get(k), k))}</td></tr>" for k in keep if k in s
    )
    dpo = s.get("dpo_eval") or {}
    rows += "".join(
        f"<tr><th>{html.escape(k)}</th><td>{human(v)}</td></tr>"
        for k, v in dpo.items()
        if "rewards" in k
    )
    return f"<table>{rows}</table>"


def train_line(summary: dict[str, Any]) -> str:
    """One line for the notebook's Train section."""
    return (
        f"trained {summary.get('global_step')} steps in {duration(summary.get('runtime_s') or 0)}"
        f" (final train loss {human(summary.get('train_loss'))}); run folder "
        f"runs/{summary.get('run')}/"
    )


def config_table(cfg, origin: dict[str, str], folded: bool = True) -> str:
    """Every configuration value and where it came from (default / override).

    Folded (``<details>``) by default: the report's end, one click away; overrides first.
    """
    d = cfg.to_dict()
    keys = sorted(d, key=lambda k: origin.get(k) != "override")
    rows = "".join(
        f"<tr><th>{k}</th><td>{html.escape(repr(d[k]))}</td><td>{origin.get(k, '')}</td></tr>"
        for k in keys
    )
    table = f"<table><tr><th>key</th><th>value</th><th>from</th></tr>{rows}</table>"
    if not folded:
        return table
    n = sum(origin.get(k) == "override" for k in d)
    return (
        f'<details class="vlmfit-config"><summary>All {len(d)} configuration values '
        f"({n} set for this run)</summary>{table}</details>"
    )
