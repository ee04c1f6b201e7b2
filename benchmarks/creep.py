"""Does GPU memory creep up over training steps? Qwen2.5-VL on images of mixed sizes (GPU).

    # one H200, ~4-5 min: 3B, the three configs side by side on the GPU
    python benchmarks/creep.py --steps 250 --parallel 3 --budget-s 270 --out results/creep
    python benchmarks/creep.py --steps 200 --budget-s 290 --out results/creep   # one at a time
    python benchmarks/creep.py --model qwen2.5-vl-7b --steps 200 --configs sdpa,varlen-expandable
    python benchmarks/creep.py --model tiny-qwen2.5-vl --steps 3 --out /tmp/creep   # CPU smoke

The claim users repeat: Qwen2.5-VL's memory grows during training; some blame the vision
tower's window attention, ms-swift blames allocator fragmentation (and recommends
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``). This trains the full-size
architecture with random weights on vlmfit's own path, ``train.build_model`` (LoRA and
every default lever but the two studied), for ``--steps`` optimizer steps; each step's
batch holds a different image (seeded widths and heights between ``--min-side`` and
``--max-side``, any aspect ratio; the first step takes the largest and the second the
smallest, so the high-water mark is set inside the warm-up), ``--text-tokens`` of text,
micro-batch ``--mb``. The visual-token count, the sequence and the vision tower's window
layout change at every step.

The step is the SFT Trainer's: TRL's fused LM head, the activation offloading context when
when the run turns it on (``fastpath.offloads_activations``; ``--set activation_offloading=True``),
backward, gradient clipping, fused AdamW, ``zero_grad(set_to_none=True)``. Batches come
from the processor (``memory.model_batch``) and are copied to the GPU per step, outside the
timed part.

Configurations (``--configs``), each in a fresh process with ``PYTORCH_CUDA_ALLOC_CONF``
removed from its environment (vlmfit turns expandable segments on itself,
``fastpath.set_allocator``, and leaves them alone when that variable names them)::

    sdpa               vision_attention=sdpa   expandable_segments=False  (stock attention)
    varlen             vision_attention=varlen expandable_segments=False
    varlen-expandable  vision_attention=varlen expandable_segments=True   (vlmfit's defaults)
    sdpa-expandable    vision_attention=sdpa   expandable_segments=True   (ms-swift's advice alone)
    defaults-no-offload  vlmfit's defaults, activation_offloading=False

Per step (``rows``): the image, visual tokens, sequence length, step seconds, loss;
``memory_allocated`` after the step (``mem_allocated_gib``), ``memory_reserved``
(``mem_reserved_gib``), the step's ``max_memory_allocated`` (``mem_peak_gib``, reset
before each step) and its running maximum (``peak_so_far_gib``), reserved minus that
running maximum (``reserved_slack_gib``: what the cache holds beyond the largest step so
far, i.e. fragmentation and not a larger batch), ``torch.cuda.memory_stats()``
fragmentation indicators (``inactive_split_gib``, ``inactive_splits``, ``segments``,
cumulative ``alloc_retries``, ``device_allocs`` / ``device_frees`` = cudaMalloc / cudaFree
calls, ``ooms``) and the process RSS (pinned host memory of the offloading shows there).
Every ``--snapshot-every`` steps ``torch.cuda.memory_snapshot()`` adds segment sizes, the
free bytes inside segments and the largest free block (``snapshots``); the last one says
whether the segments really are expandable (``expandable_in_use``).

Trend: ``vlmfit.memory.growth`` on allocated and reserved after the first
``--warmup-frac`` of steps (least squares; growing when the fitted rise exceeds
max(64 MiB, 2 % of the mean)), and the same fit on the reserved slack and the RSS.

Writes ``OUT/creep.json`` (arguments, command, library versions, GPU, the image schedule,
per config: levers, per-step rows, snapshots, summary) and ``OUT/creep.md`` (the table)
after each configuration, so a cut-off run keeps the finished ones, and ``OUT/creep.png``
(allocated and reserved, slack and inactive split bytes, visual tokens, against the step).
``--budget-s`` bounds the whole run: each configuration gets an equal share of what is
left and stops stepping at its share (``stopped_early``). ``--parallel N`` runs N
configurations at a time (``--gpus M``: spread over M GPUs, else all on one): the memory
figures are each process's own allocator's, only the step times are then shared. Without
CUDA (tiny models, the test) the GPU memory fields are absent and only the code path runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2**30

#: name -> (RunConfig overrides, what it stands for)
CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "sdpa": (
        {"vision_attention": "sdpa", "expandable_segments": False},
        "window attention through SDPA (transformers' own), expandable segments off",
    ),
    "varlen": (
        {"vision_attention": "varlen", "expandable_segments": False},
        "varlen vision attention, expandable segments off",
    ),
    "varlen-expandable": (
        {"vision_attention": "varlen", "expandable_segments": True},
        "varlen vision attention, expandable segments on (vlmfit's defaults)",
    ),
    "sdpa-expandable": (
        {"vision_attention": "sdpa", "expandable_segments": True},
        "window attention through SDPA, expandable segments on (ms-swift's advice alone)",
    ),
    "defaults-no-offload": (
        {"vision_attention": "varlen", "expandable_segments": True, "activation_offloading": False},
        "vlmfit's defaults without activation offloading",
    ),
}
DEFAULT_CONFIGS = "sdpa,varlen,varlen-expandable"


def schedule(
    steps: int, lo: int, hi: int, seed: int, largest_first: bool = True
) -> list[list[int]]:
    """(width, height) of each step's image: seeded, uniform in [lo, hi] per side (aspect
    ratios from lo/hi to hi/lo); with ``largest_first`` step 0 is hi x hi and step 1 lo x lo."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = [[int(w), int(h)] for w, h in rng.integers(lo, hi + 1, size=(steps, 2))]
    if largest_first:
        sizes[:2] = [[hi, hi], [lo, lo]][: len(sizes[:2])]
    return sizes


