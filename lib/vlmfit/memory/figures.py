"""Figures of estimates and ladders (matplotlib ``Figure`` objects, no pyplot: notebooks
show each once)."""

from __future__ import annotations

import math
from typing import Any

from vlmfit.memory.estimator import Estimate


def plot_breakdown(estimates: list[Estimate], labels: list[str] | None = None):
    """Stacked bars of estimate breakdowns (GiB)."""
    from matplotlib.figure import Figure

    labels = labels or [f"{e.finetune} mb{e.micro_batch}" for e in estimates]
    keys: list[str] = []
    for e in estimates:
        keys += [k for k in e.breakdown if k not in keys]
    fig = Figure(figsize=(max(5, 1.3 * len(estimates) + 3), 4))
    ax = fig.subplots()
    bottom = [0.0] * len(estimates)
    for k in keys:
        vals = [e.breakdown.get(k, 0.0) for e in estimates]
        ax.bar(labels, vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for x, b in enumerate(bottom):
        ax.text(x, b, f"{b:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("GiB (predicted peak allocated)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    return fig


def plot_ladder(rows: list[dict[str, Any]], unit: str = "GiB"):
    """Peak memory and tokens/s per ladder step, annotated with the change vs. baseline."""
    from matplotlib.figure import Figure

    ok = [r for r in rows if "error" not in r]
    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    labels = [str(r["label"])[:36] for r in ok]
    peaks = [r["peak_gib"] for r in ok]
    speeds = [r["tokens_per_s"] for r in ok]
    ax1.barh(labels, peaks, color="#1f77b4", label="measured")
    est = [r.get("estimate_gib", float("nan")) for r in ok]
    if any(not math.isnan(v) for v in est):
        ax1.scatter(est, labels, color="#d62728", marker="|", s=200, label="estimate", zorder=3)
        ax1.legend(fontsize=7)
    for y, r in enumerate(ok):
        ax1.text(r["peak_gib"], y, f" {r['peak_gib']:.2f} ({r.get('peak_change', 0):+.0%})",
                 va="center", fontsize=7)  # fmt: skip
        ax2.text(r["tokens_per_s"], y, f" {r['tokens_per_s']:.0f} ({r.get('speed_change', 0):+.0%})",
                 va="center", fontsize=7)  # fmt: skip
    ax2.barh(labels, speeds, color="#2ca02c")
    ax1.set_xlabel(f"peak memory ({unit})")
    ax2.set_xlabel("tokens / s")
    ax2.set_yticklabels([])
    for ax in (ax1, ax2):
        ax.invert_yaxis()
        ax.margins(x=0.35)
    fig.tight_layout()
    return fig
