"""Preprocessing: put every image on a visual-token budget, count sequence lengths exactly,
apply the over-length policy, and cache the result under a fingerprint of everything it
depends on.

Usage::

    from vlmfit.budget import Budget
    from vlmfit.preprocess import preprocess

    res = preprocess("data/shapes/sft_train.json", "smolvlm", budget=Budget(max_image_tokens=256))
    res.path            # data/cache/<fingerprint>/
    res.records_path    # .../records.jsonl: TRL conversational format, what training reads
    res.cache_hit       # a second identical call prints "cache hit: data/cache/<fp>"
    res.sample_stats    # per sample: text / visual / total tokens before and after, status

or ``python -m vlmfit preprocess DATA --model M [--split train] [--max-image-tokens N]
[--max-length 2048] [--overlength drop|shrink] [--skip-bad] [--workers N]`` (``--split``
is the dataset split; Idefics3's image tiling is ``--image-splitting`` / ``--no-image-splitting``).

Steps: read (:func:`vlmfit.data.formats.load_records`), check structure
(:func:`vlmfit.data.validate.validate_records`), reject video for families without video,
hash the data file(s) and every referenced media file (streamed) into the fingerprint, read
image headers / probe videos (threads), render the chat template and tokenize the text,
add each image's exact cost (``budget.image_sequence_tokens`` minus what its placeholder
took), apply ``overlength`` (``drop``, or ``shrink``: lower that sample's per-image token
budget step by step until it fits, else drop; never cut through image tokens), then
decode / EXIF-orient / resize / save the media in worker processes, and write
``records.jsonl``, ``images/``, ``videos/<n>/`` (sampled frames), ``stats.json`` and
``manifest.json`` into a temporary folder renamed into place (atomic). Sources are only read.

Cache layout (``cache_dir`` default ``data/cache``)::

    <fingerprint>/records.jsonl   {"messages": [...], "images": ["images/000001.png"]} per line
                                  (preference: {"prompt", "chosen", "rejected", "images"})
    <fingerprint>/images/         resized RGB images: JPEG q95 from JPEG sources, else PNG
    <fingerprint>/videos/000001/  sampled, resized frames of one video (000.jpg, 001.jpg, ...)
    <fingerprint>/stats.json      {"image_stats": [...], "sample_stats": [...]}
    <fingerprint>/manifest.json   fingerprint inputs, budget, processor kwargs, counts,
                                  dropped / shrunk samples, problems, timings

Training must build its processor with ``manifest["processor_kwargs"]`` (Idefics3 applies
the budget through ``size.longest_edge``; Qwen's pre-resized images are a fixed point of
its own resize) and, for videos, ``manifest["video_processor_kwargs"]``, passing each
``videos/<n>/`` folder's frames in name order.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfit import budget as B
from vlmfit import registry, runs
from vlmfit.budget import Budget
from vlmfit.data import media
from vlmfit.records import DataError, MediaRef, Problem, Record, count_parts
from vlmfit.registry import ModelSpec

__all__ = ["PIPELINE_VERSION", "PreprocessResult", "cli_preprocess", "fingerprint", "preprocess"]

#: Bump whenever the output for the same inputs changes (invalidates every cache entry).
PIPELINE_VERSION = 2  # 2: records carry their token count (``length``) for length-grouped batches
POLICIES = ("drop", "shrink")
SHRINK_FACTOR = 0.75  # each shrink step keeps at most 3/4 of the per-image token cap
SMALL_EDGE = 128  # outputs no larger than this are PNG even from JPEG sources
JPEG_QUALITY = 95
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
)
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")


@dataclass
class PreprocessResult:
    """What :func:`preprocess` produced (or found in the cache)."""

    path: Path  # the cache folder data/cache/<fingerprint>
    cache_hit: bool
    fingerprint: str
    records_path: Path  # path / "records.jsonl"
    n_in: int  # records in the source (readable or not)
    n_out: int  # records written
    dropped: list[dict[str, Any]]  # {"where", "total_before", "total_after", "reason"}
    shrunk: list[dict[str, Any]]  # {"where", "total_budget", "total_after", "max_image_tokens"}
    problems: list[Problem]
    image_stats: list[dict[str, Any]]  # one row per image / video use
    sample_stats: list[dict[str, Any]]  # one row per sample that passed validation
    counts: dict[str, int]
    seconds: float
    formats: dict[str, int] = field(default_factory=dict)  # good records per source format
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    def summary(self) -> str:
        """One line: where, how many in / out, dropped, shrunk, skipped, cache hit."""
        c = self.counts
        return (
            f"{self.path}: {self.n_out}/{self.n_in} records kept ({c.get('shrunk', 0)} shrunk, "
            f"{c.get('dropped', 0)} dropped over max_length {self.max_length}, "
            f"{c.get('skipped', 0)} skipped for problems); {c.get('images', 0)} images, "
            f"{c.get('videos', 0)} videos; {'cache hit' if self.cache_hit else 'built'} "
            f"in {self.seconds:.1f} s"
        )


# --------------------------------------------------------------------------- hashing

_HASHES: dict[tuple[Any, ...], str] = {}  # (path, size, mtime_ns, ctime_ns, inode) -> sha256


def file_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (streamed), memoised per (path, size, mtime, ctime, inode)."""
    st = os.stat(path)
    key = (os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    digest = _HASHES.get(key)
    if digest is None:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        _HASHES[key] = digest
    return digest


def _media_hash(ref: MediaRef) -> str:
    if ref.path is not None:
        return file_hash(ref.path)
    data = ref.data
    if isinstance(data, bytes | bytearray | memoryview):
        return hashlib.sha256(bytes(data)).hexdigest()
    if hasattr(data, "tobytes"):  # an embedded PIL image
        return hashlib.sha256(f"{data.mode}{data.size}".encode() + data.tobytes()).hexdigest()
    raise ValueError(f"cannot hash media {ref.describe()}")


def _data_hashes(data: Path) -> dict[str, str]:
    """Content hash of the data file, or of every data file under a folder."""
    if data.is_file():
        return {data.name: file_hash(data)}
    files = sorted(
        p
        for p in data.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith(".")
    )
    return {str(p.relative_to(data)): file_hash(p) for p in files}


def _processor_identity(source: str | Path, revision: str | None) -> dict[str, Any]:
    """A local processor folder by its files' content; a hub processor by id and revision."""
    path = Path(source)
    if path.is_dir():
        return {n: file_hash(path / n) for n in PROCESSOR_FILES if (path / n).is_file()}
    return {"hub_id": str(source), "revision": revision}


def fingerprint(inputs: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of the canonical JSON of ``inputs``."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- media costs


@dataclass
class _Media:
    """One unique source image / video: its hash, header size, and any error."""

    kind: str
    ref: MediaRef
    key: str = ""
    size: tuple[int, int] | None = None
    jpeg: bool = False
    info: media.VideoInfo | None = None
    frames: int = 0  # frames sampled (video)
    error: str | None = None


@dataclass
class _Use:
    """One media use in a sample, at one budget."""

    media: _Media
    tokens: int  # image-token placeholders (<image> / <|image_pad|> / <|video_pad|>)
    seq: int  # every token the media adds, markers included
    target: tuple[int, int]  # size saved (image) / every frame saved (video)
    unit: int  # tokens per image or per temporal patch (what max_image_tokens caps)


def _nonempty(budget: Budget | None) -> Budget | None:
    return None if budget is None or budget.is_empty() else budget


def _cost(spec: ModelSpec, m: _Media, budget: Budget | None, merges: bool) -> _Use:
    """Exact cost of one media at ``budget`` (``None``: processor defaults, no resize)."""
    budget = _nonempty(budget)
    if m.kind == "video":
        assert m.info is not None
        w, h, n = m.info.width, m.info.height, m.frames
        target = B.video_frame_size(spec, w, h, n, budget)
        tokens = B.video_tokens(spec, w, h, n, budget)
        grid_t = -(-n // B.QWEN_VIDEO_DEFAULTS["temporal_patch_size"])
        return _Use(m, tokens, tokens + 2, target, tokens // grid_t)
    assert m.size is not None
    w, h = m.size
    target = (w, h) if budget is None else B.budget_size(spec, w, h, budget)
    tokens = B.image_tokens(spec, *target, budget)
    seq = B.image_sequence_tokens(spec, *target, budget, merges_double_newline=merges)
    return _Use(m, tokens, seq, target, tokens)


def _is_jpeg(ref: MediaRef) -> bool:
    if ref.path is not None:
        with open(ref.path, "rb") as f:
            head = f.read(3)
    elif isinstance(ref.data, bytes | bytearray | memoryview):
        head = bytes(ref.data[:3])
    else:
        return getattr(ref.data, "format", None) == "JPEG"
    return head == b"\xff\xd8\xff"


def _probe(m: _Media, fps: float, max_frames: int) -> None:
    """Hash and read the header (image) / metadata (video) of one media, in place."""
    try:
        m.key = _media_hash(m.ref)
        if m.kind == "image":
            m.size = media.image_size(m.ref)
            m.jpeg = _is_jpeg(m.ref)
        else:
            m.info = media.probe_video(m.ref)
            m.frames = media.sample_count(m.info, fps=fps, max_frames=max_frames)
    except media.MediaError as e:
        m.error = str(e)
    except OSError as e:
        m.error = f"cannot read {m.kind}: {m.ref.describe()} ({e.strerror or e})"


# --------------------------------------------------------------------------- workers


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
                target = _cost(spec, _Media("image", ref, size=size), b, job["merges"]).target
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


# --------------------------------------------------------------------------- text tokens


def _conversations(r: Record) -> list[list[dict[str, Any]]]:
    if r.is_preference:
        return [r.messages + (r.chosen or []), r.messages + (r.rejected or [])]
    return [r.messages]


def _text_tokens(processor: Any, spec: ModelSpec, records: list[Record]) -> dict[int, Any]:
    """Per record (by position): text tokens after the chat template, placeholders excluded,
    or the reason the template failed. Preference records: the longer of the two answers."""
    tok = processor.tokenizer
    fam = spec.family

    def ph(text: str | None) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0

    ph_img, ph_vid = ph(fam.image_placeholder), ph(fam.video_placeholder)
    texts: list[str] = []
    owners: list[tuple[int, int]] = []  # (record position, placeholder tokens)
    out: dict[int, Any] = {}
    for i, r in enumerate(records):
        for conv in _conversations(r):
            try:
                texts.append(processor.apply_chat_template(conv, tokenize=False))
            except Exception as e:  # a template that cannot render this conversation
                out[i] = f"chat template failed: {type(e).__name__}: {e}"
                break
            n_ph = count_parts(conv, "image") * ph_img + count_parts(conv, "video") * ph_vid
            owners.append((i, n_ph))
    ids = tok(texts)["input_ids"] if texts else []
    for (i, n_ph), seq in zip(owners, ids, strict=True):
        if isinstance(out.get(i), str):
            continue
        out[i] = max(out.get(i, 0), len(seq) - n_ph)
    return out


# --------------------------------------------------------------------------- policy


@dataclass
class _Sample:
    """One record on its way through the pipeline."""

    record: Record
    text: int  # text tokens after the chat template (placeholders excluded)
    before: list[_Use]  # processor defaults
    uses: list[_Use]  # at the budget (after shrinking, for shrunk samples)
    status: str = "kept"  # kept | shrunk | dropped | skipped
    reason: str = ""
    cap: int | None = None  # per-image token cap of a shrunk sample
    total_budget: int = 0  # at the global budget, before the policy
    outputs: list[str] = field(default_factory=list)

    def total(self, uses: list[_Use]) -> int:
        return self.text + sum(u.seq for u in uses)


def _shrink(
    spec: ModelSpec, s: _Sample, budget: Budget | None, max_length: int, merges: bool
) -> tuple[list[_Use], int] | str:
    """Lower the sample's per-image token cap step by step until it fits, or say why not."""
    if not s.uses:
        return f"text alone is {s.text} tokens > max_length {max_length}"
    if not spec.is_qwen:
        return (
            f"{s.total_budget} tokens > max_length {max_length}; cannot shrink: the "
            f"{spec.family.name} processor rescales every image to size.longest_edge itself"
        )
    cap = max(u.unit for u in s.uses)
    base = budget or Budget()
    while True:
        cap = min(cap - 1, int(cap * SHRINK_FACTOR))
        try:
            if cap < 1:
                raise ValueError("no smaller image is possible")
            b = dataclasses.replace(base, max_image_tokens=cap)
            uses = [_cost(spec, u.media, b, merges) for u in s.uses]
        except ValueError as e:
            return (
                f"{s.total_budget} tokens > max_length {max_length}, still over at the "
                f"smallest per-image budget ({e})"
            )
        if s.total(uses) <= max_length:
            return uses, cap


def _apply_policy(
    spec: ModelSpec,
    samples: list[_Sample],
    budget: Budget | None,
    max_length: int,
    overlength: str,
    merges: bool,
) -> None:
    for s in samples:
        s.total_budget = s.total(s.uses)
        if s.total_budget <= max_length:
            continue
        shrunk = (
            _shrink(spec, s, budget, max_length, merges)
            if overlength == "shrink"
            else f"{s.total_budget} tokens > max_length {max_length}"
        )
        if isinstance(shrunk, str):
            s.status, s.reason = "dropped", shrunk
        else:
            s.uses, s.cap = shrunk
            s.status = "shrunk"
            s.reason = f"per-image budget lowered to {s.cap} tokens"


# --------------------------------------------------------------------------- output


def _message(m: dict[str, Any]) -> dict[str, Any]:
    parts = [
        {"type": "text", "text": p.get("text", "")} if p["type"] == "text" else {"type": p["type"]}
        for p in m["content"]
    ]
    return {"role": m["role"], "content": parts}


def _trl_row(s: _Sample, with_videos: bool) -> dict[str, Any]:
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


def _stats(samples: list[_Sample]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, default=str) + "\n")


def _problem_dict(p: Problem) -> dict[str, Any]:
    return {"source": p.source, "index": p.index, "reason": p.reason}


def _from_cache(path: Path, started: float) -> PreprocessResult:
    manifest = json.loads((path / "manifest.json").read_text())
    stats = json.loads((path / "stats.json").read_text())
    return PreprocessResult(
        path=path,
        cache_hit=True,
        fingerprint=manifest["fingerprint"],
        records_path=path / "records.jsonl",
        n_in=manifest["n_in"],
        n_out=manifest["n_out"],
        dropped=manifest["dropped"],
        shrunk=manifest["shrunk"],
        problems=[Problem(**p) for p in manifest["problems"]],
        image_stats=stats["image_stats"],
        sample_stats=stats["sample_stats"],
        counts=manifest["counts"],
        seconds=time.perf_counter() - started,
        formats=manifest["formats"],
        manifest=manifest,
    )


def _sort_key(p: Problem) -> tuple[str, int]:
    return (p.source, p.index if isinstance(p.index, int) else -1)


def _media_key(kind: str, ref: MediaRef) -> tuple[str, Any]:
    return (kind, ref.path) if ref.path is not None else (kind, id(ref.data))


def _record_media(r: Record, table: dict[tuple[str, Any], _Media]) -> list[_Media]:
    return [table[_media_key("image", x)] for x in r.images] + [
        table[_media_key("video", x)] for x in r.videos
    ]


def _fail_or_continue(problems: list[Problem], on_error: str) -> None:
    if problems and on_error == "fail":
        raise DataError(sorted(problems, key=_sort_key))


def _video_processor_kwargs(budget: Budget, frame_sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """Video-processor settings under which every saved frame is a fixed point of its resize."""
    v = B.QWEN_VIDEO_DEFAULTS
    px = (v["patch_size"] * v["merge_size"]) ** 2
    lo = budget.min_image_tokens * px if budget.min_image_tokens else v["min_pixels"]
    caps = [v["max_pixels"], budget.max_pixels, (budget.max_image_tokens or 0) * px or None]
    hi = min(c for c in caps if c)
    areas = [w * h for w, h in frame_sizes]
    return {
        "min_pixels": min([lo, *areas]),
        "max_pixels": max([hi, *areas]),
        "do_sample_frames": False,
    }


def preprocess(
    data: str | Path,
    model: str,
    *,
    weights: str = "hub",
    budget: Budget | None = None,
    max_length: int = 2048,
    overlength: str = "drop",
    on_error: str = "fail",
    cache_dir: str | Path = "data/cache",
    workers: int | None = None,
    progress: bool = True,
    video_fps: float = 2.0,
    video_max_frames: int = 16,
    split: str | None = "train",
) -> PreprocessResult:
    """Validate ``data`` (its ``split``: test rows never reach training; ``None``: all), put
    its media on ``budget`` for ``model``, apply the over-length policy and write the cache
    folder (or find it). See the module docstring.

    ``weights``: ``hub`` (the hub processor), ``random`` (``tiny.ensure_random``) or a local
    model folder; only the tokenizer and chat template are read from it, token arithmetic
    uses the registry's published processor settings. ``on_error="fail"`` raises
    :class:`~vlmfit.records.DataError` listing every problem; ``"skip"`` leaves bad records
    out and reports them. ``workers=1`` decodes inline; default ``os.cpu_count()`` processes.
    """
    import vlmfit
    from vlmfit.data.formats import load_records
    from vlmfit.data.validate import validate_records

    started = time.perf_counter()
    timings: dict[str, float] = {}
    if overlength not in POLICIES:
        raise ValueError(f"overlength must be one of {POLICIES}, got {overlength!r}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    spec = registry.get(model)
    budget = budget or Budget()
    proc_kwargs = B.processor_kwargs(spec, budget)  # ValueError for a budget the model can't do
    workers = max(1, workers or os.cpu_count() or 1)
    data = Path(data)

    # 1. read and check structure (no pixels yet)
    loaded = load_records(data, split=split)
    for line in loaded.skipped:
        print(f"skipped file {line}")
    problems = list(loaded.problems)
    problems += validate_records(loaded.records, check_media=False)
    if not spec.family.supports_video:
        problems += [
            Problem(
                r.source,
                r.index,
                f"video not supported: {spec.name} ({spec.family.name}) takes images only; "
                f"this record has {len(r.videos)} video(s)",
            )
            for r in loaded.records
            if r.videos
        ]
    n_in = len(loaded.records) + len(
        {(p.source, p.index) for p in loaded.problems if p.index != "-"}
    )
    _fail_or_continue(problems, on_error)
    bad = {(p.source, p.index) for p in problems}
    records = [r for r in loaded.records if (r.source, r.index) not in bad]
    timings["load"] = time.perf_counter() - started

    # 2. hash + probe every unique media (threads: hashing and header reads release the GIL)
    t = time.perf_counter()
    table: dict[tuple[str, Any], _Media] = {}
    for r in records:
        for kind, refs in (("image", r.images), ("video", r.videos)):
            for ref in refs:
                table.setdefault(_media_key(kind, ref), _Media(kind, ref))
    if table:
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            list(pool.map(lambda m: _probe(m, video_fps, video_max_frames), table.values()))
    for r in records:
        reasons = list(dict.fromkeys(m.error for m in _record_media(r, table) if m.error))
        problems += [Problem(r.source, r.index, reason) for reason in reasons]
    _fail_or_continue(problems, on_error)
    records = [r for r in records if not any(m.error for m in _record_media(r, table))]
    timings["probe"] = time.perf_counter() - t

    # 3. fingerprint: sources, model + processor, budget, policy, versions
    from vlmfit.models import resolve_source

    source, revision = resolve_source(spec, weights)
    media_keys = sorted(f"{m.kind}:{m.key or m.error}" for m in table.values())
    inputs: dict[str, Any] = {
        # DATASET_DIR/NAME (a LLaMA-Factory dataset) is no path: hash its dataset_dir
        "data": _data_hashes(data)
        if data.exists()
        else _data_hashes(data.parent)
        if loaded.records
        else {},
        "split": split,
        "media": media_keys,
        "model": {
            "name": spec.name,
            "family": spec.family.name,
            "processor": spec.processor,
            "processor_kwargs": proc_kwargs,
            "tokenizer": _processor_identity(source, revision),
        },
        "budget": dataclasses.asdict(budget),
        "max_length": max_length,
        "overlength": overlength,
        "on_error": on_error,
        "video": {"fps": video_fps, "max_frames": video_max_frames},
        "vlmfit_version": vlmfit.__version__,
        "pipeline_version": PIPELINE_VERSION,
    }
    fp = fingerprint(inputs)
    root = Path(cache_dir)
    out = root / fp
    if (out / "manifest.json").is_file() and (out / "records.jsonl").is_file():
        print(f"cache hit: {out}")
        return _from_cache(out, started)

    # 4. exact token counts and the over-length policy
    t = time.perf_counter()
    from vlmfit.procs import load_processor

    processor = load_processor(
        source, spec.family.name, **({"revision": revision} if revision else {})
    )
    tok = processor.tokenizer
    merges = len(tok("\n\n", add_special_tokens=False)["input_ids"]) == 1
    texts = _text_tokens(processor, spec, records)
    samples: list[_Sample] = []
    for i, r in enumerate(records):
        text = texts.get(i, 0)
        if isinstance(text, str):
            problems.append(Problem(r.source, r.index, text))
            continue
        ms = _record_media(r, table)
        try:
            before = [_cost(spec, m, None, merges) for m in ms]
            uses = [_cost(spec, m, budget, merges) for m in ms]
        except ValueError as e:
            problems.append(
                Problem(r.source, r.index, f"refused by the {spec.name} processor: {e}")
            )
            continue
        samples.append(_Sample(r, text, before, uses))
    _fail_or_continue(problems, on_error)
    _apply_policy(spec, samples, budget, max_length, overlength, merges)
    timings["tokens"] = time.perf_counter() - t

    # 5. decode / resize / save into a temporary folder, then rename it into place
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{fp}.tmp-", dir=root))
    tmp.chmod(0o777 & ~runs.umask())  # mkdtemp makes 0700: the user's umask instead
    try:
        result = _build(
            tmp,
            spec=spec,
            samples=samples,
            budget=budget,
            problems=problems,
            on_error=on_error,
            workers=workers,
            progress=progress,
            merges=merges,
            max_length=max_length,
            video_fps=video_fps,
            video_max_frames=video_max_frames,
            timings=timings,
        )
        compact = {**inputs, "media": {"count": len(media_keys), "sha256": fingerprint(media_keys)}}
        manifest: dict[str, Any] = {
            "fingerprint": fp,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "data": str(data),
            "source_format": loaded.fmt,
            "model": spec.name,
            "weights": weights,
            "family": spec.family.name,
            "budget": dataclasses.asdict(budget),
            "budget_flags": budget.describe(),
            "processor_kwargs": proc_kwargs,
            "video_processor_kwargs": (
                _video_processor_kwargs(budget, result["frame_sizes"])
                if result["frame_sizes"]
                else None
            ),
            "max_length": max_length,
            "overlength": overlength,
            "on_error": on_error,
            "video_fps": video_fps,
            "video_max_frames": video_max_frames,
            "vlmfit_version": vlmfit.__version__,
            "pipeline_version": PIPELINE_VERSION,
            "inputs": compact,
            "n_in": n_in,
            "n_out": result["counts"]["kept"] + result["counts"]["shrunk"],
            "counts": {**result["counts"], "records": n_in},
            "formats": dict(loaded.counts),
            "dropped": result["dropped"],
            "shrunk": result["shrunk"],
            "problems": [_problem_dict(p) for p in sorted(problems, key=_sort_key)],
            "workers": workers,
            "timings": timings,
            "images_per_s": result["images_per_s"],  # files decoded + resized + saved / s
        }
        manifest["counts"]["skipped"] = len({(p.source, p.index) for p in problems})
        timings["total"] = time.perf_counter() - started
        _write_json(tmp / "manifest.json", manifest)  # last: marks a complete folder
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same fingerprint first: use theirs
            if not (out / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    res = _from_cache(out, started)
    res.cache_hit = False
    print(f"built: {out} ({res.seconds:.1f} s)")
    return res


def _sample_budget(budget: Budget, s: _Sample) -> Budget:
    return dataclasses.replace(budget, max_image_tokens=s.cap) if s.cap else budget


def _build(
    tmp: Path,
    *,
    spec: ModelSpec,
    samples: list[_Sample],
    budget: Budget,
    problems: list[Problem],
    on_error: str,
    workers: int,
    progress: bool,
    merges: bool,
    max_length: int,
    video_fps: float,
    video_max_frames: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Save the media of kept samples into ``tmp`` and write records / stats there."""
    t = time.perf_counter()
    (tmp / "images").mkdir()
    jobs: list[dict[str, Any]] = []
    outputs: dict[tuple[Any, ...], str] = {}
    n_kind: Counter[str] = Counter()
    for s in samples:
        if s.status == "dropped":
            continue
        b = _nonempty(_sample_budget(budget, s))
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
                        "fps": video_fps,
                        "max_frames": video_max_frames,
                    }
                )
            s.outputs.append(outputs[key])
    results = _run_jobs(jobs, workers, progress)
    done = {j["rel"]: r for j, r in zip(jobs, results, strict=True)}
    timings["media"] = time.perf_counter() - t
    files = sum(r.get("frames", 1) for r in results if not r["error"])
    images_per_s = files / timings["media"] if timings["media"] > 0 else 0.0

    t = time.perf_counter()
    for s in samples:
        if s.status == "dropped":
            continue
        errors = list(dict.fromkeys(done[o]["error"] for o in s.outputs if done[o]["error"]))
        if errors:
            s.status = "skipped"
            problems += [Problem(s.record.source, s.record.index, e) for e in errors]
            continue
        for k, (u, o) in enumerate(zip(s.uses, s.outputs, strict=True)):
            size = done[o].get("size")
            if u.media.kind == "image" and size and tuple(size) != u.media.size:
                # the header size was not the decoded size (EXIF after a PNG's pixels)
                m = dataclasses.replace(u.media, size=tuple(size))
                s.before[k] = _cost(spec, m, None, merges)
                s.uses[k] = _cost(spec, m, _sample_budget(budget, s), merges)
        if s.total(s.uses) > max_length:
            s.status = "dropped"
            s.reason = f"{s.total(s.uses)} tokens > max_length {max_length} (decoded size)"
    _fail_or_continue(problems, on_error)

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
    _write_json(tmp / "stats.json", {"image_stats": image_rows, "sample_stats": sample_rows})
    timings["write"] = time.perf_counter() - t
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
        "images_per_s": images_per_s,
    }


# --------------------------------------------------------------------------- report helpers

#: Reference photo sizes for the cost table (w, h): VGA, 1000 px square, phone photo.
REFERENCE_SIZES = [(640, 480), (1000, 1000), (1920, 1080), (4032, 3024)]


def truncation_risk(res: PreprocessResult) -> dict[str, float | int]:
    """Fractions of valid samples over ``max_length``: at processor defaults (``before``),
    at the budget before the policy (``budget``), and written (``after``, always 0)."""
    rows = res.sample_stats
    n = max(len(rows), 1)
    limit = res.max_length
    return {
        "samples": len(rows),
        "max_length": limit,
        "over_before": sum(r["total_before"] > limit for r in rows) / n,
        "over_budget": sum(r["total_budget"] > limit for r in rows) / n,
        "over_after": sum(r["total_after"] > limit and r["status"] != "dropped" for r in rows) / n,
        "dropped": sum(r["status"] == "dropped" for r in rows),
        "shrunk": sum(r["status"] == "shrunk" for r in rows),
    }


def problem_rows(res: PreprocessResult) -> list[dict[str, Any]]:
    """The validation table: one row per problem (``where``, ``kind``, ``reason``)."""
    from vlmfit.data.validate import reason_kind

    return [
        {"where": f"{p.source}:{p.index}", "kind": reason_kind(p.reason), "reason": p.reason}
        for p in res.problems
    ]


def pitfall_table(model: str, budget: Budget | None = None) -> list[dict[str, Any]]:
    """Visual tokens of reference photo sizes at processor defaults and at ``budget``, for
    ``model`` and, for contrast, Qwen2-VL at its hub defaults (which never downscale: a
    1000x1000 photo costs 1,296 tokens)."""
    budget = budget or Budget()
    rows = []
    for name in dict.fromkeys([model, "qwen2-vl-2b"]):
        spec = registry.get(name)
        try:
            table = B.cost_table(spec, REFERENCE_SIZES, budget)
        except ValueError as e:  # a budget this model cannot meet
            table = [{"width": w, "height": h, "error": str(e)} for w, h in REFERENCE_SIZES]
        for row in table:
            rows.append({"model": name, "budget": budget.describe(), **row})
    return rows


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmfit preprocess",
        description="Put DATA's images on MODEL's visual-token budget, count sequence lengths "
        "and cache the result in CACHE_DIR/<fingerprint>/ (records.jsonl for training).",
    )
    p.add_argument("data", help="a .json/.jsonl/.parquet/.arrow file or a dataset folder")
    p.add_argument("--model", required=True, help="registry name (python -m vlmfit tokens)")
    p.add_argument(
        "--split", default="train", help="dataset split to read (default train; 'all': every one)"
    )
    p.add_argument("--weights", default="hub", help="hub | random | a local model folder")
    B.add_budget_arguments(p)
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sample")
    p.add_argument("--overlength", choices=POLICIES, default="drop", help="over max-length")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records instead of failing")
    p.add_argument("--cache-dir", default="data/cache")
    p.add_argument("--workers", type=int, help="processes (default: CPU count; 1: inline)")
    p.add_argument("--video-fps", type=float, default=2.0)
    p.add_argument("--video-max-frames", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")
    return p


def cli_preprocess(argv: list[str]) -> int:
    """``vlmfit preprocess``: 0 with a summary; 1 listing every problem; 2 on a usage error."""
    args = _parser().parse_args(argv)
    try:
        budget = B.budget_from_args(args)
        res = preprocess(
            args.data,
            args.model,
            weights=args.weights,
            budget=budget,
            max_length=args.max_length,
            overlength=args.overlength,
            on_error="skip" if args.skip_bad else "fail",
            cache_dir=args.cache_dir,
            workers=args.workers,
            progress=not args.no_progress,
            video_fps=args.video_fps,
            video_max_frames=args.video_max_frames,
            split=None if args.split == "all" else args.split,
        )
    except DataError as e:
        print(e)
        print("nothing was written; fix the data or pass --skip-bad")
        return 1
    except (ValueError, registry.UnknownModelError) as e:
        print(f"vlmfit preprocess: error: {e}", file=sys.stderr)
        return 2
    for problem in res.problems:
        print(f"skipped {problem}")
    for row in res.dropped:
        print(f"dropped {row['where']}: {row['reason']}")
    for row in res.shrunk:
        print(
            f"shrunk {row['where']}: {row['total_budget']} -> {row['total_after']} tokens "
            f"(max_image_tokens {row['max_image_tokens']})"
        )
    risk = truncation_risk(res)
    print(
        f"over max_length {res.max_length}: {risk['over_before']:.1%} at processor defaults, "
        f"{risk['over_budget']:.1%} with {budget.describe()}"
    )
    print(f"records: {res.records_path}")
    return 0 if res.n_out else 1
