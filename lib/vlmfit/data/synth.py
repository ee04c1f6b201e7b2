"""The bundled "shapes" visual question answering dataset, generated on demand.

One small PNG per sample with one to three flat-coloured shapes and one templated question
(colour, shape, position or count), in LLaMA-Factory's ShareGPT layout so that vlmfit reads it
like user data: ``vlmfit data`` or :func:`generate`. Balance and layout: docs/data-formats.md.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vlmfit.files import atomic_folder, write_json

__all__ = [
    "ANSWERS",
    "COLOURS",
    "GENERATOR",
    "GENERATOR_VERSION",
    "IMAGE_TOKEN",
    "QUESTIONS",
    "QUESTION_TYPES",
    "SPLITS",
    "generate",
    "question_type",
    "render",
    "sample_spec",
]

GENERATOR = "vlmfit.data.synth"
#: Bump whenever the output for a given seed and parameters changes (invalidates old folders).
GENERATOR_VERSION = 1
IMAGE_TOKEN = "<image>"

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "position", "count")
QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is this?",
    "position": "Where is the shape?",
    "count": "How many shapes are there?",
}
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue"),
    "shape": ("circle", "square", "triangle"),
    "position": ("left", "middle", "right"),
    "count": ("one", "two", "three"),
}
#: Nominal RGB of each colour answer; rendered colours are jittered by at most ``_COLOUR_JITTER``.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 40),
    "blue": (40, 70, 220),
}
_COLOUR_JITTER = 15
_BACKGROUND = (200, 240)  # grey level range of the background (inclusive)

#: Split name -> (file name, image prefix, preference?). Test splits are generated first.
SPLITS: dict[str, tuple[str, str, bool]] = {
    "sft_test": ("sft_test.json", "test", False),
    "dpo_test": ("dpo_test.json", "dpo_test", True),
    "sft_train": ("sft_train.json", "train", False),
    "dpo_train": ("dpo_train.json", "dpo_train", True),
}

# Geometry, as fractions of the image side. Shapes are drawn without anti-aliasing so every
# shape is one crisp connected blob.
_SIZE_SINGLE = (0.36, 0.50)  # colour questions: one big shape anywhere
_SIZE_SHAPE = (0.48, 0.60)  # shape questions: one bigger shape near the centre
_SHAPE_JITTER = 0.06  # ... whose centre is at most this far from the image centre
_SIZE_POSITION = (0.22, 0.30)  # position questions: fits inside a third
#: Count questions: every shape covers the same area (this fraction of the image, jittered by
#: +-_AREA_JITTER), whatever its kind, so the coloured area is proportional to the count.
_AREA_COUNT = 0.045
_AREA_JITTER = 0.08
#: Fraction of its bounding box that each kind fills.
_FILL = {"circle": 0.7854, "square": 1.0, "triangle": 0.5}
_THIRD_MARGIN = 0.05  # the centre stays this far inside its third
_GAP = 0.06  # minimum gap between the bounding boxes of two shapes
_BORDER = 0.02  # minimum gap between a shape and the image edge


def question_type(question_text: str) -> str | None:
    """The question type of a question (with or without image placeholders), else ``None``."""
    text = " ".join(question_text.replace(IMAGE_TOKEN, " ").split()).lower()
    for qtype, question in QUESTIONS.items():
        if text == question.lower():
            return qtype
    return None


def _jittered_rgb(rng: random.Random, colour: str) -> list[int]:
    return [
        max(0, min(255, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in COLOURS[colour]
    ]


def _shape(
    rng: random.Random, *, kind: str, colour: str, size: float, cx: float, cy: float
) -> dict[str, Any]:
    return {
        "kind": kind,
        "colour": colour,
        "rgb": _jittered_rgb(rng, colour),
        "size": round(size, 4),
        "cx": round(cx, 4),
        "cy": round(cy, 4),
    }


def _free_centre(rng: random.Random, size: float) -> float:
    half = size / 2 + _BORDER
    return rng.uniform(half, 1 - half)


def sample_spec(rng: random.Random, qtype: str, answer: str) -> dict[str, Any]:
    """A random scene whose correct answer to the ``qtype`` question is ``answer``.

    The spec is resolution independent (coordinates and sizes are fractions of the side)::

        {"background": 221, "shapes": [{"kind": "circle", "colour": "red", "rgb": [..],
                                        "size": 0.4, "cx": 0.5, "cy": 0.3}, ...]}

    ``size`` is the side of the shape's bounding box, ``(cx, cy)`` its centre.
    """
    if qtype not in ANSWERS or answer not in ANSWERS[qtype]:
        raise ValueError(f"no answer {answer!r} for question type {qtype!r}")
    background = rng.randint(*_BACKGROUND)
    kinds, colours = ANSWERS["shape"], ANSWERS["colour"]
    shapes: list[dict[str, Any]]
    if qtype == "colour":
        size = rng.uniform(*_SIZE_SINGLE)
        cx, cy = _free_centre(rng, size), _free_centre(rng, size)
        shapes = [_shape(rng, kind=rng.choice(kinds), colour=answer, size=size, cx=cx, cy=cy)]
    elif qtype == "shape":
        size = rng.uniform(*_SIZE_SHAPE)
        cx = 0.5 + rng.uniform(-_SHAPE_JITTER, _SHAPE_JITTER)
        cy = 0.5 + rng.uniform(-_SHAPE_JITTER, _SHAPE_JITTER)
        shapes = [_shape(rng, kind=answer, colour=rng.choice(colours), size=size, cx=cx, cy=cy)]
    elif qtype == "position":
        size = rng.uniform(*_SIZE_POSITION)
        third = ANSWERS["position"].index(answer)
        lo = max(third / 3 + _THIRD_MARGIN, size / 2 + _BORDER)
        hi = min((third + 1) / 3 - _THIRD_MARGIN, 1 - size / 2 - _BORDER)
        cx, cy = rng.uniform(lo, hi), _free_centre(rng, size)
        shape = _shape(
            rng, kind=rng.choice(kinds), colour=rng.choice(colours), size=size, cx=cx, cy=cy
        )
        shapes = [shape]
    else:  # count: shapes of one colour and one kind, equal areas, non-overlapping
        n = ANSWERS["count"].index(answer) + 1
        kind, colour = rng.choice(kinds), rng.choice(colours)
        shapes = []
        attempts = 0
        while len(shapes) < n:
            attempts += 1
            if attempts > 50:  # the first shapes left no room: start the scene again
                shapes, attempts = [], 0
            area = _AREA_COUNT * (1 + rng.uniform(-_AREA_JITTER, _AREA_JITTER))
            size = (area / _FILL[kind]) ** 0.5
            cx, cy = _free_centre(rng, size), _free_centre(rng, size)
            if all(
                abs(cx - s["cx"]) >= (size + s["size"]) / 2 + _GAP
                or abs(cy - s["cy"]) >= (size + s["size"]) / 2 + _GAP
                for s in shapes
            ):
                shapes.append(_shape(rng, kind=kind, colour=colour, size=size, cx=cx, cy=cy))
    return {"background": background, "shapes": shapes}


def render(spec: dict[str, Any], image_size: int) -> Image.Image:
    """Draw a scene spec (see :func:`sample_spec`) as an ``image_size`` square RGB image."""
    grey = int(spec["background"])
    img = Image.new("RGB", (image_size, image_size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    for s in spec["shapes"]:
        fill = tuple(int(c) for c in s["rgb"])
        half = s["size"] * image_size / 2
        cx, cy = s["cx"] * image_size, s["cy"] * image_size
        x0, y0 = round(cx - half), round(cy - half)
        x1, y1 = round(cx + half) - 1, round(cy + half) - 1
        if s["kind"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s["kind"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif s["kind"] == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape kind {s['kind']!r}")
    return img


def _slots(n: int, question_types: Sequence[str], *, exact: bool, split: str) -> list[list[str]]:
    """``n`` (type, answer) pairs, as balanced as possible over types and, per type, answers."""
    nt = len(question_types)
    per_type = [n // nt + (1 if i < n % nt else 0) for i in range(nt)]
    slots: list[list[str]] = []
    for i, (qtype, count) in enumerate(zip(question_types, per_type, strict=True)):
        answers = ANSWERS[qtype]
        if exact and (n % nt or count % len(answers)):
            raise ValueError(
                f"{split}: {n} samples cannot be split exactly evenly over {nt} question type(s) "
                f"and {len(answers)} answers each; use a multiple of "
                f"{nt * len(answers)} for a held-out split"
            )
        na = len(answers)
        # Leftover samples go to different answers for different types (rotated start).
        per_answer = [count // na + (1 if (j - i) % na < count % na else 0) for j in range(na)]
        for answer, k in zip(answers, per_answer, strict=True):
            slots += [[qtype, answer]] * k
    return slots


def _user_turn(qtype: str) -> dict[str, str]:
    return {"role": "user", "content": IMAGE_TOKEN + QUESTIONS[qtype]}


def _assistant_turn(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _build_split(
    root: Path,
    split: str,
    n: int,
    *,
    seed: int,
    image_size: int,
    question_types: Sequence[str],
    seen: set[bytes],
) -> tuple[list[dict[str, Any]], Counter[tuple[str, str]]]:
    """Render one split's images into ``root/images`` and return its JSON records."""
    _file, prefix, preference = SPLITS[split]
    rng = random.Random(f"{GENERATOR}:{GENERATOR_VERSION}:{seed}:{split}")
    slots = _slots(n, question_types, exact=split.endswith("_test"), split=split)
    rng.shuffle(slots)
    records: list[dict[str, Any]] = []
    counts: Counter[tuple[str, str]] = Counter()
    rejected_turn: Counter[tuple[str, str]] = Counter()
    for index, (qtype, answer) in enumerate(slots):
        for _attempt in range(1000):
            img = render(sample_spec(rng, qtype, answer), image_size)
            key = hashlib.sha256(qtype.encode() + b"\0" + img.tobytes()).digest()
            if key not in seen:
                break
        else:  # pragma: no cover - needs absurd sizes for a tiny image_size
            raise RuntimeError(f"{split}: cannot find a new image for {qtype}={answer}")
        seen.add(key)
        rel = f"images/{prefix}_{index:05d}.png"
        img.save(root / rel, format="PNG")
        counts[qtype, answer] += 1
        if preference:
            # Rejected: the wrong answers of the type in turn, so it is balanced as well.
            wrong = [a for a in ANSWERS[qtype] if a != answer]
            rejected = wrong[rejected_turn[qtype, answer] % len(wrong)]
            rejected_turn[qtype, answer] += 1
            records.append(
                {
                    "messages": [_user_turn(qtype)],
                    "chosen": _assistant_turn(answer),
                    "rejected": _assistant_turn(rejected),
                    "images": [rel],
                }
            )
        else:
            records.append(
                {"messages": [_user_turn(qtype), _assistant_turn(answer)], "images": [rel]}
            )
    return records, counts


