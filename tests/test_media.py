"""Tests for vlmfit.data.media: images in every mode, EXIF orientation, broken files,
decompression bombs, video probing / sampling (incl. seeking), resizing.

Fixtures are built in ``tmp_path``; LLaMA-Factory's demo videos, where present, are only read.
"""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageFile

from vlmfit.data import media
from vlmfit.data.media import (
    MediaError,
    VideoInfo,
    check_image,
    image_size,
    open_image,
    probe_video,
    resize_image,
    sample_count,
    sample_video,
)
from vlmfit.data.records import MediaRef

DEMO = Path(__file__).resolve().parents[2] / "shared/fixtures/llamafactory_mllm_demo/mllm_demo_data"
needs_demo = pytest.mark.skipif(not DEMO.is_dir(), reason="demo media not available")


def px(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def close_to(a: tuple[int, ...], b: tuple[int, ...], tol: int) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw: object) -> Path:
    img.save(path, fmt, **kw)
    return path


# --------------------------------------------------------------------------- modes


def _palette(mode: str = "P") -> Image.Image:
    im = Image.new(mode, (2, 1))
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    return im


def _mode_cases() -> list[tuple[str, Image.Image, list[tuple[tuple[int, int], tuple[int, ...]]]]]:
    """(name, image, [(pixel, expected RGB)]) for every mode, all passed as PIL input."""
    cases = []
    rgba = Image.new("RGBA", (3, 1), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (255, 0, 0, 128))  # half red over white
    cases.append(("RGBA", rgba, [((0, 0), (255, 255, 255)), ((1, 0), (255, 0, 0))]))
    cases.append(("RGBA-half", rgba, [((2, 0), (255, 127, 127))]))
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (40, 255))
    cases.append(("LA", la, [((0, 0), (255, 255, 255)), ((1, 0), (40, 40, 40))]))
    pa = _palette("PA")
    pa.putpixel((0, 0), (0, 255))
    pa.putpixel((1, 0), (1, 0))
    cases.append(("PA", pa, [((0, 0), (10, 20, 30)), ((1, 0), (255, 255, 255))]))
    p = _palette()
    p.putpixel((1, 0), 1)
    cases.append(("P", p, [((0, 0), (10, 20, 30)), ((1, 0), (200, 100, 50))]))
    pt = _palette()
    pt.putpixel((1, 0), 1)
    pt.info["transparency"] = 0
    cases.append(("P+transparency", pt, [((0, 0), (255, 255, 255)), ((1, 0), (200, 100, 50))]))
    prgba = Image.new("P", (2, 1))
    prgba.putpalette([10, 20, 30, 0, 200, 100, 50, 255], rawmode="RGBA")
    prgba.putpixel((1, 0), 1)
    cases.append(("P+RGBA-palette", prgba, [((0, 0), (255, 255, 255)), ((1, 0), (200, 100, 50))]))
    cases.append(("L", Image.new("L", (1, 1), 77), [((0, 0), (77, 77, 77))]))
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    cases.append(("1", one, [((0, 0), (0, 0, 0)), ((1, 0), (255, 255, 255))]))
    cases.append(("CMYK", Image.new("CMYK", (1, 1), (255, 0, 0, 0)), [((0, 0), (0, 255, 255))]))
    sixteen = np.array([[0, 32768, 65535]], dtype=np.uint16)
    expected16 = [((0, 0), (0, 0, 0)), ((1, 0), (128, 128, 128)), ((2, 0), (255, 255, 255))]
    cases.append(("I;16", Image.fromarray(sixteen), expected16))
    big_endian = Image.frombytes("I;16B", (3, 1), sixteen.astype(">u2").tobytes())
    cases.append(("I;16B", big_endian, expected16))
    cases.append(("I", Image.fromarray(sixteen.astype(np.int32)), expected16))
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    cases.append(("F", Image.fromarray(floats), expected16))
    ycc = Image.new("RGB", (1, 1), (200, 50, 50)).convert("YCbCr")
    cases.append(("YCbCr", ycc, [((0, 0), (200, 50, 50))]))
    rgb_a = Image.new("RGBA", (1, 1), (0, 0, 255, 0)).convert("RGBa")
    cases.append(("RGBa", rgb_a, [((0, 0), (255, 255, 255))]))
    cases.append(("RGB", Image.new("RGB", (1, 1), (1, 2, 3)), [((0, 0), (1, 2, 3))]))
    return cases


