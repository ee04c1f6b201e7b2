"""Media inputs resolved to a path, bytes or a PIL image, and :class:`MediaError`, the one
error every reader raises: a one-line reason naming the media as the data named it
(``MediaRef.describe()``), ready for ``FILE:RECORD: reason``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlmfit.data.records import MediaRef


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


@dataclass(frozen=True)
class Source:
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


def resolve(ref: Any, kind: str) -> Source:
    """Turn any accepted input into a :class:`Source`, checking that files exist."""
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
        return Source(desc=desc or "<PIL image>", image=ref)
    if isinstance(ref, bytes | bytearray | memoryview):
        data = bytes(ref)
        src = Source(desc=desc or f"<embedded {kind} bytes>", data=data)
        if not data:
            raise MediaError(f"empty {kind} data (0 bytes): {src.desc}", code="empty")
        return src
    if isinstance(ref, str | os.PathLike):
        path = os.fspath(ref)
        src = Source(desc=desc or path, path=path)
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


def sniff_unsupported(head: bytes) -> str | None:
    for magic, offset, name in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None