# ------------------------------------------------------------------- one config (a child)


def _cuda_stats() -> dict[str, Any]:
    import torch

    s = torch.cuda.memory_stats()
    return {
        "mem_allocated_gib": torch.cuda.memory_allocated() / GIB,
        "mem_reserved_gib": torch.cuda.memory_reserved() / GIB,
        "mem_peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "inactive_split_gib": s.get("inactive_split_bytes.all.current", 0) / GIB,
        "inactive_splits": s.get("inactive_split.all.current"),
        "segments": s.get("segment.all.current"),
        "large_pool_reserved_gib": s.get("reserved_bytes.large_pool.current", 0) / GIB,
        "small_pool_reserved_gib": s.get("reserved_bytes.small_pool.current", 0) / GIB,
        "alloc_retries": s.get("num_alloc_retries"),
        "device_allocs": s.get("num_device_alloc"),
        "device_frees": s.get("num_device_free"),
        "ooms": s.get("num_ooms"),
    }


def _segments() -> dict[str, Any]:
    """The caching allocator's segments now (``torch.cuda.memory_snapshot``)."""
    import torch

    segs = torch.cuda.memory_snapshot()
    total = sum(s["total_size"] for s in segs)
    used = sum(s["allocated_size"] for s in segs)
    free = [b["size"] for s in segs for b in s.get("blocks", []) if b.get("state") == "inactive"]
    return {
        "segments": len(segs),
        "expandable_segments": sum(bool(s.get("is_expandable")) for s in segs),
        "segment_gib": total / GIB,
        "largest_segment_gib": max((s["total_size"] for s in segs), default=0) / GIB,
        "free_in_segments_gib": (total - used) / GIB,
        "free_blocks": len(free),
        "largest_free_block_gib": max(free, default=0) / GIB,
    }