def _read_meta(out: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_complete(out: Path, meta: dict[str, Any], params: dict[str, Any]) -> bool:
    return (
        meta.get("generator") == GENERATOR
        and meta.get("version") == GENERATOR_VERSION
        and meta.get("params") == params
        and all((out / f).is_file() for f, _p, _pref in SPLITS.values())
    )


def generate(
    out_dir: str | Path = "data/shapes",
    *,
    seed: int = 0,
    image_size: int = 64,
    n_train: int = 2400,
    n_test: int = 120,
    n_dpo_train: int = 200,
    n_dpo_test: int = 120,
    question_types: Sequence[str] = QUESTION_TYPES,
    force: bool = False,
) -> dict[str, Any]:
    """Generate the shapes VQA dataset into ``out_dir`` and return its metadata.

    The returned dict is the content of ``meta.json`` plus ``"status"`` (``"created"``, or
    ``"exists"`` when ``out_dir`` already holds this generator's output for the same seed,
    sizes, types and version, in which case nothing is touched) and ``"path"``. ``force``
    regenerates regardless. Test sizes must divide exactly into equal answer counts per type
    (with the default four types: multiples of 12); train sizes are balanced to within one.

    Raises ``ValueError`` for bad parameters and ``FileExistsError`` when ``out_dir`` exists,
    is not empty and was not written by this generator (it is never overwritten).
    """
    out = Path(out_dir)
    qtypes = tuple(question_types)
    unknown = [t for t in qtypes if t not in ANSWERS]
    if not qtypes or unknown or len(set(qtypes)) != len(qtypes):
        raise ValueError(
            f"question_types must be distinct names from {QUESTION_TYPES}, got {qtypes!r}"
        )
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    sizes = {"sft_train": n_train, "sft_test": n_test, "dpo_train": n_dpo_train}
    sizes["dpo_test"] = n_dpo_test
    if any(not isinstance(v, int) or v < 0 for v in sizes.values()):
        raise ValueError(f"split sizes must be non-negative integers, got {sizes}")
    params: dict[str, Any] = {
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_test": n_test,
        "n_dpo_train": n_dpo_train,
        "n_dpo_test": n_dpo_test,
        "question_types": list(qtypes),
    }

    old = _read_meta(out) if out.is_dir() else None
    if old is not None and not force and _is_complete(out, old, params):
        return {**old, "status": "exists", "path": str(out)}
    if out.exists() and not (
        (out.is_dir() and not any(out.iterdir()))
        or (old is not None and old.get("generator") == GENERATOR)
    ):
        raise FileExistsError(f"{out} exists and was not written by {GENERATOR}; not replacing it")

    started = time.perf_counter()
    with atomic_folder(out) as tmp:
        (tmp / "images").mkdir()
        seen: set[bytes] = set()
        counts: dict[str, Any] = {}
        for split in SPLITS:  # test splits first: train samples avoid every test pair
            records, c = _build_split(
                tmp,
                split,
                sizes[split],
                seed=seed,
                image_size=image_size,
                question_types=qtypes,
                seen=seen,
            )
            write_json(tmp / SPLITS[split][0], records, ensure_ascii=False)
            counts[split] = {
                "total": len(records),
                "per_type": {t: sum(c[t, a] for a in ANSWERS[t]) for t in qtypes},
                "per_answer": {t: {a: c[t, a] for a in ANSWERS[t]} for t in qtypes},
            }
        meta: dict[str, Any] = {
            "generator": GENERATOR,
            "version": GENERATOR_VERSION,
            "params": params,
            "seed": seed,
            "image_size": image_size,
            "format": "llamafactory-sharegpt",
            "image_token": IMAGE_TOKEN,
            "files": {split: f for split, (f, _p, _pref) in SPLITS.items()},
            "question_types": list(qtypes),
            "questions": {t: QUESTIONS[t] for t in qtypes},
            "answers": {t: list(ANSWERS[t]) for t in qtypes},
            "counts": counts,
            "chance_accuracy": {
                split: {
                    t: (max(v["per_answer"][t].values()) / v["per_type"][t])
                    if v["per_type"][t]
                    else 0.0
                    for t in qtypes
                }
                for split, v in counts.items()
            },
        }
        write_json(tmp / "meta.json", meta, ensure_ascii=False)  # last: marks a complete folder
    return {
        **meta,
        "status": "created",
        "path": str(out),
        "seconds": round(time.perf_counter() - started, 3),
    }
