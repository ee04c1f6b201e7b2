"""Figures and tables for the training reports (SFT, DPO), from a run folder.

Each function returns a matplotlib Figure or an HTML string; notebooks display them.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from vlmfit import runs


def _plt():
    # No backend is forced: the notebook's inline backend draws the figures into the report
    # (forcing Agg here kept every training plot out of the HTML).
    import matplotlib.pyplot as plt

    return plt


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
    for k, label in (
        ("mem_allocated_gib", "allocated"),
        ("mem_peak_gib", "peak allocated"),
        ("mem_reserved_gib", "reserved"),
        ("mem_rss_gib", "process RSS (CPU)"),
    ):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", lw=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("GiB")
    ax.set_title("memory timeline")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
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


def summary_table(run_path: str | Path) -> str:
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
        "peak_memory_gib",
        "device",
    ]
    rows = "".join(
        f"<tr><th>{k}</th><td>{html.escape(str(s.get(k)))}</td></tr>" for k in keep if k in s
    )
    dpo = s.get("dpo_eval") or {}
    rows += "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v:.4f}</td></tr>"
        for k, v in dpo.items()
        if "rewards" in k
    )
    return f"<table>{rows}</table>"


def config_table(cfg, origin: dict[str, str]) -> str:
    """Every configuration value and where it came from (default / override)."""
    d = cfg.to_dict()
    rows = "".join(
        f"<tr><th>{k}</th><td>{html.escape(repr(v))}</td><td>{origin.get(k, '')}</td></tr>"
        for k, v in d.items()
    )
    return f"<table><tr><th>key</th><th>value</th><th>from</th></tr>{rows}</table>"
