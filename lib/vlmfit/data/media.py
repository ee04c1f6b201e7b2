"""Opening images and videos robustly.

Every reader and every later stage goes through this module to touch pixels, so that
all of them agree on what an image *is*:

- :func:`open_image` returns a fully decoded RGB :class:`PIL.Image.Image` with the EXIF
  orientation applied, whatever the source mode (palette, alpha, CMYK, 16-bit, float...).
  Transparent pixels are composited over white.
- :func:`image_size` reads the (oriented) size from the header only, for token
  budgeting of many images; :func:`check_image` decodes fully to validate.
- :func:`probe_video` / :func:`sample_video` read videos through PyAV: metadata, and
  frames sampled uniformly in time (with seeking on long videos).
- :func:`resize_image` is the one high-quality resize.

Every failure is a :class:`MediaError` whose message is a one-line reason naming the
media as the data named it (``MediaRef.describe()``), ready for ``FILE:RECORD: reason``.

Pillow's process-wide settings are left alone: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
never enabled (truncated files are errors) and ``Image.MAX_IMAGE_PIXELS`` is never
changed; the decompression-bomb limit is our own per-call ``max_pixels``, checked on the
header before any pixel is decoded.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps

from vlmfit.records import MediaRef

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MediaError",
    "VideoInfo",
    "check_image",
    "image_size",
    "open_image",
    "probe_video",
    "resize_image",
    "sample_count",
    "sample_video",
    "to_rgb",
]

DEFAULT_MAX_PIXELS: int = 64 * 2**20
"""Largest image (width * height) opened by default: 67,108,864 pixels (e.g. 8192 x 8192)."""

ImageInput = MediaRef | str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image
VideoInput = MediaRef | str | os.PathLike[str] | bytes | bytearray | memoryview

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 / 270 degrees


class MediaError(ValueError):
    """An image or video that cannot be used; ``str(err)`` is a one-line reason.

    ``code`` classifies the failure for summaries: ``missing``, ``empty``, ``corrupt``,
    ``truncated``, ``unsupported``, ``too_large``, ``no_video``.
    """

    def __init__(self, reason: str, *, code: str = "corrupt"):
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:  # keep ``code`` across process boundaries
        return (_make_media_error, (self.reason, self.code))


def _make_media_error(reason: str, code: str) -> MediaError:
    return MediaError(reason, code=code)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    """A resolved media input: a filesystem path, in-memory bytes, or a PIL image."""

    desc: str
    path: str | None = None
    data: bytes | None = None
    image: Image.Image | None = None

    def size_bytes(self) -> int | None:
        if self.data is not None:
            return len(self.data)
        if self.path is not None:
            try:
                return os.stat(self.path).st_size
            except OSError:
                return None
        return None

    def head(self, n: int = 32) -> bytes:
        """The first ``n`` bytes (for format sniffing in error messages)."""
        if self.data is not None:
            return self.data[:n]
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    return f.read(n)
            except OSError:
                return b""
        return b""


def _resolve(ref: Any, kind: str) -> _Source:
    """Turn any accepted input into a :class:`_Source`, checking that files exist."""
    desc: str | None = None
    if isinstance(ref, MediaRef):
        desc = ref.describe()
        ref = ref.path if ref.path is not None else ref.data
        if ref is None:
            raise MediaError(
                f"{kind} reference has neither a path nor data: {desc}", code="missing"
            )
    if isinstance(ref, dict):  # Hugging Face datasets' undecoded Image(): {"bytes", "path"}
        if ref.get("bytes") is not None:
            ref = ref["bytes"]
        elif ref.get("path"):
            ref = ref["path"]
        else:
            raise MediaError(f"{kind} has neither bytes nor path: {desc or ref!r}", code="missing")
    if isinstance(ref, Image.Image):
        if kind != "image":
            raise MediaError(f"expected a video, got a PIL image: {desc or '<PIL image>'}")
        return _Source(desc=desc or "<PIL image>", image=ref)
    if isinstance(ref, bytes | bytearray | memoryview):
        data = bytes(ref)
        src = _Source(desc=desc or f"<embedded {kind} bytes>", data=data)
        if not data:
            raise MediaError(f"empty {kind} data (0 bytes): {src.desc}", code="empty")
        return src
    if isinstance(ref, str | os.PathLike):
        path = os.fspath(ref)
        src = _Source(desc=desc or path, path=path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise MediaError(f"{kind} not found: {src.desc}", code="missing") from None
        except OSError as e:
            raise MediaError(f"cannot read {kind}: {src.desc} ({e.strerror or e})") from None
        if not os.path.isfile(path):
            raise MediaError(f"{kind} path is not a file: {src.desc}", code="missing")
        if st.st_size == 0:
            raise MediaError(f"empty {kind} file (0 bytes): {src.desc}", code="empty")
        return src
    raise TypeError(f"cannot open {kind} from {type(ref).__name__}")


# --------------------------------------------------------------------------- images

_SIGNATURES: list[tuple[bytes, int, str]] = [
    # (magic, offset, name) of formats Pillow cannot read without plugins, for clearer errors
    (b"ftypheic", 4, "HEIC (needs the pillow-heif plugin)"),
    (b"ftypheix", 4, "HEIC (needs the pillow-heif plugin)"),
    (b"ftyphevc", 4, "HEIC (needs the pillow-heif plugin)"),
    (b"ftypmif1", 4, "HEIF (needs the pillow-heif plugin)"),
    (b"ftypmsf1", 4, "HEIF (needs the pillow-heif plugin)"),
    (b"ftypavif", 4, "AVIF (this Pillow build has no AVIF support)"),
    (b"ftypisom", 4, "MP4 video (not an image)"),
    (b"ftypmp4", 4, "MP4 video (not an image)"),
    (b"%PDF", 0, "PDF (not an image)"),
    (b"<svg", 0, "SVG (vector graphics are not supported)"),
    (b"<?xml", 0, "XML/SVG (vector graphics are not supported)"),
    (b"\x1a\x45\xdf\xa3", 0, "Matroska/WebM video (not an image)"),
    (b"II*\x00", 0, "TIFF variant this Pillow build cannot read"),
    (b"MM\x00*", 0, "TIFF variant this Pillow build cannot read"),
]


def _sniff_unsupported(head: bytes) -> str | None:
    for magic, offset, name in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def _declared_truncated(src: _Source) -> bool:
    """True for RIFF (WebP) files shorter than their header says; Pillow's WebP error
    ("could not create decoder object") does not say *truncated* by itself."""
    head, size = src.head(12), src.size_bytes()
    if size is None or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return False
    return int.from_bytes(head[4:8], "little") + 8 > size


def _decode_error(src: _Source, exc: BaseException, stage: str) -> MediaError:
    """Classify an exception raised by Pillow while opening (``stage='header'``) or
    decoding (``stage='data'``) into a :class:`MediaError`."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        return MediaError(
            f"image too large (possible decompression bomb): {src.desc} ({msg}; this is "
            "Pillow's process-wide Image.MAX_IMAGE_PIXELS)",
            code="too_large",
        )
    low = msg.lower()
    if "truncated" in low or _declared_truncated(src):
        return MediaError(f"truncated image: {src.desc} ({msg})", code="truncated")
    if isinstance(exc, Image.UnidentifiedImageError):
        what = _sniff_unsupported(src.head())
        if what:
            return MediaError(f"unsupported image format {what}: {src.desc}", code="unsupported")
        return MediaError(
            f"cannot identify image file (corrupt or not an image): {src.desc}", code="corrupt"
        )
    if "not available" in low or "unsupported" in low or "not supported" in low:
        return MediaError(f"unsupported image encoding: {src.desc} ({msg})", code="unsupported")
    what = "header" if stage == "header" else "data"
    return MediaError(f"corrupt image {what}: {src.desc} ({type(exc).__name__}: {msg})")