def run_child(job: dict[str, Any]) -> None:
    """Train one configuration in this process; every row goes to ``job["stream"]`` (JSON
    lines: ``meta``, ``row``, ``snapshot``, ``end``) as it is measured."""
    import psutil
    import torch

    from vlmfit import memory, train
    from vlmfit.config import resolve
    from vlmfit.train import fastpath

    stream = open(job["stream"], "a", buffering=1)  # noqa: SIM115 - line-buffered, whole run

    def emit(kind: str, **data) -> None:
        stream.write(json.dumps({"kind": kind, **data}) + "\n")

    cuda = torch.cuda.is_available()
    over = {
        "model": job["model"],
        "weights": "random",
        "per_device_train_batch_size": job["mb"],
        **job["set"],
        **job["over"],
    }
    cfg, _ = resolve(over)
    allocator = fastpath.set_allocator(cfg.expandable_segments)  # as train.run: before any
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    model, processor = train.build_model(cfg)
    load_s = time.perf_counter() - t
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model.get_base_model())  # TRL's SFTTrainer scores through it
    model.train()  # as the Trainer does (from_pretrained models are in eval mode)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.make_optimizer(cfg, model) or torch.optim.AdamW(
        params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=cuda or None
    )
    offload = fastpath.offloads_activations(cfg)
    if offload:
        from trl.models import get_act_offloading_ctx_manager

        ctx = get_act_offloading_ctx_manager(model)  # one for the run, as the SFTTrainer
    else:
        ctx = contextlib.nullcontext()
    proc = psutil.Process()
    weights_gib = torch.cuda.memory_allocated() / GIB if cuda else None
    emit(
        "meta",
        name=job["name"],
        over=over,
        env_alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        gpu=torch.cuda.get_device_name() if cuda else "cpu",
        torch=torch.__version__,
        load_s=load_s,
        weights_gib=weights_gib,
        levers={
            "vision_attention": getattr(model, "vlmfit_vision_attention", None),
            "expandable_segments": allocator,
            "activation_offloading": offload,
            "vision_no_grad": bool(getattr(model, "vlmfit_vision_no_grad", None)),
            "fused_lora": getattr(model, "vlmfit_fused_lora", None),
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "autocast": fastpath.uses_autocast(cfg),
            "fused_lm_head": True,
        },
    )

    def step(batch) -> float:
        with ctx:
            loss = model(**batch, fused_lm_head=True).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    peak_so_far = 0.0
    stopped_early = False
    t_run = time.perf_counter()
    for i, (w, h) in enumerate(job["schedule"]):
        if time.time() > job["deadline"]:
            stopped_early = True
            break
        t = time.perf_counter()
        batch, visual, seq, _ = memory.model_batch(
            model, processor, cfg.spec, cfg, (w, h), job["text_tokens"]
        )
        grid = batch.get("image_grid_thw")
        grid = grid[0].tolist() if grid is not None else None
        prep_s = time.perf_counter() - t
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss = step(batch)
        if cuda:
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t
        del batch
        row: dict[str, Any] = {
            "step": i,
            "image": [w, h],
            "grid_thw": grid,
            "visual_tokens": visual,
            "sequence_tokens": seq,
            "step_s": step_s,
            "prep_s": prep_s,
            "loss": loss,
        }
        if cuda:
            row |= _cuda_stats()
            peak_so_far = max(peak_so_far, row["mem_peak_gib"])
            row["peak_so_far_gib"] = peak_so_far
            row["reserved_slack_gib"] = row["mem_reserved_gib"] - peak_so_far
        row["rss_gib"] = proc.memory_info().rss / GIB
        emit("row", **row)
        every = job["snapshot_every"]
        if cuda and every and (i % every == 0 or i == len(job["schedule"]) - 1):
            emit("snapshot", step=i, **_segments())
    final = _segments() if cuda else {}
    emit(
        "end",
        stopped_early=stopped_early,
        loop_s=time.perf_counter() - t_run,
        final_segments=final,
        expandable_in_use=bool(final.get("expandable_segments")) if cuda else None,
        max_reserved_gib=torch.cuda.max_memory_reserved() / GIB if cuda else None,
    )
    stream.close()


# ----------------------------------------------------------------------- summary (parent)


def _fit(rows: list[dict[str, Any]], key: str, warmup: float) -> dict[str, Any] | None:
    """``memory.growth``'s fit of one series (any key), or None where it is absent."""
    from vlmfit import memory

    pts = [{"step": r["step"], "mem_reserved_gib": r[key]} for r in rows if r.get(key) is not None]
    if len(pts) != len(rows) or not pts:
        return None
    return memory.growth(pts, warmup=warmup).get("mem_reserved_gib")


