"""Tests for the embedded shapes VQA generator (``vlmfit.data.synth``); fast, CPU only."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlmfit.data import synth

SMALL = {"n_train": 48, "n_test": 24, "n_dpo_train": 20, "n_dpo_test": 12}
SPLIT_FILES = ("sft_train.json", "sft_test.json", "dpo_train.json", "dpo_test.json")


@pytest.fixture(scope="module")
def default_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The dataset with the default parameters, generated once for the module."""
    out = tmp_path_factory.mktemp("synth") / "shapes"
    return out, synth.generate(out)


def load(out: Path, name: str) -> list[dict[str, Any]]:
    return json.loads((out / name).read_text(encoding="utf-8"))


def qa(record: dict[str, Any]) -> tuple[str, str]:
    """(question type, correct answer) of an SFT or DPO record."""
    qtype = synth.question_type(record["messages"][0]["content"])
    assert qtype is not None
    if "chosen" in record:
        return qtype, record["chosen"]["content"]
    return qtype, record["messages"][-1]["content"]


# --- image analysis written here so the tests do not trust the generator ----------------------


def foreground(img: np.ndarray) -> np.ndarray:
    """Mask of the pixels that differ clearly from the background (the most common colour)."""
    flat = img.reshape(-1, 3).astype(np.int64)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    mode = int(np.bincount(packed).argmax())
    bg = np.array([mode >> 16, (mode >> 8) & 255, mode & 255])
    assert bg[0] == bg[1] == bg[2], "background is grey"
    return np.abs(img.astype(int) - bg).max(axis=-1) > 40


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask (iterative flood fill)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, comp = [(int(y0), int(x0))], []
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(comp)
    return out


def read_answer(img: np.ndarray, qtype: str) -> str:
    """Answer a question by measuring the image."""
    mask = foreground(img)
    assert mask.any()
    if qtype == "colour":
        return ("red", "green", "blue")[int(img[mask].mean(axis=0).argmax())]
    if qtype == "position":
        centre_x = (np.nonzero(mask)[1].mean() + 0.5) / img.shape[1]
        return ("left", "middle", "right")[min(2, int(centre_x * 3))]
    if qtype == "count":
        return ("one", "two", "three", "four")[len(components(mask)) - 1]
    if qtype == "shape":
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        return "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"
    raise AssertionError(qtype)


# --- API --------------------------------------------------------------------------------------


def test_vocabulary_and_question_type() -> None:
    assert set(synth.QUESTION_TYPES) == set(synth.QUESTIONS) == set(synth.ANSWERS)
    for qtype in synth.QUESTION_TYPES:
        answers = synth.ANSWERS[qtype]
        assert len(answers) >= 3 and len(set(answers)) == len(answers)
        assert all(a.isalpha() and a == a.lower() for a in answers)  # single words
        question = synth.QUESTIONS[qtype]
        assert synth.question_type(question) == qtype
        assert synth.question_type("<image>" + question) == qtype
        assert synth.question_type(" <image>\n" + question.upper() + " ") == qtype
    assert synth.question_type("What is the meaning of life?") is None


def test_render_encodes_the_spec() -> None:
    import random

    rng = random.Random(0)
    for qtype in synth.QUESTION_TYPES:
        for answer in synth.ANSWERS[qtype]:
            spec = synth.sample_spec(rng, qtype, answer)
            for size in (32, 64):
                img = synth.render(spec, size)
                assert img.size == (size, size) and img.mode == "RGB"
                assert read_answer(np.asarray(img), qtype) == answer, (qtype, answer, size)


def test_dense_count_scenes_always_fit() -> None:
    """Three big triangles may not fit after an unlucky start: sampling restarts, never hangs."""
    import random

    for seed in range(300):
        spec = synth.sample_spec(random.Random(seed), "count", "three")
        assert len(spec["shapes"]) == 3


# --- generated folder ---------------------------------------------------------------------------


