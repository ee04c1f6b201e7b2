"""Figures of the reports, as matplotlib Figures: the preprocessing report's (image sizes,
visual tokens, sequence lengths, samples) and the training reports' (curves, memory).
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

from vlmfit.report.tables import metrics
from vlmfit.train import runs

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


# ------------------------------------------------------------- training (run folders)


def _plt():
    # No backend is forced: the notebook's inline backend draws the figures into the report
    # (forcing Agg here kept every training plot out of the HTML).
    import matplotlib.pyplot as plt

    return plt


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
