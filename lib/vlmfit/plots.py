"""Figures for the reports: each function takes plain rows (lists of dicts, as in
``stats.json``) and returns a :class:`matplotlib.figure.Figure`, drawn without pyplot so
notebooks show each figure exactly once (``%matplotlib inline`` renders it as a PNG).

Usage::

    from vlmfit import plots, preprocess

    res = preprocess.preprocess("data/shapes/sft_train.json", "tiny-smolvlm")
    plots.image_sizes(res.image_stats)                 # longest edge before / after
    plots.visual_tokens(res.image_stats, budget=256)   # tokens per image before / after
    plots.sequence_lengths(res.sample_stats, max_length=2048)
    plots.truncation(res.sample_stats, max_length=2048)
    plots.sample_grid(res.records_path, n=12, seed=0)
"""

from __future__ import annotations

import json
import random
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["image_sizes", "sample_grid", "sequence_lengths", "truncation", "visual_tokens"]

BEFORE = "#d62728"  # processor defaults
BUDGET = "#ff7f0e"  # at the budget, before the over-length policy
AFTER = "#1f77b4"  # what is written


def _bins(values: Sequence[float], n: int = 30, log: bool = False) -> np.ndarray:
    lo, hi = (min(values), max(values)) if values else (1, 2)
    if log:
        lo = max(lo, 1)
        return np.geomspace(lo, max(hi, lo * 1.01), n + 1)
    return np.linspace(lo, hi if hi > lo else lo + max(abs(lo) * 0.1, 1e-3), n + 1)


def _hist(ax: Any, series: dict[str, tuple[list[float], str]], log: bool, xlabel: str) -> None:
    values = [v for vs, _ in series.values() for v in vs]
    if not values:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    log = log and min(values) > 0 and max(values) / max(min(values), 1) > 20
    if all(float(v).is_integer() for v in values) and max(values) - min(values) <= 60:
        # a few distinct integers (tokens of short samples): one bar per value, not slivers
        bins = np.arange(min(values) - 0.5, max(values) + 1.5)
        log = False
    else:
        bins = _bins(values, log=log)
    # identical series drawn once, named together (overlaid they mix into one grey)
    merged: dict[tuple, tuple[list[str], list[float], str]] = {}
    for label, (vs, colour) in series.items():
        if vs:
            key = tuple(sorted(vs))
            merged.setdefault(key, ([], vs, colour))[0].append(label)
    for labels, vs, colour in merged.values():
        ax.hist(vs, bins=bins, alpha=0.55, color=colour,
                label=f"{' = '.join(labels)} (n={len(vs)})")  # fmt: skip
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend(fontsize=8)


def _limit_line(ax: Any, values: list[float], limit: int | None, label: str) -> str:
    """Draw a limit as a dashed line when it is near the data; else return a note for the
    title. A limit far right of short samples would squeeze every bar into one sliver."""
    if not limit:
        return ""
    top = max(values) if values else 0
    if values and limit > 2 * top:
        return f" (all <= {top:,.0f}; {label}={limit:,} is off the chart)"
    ax.axvline(limit, color="black", linestyle="--", linewidth=1)
    ax.annotate(f"{label}={limit}", (limit, 0.95), xycoords=("data", "axes fraction"),
                fontsize=8, ha="right")  # fmt: skip
    return ""


def image_sizes(image_stats: list[dict[str, Any]]) -> Figure:
    """Longest edge and megapixels of every image: as stored, and as saved for training."""
    rows = [r for r in image_stats if r.get("kind", "image") == "image"]
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    edge_before = [max(r["width"], r["height"]) for r in rows]
    edge_after = [max(r["new_width"], r["new_height"]) for r in rows]
    _hist(ax1, {"source": (edge_before, BEFORE), "resized": (edge_after, AFTER)}, True, "px")
    ax1.set_title("longest edge")
    mp_before = [r["width"] * r["height"] / 1e6 for r in rows]
    mp_after = [r["new_width"] * r["new_height"] / 1e6 for r in rows]
    _hist(ax2, {"source": (mp_before, BEFORE), "resized": (mp_after, AFTER)}, False, "megapixels")
    ax2.set_title("pixels per image")
    fig.suptitle("Image sizes before / after the budget")
    return fig