def test_layout_and_images(default_data: tuple[Path, dict[str, Any]]) -> None:
    out, meta = default_data
    assert meta["status"] == "created"
    on_disk = json.loads((out / "meta.json").read_text())
    assert "status" not in on_disk and on_disk["seed"] == 0 and on_disk["image_size"] == 64
    assert on_disk["question_types"] == list(synth.QUESTION_TYPES)
    assert on_disk["answers"] == {t: list(a) for t, a in synth.ANSWERS.items()}
    assert on_disk["version"] == synth.GENERATOR_VERSION
    sizes = {"sft_train": 2400, "sft_test": 120, "dpo_train": 200, "dpo_test": 120}
    assert {s: c["total"] for s, c in on_disk["counts"].items()} == sizes
    assert not list(out.parent.glob(".*"))  # no temporary folders left behind
    for name in SPLIT_FILES:
        records = load(out, name)
        assert len(records) == sizes[name.removesuffix(".json")]
        for r in records:
            assert len(r["images"]) == 1
            path = out / r["images"][0]
            assert not Path(r["images"][0]).is_absolute() and path.is_file()
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(path) as img:
                assert img.format == "PNG" and img.size == (64, 64)
            user = r["messages"][0]
            assert user["role"] == "user" and user["content"].startswith("<image>")
            assert user["content"].count("<image>") == 1
            if name.startswith("sft"):
                assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            else:
                assert len(r["messages"]) == 1
                assert r["chosen"]["role"] == r["rejected"]["role"] == "assistant"
    all_images = [load(out, n)[i]["images"][0] for n in SPLIT_FILES for i in range(2)]
    assert len(set(all_images)) == len(all_images)  # splits do not share image files


@pytest.mark.parametrize("name", SPLIT_FILES)
def test_balanced(default_data: tuple[Path, dict[str, Any]], name: str) -> None:
    out, meta = default_data
    records = load(out, name)
    counts = Counter(qa(r) for r in records)
    per_type = Counter(t for t, _a in counts.elements())
    split = name.removesuffix(".json")
    n_types = len(synth.QUESTION_TYPES)
    assert set(per_type) == set(synth.QUESTION_TYPES)
    assert max(per_type.values()) - min(per_type.values()) <= 1
    for qtype in synth.QUESTION_TYPES:
        per_answer = [counts[qtype, a] for a in synth.ANSWERS[qtype]]
        assert sum(per_answer) == per_type[qtype]
        assert meta["counts"][split]["per_answer"][qtype] == dict(
            zip(synth.ANSWERS[qtype], per_answer, strict=True)
        )
        if split.endswith("_test") or split == "sft_train":  # divisible sizes: exact
            assert len(set(per_answer)) == 1, (split, qtype, per_answer)
            assert per_answer[0] == len(records) // n_types // 3
        else:  # 200 / 4 = 50 per type: 17/17/16
            assert max(per_answer) - min(per_answer) <= 1
        if split.endswith("_test"):  # chance accuracy (majority answer) at most 1/3
            assert max(per_answer) / sum(per_answer) <= 1 / 3
            assert meta["chance_accuracy"][split][qtype] <= 1 / 3


def test_answers_match_the_images(default_data: tuple[Path, dict[str, Any]]) -> None:
    out, _meta = default_data
    for name in SPLIT_FILES:  # every test sample, and the first 120 of each train split
        for r in load(out, name)[:120]:
            qtype, answer = qa(r)
            with Image.open(out / r["images"][0]) as img:
                pixels = np.asarray(img.convert("RGB"))
            assert read_answer(pixels, qtype) == answer, (name, r["images"][0])


def test_dpo_rejected(default_data: tuple[Path, dict[str, Any]]) -> None:
    out, _meta = default_data
    for name in ("dpo_train.json", "dpo_test.json"):
        rejected = Counter()
        for r in load(out, name):
            qtype, chosen = qa(r)
            assert r["rejected"]["content"] != chosen
            assert r["rejected"]["content"] in synth.ANSWERS[qtype]
            rejected[qtype, r["rejected"]["content"]] += 1
        for qtype in synth.QUESTION_TYPES:  # rejected answers are spread over the vocabulary
            per = [rejected[qtype, a] for a in synth.ANSWERS[qtype]]
            assert max(per) - min(per) <= 2, (name, qtype, per)


def test_test_disjoint_from_train(default_data: tuple[Path, dict[str, Any]]) -> None:
    out, _meta = default_data

    def keys(name: str) -> set[str]:
        result = set()
        for r in load(out, name):
            with Image.open(out / r["images"][0]) as img:
                pixels = np.asarray(img.convert("RGB")).tobytes()
            question = r["messages"][0]["content"]
            result.add(hashlib.sha256(question.encode() + b"\0" + pixels).hexdigest())
        return result

    train = keys("sft_train.json") | keys("dpo_train.json")
    for name in ("sft_test.json", "dpo_test.json"):
        test = keys(name)
        assert len(test) == len(load(out, name))  # no duplicates inside a test split either
        assert not test & train


