"""Figures and tables for the training reports (SFT, DPO), from a run folder.

Each function returns a matplotlib Figure or an HTML string; notebooks display them.
Numbers are rounded for people (:func:`human`): 3 significant digits, durations in
minutes and seconds, parameter counts in K / M / B.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from pathlib import Path
from typing import Any

from vlmfit import runs


def _plt():
    # No backend is forced: the notebook's inline backend draws the figures into the report
    # (forcing Agg here kept every training plot out of the HTML).
    import matplotlib.pyplot as plt

    return plt


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


def curves(run_path: str | Path, keys: tuple[str, ...] | None = None):
    """Loss, learning rate and grad norm (and DPO rewards when present) against step."""
    plt = _plt()
    rows = [r for r in metrics(run_path) if "loss" in r or "learning_rate" in r]
    keys = keys or tuple(
        k
        for k in ("loss", "learning_rate", "grad_norm", "rewards/accuracies", "rewards/margins")
        if any(k in r for r in rows)
    )
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3))
    axes = list(axes) if hasattr(axes, "__iter__") else [axes]
    for ax, k in zip(axes, keys, strict=False):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", lw=1)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def memory_timeline(run_path: str | Path):
    """GPU allocated / peak / reserved (CUDA) or process RSS (CPU) against step, GiB."""
    plt = _plt()
    rows = metrics(run_path)
    fig, ax = plt.subplots(figsize=(6, 3))
    top = 0.0
    for k, label in (
        ("mem_allocated_gib", "allocated"),
        ("mem_peak_gib", "peak allocated"),
        ("mem_reserved_gib", "reserved"),
        ("mem_rss_gib", "process RSS (CPU)"),
    ):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", lw=1, label=label)
            top = max(top, max(v for _, v in pts))
    # From zero: a flat line must look flat, not fill an axis that spans 0.002 GiB.
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("GiB")
    ax.set_title("memory timeline")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


#: Series of ``memory.jsonl`` drawn by :func:`memory_growth` (key, label, colour).
GROWTH_SERIES = (
    ("mem_allocated_gib", "allocated", "#1f77b4"),
    ("mem_reserved_gib", "reserved", "#2ca02c"),
    ("mem_peak_gib", "peak allocated (per step)", "#d62728"),
)


def growth_caption(trend: dict[str, Any]) -> str:
    """``memory.growth``'s verdict and numbers in one line: slope in GiB per 100 steps."""
    if trend.get("growing") is None:
        return f"no trend: {trend.get('why', 'no rows')}"
    parts = []
    for key, label, _ in GROWTH_SERIES:
        fit = trend.get(key)
        if isinstance(fit, dict):
            parts.append(
                f"{label} {fit['slope_mib_per_100_steps'] / 1024:+.3f} GiB/100 steps "
                f"(rise {fit['rise_gib']:+.3f} GiB)"
            )
    verdict = "FLAGGED: growing" if trend["growing"] else "not flagged"
    return f"{verdict} ({trend['why']}); " + ", ".join(parts)


def memory_growth(run_path: str | Path, *, warmup: float = 0.1):
    """GPU memory of every step (``memory.jsonl``): allocated, reserved and the step's peak
    against step, with ``memory.growth``'s least-squares trend drawn over the steps it fits
    and its verdict and slopes in the title. A run without CUDA rows (a CPU run logs the
    process RSS only) prints one line saying so and returns None."""
    from vlmfit import memory

    rows = runs.MetricsLog(Path(run_path) / "memory.jsonl").read()
    cuda = [r for r in rows if "step" in r and "mem_allocated_gib" in r]
    if not cuda:
        what = (
            f"{len(rows)} steps of process RSS, in the memory timeline above"
            if rows
            else "no memory.jsonl rows"
        )
        print(f"GPU memory over steps: no CUDA rows in this run (CPU run: {what}).")
        return None
    trend = memory.growth(cuda, warmup=warmup)
    fitted = [r for r in cuda if "step" in r][int(len(cuda) * warmup) :]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    many = len(cuda) > 150
    values: list[float] = []
    for key, label, colour in GROWTH_SERIES:
        pts = [(r["step"], r[key]) for r in cuda if key in r]
        if not pts:
            continue
        ax.plot(*zip(*pts, strict=True), lw=1, color=colour, label=label,
                marker=None if many else ".", alpha=0.8)  # fmt: skip
        values += [v for _, v in pts]
        fit = trend.get(key)
        if isinstance(fit, dict) and len(fitted) >= 2:
            # the least-squares line passes through the centroid of the points it fits
            xs = [float(r["step"]) for r in fitted]
            ys = [float(r[key]) for r in fitted]
            slope = fit["slope_mib_per_100_steps"] / 1024 / 100
            x0, y0 = sum(xs) / len(xs), sum(ys) / len(ys)
            line = [y0 + slope * (x - x0) for x in (xs[0], xs[-1])]
            ax.plot((xs[0], xs[-1]), line, ls="--", lw=1.5, color=colour,
                    label=f"{label} trend ({slope * 100:+.3f} GiB/100 steps)")  # fmt: skip
    # Not from zero (unlike the memory timeline): a creep of 0.3 GiB on 18 GiB must show.
    # The axis spans at least 10 % of the top (and 0.5 GiB), so steady noise looks flat.
    lo, hi = min(values), max(values)
    pad = (max(hi - lo, 0.1 * hi, 0.5) - (hi - lo)) / 2 + 0.05 * max(hi - lo, 0.1)
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("GiB")
    verdict = (
        "no trend (too few steps)"
        if trend["growing"] is None
        else "GROWING (flagged)"
        if trend["growing"]
        else "steady (not flagged)"
    )
    ax.set_title(f"GPU memory per step: {verdict}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    caption = growth_caption(trend)
    if trend["growing"] is not None:
        caption += f"; fit over steps {fitted[0]['step']}-{fitted[-1]['step']}"
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(caption, 150)), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.vlmfit_growth = trend  # the numbers drawn, for tests and callers
    return fig


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
