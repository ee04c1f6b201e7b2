"""Stage 5: write ``records.jsonl`` (TRL's format), ``stats.json`` and the manifest."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from vlmfit.budget import Budget
from vlmfit.budget.qwen import QWEN_VIDEO_DEFAULTS, qwen_pixel_range
from vlmfit.data.formats import LoadResult
from vlmfit.data.records import Problem
from vlmfit.files import write_json
from vlmfit.models.registry import ModelSpec
from vlmfit.preprocess.cache import PIPELINE_VERSION, fingerprint
from vlmfit.preprocess.lengths import Sample
from vlmfit.preprocess.options import Options
from vlmfit.preprocess.read import sort_key


def _message(m: dict[str, Any]) -> dict[str, Any]:
    parts = [
        {"type": "text", "text": p.get("text", "")} if p["type"] == "text" else {"type": p["type"]}
        for p in m["content"]
    ]
    return {"role": m["role"], "content": parts}


def _trl_row(s: Sample, with_videos: bool) -> dict[str, Any]:
    r = s.record
    images = [o for u, o in zip(s.uses, s.outputs, strict=True) if u.media.kind == "image"]
    videos = [o for u, o in zip(s.uses, s.outputs, strict=True) if u.media.kind == "video"]
    if r.is_preference:
        row: dict[str, Any] = {
            "prompt": [_message(m) for m in r.messages],
            "chosen": [_message(m) for m in r.chosen or []],
            "rejected": [_message(m) for m in r.rejected or []],
        }
    else:
        row = {"messages": [_message(m) for m in r.messages]}
    row["images"] = images
    if with_videos:
        row["videos"] = videos
    row["length"] = s.total(s.uses)  # tokens after the budget: training groups batches by it
    return row


def _stats(samples: list[Sample]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    image_rows, sample_rows = [], []
    for s in samples:
        r = s.record
        outs = s.outputs or [None] * len(s.uses)
        for b, u, out in zip(s.before, s.uses, outs, strict=True):
            m = u.media
            w, h = m.size if m.kind == "image" and m.size else (m.info.width, m.info.height)  # type: ignore[union-attr]
            image_rows.append(
                {
                    "where": r.where,
                    "kind": m.kind,
                    "source": m.ref.path or m.ref.describe(),
                    "width": w,
                    "height": h,
                    "frames": m.frames if m.kind == "video" else 1,
                    "tokens_before": b.tokens,
                    "tokens_after": u.tokens,
                    "new_width": u.target[0],
                    "new_height": u.target[1],
                    "output": out,
                    "status": s.status,
                }
            )
        sample_rows.append(
            {
                "where": r.where,
                "fmt": r.fmt,
                "n_images": len(r.images),
                "n_videos": len(r.videos),
                "text_tokens": s.text,
                "visual_before": sum(u.seq for u in s.before),
                "visual_after": sum(u.seq for u in s.uses),
                "total_before": s.total(s.before),
                "total_budget": s.total_budget,
                "total_after": s.total(s.uses),
                "status": s.status,
                "max_image_tokens": s.cap,
                "reason": s.reason,
            }
        )
    return image_rows, sample_rows


def _problem_dict(p: Problem) -> dict[str, Any]:
    return {"source": p.source, "index": p.index, "reason": p.reason}


def _video_processor_kwargs(budget: Budget, frame_sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """Video-processor settings under which every saved frame is a fixed point of its resize."""
    lo, hi = qwen_pixel_range(QWEN_VIDEO_DEFAULTS, budget)
    areas = [w * h for w, h in frame_sizes]
    return {
        "min_pixels": min([lo, *areas]),
        "max_pixels": max([hi, *areas]),
        "do_sample_frames": False,
    }


def write_outputs(tmp: Path, samples: list[Sample], done: dict[str, dict[str, Any]]) -> dict:
    """Write the kept samples' records and every valid sample's stats into ``tmp``, remove
    the media of samples skipped after decoding, and return counts and the dropped /
    shrunk lists for the manifest."""
    written = [s for s in samples if s.status in ("kept", "shrunk")]
    used = {o for s in written for o in s.outputs}
    for rel in set(done) - used:  # outputs of samples skipped after decoding
        path = tmp / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    with_videos = any(s.record.videos for s in written)
    with open(tmp / "records.jsonl", "w", encoding="utf-8") as f:
        for s in written:
            f.write(json.dumps(_trl_row(s, with_videos), ensure_ascii=False) + "\n")
    valid = [s for s in samples if s.status != "skipped"]
    image_rows, sample_rows = _stats(valid)
    write_json(
        tmp / "stats.json",
        {"image_stats": image_rows, "sample_stats": sample_rows},
        indent=1,
        ensure_ascii=False,
    )
    status = Counter(s.status for s in valid)
    frame_sizes = [tuple(done[o]["target"]) for o in used if o.startswith("videos/")]
    return {
        "counts": {
            "valid": len(valid),
            "kept": status["kept"],
            "shrunk": status["shrunk"],
            "dropped": status["dropped"],
            "images": sum(len(s.record.images) for s in written),
            "videos": sum(len(s.record.videos) for s in written),
            "frames": sum(done[o].get("frames", 0) for o in used),
            "files": sum(done[o].get("frames", 1) for o in used),
        },
        "dropped": [
            {
                "where": s.record.where,
                "total_before": s.total(s.before),
                "total_after": s.total_budget,
                "reason": s.reason,
            }
            for s in valid
            if s.status == "dropped"
        ],
        "shrunk": [
            {
                "where": s.record.where,
                "total_budget": s.total_budget,
                "total_after": s.total(s.uses),
                "max_image_tokens": s.cap,
            }
            for s in valid
            if s.status == "shrunk"
        ],
        "frame_sizes": frame_sizes,
    }


def manifest(
    fp: str,
    data: Path,
    loaded: LoadResult,
    spec: ModelSpec,
    budget: Budget,
    inputs: dict[str, Any],
    n_in: int,
    result: dict[str, Any],
    problems: list[Problem],
    opts: Options,
    timings: dict[str, float],
) -> dict[str, Any]:
    """What ``manifest.json`` records: the inputs (media folded into one hash), the settings
    training must reuse (``processor_kwargs``, ``video_processor_kwargs``), counts, the
    dropped / shrunk samples, problems and timings."""
    import vlmfit

    media_keys = inputs["media"]
    compact = {**inputs, "media": {"count": len(media_keys), "sha256": fingerprint(media_keys)}}
    out: dict[str, Any] = {
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "data": str(data),
        "source_format": loaded.fmt,
        "model": spec.name,
        "weights": opts.weights,
        "family": spec.family.name,
        "budget": dataclasses.asdict(budget),
        "budget_flags": budget.describe(),
        "processor_kwargs": inputs["model"]["processor_kwargs"],
        "video_processor_kwargs": (
            _video_processor_kwargs(budget, result["frame_sizes"])
            if result["frame_sizes"]
            else None
        ),
        "max_length": opts.max_length,
        "overlength": opts.overlength,
        "on_error": opts.on_error,
        "video_fps": opts.video_fps,
        "video_max_frames": opts.video_max_frames,
        "vlmfit_version": vlmfit.__version__,
        "pipeline_version": PIPELINE_VERSION,
        "inputs": compact,
        "n_in": n_in,
        "n_out": result["counts"]["kept"] + result["counts"]["shrunk"],
        "counts": {**result["counts"], "records": n_in},
        "formats": dict(loaded.counts),
        "dropped": result["dropped"],
        "shrunk": result["shrunk"],
        "problems": [_problem_dict(p) for p in sorted(problems, key=sort_key)],
        "workers": opts.workers,
        "timings": timings,
        "images_per_s": result["images_per_s"],  # files decoded + resized + saved / s
    }
    out["counts"]["skipped"] = len({(p.source, p.index) for p in problems})
    return out
