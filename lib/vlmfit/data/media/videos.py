"""Videos through PyAV: metadata (:func:`probe_video`), and frames sampled uniformly in
time (:func:`sample_video`), seeking on long videos yet picking the frames a sequential
decode would (why not transformers' ``load_video``: :func:`sample_video`).
"""

from __future__ import annotations

import bisect
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from PIL import Image

from vlmfit.data.media.sources import MediaError, Source, resolve, sniff_unsupported
from vlmfit.data.records import MediaRef

VideoInput = MediaRef | str | os.PathLike[str] | bytes | bytearray | memoryview


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` reads: displayed size (after rotation metadata), frame rate,
    frame count and duration in seconds; ``rotation`` is the counter-clockwise display
    rotation (0, 90, 180, 270) that :func:`sample_video` applies to frames."""

    width: int
    height: int
    fps: float
    frames: int
    duration: float
    rotation: int = 0


# Seeking policy: with a keyframe index, seek when the keyframe before the next target is
# more than _MIN_SKIP_S ahead of the decoder; without one, when the target is more than
# _SEEK_GAP_S ahead (then back off by that much if the seek lands past the target).
_MIN_SKIP_S = 1.0
_SEEK_GAP_S = 4.0
_SEEK_RETRIES = 3


def _open_container(src: Source) -> Any:
    import av  # deferred: importing FFmpeg costs ~0.1 s and image-only users never need it

    target: str | IO[bytes] = src.path if src.path is not None else io.BytesIO(src.data or b"")
    try:
        return av.open(target, mode="r")
    except FileNotFoundError:
        raise MediaError(f"video not found: {src.desc}", code="missing") from None
    except av.FFmpegError as e:
        what = sniff_unsupported(src.head())
        hint = f"; looks like {what}" if what and "video" not in what else ""
        raise MediaError(
            f"cannot read video (corrupt or not a video): {src.desc} ({e.strerror or e}{hint})"
        ) from None
    except Exception as e:
        raise MediaError(f"cannot read video: {src.desc} ({type(e).__name__}: {e})") from None


def _video_stream(container: Any, src: Source) -> Any:
    if not container.streams.video:
        raise MediaError(f"no video stream: {src.desc}", code="no_video")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads; output is identical, only faster
    return stream


def _rate(stream: Any) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and math.isfinite(float(rate)) and float(rate) > 0:
            return float(rate)
    return 0.0


def _norm_rotation(degrees: float | None) -> int:
    return int(round((degrees or 0) / 90.0)) * 90 % 360


def _count_packets(src: Source) -> tuple[int, float]:
    """Frame count and duration from the packets alone (no decoding), for streams whose
    container states neither (e.g. WebM without cues, raw elementary streams)."""
    with _open_container(src) as container:
        stream = _video_stream(container, src)
        pts = [p.pts for p in container.demux(stream) if p.size and p.pts is not None]
        tb = stream.time_base
    if not pts or not tb:
        return len(pts), 0.0
    span = float((max(pts) - min(pts)) * tb)
    return len(pts), span + (span / (len(pts) - 1) if len(pts) > 1 else 0.0)


def probe_video(ref: VideoInput) -> VideoInfo:
    """Read a video's metadata through PyAV, plus its first frame (which proves the
    stream decodes and carries the display rotation).

    Raises :class:`MediaError` for a missing, empty or corrupt file, or one with no
    video stream.
    """
    src = resolve(ref, "video")
    with _open_container(src) as container:
        stream = _video_stream(container, src)
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        fps, tb = _rate(stream), stream.time_base
        frames = int(stream.frames or 0)
        duration = 0.0
        if stream.duration and tb:
            duration = float(stream.duration * tb)
        elif container.duration:
            duration = container.duration / 1_000_000  # AV_TIME_BASE
        try:
            first = next(iter(container.decode(stream)), None)
        except Exception as e:
            raise MediaError(f"corrupt video data: {src.desc} ({type(e).__name__}: {e})") from None
    if first is None:
        raise MediaError(f"video has no decodable frames: {src.desc}", code="empty")
    if not duration and frames and fps:
        duration = frames / fps
    if not frames and duration and fps:
        frames = max(1, round(duration * fps))
    if not frames or not duration:
        counted, span = _count_packets(src)
        frames, duration = frames or counted, duration or span
    if not fps and duration and frames:
        fps = frames / duration
    width, height = width or first.width, height or first.height
    if width <= 0 or height <= 0:
        raise MediaError(f"zero-size video ({width}x{height}): {src.desc}", code="empty")
    rotation = _norm_rotation(getattr(first, "rotation", 0))
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(width, height, fps, frames, duration, rotation)


def sample_count(
    info: VideoInfo,
    *,
    fps: float = 2.0,
    max_frames: int = 32,
    min_frames: int = 2,
    frame_multiple: int = 2,
) -> int:
    """How many frames :func:`sample_video` returns for a video (for token budgeting).

    ``duration * fps`` frames, floored; clamped to ``[min_frames, max_frames]`` and to the
    frames the video has; rounded down to a multiple of ``frame_multiple`` (Qwen2-VL's
    temporal patch is 2), but never below ``frame_multiple`` (frames repeat if need be).
    """
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps}")
    if frame_multiple < 1 or max_frames < 1 or min_frames < 0:
        raise ValueError("need frame_multiple >= 1, max_frames >= 1 and min_frames >= 0")
    n = math.floor(max(info.duration, 0.0) * fps + 1e-9)
    n = min(max(n, min_frames), max_frames)
    if info.frames > 0:
        n = min(n, info.frames)
    return max(n // frame_multiple * frame_multiple, frame_multiple)


class _SeekFailed(Exception):
    """Seeking gave unusable output; decode sequentially instead."""


def _frame_to_image(frame: Any) -> Image.Image:
    img = frame.to_image()  # rgb24 through swscale
    if img.mode != "RGB":
        img = img.convert("RGB")
    rotation = _norm_rotation(getattr(frame, "rotation", 0))
    if rotation:
        img = img.transpose(
            {
                90: Image.Transpose.ROTATE_90,
                180: Image.Transpose.ROTATE_180,
                270: Image.Transpose.ROTATE_270,
            }[rotation]
        )
    return img


class _Cursor:
    """Decodes forward through one video stream, remembering the last frame at or before
    the current target (``prev``) and the first one after it (``pending``): at most two
    decoded frames are alive at any time."""

    def __init__(self, container: Any, stream: Any, *, strict_pts: bool):
        self.container, self.stream = container, stream
        self.tb = stream.time_base
        start = stream.start_time
        self.origin = float(start * self.tb) if start is not None and self.tb else 0.0
        self.fps = _rate(stream) or 25.0
        self.strict_pts = strict_pts  # missing timestamps: fail (seeking) or count frames
        self.decoded: Iterator[Any] | None = None
        self.gap_seeks = True  # index-less seeking still pays off (see _maybe_seek)
        self.restart(None)

    def restart(self, seek_to: float | None) -> None:
        """Decode from the start (``None``: only before any decoding), or from the keyframe
        at or before ``seek_to`` seconds."""
        if seek_to is not None:
            offset = int(math.floor((self.origin + seek_to) / float(self.tb)))
            self.container.seek(offset, stream=self.stream, backward=True, any_frame=False)
        self.decoded = iter(self.container.decode(self.stream))
        self.prev: Any = None
        self.prev_t = -math.inf
        self.pending: Any = None
        self.pending_t = math.inf
        self.index = 0 if seek_to is None else -1  # frame counter, valid only from the start
        self.first_t: float | None = None  # time of the first frame decoded since (re)start

    def _time(self, frame: Any) -> float:
        if frame.pts is None or not self.tb:
            if self.strict_pts or self.index < 0:
                raise _SeekFailed
            return self.index / self.fps
        return float(frame.pts * self.tb) - self.origin

    def advance(self, target: float, eps: float = 1e-6) -> None:
        """Decode until the next frame lies after ``target``."""
        assert self.decoded is not None
        if self.pending is not None:
            if self.pending_t > target + eps:
                return
            self.prev, self.prev_t, self.pending = self.pending, self.pending_t, None
        for frame in self.decoded:
            t = self._time(frame)
            if self.first_t is None:
                self.first_t = t
            if self.index >= 0:
                self.index += 1
            if t > target + eps:
                self.pending, self.pending_t = frame, t
                return
            self.prev, self.prev_t = frame, t

    @property
    def position(self) -> float:
        """Time of the last frame decoded (0 before the first)."""
        if self.pending is not None:
            return self.pending_t
        return max(self.prev_t, 0.0)


def _pick_frames(
    src: Source, targets: list[float], *, allow_seek: bool
) -> tuple[list[Image.Image], list[float]]:
    """For each target time (seconds from the stream start, ascending), the frame on screen
    then: the last frame whose timestamp is <= the target (the first frame for targets
    before it), with that frame's timestamp.

    With ``allow_seek``, jumps ahead to the keyframe before a target when that skips
    decoding (see ``_MIN_SKIP_S`` / ``_SEEK_GAP_S``); if a seek keeps landing after its
    target, or timestamps are missing, raises :class:`_SeekFailed` and the caller decodes
    sequentially. Both ways pick the same frames.
    """
    eps = 1e-6
    images: list[Image.Image] = []
    times: list[float] = []
    with _open_container(src) as container:
        stream = _video_stream(container, src)
        cur = _Cursor(container, stream, strict_pts=allow_seek)
        keyframes: list[float] = []
        if allow_seek and cur.tb:
            keyframes = _keyframe_index(stream, cur)
        last_t: float | None = None
        last_img: Image.Image | None = None
        for target in targets:
            if allow_seek:
                _maybe_seek(cur, keyframes, target, eps)
            cur.advance(target, eps)
            if cur.prev is not None:
                chosen, chosen_t = cur.prev, cur.prev_t
            elif cur.pending is not None:  # target before the first frame
                chosen, chosen_t = cur.pending, cur.pending_t
            else:
                raise MediaError(f"video has no decodable frames: {src.desc}", code="empty")
            if chosen_t == last_t and last_img is not None:
                img = last_img.copy()  # the same frame again (short video): a separate image
            else:
                img = last_img = _frame_to_image(chosen)
            last_t = chosen_t
            images.append(img)
            times.append(max(chosen_t, 0.0))
    return images, times


def _keyframe_index(stream: Any, cur: _Cursor) -> list[float]:
    """Keyframe times (s, from the stream start) from the container's index, or ``[]`` when
    the index is missing or too sparse to trust (e.g. Matroska cues naming one keyframe).

    Index timestamps are DTS, which is <= PTS: a safe point to seek to for a target.
    """
    try:
        entries = list(stream.index_entries)
    except Exception:
        return []
    keys = sorted(float(e.timestamp * cur.tb) - cur.origin for e in entries if e.is_keyframe)
    complete = len(entries) > len(keys)  # a full sample table (MP4, AVI), not just cues
    return keys if keys and (complete or len(keys) >= 2) else []


def _maybe_seek(cur: _Cursor, keyframes: list[float], target: float, eps: float) -> None:
    """Seek ``cur`` towards ``target`` when that skips decoding; verify the landing."""
    where = cur.position
    if keyframes:
        k = bisect.bisect_right(keyframes, target + eps) - 1
        if k < 0 or keyframes[k] <= where + _MIN_SKIP_S:
            return
        candidates = [keyframes[i] for i in range(k, max(k - _SEEK_RETRIES, 0) - 1, -1)]
    else:
        if not cur.gap_seeks or target - where <= _SEEK_GAP_S:
            return
        candidates = [target - i * _SEEK_GAP_S for i in range(_SEEK_RETRIES + 1)]
    for pos in candidates:
        cur.restart(max(pos, 0.0))
        cur.advance(target, eps)
        if cur.prev is not None:
            if not keyframes and cur.first_t is not None and cur.first_t <= where + eps:
                cur.gap_seeks = False  # landed behind where we were: keyframes too sparse
            return
    raise _SeekFailed  # seeks landed after the target: inexact seeking in this container


def sample_video(
    ref: VideoInput,
    *,
    fps: float = 2.0,
    max_frames: int = 32,
    min_frames: int = 2,
    frame_multiple: int = 2,
) -> tuple[list[Image.Image], list[float]]:
    """Sample RGB frames uniformly in time; return ``(frames, timestamps_in_seconds)``.

    The count is :func:`sample_count` of :func:`probe_video`; the ``n`` target times are the
    centres of ``n`` equal slices of the duration, and each gives the frame on screen at
    that time, with its own timestamp (seconds from the stream start; a frame repeats only
    when the video has fewer frames than asked). Frames carry the display rotation.
    Deterministic: seeking (long videos with a keyframe index) picks exactly the frames a
    full sequential decode would, and never holds more than two decoded frames besides the
    results.

    Not ``transformers.video_utils.load_video``: its PyAV reader decodes from the start to
    the last frame it picks (no seeking), picks by frame index rather than time, ignores the
    display rotation and names no file in its errors.
    """
    src = resolve(ref, "video")
    info = probe_video(ref)
    n = sample_count(
        info, fps=fps, max_frames=max_frames, min_frames=min_frames, frame_multiple=frame_multiple
    )
    targets = [(i + 0.5) * info.duration / n for i in range(n)]
    try:
        try:
            return _pick_frames(src, targets, allow_seek=True)
        except _SeekFailed:
            return _pick_frames(src, targets, allow_seek=False)
    except MediaError:
        raise
    except Exception as e:  # decoder errors midway through a damaged file
        raise MediaError(f"corrupt video data: {src.desc} ({type(e).__name__}: {e})") from None