@pytest.mark.parametrize(
    "name,image,expected", _mode_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_mode_becomes_rgb(name, image, expected):
    mode = image.mode
    out = open_image(image)
    assert out.mode == "RGB" and out.size == image.size
    assert out is not image and image.mode == mode  # the caller's image is untouched
    for xy, rgb in expected:
        assert close_to(px(out, xy), rgb, 4), (name, xy, px(out, xy), rgb)


def test_modes_from_files(tmp_path):
    # P + tRNS and 16-bit grey written by Pillow as PNG, CMYK as JPEG and TIFF
    pt = _palette()
    pt.putpixel((1, 0), 1)
    out = open_image(save(pt, tmp_path / "p.png", transparency=0))
    assert px(out, (0, 0)) == (255, 255, 255) and px(out, (1, 0)) == (200, 100, 50)

    g16 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    path = save(g16, tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    out = open_image(path)
    assert [px(out, (x, 0))[0] for x in range(3)] == [0, 128, 255]

    cyan = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    for name in ("cmyk.jpg", "cmyk.tif"):
        out = open_image(save(cyan, tmp_path / name))
        assert close_to(px(out, (4, 4)), (0, 255, 255), 8), (name, px(out, (4, 4)))


# --------------------------------------------------------------------------- EXIF


def _marked(w: int = 64, h: int = 32) -> Image.Image:
    """Grey w x h image with a red block in the stored top-left corner."""
    im = Image.new("RGB", (w, h), (128, 128, 128))
    im.paste((255, 0, 0), (0, 0, 12, 12))
    return im


def _is_red(rgb: tuple[int, ...]) -> bool:
    return rgb[0] > 200 and rgb[1] < 60 and rgb[2] < 60


@pytest.mark.parametrize(
    "orientation,size,corner",
    [
        (1, (64, 32), (5, 5)),  # as stored
        (3, (64, 32), (58, 26)),  # 180: bottom-right
        (6, (32, 64), (26, 5)),  # 90 clockwise: top-right
        (8, (32, 64), (5, 58)),  # 90 counter-clockwise: bottom-left
    ],
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation(tmp_path, orientation, size, corner, fmt):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(_marked(), tmp_path / f"o{orientation}.{fmt.lower()}", fmt, exif=exif.tobytes())
    assert image_size(path) == size
    img = open_image(path)
    assert img.size == size and img.mode == "RGB"
    assert _is_red(px(img, corner)), px(img, corner)
    reds = [xy for xy in [(5, 5), (size[0] - 6, 5), (5, size[1] - 6), (size[0] - 6, size[1] - 6)]]
    assert sum(_is_red(px(img, xy)) for xy in reds) == 1  # exactly one corner is marked
    assert check_image(path) == size


def test_malformed_exif_is_ignored(tmp_path):
    path = save(_marked(), tmp_path / "bad_exif.jpg", exif=b"Exif\x00\x00garbage-not-tiff")
    assert image_size(path) == (64, 32)
    assert open_image(path).size == (64, 32)


# --------------------------------------------------------------------------- errors


def _raises(ref, code: str, text: str, fn=open_image, **kw) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn(ref, **kw)
    err = info.value
    assert err.code == code, str(err)
    assert text in str(err), str(err)
    return err


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    err = _raises(path, "missing", f"image not found: {path}")
    _raises(str(path), "missing", "image not found", fn=image_size)
    _raises(
        MediaRef(path=str(path), origin="imgs/nope.jpg"), "missing", "imgs/nope.jpg", fn=check_image
    )
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert again.code == "missing" and str(again) == str(err)


def test_directory_empty_random_and_truncated(tmp_path):
    _raises(tmp_path, "missing", "not a file")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    _raises(empty, "empty", "0 bytes")
    _raises(empty, "empty", "0 bytes", fn=image_size)
    _raises(b"", "empty", "0 bytes")

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _raises(junk, "corrupt", "cannot identify image file")
    _raises(junk, "corrupt", "cannot identify image file", fn=image_size)

    noise = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    half = tmp_path / "half.jpg"
    half.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert image_size(half) == (96, 64)  # the header is intact
    _raises(half, "truncated", "truncated image")
    _raises(half, "truncated", "truncated image", fn=check_image)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False

    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "WEBP")
    _raises(buf.getvalue()[: len(buf.getvalue()) // 2], "truncated", "truncated image")


def test_unsupported_format_is_named(tmp_path):
    heic = tmp_path / "photo.heic"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    _raises(heic, "unsupported", "HEIC")
    svg = tmp_path / "logo.png"
    svg.write_bytes(b'<svg xmlns="http://www.w3.org/2000/svg"></svg>')
    _raises(svg, "unsupported", "SVG")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no pixel data: decoding it would
    fail as truncated, so a too_large error proves the limit is checked before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_checked_on_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(5000, 5000))
    err = _raises(bomb, "too_large", "5000x5000 = 25,000,000 pixels", max_pixels=1_000_000)
    assert "1,000,000" in str(err)
    _raises(bomb, "too_large", "5000x5000", fn=image_size, max_pixels=1_000_000)
    _raises(bomb, "too_large", "5000x5000", fn=check_image, max_pixels=1_000_000)
    # within the limit the header is fine and the missing data shows as truncation
    assert image_size(bomb, max_pixels=30_000_000) == (5000, 5000)
    _raises(bomb, "truncated", "truncated", max_pixels=30_000_000)
    # a real one, as a PIL image and as bytes
    _raises(Image.new("L", (2000, 1000)), "too_large", "2000x1000", max_pixels=1_000_000)


def test_pillow_global_limits_untouched(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    mid = tmp_path / "mid.png"  # between Pillow's warning (~89 Mpx) and error (~179 Mpx) limits
    mid.write_bytes(_png_header_only(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        assert image_size(mid, max_pixels=200_000_000) == (10_000, 10_000)
        _raises(mid, "too_large", "10000x10000")  # our default limit (64 Mi pixels)
    huge = tmp_path / "huge.png"  # past Pillow's own hard limit: still a MediaError
    huge.write_bytes(_png_header_only(100_000, 100_000))
    _raises(huge, "too_large", "decompression bomb", max_pixels=None)
    assert before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------- inputs


def test_embedded_bytes_and_pil_inputs(tmp_path):
    buf = io.BytesIO()
    _marked().save(buf, "PNG")
    data = buf.getvalue()
    for ref in (data, bytearray(data), MediaRef(data=data), {"bytes": data, "path": None}):
        assert open_image(ref).size == (64, 32)
        assert image_size(ref) == (64, 32)
    pil = Image.open(io.BytesIO(data))  # lazily opened, as Hugging Face datasets hand them out
    out = open_image(MediaRef(data=pil))
    assert out.mode == "RGB" and _is_red(px(out, (5, 5))) and out is not pil
    out.putpixel((5, 5), (0, 0, 0))
    assert _is_red(px(pil.convert("RGB"), (5, 5)))  # a copy, not the caller's image
    path = save(_marked(), tmp_path / "m.png")
    assert open_image(MediaRef(path=str(path), origin="m.png")).size == (64, 32)
    _raises(MediaRef(origin="ghost.png"), "missing", "ghost.png")
    with pytest.raises(TypeError):
        open_image(12345)  # type: ignore[arg-type]


@needs_demo
def test_demo_jpegs():
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        w, h = image_size(DEMO / name)
        img = open_image(DEMO / name)
        assert img.mode == "RGB" and img.size == (w, h) and w > 0 and h > 0


# --------------------------------------------------------------------------- video


def _encode(path: Path, n: int = 40, *, rate: int = 10, gop: int = 5, rotation: int = 0) -> Path:
    """A small H.264 (or MPEG-4 part 2) MP4 whose frame i has red channel 6*i at (0, 0)
    and a white band on the left (stored orientation)."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "bframes": "2"}
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(n):
            a = np.full((48, 64, 3), 40, np.uint8)
            a[:, :8] = 255
            a[16:32, 24:40, 0] = (6 * i) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _same(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True)
    )


@needs_demo
@pytest.mark.parametrize("name", ["1.mp4", "2.avi", "3.mp4"])
def test_demo_videos(name):
    info = probe_video(DEMO / name)
    assert 100 <= info.width <= 4096 and 100 <= info.height <= 4096
    assert 10 < info.fps < 61 and info.frames > 10 and 1 < info.duration < 60
    assert abs(info.frames / info.fps - info.duration) < 0.5
    frames, times = sample_video(DEMO / name, fps=2.0, max_frames=16)
    assert len(frames) == len(times) == sample_count(info, fps=2.0, max_frames=16)
    assert 2 <= len(frames) <= 16 and len(frames) % 2 == 0
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    assert times[0] >= 0 and times[-1] <= info.duration
    assert all(f.mode == "RGB" and f.size == (info.width, info.height) for f in frames)
    again, times2 = sample_video(MediaRef(path=str(DEMO / name)), fps=2.0, max_frames=16)
    assert times2 == times and _same(frames, again)  # deterministic


@needs_demo
def test_seeking_matches_sequential_decode(monkeypatch):
    path = DEMO / "3.mp4"  # B-frames, two keyframes
    seq, seq_t = sample_video(path, fps=4.0)
    calls = []
    real = media.videos._Cursor.restart
    monkeypatch.setattr(media.videos._Cursor, "restart", lambda s, t: calls.append(t) or real(s, t))
    monkeypatch.setattr(media.videos, "_MIN_SKIP_S", -1.0)  # seek whenever a keyframe is ahead
    sk, sk_t = sample_video(path, fps=4.0)
    assert any(t is not None for t in calls)
    assert sk_t == seq_t and _same(sk, seq)


def test_synthetic_video_seeking_and_frame_choice(tmp_path, monkeypatch):
    path = _encode(tmp_path / "v.mp4", n=40, rate=10, gop=5)
    info = probe_video(path)
    assert (info.width, info.height, info.frames, info.rotation) == (64, 48, 40, 0)
    assert info.fps == pytest.approx(10) and info.duration == pytest.approx(4.0)
    seq, seq_t = sample_video(path, fps=2.0)
    assert len(seq) == 8
    # targets are slice centres 0.25, 0.75, ...: the frame on screen is floor(t * 10) / 10
    assert seq_t == pytest.approx([0.2, 0.7, 1.2, 1.7, 2.2, 2.7, 3.2, 3.7])
    reds = [int(np.asarray(f)[24, 32, 0]) for f in seq]
    assert all(abs(r - 6 * round(t * 10)) <= 8 for r, t in zip(reds, seq_t, strict=True))
    monkeypatch.setattr(media.videos, "_MIN_SKIP_S", -1.0)
    sk, sk_t = sample_video(path, fps=2.0)
    assert sk_t == seq_t and _same(sk, seq)
    # without a usable index (gap-based seeking)
    monkeypatch.setattr(media.videos, "_keyframe_index", lambda stream, cur: [])
    monkeypatch.setattr(media.videos, "_SEEK_GAP_S", 0.3)
    gp, gp_t = sample_video(path, fps=2.0)
    assert gp_t == seq_t and _same(gp, seq)


def test_video_rotation_and_bytes(tmp_path):
    path = _encode(tmp_path / "rot.mp4", n=6, rotation=90)
    info = probe_video(path)
    assert (info.width, info.height, info.rotation) == (48, 64, 90)
    frames, times = sample_video(path.read_bytes(), fps=10.0, max_frames=4)
    assert len(frames) == 4 and times == sorted(times)
    frame = np.asarray(frames[0])
    assert frame.shape == (64, 48, 3)
    assert frame[-3, 24].min() > 200 and frame[3, 24].max() < 100  # left band is now the bottom


def test_short_video_repeats_frames_to_the_multiple(tmp_path):
    path = _encode(tmp_path / "one.mp4", n=1)
    frames, times = sample_video(path)
    assert len(frames) == 2 and times[0] == times[1] and frames[0] is not frames[1]


def test_sample_count_rules():
    info = VideoInfo(640, 360, 25.0, 243, 9.72)
    assert sample_count(info) == 18  # floor(19.44) -> 19 -> even 18
    assert sample_count(info, fps=10) == 32
    assert sample_count(info, fps=10, max_frames=31) == 30
    assert sample_count(info, fps=0.1) == 2  # min_frames
    assert sample_count(info, fps=0.1, min_frames=5, frame_multiple=1) == 5
    assert sample_count(VideoInfo(8, 8, 1.0, 3, 3.0), fps=30, frame_multiple=4) == 4
    with pytest.raises(ValueError):
        sample_count(info, fps=0)


def test_video_errors(tmp_path):
    corrupt = tmp_path / "bad.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    _raises(corrupt, "corrupt", "cannot read video", fn=probe_video)
    _raises(corrupt, "corrupt", "cannot read video", fn=sample_video)
    _raises(tmp_path / "gone.mp4", "missing", "video not found", fn=probe_video)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    _raises(empty, "empty", "0 bytes", fn=sample_video)
    still = save(_marked(), tmp_path / "still.png")  # FFmpeg reads a PNG as a 1-frame video
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
    _raises(audio, "no_video", "no video stream", fn=probe_video)
    assert probe_video(still).frames >= 1


# --------------------------------------------------------------------------- resize


def test_resize_image():
    img = _marked()
    assert resize_image(img, (64, 32)) is img
    down = resize_image(img, (16, 8))
    up = resize_image(img, (128, 64))
    mixed = resize_image(img, (128, 16))
    for out, size in ((down, (16, 8)), (up, (128, 64)), (mixed, (128, 16))):
        assert out.mode == "RGB" and out.size == size
    assert _is_red(px(up, (4, 4))) and _is_red(px(down, (1, 1)))
    big = Image.new("RGB", (4000, 3000), (10, 200, 30))
    assert px(resize_image(big, (400, 300)), (200, 150)) == (10, 200, 30)
    for bad in ((0, 10), (10.5, 3), (-1, 4)):
        with pytest.raises(ValueError):
            resize_image(img, bad)  # type: ignore[arg-type]
