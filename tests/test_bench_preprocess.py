"""Preprocessing throughput: images/s for 1,000 mixed-size JPEGs (64 px to ~3000 px, random
aspect ratios, some EXIF-rotated) through the whole pipeline (read, hash, header, decode,
EXIF, budget resize, save), with workers=1 and workers=2.

Run: ``.venv/bin/python -m pytest -q -s tests/test_bench_preprocess.py --benchmarks``
(``make bench``). Generating the photos takes ~30 s; each pass about as long per worker.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.bench

N_IMAGES = 1000
MIN_EDGE, MAX_EDGE = 64, 3000


@pytest.fixture(autouse=True)
def _only_with_flag(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("--benchmarks", default=False):
        pytest.skip("benchmark: run with --benchmarks")


def _photo(rng: random.Random, path: Path) -> None:
    """A smooth synthetic photo (gradients + shapes: JPEG sizes like real photos)."""
    longest = int(math.exp(rng.uniform(math.log(MIN_EDGE), math.log(MAX_EDGE))))
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
    w, h = (longest, max(16, int(longest / aspect))) if aspect >= 1 else (
        max(16, int(longest * aspect)), longest)  # fmt: skip
    grad = Image.linear_gradient("L")
    img = Image.merge(
        "RGB", (grad.resize((w, h)), grad.rotate(90).resize((w, h)), grad.rotate(45).resize((w, h)))
    )
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.randrange(w), rng.randrange(h)
        r = rng.randint(4, max(5, min(w, h) // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in "rgb"))
    exif = Image.Exif()
    if rng.random() < 0.1:
        exif[0x0112] = 6  # rotated 90 degrees: the pipeline must apply it
    img.save(path, quality=90, exif=exif)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bench-photos")
    rng = random.Random(0)
    records = []
    for i in range(N_IMAGES):
        _photo(rng, folder / f"{i:04d}.jpg")
        records.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>What is in this photo?"},
                    {"role": "assistant", "content": "Shapes on a gradient."},
                ],
                "images": [f"{i:04d}.jpg"],
            }
        )
    data = folder / "photos.json"
    data.write_text(json.dumps(records))
    return data


def test_preprocess_throughput(photos: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VLMFIT_CACHE", str(tmp_path / "models"))
    from vlmfit.budget import Budget
    from vlmfit.models import builders as tiny
    from vlmfit.preprocess import preprocess

    monkeypatch.setattr(tiny, "DEFAULT_CACHE", tmp_path / "models")
    tokenizer = tiny.ensure_tiny("tiny-qwen2-vl")  # Qwen2-VL-2B's arithmetic, local tokenizer
    lines = []
    for workers in (1, 2):
        res = preprocess(
            photos,
            "qwen2-vl-2b",
            weights=str(tokenizer),
            budget=Budget(max_image_tokens=256),
            cache_dir=tmp_path / f"cache-{workers}",
            workers=workers,
            progress=False,
        )
        assert res.n_out == N_IMAGES and not res.cache_hit
        assert all(r["tokens_after"] <= 256 for r in res.image_stats)
        media_s = res.manifest["timings"]["media"]
        lines.append(
            f"workers={workers}: {N_IMAGES / res.seconds:.1f} images/s end to end "
            f"({res.seconds:.1f} s), {N_IMAGES / media_s:.1f} images/s decode+EXIF+resize+save "
            f"({media_s:.1f} s)"
        )
    print("\npreprocess benchmark, 1000 JPEGs 64..3000 px -> Qwen2-VL budget 256 tokens:")
    print("\n".join(lines))
