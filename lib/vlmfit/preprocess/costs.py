"""Stage 2: hash and probe every unique image / video, and what each costs at a budget."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vlmfit import budget as B
from vlmfit.budget import Budget
from vlmfit.data import media
from vlmfit.data.records import MediaRef, Problem, Record
from vlmfit.models.registry import ModelSpec
from vlmfit.preprocess.cache import media_hash
from vlmfit.preprocess.options import Options
from vlmfit.preprocess.read import fail_or_continue


@dataclass
class Media:
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
class Use:
    """One media use in a sample, at one budget."""

    media: Media
    tokens: int  # image-token placeholders (<image> / <|image_pad|> / <|video_pad|>)
    seq: int  # every token the media adds, markers included
    target: tuple[int, int]  # size saved (image) / every frame saved (video)
    unit: int  # tokens per image or per temporal patch (what max_image_tokens caps)


MediaTable = dict[tuple[str, Any], Media]


def nonempty(budget: Budget | None) -> Budget | None:
    return None if budget is None or budget.is_empty() else budget


def cost(spec: ModelSpec, m: Media, budget: Budget | None, merges: bool) -> Use:
    """Exact cost of one media at ``budget`` (``None``: processor defaults, no resize)."""
    budget = nonempty(budget)
    if m.kind == "video":
        assert m.info is not None
        w, h, n = m.info.width, m.info.height, m.frames
        target = B.video_frame_size(spec, w, h, budget)
        tokens = B.video_tokens(spec, w, h, n, budget)
        grid_t = -(-n // B.QWEN_VIDEO_DEFAULTS["temporal_patch_size"])
        return Use(m, tokens, tokens + 2, target, tokens // grid_t)
    assert m.size is not None
    w, h = m.size
    target = (w, h) if budget is None else B.budget_size(spec, w, h, budget)
    tokens = B.image_tokens(spec, *target, budget)
    seq = B.image_sequence_tokens(spec, *target, budget, merges_double_newline=merges)
    return Use(m, tokens, seq, target, tokens)


def _is_jpeg(ref: MediaRef) -> bool:
    if ref.path is not None:
        with open(ref.path, "rb") as f:
            head = f.read(3)
    elif isinstance(ref.data, bytes | bytearray | memoryview):
        head = bytes(ref.data[:3])
    else:
        return getattr(ref.data, "format", None) == "JPEG"
    return head == b"\xff\xd8\xff"


def _probe(m: Media, fps: float, max_frames: int) -> None:
    """Hash and read the header (image) / metadata (video) of one media, in place."""
    try:
        m.key = media_hash(m.ref)
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


def _media_key(kind: str, ref: MediaRef) -> tuple[str, Any]:
    return (kind, ref.path) if ref.path is not None else (kind, id(ref.data))


def record_media(r: Record, table: MediaTable) -> list[Media]:
    return [table[_media_key("image", x)] for x in r.images] + [
        table[_media_key("video", x)] for x in r.videos
    ]


def probe_media(
    records: list[Record], problems: list[Problem], opts: Options
) -> tuple[MediaTable, list[Record]]:
    """Every unique media probed (threads: hashing and header reads release the GIL), and
    the records whose media all opened; the others' reasons are added to ``problems``."""
    table: MediaTable = {}
    for r in records:
        for kind, refs in (("image", r.images), ("video", r.videos)):
            for ref in refs:
                table.setdefault(_media_key(kind, ref), Media(kind, ref))
    if table:
        fps, max_frames = opts.video_fps, opts.video_max_frames
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            list(pool.map(lambda m: _probe(m, fps, max_frames), table.values()))
    for r in records:
        reasons = list(dict.fromkeys(m.error for m in record_media(r, table) if m.error))
        problems += [Problem(r.source, r.index, reason) for reason in reasons]
    fail_or_continue(problems, opts.on_error)
    records = [r for r in records if not any(m.error for m in record_media(r, table))]
    return table, records