def visual_tokens(image_stats: list[dict[str, Any]], budget: int | None = None) -> Figure:
    """Visual tokens per image (placeholders) at processor defaults and at the budget."""
    rows = [r for r in image_stats if r.get("kind", "image") == "image"]
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax = fig.subplots()
    before = [r["tokens_before"] for r in rows]
    after = [r["tokens_after"] for r in rows]
    _hist(ax, {"processor defaults": (before, BEFORE), "budget": (after, AFTER)}, True, "tokens")
    note = _limit_line(ax, before + after, budget, "max_image_tokens")
    total_b, total_a = sum(before), sum(after)
    ratio = f"{total_b / total_a:.1f}x fewer" if total_a and total_b > total_a else "unchanged"
    ax.set_title(f"Visual tokens per image: {total_b:,} -> {total_a:,} in total ({ratio}){note}")
    return fig


def sequence_lengths(sample_stats: list[dict[str, Any]], max_length: int) -> Figure:
    """Tokens per sample (text + visual) before / at the budget / written, and max_length."""
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax = fig.subplots()
    written = [r["total_after"] for r in sample_stats if r["status"] != "dropped"]
    series = {
        "processor defaults": ([r["total_before"] for r in sample_stats], BEFORE),
        "budget": ([r["total_budget"] for r in sample_stats], BUDGET),
        "written": (written, AFTER),
    }
    _hist(ax, series, True, "tokens per sample")
    note = _limit_line(ax, [v for vs, _ in series.values() for v in vs], max_length, "max_length")
    ax.set_title(f"Tokens per sample after the chat template (text + visual){note}")
    return fig


def truncation(sample_stats: list[dict[str, Any]], max_length: int) -> Figure:
    """Truncation risk: share of samples over ``max_length`` and what the policy did."""
    n = max(len(sample_stats), 1)
    over = [
        sum(r["total_before"] > max_length for r in sample_stats) / n,
        sum(r["total_budget"] > max_length for r in sample_stats) / n,
        0.0,
    ]
    fig = Figure(figsize=(10, 3.0), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    labels = ["processor defaults", "budget", "written"]
    bars = ax1.bar(labels, [100 * v for v in over], color=[BEFORE, BUDGET, AFTER])
    ax1.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax1.set_ylabel(f"% of samples > {max_length} tokens")
    ax1.set_ylim(0, max(5, 110 * max(over)))
    ax1.set_title("Truncation risk")
    status = ["kept", "shrunk", "dropped"]
    counts = [sum(r["status"] == s for r in sample_stats) for s in status]
    bars = ax2.bar(status, counts, color=[AFTER, BUDGET, BEFORE])
    ax2.bar_label(bars, fontsize=8)
    ax2.set_ylabel("samples")
    ax2.set_title("Over-length policy")
    return fig


def _caption(row: dict[str, Any], width: int = 34) -> str:
    turns = row.get("messages") or (row.get("prompt", []) + row.get("chosen", []))
    lines = []
    for m in turns:
        text = " ".join(p.get("text", "") for p in m["content"] if p["type"] == "text").strip()
        if text and m["role"] != "system":
            lines.append(f"{m['role'][0].upper()}: {text}")
    return "\n".join(textwrap.fill(x, width, max_lines=2, placeholder=" ...") for x in lines[:3])


def sample_grid(records_path: str | Path, n: int = 12, seed: int = 0, cols: int = 4) -> Figure:
    """A grid of ``n`` random written samples: their first image and their text."""
    from PIL import Image

    path = Path(records_path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    with_media = [r for r in rows if r.get("images") or r.get("videos")]
    picked = random.Random(seed).sample(with_media, min(n, len(with_media)))
    n_rows = max(1, -(-len(picked) // cols))
    fig = Figure(figsize=(2.6 * cols, 2.9 * n_rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, row in zip(axes, picked, strict=False):
        if row.get("images"):
            media, what = path.parent / row["images"][0], ""
        else:
            folder = path.parent / row["videos"][0]
            frames = sorted(folder.iterdir())
            media, what = frames[len(frames) // 2], f" (video, {len(frames)} frames)"
        with Image.open(media) as im:
            ax.imshow(np.asarray(im.convert("RGB")))
            ax.set_title(f"{im.width}x{im.height}{what}", fontsize=8)
        ax.text(0.0, -0.04, _caption(row), transform=ax.transAxes, fontsize=7, va="top",
                wrap=True)  # fmt: skip
    if not picked:
        axes[0].text(0.5, 0.5, "no samples with images", ha="center", va="center")
    fig.suptitle(f"{len(picked)} of {len(rows)} written samples (seed {seed})")
    return fig