def summarize(rows: list[dict[str, Any]], warmup: float = 0.1) -> dict[str, Any]:
    """Start / end / trend of allocated, reserved, slack and RSS after the warm-up, the peak,
    allocator retries and cudaMalloc calls, step time; ``growth`` is ``memory.growth``."""
    import statistics

    from vlmfit import memory

    keys = ("mem_allocated_gib", "mem_reserved_gib")
    g = memory.growth(
        [{"step": r["step"], **{k: r[k] for k in keys if k in r}} for r in rows], warmup=warmup
    )
    skip = int(len(rows) * warmup)
    post = rows[skip:]
    vt = [r["visual_tokens"] for r in rows]
    out: dict[str, Any] = {
        "steps": len(rows),
        "warmup_steps": skip,
        "gpu_measured": bool(rows) and "mem_allocated_gib" in rows[-1],
        "visual_tokens": {"min": min(vt), "max": max(vt), "mean": sum(vt) / len(vt)}
        if vt
        else None,
        "distinct_visual_tokens": len(set(vt)),
        "step_s_median": statistics.median(r["step_s"] for r in post) if post else None,
        "growth": g,
        "growing": g.get("growing"),
        "why": g.get("why"),
    }
    for key, name in (
        ("mem_allocated_gib", "allocated"),
        ("mem_reserved_gib", "reserved"),
        ("reserved_slack_gib", "reserved_slack"),
        ("inactive_split_gib", "inactive_split"),
        ("rss_gib", "rss"),
    ):
        if not post or post[-1].get(key) is None:
            continue
        out[name] = {
            "start_gib": post[0][key],
            "end_gib": post[-1][key],
            "max_gib": max(r[key] for r in rows),
            "trend": _fit(rows, key, warmup),
        }
    if out["gpu_measured"]:
        last = rows[-1]
        out["peak_gib"] = max(r["mem_peak_gib"] for r in rows)
        out["peak_after_warmup_gib"] = max(r["mem_peak_gib"] for r in post)
        out["alloc_retries"] = last.get("alloc_retries")
        out["alloc_retries_after_warmup"] = _delta(post, "alloc_retries")
        out["device_allocs_after_warmup"] = _delta(post, "device_allocs")
        out["segments_start_end"] = [post[0].get("segments"), last.get("segments")]
        out["ooms"] = last.get("ooms")
    return out


def _delta(post: list[dict[str, Any]], key: str) -> int | None:
    a, b = post[0].get(key), post[-1].get(key)
    return None if a is None or b is None else b - a


def read_stream(path: Path) -> dict[str, Any]:
    """A child's JSON lines back into one record (what it measured, even if it died)."""
    rec: dict[str, Any] = {"rows": [], "snapshots": []}
    if not path.exists():
        return rec
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
        kind = item.pop("kind")
        if kind == "row":
            rec["rows"].append(item)
        elif kind == "snapshot":
            rec["snapshots"].append(item)
        else:
            rec |= item
    return rec


def _trend(s: dict[str, Any], name: str) -> str:
    part = s.get(name)
    if not part:
        return "-"
    slope = (part.get("trend") or {}).get("slope_mib_per_100_steps")
    slope_txt = f"{slope:+.0f}" if slope is not None else "-"
    return f"{part['start_gib']:.2f} -> {part['end_gib']:.2f} ({slope_txt})"


