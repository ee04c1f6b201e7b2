"""Stage 4: decode, orient, resize and save every image / video, in worker processes."""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from vlmfit.budget import Budget
from vlmfit.data import media
from vlmfit.data.records import MediaRef
from vlmfit.models import registry
from vlmfit.models.registry import ModelSpec
from vlmfit.preprocess.costs import Media, cost, nonempty
from vlmfit.preprocess.lengths import Sample, sample_budget
from vlmfit.preprocess.options import Options

SMALL_EDGE = 128  # outputs no larger than this are PNG even from JPEG sources
JPEG_QUALITY = 95


def _output_format(jpeg: bool, size: tuple[int, int]) -> str:
    return "jpg" if jpeg and max(size) > SMALL_EDGE else "png"


def _save(img: Any, path: Path) -> None:
    if path.suffix == ".jpg":
        img.save(path, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.save(path, format="PNG", compress_level=4)


def _open_jpeg_draft(job: dict[str, Any]) -> Any | None:
    """A big JPEG that shrinks at least 4x, opened lazily with libjpeg's DCT scaling set so
    it decodes at >= 2x the target size (what ``Image.thumbnail`` does): several times
    faster, and the LANCZOS resize that follows still sees >= 2x the output pixels. ``None``
    when that does not apply or the header does not open (``open_image`` then reports it)."""
    from PIL import Image

    (w, h), (tw, th) = job["size"], job["target"]
    if not job["jpeg"] or w < 4 * tw or h < 4 * th:
        return None
    source = job["path"] if job["path"] is not None else job["data"]
    if not isinstance(source, str | bytes):
        return None
    try:
        im = Image.open(source if isinstance(source, str) else io.BytesIO(source))
    except Exception:
        return None
    if im.format != "JPEG":
        im.close()
        return None
    swapped = im.size != (w, h)  # stored sideways, shown rotated by EXIF
    im.draft("RGB", (2 * th, 2 * tw) if swapped else (2 * tw, 2 * th))
    return im


def _do_job(job: dict[str, Any]) -> dict[str, Any]:
    """Decode, orient, resize and save one image or video (runs in a worker process).

    An image whose decoded size differs from its header size (EXIF stored after a PNG's
    pixels) gets its target recomputed from the decoded size with the same budget.
    """
    ref = MediaRef(path=job["path"], data=job["data"], origin=job["desc"])
    out = Path(job["out"])
    try:
        if job["kind"] == "image":
            target = tuple(job["target"])
            draft = _open_jpeg_draft(job)
            if draft is not None:
                with draft:
                    img = media.open_image(draft)
                size = tuple(job["size"])  # JPEG headers carry EXIF: the size is right
            else:
                img = media.open_image(ref)
                size = img.size
            if size != tuple(job["size"]):
                spec = registry.get(job["model"])
                b = Budget(**job["budget"]) if job["budget"] else None
                target = cost(spec, Media("image", ref, size=size), b, job["merges"]).target
            _save(media.resize_image(img, target), out)
            return {"size": list(size), "target": list(target), "error": None}
        frames, times = media.sample_video(ref, fps=job["fps"], max_frames=job["max_frames"])
        out.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            _save(media.resize_image(frame, tuple(job["target"])), out / f"{i:03d}.{job['ext']}")
        return {"frames": len(frames), "times": times, "target": job["target"], "error": None}
    except media.MediaError as e:
        return {"error": str(e)}
    except Exception as e:  # a decoder bug must not hide the other results
        return {"error": f"unreadable {job['kind']}: {job['desc']} ({type(e).__name__}: {e})"}


def _run_jobs(jobs: list[dict[str, Any]], workers: int, progress: bool) -> list[dict[str, Any]]:
    """Run jobs inline (``workers == 1``) or in a spawned process pool, in order.

    Spawn, not fork: the parent holds torch / tokenizers threads. A pool that breaks (a
    calling script without ``if __name__ == "__main__":``) finishes inline, with a warning.
    """
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    results: list[dict[str, Any]] = []
    with tqdm(total=len(jobs), desc="preprocess", unit="media", disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            n = min(workers, len(jobs))
            chunk = max(1, min(16, len(jobs) // (n * 8)))
            ctx = multiprocessing.get_context("spawn")
            try:
                with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
                    for r in pool.map(_do_job, jobs, chunksize=chunk):
                        results.append(r)
                        bar.update()
            except BrokenProcessPool:
                warnings.warn(
                    "preprocess: the worker processes died (a script calling preprocess() "
                    "needs `if __name__ == '__main__':`); finishing with workers=1",
                    RuntimeWarning,
                    stacklevel=3,
                )
        for job in jobs[len(results) :]:
            results.append(_do_job(job))
            bar.update()
    return results


def save_media(
    tmp: Path,
    spec: ModelSpec,
    samples: list[Sample],
    budget: Budget,
    merges: bool,
    opts: Options,
) -> dict[str, dict[str, Any]]:
    """Save the media of the samples not dropped under ``tmp`` (each file once per target
    size), set each sample's ``outputs``, and return every job's result by output path."""
    (tmp / "images").mkdir()
    jobs: list[dict[str, Any]] = []
    outputs: dict[tuple[Any, ...], str] = {}
    n_kind: Counter[str] = Counter()
    for s in samples:
        if s.status == "dropped":
            continue
        b = nonempty(sample_budget(budget, s))
        for u in s.uses:
            m = u.media
            key = (m.kind, m.key, u.target)
            if key not in outputs:
                n_kind[m.kind] += 1
                ext = _output_format(m.jpeg or m.kind == "video", u.target)
                rel = (
                    f"images/{n_kind['image']:06d}.{ext}"
                    if m.kind == "image"
                    else f"videos/{n_kind['video']:06d}"
                )
                outputs[key] = rel
                jobs.append(
                    {
                        "kind": m.kind,
                        "path": m.ref.path,
                        "data": m.ref.data,
                        "desc": m.ref.describe(),
                        "size": list(m.size or ()),
                        "target": list(u.target),
                        "out": str(tmp / rel),
                        "rel": rel,
                        "ext": ext,
                        "jpeg": m.jpeg,
                        "model": spec.name,
                        "budget": dataclasses.asdict(b) if b else None,
                        "merges": merges,
                        "fps": opts.video_fps,
                        "max_frames": opts.video_max_frames,
                    }
                )
            s.outputs.append(outputs[key])
    results = _run_jobs(jobs, opts.workers, opts.progress)
    return {j["rel"]: r for j, r in zip(jobs, results, strict=True)}