# --- determinism, idempotence, atomicity -------------------------------------------------------


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_deterministic(tmp_path: Path) -> None:
    a = synth.generate(tmp_path / "a", seed=3, **SMALL)
    b = synth.generate(tmp_path / "b", seed=3, **SMALL)
    assert a["status"] == b["status"] == "created"
    sa, sb = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert sa == sb  # byte-identical JSON and PNGs
    for rel in ("images/train_00000.png", "images/dpo_test_00003.png"):
        with Image.open(tmp_path / "a" / rel) as x, Image.open(tmp_path / "b" / rel) as y:
            assert np.array_equal(np.asarray(x), np.asarray(y))
    synth.generate(tmp_path / "c", seed=4, **SMALL)
    sc = snapshot(tmp_path / "c")
    assert sc["sft_train.json"] != sa["sft_train.json"]
    assert sc["images/train_00000.png"] != sa["images/train_00000.png"]


def test_idempotent_and_force(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    first = synth.generate(out, **SMALL)
    meta_file, image = out / "meta.json", out / "images" / "test_00000.png"
    before = {p: os.stat(p) for p in (meta_file, image)}
    second = synth.generate(out, **SMALL)
    assert second["status"] == "exists"
    assert {k: v for k, v in second.items() if k not in ("status", "seconds")} == {
        k: v for k, v in first.items() if k not in ("status", "seconds")
    }
    for p, st in before.items():
        now = os.stat(p)
        assert (now.st_mtime_ns, now.st_ino) == (st.st_mtime_ns, st.st_ino)
    old = snapshot(out)
    third = synth.generate(out, force=True, **SMALL)
    assert third["status"] == "created"
    assert os.stat(meta_file).st_ino != before[meta_file].st_ino  # really rewritten ...
    assert snapshot(out) == old  # ... with the same content
    # Other parameters are another dataset: regenerated in place.
    fourth = synth.generate(out, **{**SMALL, "n_train": 24})
    assert fourth["status"] == "created" and len(load(out, "sft_train.json")) == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]


def failing_render(after: int) -> Callable[..., Image.Image]:
    real, calls = synth.render, [0]

    def render(spec: dict[str, Any], image_size: int) -> Image.Image:
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError("simulated failure")
        return real(spec, image_size)

    return render


def test_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "shapes"
    monkeypatch.setattr(synth, "render", failing_render(30))
    with pytest.raises(RuntimeError, match="simulated"):
        synth.generate(out, **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder
    monkeypatch.undo()

    synth.generate(out, **SMALL)
    good = snapshot(out)
    monkeypatch.setattr(synth, "render", failing_render(50))
    with pytest.raises(RuntimeError, match="simulated"):
        synth.generate(out, force=True, **SMALL)
    assert snapshot(out) == good  # the old complete folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]


def test_refuses_foreign_folder_and_bad_sizes(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "data.json").write_text("[]")
    with pytest.raises(FileExistsError):
        synth.generate(foreign, force=True, **SMALL)
    assert (foreign / "data.json").read_text() == "[]"
    with pytest.raises(ValueError, match="exactly evenly"):
        synth.generate(tmp_path / "x", **{**SMALL, "n_test": 25})
    with pytest.raises(ValueError, match="question_types"):
        synth.generate(tmp_path / "x", question_types=("colour", "smell"), **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_subset_of_types_and_image_size(tmp_path: Path) -> None:
    meta = synth.generate(
        tmp_path / "s", image_size=32, question_types=("count", "colour"), **SMALL
    )
    assert meta["question_types"] == ["count", "colour"]
    records = load(tmp_path / "s", "sft_test.json")
    assert Counter(qa(r)[0] for r in records) == {"count": 12, "colour": 12}
    for r in records:
        with Image.open(tmp_path / "s" / r["images"][0]) as img:
            assert img.size == (32, 32)
            assert read_answer(np.asarray(img.convert("RGB")), qa(r)[0]) == qa(r)[1]


def test_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlmfit.cli.data import cli_data

    argv = ["--out", str(tmp_path / "cli"), "--seed", "1", "--n-train", "24", "--n-test", "12"]
    argv += ["--n-dpo-train", "12", "--n-dpo-test", "12"]
    assert cli_data(argv) == 0
    assert capsys.readouterr().out.startswith("created: ")
    assert cli_data(argv) == 0
    assert capsys.readouterr().out.startswith("exists: ")
    assert cli_data([*argv, "--force"]) == 0
    assert capsys.readouterr().out.startswith("created: ")
    assert cli_data([*argv[:2], "--n-test", "13"]) == 2
    assert "error:" in capsys.readouterr().err