def table(configs: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per configuration. Memory cells are 'start -> end GiB (slope MiB
    per 100 steps)' after the warm-up."""
    head = (
        "| config | steps | visual tokens | allocated GiB (MiB/100 steps) "
        "| reserved GiB (MiB/100 steps) | slack GiB (MiB/100 steps) | peak GiB "
        "| retries | cudaMalloc after warm-up | step s | growth |"
    )
    lines = [head, "|" + "---|" * 11]
    for name, c in configs.items():
        s = c.get("summary") or {}
        if not s.get("steps"):
            err = [ln for ln in c.get("error", "no steps").splitlines() if ln.strip()]
            lines.append(f"| {name} | 0 | {err[-1][:160].replace('|', '/')} |" + " - |" * 8)
            continue
        vt = s["visual_tokens"]
        peak = f"{s['peak_gib']:.2f}" if s.get("peak_gib") is not None else "-"
        step_s = f"{s['step_s_median']:.3f}" if s.get("step_s_median") is not None else "-"
        verdict = (
            "-" if not s["gpu_measured"] else ("GROWING: " + s["why"]) if s["growing"] else "flat"
        )
        cut = " (stopped early)" if c.get("stopped_early") else ""
        lines.append(
            f"| {name} | {s['steps']}{cut} | {vt['min']}-{vt['max']} "
            f"| {_trend(s, 'allocated')} | {_trend(s, 'reserved')} | {_trend(s, 'reserved_slack')} "
            f"| {peak} | {s.get('alloc_retries', '-')} | {s.get('device_allocs_after_warmup', '-')} "
            f"| {step_s} | {verdict} |"
        )
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> Path | None:
    """Allocated / reserved, slack / inactive split bytes and visual tokens against the step
    (one colour per configuration); RSS where the GPU was not measured."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(11, 10), layout="constrained")
    ax_mem, ax_frag, ax_vt = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 1])
    colours = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd"]
    for n, (name, c) in enumerate(doc["configs"].items()):
        rows = c.get("rows") or []
        if not rows:
            continue
        col = colours[n % len(colours)]
        x = [r["step"] for r in rows]
        if "mem_reserved_gib" in rows[-1]:
            ax_mem.plot(x, [r["mem_reserved_gib"] for r in rows], color=col, lw=1.6,
                        label=f"{name}: reserved")  # fmt: skip
            ax_mem.plot(x, [r["mem_allocated_gib"] for r in rows], color=col, lw=1.2, ls="--",
                        label=f"{name}: allocated after the step")  # fmt: skip
            ax_mem.plot(x, [r["mem_peak_gib"] for r in rows], color=col, lw=0.5, alpha=0.5,
                        label=f"{name}: step peak")  # fmt: skip
            ax_frag.plot(x, [r["reserved_slack_gib"] for r in rows], color=col, lw=1.4,
                         label=f"{name}: reserved - running peak")  # fmt: skip
            ax_frag.plot(x, [r["inactive_split_gib"] for r in rows], color=col, lw=0.8, ls=":",
                         label=f"{name}: inactive split")  # fmt: skip
        else:
            ax_mem.plot(x, [r["rss_gib"] for r in rows], color=col, label=f"{name}: RSS (CPU)")
        if n == 0:
            ax_vt.plot(x, [r["visual_tokens"] for r in rows], color="0.3", lw=0.8)
    a = doc["args"]
    n_steps = max((len(c.get("rows") or []) for c in doc["configs"].values()), default=0)
    cut = int(n_steps * a.get("warmup_frac", 0.1))
    if cut:  # left out of the trend fit
        for ax in (ax_mem, ax_frag, ax_vt):
            ax.axvspan(0, cut, color="0.92", zorder=0)
    ax_mem.set_title(
        f"{a['model']}, LoRA, micro-batch {a['mb']}, one image of {a['min_side']}-"
        f"{a['max_side']} px a side per step + {a['text_tokens']} text tokens ({doc.get('gpu')})"
    )
    ax_mem.set_ylabel("GiB")
    ax_frag.set_ylabel("GiB")
    ax_vt.set_ylabel("visual tokens")
    ax_vt.set_xlabel("optimizer step")
    for ax in (ax_mem, ax_frag):
        if ax.has_data():
            ax.legend(fontsize=7, ncols=2)
        ax.grid(alpha=0.3)
    ax_vt.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def versions() -> dict[str, str | None]:
    import platform

    import fastpath as bench  # benchmarks/fastpath.py

    return {"python": platform.python_version(), **bench.versions()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="qwen2.5-vl-3b", help="qwen2.5-vl-3b, -7b or tiny-*")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=240, help="optimizer steps per config")
    ap.add_argument("--mb", type=int, default=1, help="micro-batch (the same image per row)")
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--min-side", type=int, default=224)
    ap.add_argument("--max-side", type=int, default=1400)
    ap.add_argument("--seed", type=int, default=0, help="of the image sizes")
    ap.add_argument("--no-largest-first", action="store_true",
                    help="steps 0 and 1 random too (the high-water mark may rise late)")  # fmt: skip
    ap.add_argument("--warmup-frac", type=float, default=0.1, help="left out of the trend fit")
    ap.add_argument(
        "--snapshot-every", type=int, default=20, help="memory_snapshot; 0: only at the end"
    )
    ap.add_argument("--budget-s", type=float, default=0,
                    help="wall seconds for all configs (0: none); each gets a share")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], help="RunConfig field=value, all configs")
    ap.add_argument("--out", default="results/creep")
    ap.add_argument("--work", default="/tmp/vlmfit-creep", help="the children's JSON-lines streams")
    ap.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="configs at a time (memory is per process; step times then shared)",
    )
    ap.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="spread children over this many GPUs (CUDA_VISIBLE_DEVICES); 0: inherit",
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        run_child(json.loads(a.child))
        return 0

    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    sets = {}
    for item in a.set:
        k, v = item.split("=", 1)
        try:
            sets[k] = json.loads(v)  # numbers, true / false / null, lists
        except ValueError:
            sets[k] = v
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    sizes = schedule(a.steps, a.min_side, a.max_side, a.seed, not a.no_largest_first)
    doc: dict[str, Any] = {
        "benchmark": "creep",
        "command": " ".join([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)]),
        "args": vars(a) | {"configs": names},
        "versions": versions(),
        "gpu": None,
        "env_alloc_conf_outside": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "schedule": sizes,
        "configs": {},
    }
    t_end = time.time() + a.budget_s if a.budget_s else None
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    env["PYTHONUNBUFFERED"] = "1"
    pending, running, done = list(names), {}, {}
    launched = 0
    while pending or running:
        while pending and len(running) < a.parallel:
            name = pending.pop(0)
            over, label = CONFIGS[name]
            now = time.time()
            rounds = -(-(len(pending) + 1) // a.parallel)  # waves left, this one included
            deadline = now + (t_end - now) / rounds if t_end else now + 10**9
            stream = work / f"creep-{name}-{os.getpid()}.jsonl"
            stream.unlink(missing_ok=True)
            log = work / f"creep-{name}-{os.getpid()}.log"
            job = {
                "name": name, "model": a.model, "mb": a.mb, "text_tokens": a.text_tokens,
                "over": over, "set": sets, "schedule": sizes, "deadline": deadline,
                "snapshot_every": a.snapshot_every, "stream": str(stream),
            }  # fmt: skip
            child_env = dict(env)
            if a.gpus:
                child_env["CUDA_VISIBLE_DEVICES"] = str(launched % a.gpus)
            launched += 1
            print(f"[creep] {name}: {label} ({a.steps} steps)", flush=True)
            with open(log, "w") as f:
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--child", json.dumps(job)],
                    stdout=f, stderr=subprocess.STDOUT, env=child_env,
                )  # fmt: skip
            running[name] = (proc, now, deadline, stream, log, label, over)
        time.sleep(0.5)
        for name, (proc, t0, deadline, stream, log, label, over) in list(running.items()):
            error = None
            if proc.poll() is None:
                if not (t_end and time.time() > deadline + 120):
                    continue
                proc.kill()  # stepping stops at the deadline: this one hangs
                proc.wait()
                error = f"killed {time.time() - deadline:.0f} s after its deadline"
            elif proc.returncode:
                error = f"exit {proc.returncode}: " + log.read_text()[-1500:]
            del running[name]
            rec = read_stream(stream)
            rec["config"] = {"overrides": over, "label": label}
            rec["wall_s"] = round(time.time() - t0, 1)
            if error:
                rec["error"] = error
                print(error, file=sys.stderr)
            rec["summary"] = summarize(rec["rows"], a.warmup_frac)
            done[name] = rec
            doc["gpu"] = doc["gpu"] or rec.get("gpu")
            doc["configs"] = {n: done[n] for n in names if n in done}
            doc["table"] = table(doc["configs"])
            if a.parallel > 1:
                doc["table"] += (
                    f"\n\nUp to {a.parallel} configurations ran at a time"
                    + (f" over {a.gpus} GPUs" if a.gpus else " on one GPU")
                    + ": memory figures are each process's own, step times are shared."
                )
            (out / "creep.json").write_text(json.dumps(doc, indent=1))
            (out / "creep.md").write_text(doc["table"] + "\n")
            if not a.no_plot:
                plot(doc, out / "creep.png")
            s = rec["summary"]
            print(
                f"[creep] {name}: {s['steps']} steps in {rec['wall_s']} s, levers "
                f"{json.dumps(rec.get('levers'))}, expandable in use: "
                f"{rec.get('expandable_in_use')}",
                flush=True,
            )
    print(json.dumps(doc["versions"]))
    print(f"GPU: {doc['gpu']}")
    print(doc["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
