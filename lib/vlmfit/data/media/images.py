"""Images: open fully decoded, EXIF-oriented and in RGB (:func:`open_image`), read the
oriented size from the header only (:func:`image_size`), and the one high-quality resize.

Pillow's process-wide settings are left alone (why, and why not transformers' ``load_image``:
:func:`open_image`).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps

from vlmfit.data.media.sources import MediaError, Source, resolve, sniff_unsupported
from vlmfit.data.records import MediaRef

DEFAULT_MAX_PIXELS: int = 64 * 2**20
"""Largest image (width * height) opened by default: 67,108,864 pixels (e.g. 8192 x 8192)."""

ImageInput = MediaRef | str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 / 270 degrees


def _declared_truncated(src: Source) -> bool:
    """True for RIFF (WebP) files shorter than their header says; Pillow's WebP error
    ("could not create decoder object") does not say *truncated* by itself."""
    head, size = src.head(12), src.size_bytes()
    if size is None or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return False
    return int.from_bytes(head[4:8], "little") + 8 > size


def _decode_error(src: Source, exc: BaseException, stage: str) -> MediaError:
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
        what = sniff_unsupported(src.head())
        if what:
            return MediaError(f"unsupported image format {what}: {src.desc}", code="unsupported")
        return MediaError(
            f"cannot identify image file (corrupt or not an image): {src.desc}", code="corrupt"
        )
    if "not available" in low or "unsupported" in low or "not supported" in low:
        return MediaError(f"unsupported image encoding: {src.desc} ({msg})", code="unsupported")
    what = "header" if stage == "header" else "data"
    return MediaError(f"corrupt image {what}: {src.desc} ({type(exc).__name__}: {msg})")


def _check_pixels(src: Source, size: tuple[int, int], max_pixels: int | None) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise MediaError(f"zero-size image ({w}x{h}): {src.desc}", code="empty")
    if max_pixels is not None and w * h > max_pixels:
        raise MediaError(
            f"image too large: {src.desc} is {w}x{h} = {w * h:,} pixels, over the limit of "
            f"{max_pixels:,} (max_pixels; possible decompression bomb)",
            code="too_large",
        )


def _open_header(src: Source, max_pixels: int | None) -> Image.Image:
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


def _full_load(src: Source, im: Image.Image) -> None:
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

    Pillow's process-wide settings are left alone: truncated files are errors and the
    decompression-bomb limit is our own per-call ``max_pixels``, checked on the header.
    Not ``transformers.image_utils.load_image`` (the same EXIF turn and RGB): for user data
    vlmfit needs errors naming the file and their kind, truncation and colour-profile
    handling, and the size from the header without decoding.
    """
    src = resolve(ref, "image")
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
    src = resolve(ref, "image")
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