def _check_pixels(src: _Source, size: tuple[int, int], max_pixels: int | None) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise MediaError(f"zero-size image ({w}x{h}): {src.desc}", code="empty")
    if max_pixels is not None and w * h > max_pixels:
        raise MediaError(
            f"image too large: {src.desc} is {w}x{h} = {w * h:,} pixels, over the limit of "
            f"{max_pixels:,} (max_pixels; possible decompression bomb)",
            code="too_large",
        )


def _open_header(src: _Source, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (header only) with every failure as :class:`MediaError` and the
    pixel limit checked. The caller closes the returned image."""
    fp: str | IO[bytes] = src.path if src.path is not None else io.BytesIO(src.data or b"")
    try:
        # Our own max_pixels is the limit; Pillow's global one only warns (or raises at 2x).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except FileNotFoundError:
        raise MediaError(f"image not found: {src.desc}", code="missing") from None
    except Exception as e:  # untrusted bytes: any decoder failure is a bad file
        raise _decode_error(src, e, "header") from e
    try:
        _check_pixels(src, im.size, max_pixels)
    except MediaError:
        im.close()
        raise
    return im


def _full_load(src: _Source, im: Image.Image) -> None:
    """Decode every pixel now, so truncation and corruption surface here."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone enabled it process-wide; say so, once
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled globally: truncated images "
            "will load with grey areas instead of raising MediaError",
            RuntimeWarning,
            stacklevel=3,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Exception as e:
        raise _decode_error(src, e, "data") from e


def _orientation(im: Image.Image, *, header_only: bool) -> int:
    """EXIF (or XMP) orientation 1-8, as ``ImageOps.exif_transpose`` would apply it.

    ``header_only`` uses the base-class ``getexif`` (what Pillow parsed with the header),
    so that a PNG is not decoded just for this.
    """
    try:
        exif = Image.Image.getexif(im) if header_only else im.getexif()
        value = exif.get(_ORIENTATION_TAG, 1)
        return int(value) if 1 <= int(value) <= 8 else 1
    except Exception:  # malformed EXIF must not make a good image unusable
        return 1


def _oriented_size(im: Image.Image, orientation: int) -> tuple[int, int]:
    w, h = im.size
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF / XMP: keep the pixels as stored
        out = im
    return out


def _to_uint8_gray(arr: np.ndarray, *, sixteen_bit: bool) -> np.ndarray:
    """Map a high-bit-depth or float grey array to uint8 without clipping its range."""
    if arr.dtype.kind == "f":
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:  # normalised floats
            a = a * 255.0
        elif not (lo >= 0.0 and hi <= 255.0):  # arbitrary range (depth maps...): stretch
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = arr.astype(np.int64)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if sixteen_bit or (lo >= 0 and hi <= 65535):
        # exact 0..65535 -> 0..255 with rounding: 65535 -> 255, 32768 -> 128, 0 -> 0
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    if hi > lo:  # 32-bit data outside the 16-bit range: stretch min..max
        return ((a - lo) * 255 // (hi - lo)).astype(np.uint8)
    return np.full(a.shape, 0 if hi <= 0 else 255, np.uint8)


def _over_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert an image in any Pillow mode to RGB (a new image unless already RGB).

    Alpha (RGBA, LA, PA, P/L/RGB with a transparency key, P with an RGBA palette,
    premultiplied modes) is composited over white; 16-bit integer modes are scaled (not
    clipped) to 8 bits; ``I`` is treated as 16-bit when its values fit, else stretched;
    ``F`` is taken as 0..1 or 0..255 when it fits, else stretched; CMYK uses its embedded
    ICC profile when there is one (other modes' ICC profiles are not applied).
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        gray = _to_uint8_gray(np.asarray(im), sixteen_bit=mode.startswith("I;16"))
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa"):
        return _over_white(im.convert("RGBA"))
    if mode == "La":
        return _over_white(im.convert("LA").convert("RGBA"))
    if ("transparency" in im.info and mode in ("P", "L", "RGB", "1")) or (
        mode == "P" and im.palette is not None and im.palette.mode == "RGBA"
    ):
        return _over_white(im.convert("RGBA"))
    if mode == "CMYK" and im.info.get("icc_profile"):
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
            out = ImageCms.profileToProfile(
                im, profile, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
            if out is not None:
                return out
        except Exception:  # broken profile: fall back to Pillow's plain formula
            pass
    try:
        return im.convert("RGB")
    except Exception as e:
        raise MediaError(f"unsupported image mode {mode!r} ({e})", code="unsupported") from e


def _finish(im: Image.Image) -> Image.Image:
    """Orient and convert a decoded image; the result is always a new, file-free image."""
    out = to_rgb(_exif_transpose(im))
    return im.copy() if out is im else out


def open_image(ref: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image fully decoded, EXIF-oriented and in RGB.

    ``ref`` is a :class:`MediaRef` (its ``path``, else its ``data``), a path, encoded
    bytes, or a PIL image (copied; a lazily opened one gets loaded, nothing else changes).
    Multi-frame files give their first frame. ``max_pixels`` (``None``: no limit of ours)
    is checked on the header before any pixel is decoded.

    Raises :class:`MediaError` (missing, empty, corrupt, truncated, unsupported, too large).
    """
    src = _resolve(ref, "image")
    if src.image is not None:
        _check_pixels(src, src.image.size, max_pixels)
        _full_load(src, src.image)
        return _finish(src.image)
    im = _open_header(src, max_pixels)
    try:
        _full_load(src, im)
        return _finish(im)
    finally:
        im.close()


def image_size(ref: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` as :func:`open_image` would return it, from the header only.

    Fast (no pixel decoding), for budgeting thousands of images; a file that is corrupt
    past its header passes here and fails in :func:`check_image` / :func:`open_image`.
    (EXIF placed after a PNG's image data is only seen by the full decode.)
    """
    src = _resolve(ref, "image")
    if src.image is not None:
        _check_pixels(src, src.image.size, max_pixels)
        return _oriented_size(src.image, _orientation(src.image, header_only=False))
    im = _open_header(src, max_pixels)
    try:
        return _oriented_size(im, _orientation(im, header_only=True))
    finally:
        im.close()


def check_image(ref: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Validate an image by decoding it fully; return its oriented ``(width, height)``.

    Raises :class:`MediaError` exactly where :func:`open_image` would.
    """
    return open_image(ref, max_pixels=max_pixels).size


def resize_image(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to ``size`` = ``(width, height)`` with high quality.

    Downscaling uses LANCZOS (with ``reducing_gap=3.0``, which first box-reduces by an
    integer factor on big downscales: much faster, visually identical); pure upscaling
    uses BICUBIC; a mixed resize (up one axis, down the other) uses LANCZOS. Same size:
    the image itself is returned. The mode is kept.
    """
    w, h = (int(size[0]), int(size[1]))
    if (w, h) != tuple(size) or w <= 0 or h <= 0:
        raise ValueError(f"resize_image: size must be two positive integers, got {size!r}")
    if img.size == (w, h):
        return img
    if w >= img.width and h >= img.height:
        return img.resize((w, h), Image.Resampling.BICUBIC)
    return img.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)


# --------------------------------------------------------------------------- videos


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


def _open_container(src: _Source) -> Any:
    import av  # deferred: importing FFmpeg costs ~0.1 s and image-only users never need it

    target: str | IO[bytes] = src.path if src.path is not None else io.BytesIO(src.data or b"")
    try:
        return av.open(target, mode="r")
    except FileNotFoundError:
        raise MediaError(f"video not found: {src.desc}", code="missing") from None
    except av.FFmpegError as e:
        what = _sniff_unsupported(src.head())
        hint = f"; looks like {what}" if what and "video" not in what else ""
        raise MediaError(
            f"cannot read video (corrupt or not a video): {src.desc} ({e.strerror or e}{hint})"
        ) from None
    except Exception as e:
        raise MediaError(f"cannot read video: {src.desc} ({type(e).__name__}: {e})") from None


def _video_stream(container: Any, src: _Source) -> Any:
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


def _count_packets(src: _Source) -> tuple[int, float]:
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
    src = _resolve(ref, "video")
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
    src: _Source, targets: list[float], *, allow_seek: bool
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
    """
    src = _resolve(ref, "video")
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
