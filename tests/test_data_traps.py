"""Traps refused before training, as ``FILE:RECORD: reason`` (issue 9.4), and what must stay
true (issue 9.6): sources untouched, decompression bombs refused from the header.

Run: ``.venv/bin/python -m pytest -q tests/test_data_traps.py``. Processor refusals are
checked against the real image processors of the tiny models (built once per session).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmfit.data.formats import load_records
from vlmfit.data.records import DataError, Record
from vlmfit.data.validate import check_dataset, validate_records
from vlmfit.models import registry

LINE = re.compile(r"^.+:(\d+|-): [a-zA-Z<'].+")  # FILE:RECORD: reason


@pytest.fixture(autouse=True)
def _tiny_env(tiny_cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMFIT_CACHE", tiny_cache)
    from vlmfit.models import builders as tiny

    monkeypatch.setattr(tiny, "DEFAULT_CACHE", Path(tiny_cache))


def img(path: Path, size: tuple[int, int] = (16, 12)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "red").save(path)
    return path.name


def conv(user: str, answer: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages, **extra}


def write(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def reasons(path: Path, **kw: Any) -> dict[Any, list[str]]:
    report = check_dataset(path, on_error="skip", **kw)
    assert all(LINE.match(str(p)) for p in report.problems), report.problems
    out: dict[Any, list[str]] = {}
    for p in report.problems:
        assert p.source == str(path)
        out.setdefault(p.index, []).append(p.reason)
    return out


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


# --------------------------------------------------------------------------- turns


def test_image_placeholder_in_an_assistant_turn(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    good = conv("<image>What is it?", "A red patch.", images=["a.png"])
    bad = conv("What is it?", "It is <image>", images=["a.png"])
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Draw it"}]},
            {"role": "assistant", "content": [{"type": "image", "image": "a.png"}]},
        ]
    }
    found = reasons(write(tmp_path / "d.json", [good, bad, parts]))
    assert set(found) == {1, 2}
    assert found[1][0].startswith("image placeholder in an assistant turn: messages[1]")
    assert any(
        r.startswith("image placeholder in an assistant turn: messages[1]") for r in found[2]
    )


def test_chosen_identical_to_rejected(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    lf = {
        "conversations": [{"from": "human", "value": "<image>Colour?"}],
        "chosen": {"from": "gpt", "value": "Red."},
        "rejected": {"from": "gpt", "value": " Red. "},
        "images": ["a.png"],
    }
    trl = {"prompt": "<image>Colour?", "chosen": "Red.", "rejected": "Red.", "images": ["a.png"]}
    implicit = {"chosen": "The sky is blue.", "rejected": "The sky is blue."}
    assert reasons(write(tmp_path / "lf.json", [lf])) == {
        0: ["chosen identical to rejected: the pair teaches nothing"]
    }
    assert reasons(write(tmp_path / "trl.json", [trl])) == {
        0: ["chosen identical to rejected: the pair teaches nothing"]
    }
    assert reasons(write(tmp_path / "implicit.json", [implicit])) == {
        0: ["chosen identical to rejected: the pair teaches nothing"]
    }


def _family_media_tokens() -> set[str]:
    """Every image / video token any registry family's processor writes."""
    tokens: set[str] = set()
    for fam in registry.FAMILIES.values():
        for text in (fam.image_placeholder, fam.video_placeholder or "", *fam.special_tokens):
            tokens |= {
                t
                for t in re.findall(r"<[^<>]+>", text)
                if re.search(r"image|img|video|vision|row_", t)
            }
        tokens |= {t for t in (fam.image_token, fam.video_token) if t}
    return tokens


@pytest.mark.parametrize("token", sorted(_family_media_tokens()))
def test_any_family_media_token_typed_as_text(token: str) -> None:
    record = Record(
        [
            {"role": "user", "content": [{"type": "text", "text": f"Look: {token} here"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        ],
        source="d.json",
        index=4,
    )
    (p,) = validate_records([record], check_media=False)
    assert str(p) == (
        f"d.json:4: special token typed as text: {token!r} in turn 0; the processor writes "
        "image and video tokens itself (mark media with <image> / <video>)"
    )


def test_media_tokens_in_peer_files(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    rows = [
        conv("<|vision_start|><|image_pad|><|vision_end|>Describe.", "x"),
        conv("<image>Describe.", "<fake_token_around_image><global-img>", images=["a.png"]),
    ]
    found = reasons(write(tmp_path / "d.json", rows))
    assert found[0] == [
        "special token typed as text: '<|vision_start|>' in turn 0; the processor writes "
        "image and video tokens itself (mark media with <image> / <video>)"
    ]
    assert found[1][0].startswith(
        "special token typed as text: '<fake_token_around_image>' in turn 1"
    )


# --------------------------------------------------------------------------- grounding


def test_grounding_fields_and_markup_are_refused(tmp_path: Path) -> None:
    img(tmp_path / "x.png")
    swift_objects = conv(
        "<image>Find the <ref-object> in the image",
        "<bbox><bbox>",
        images=["x.png"],
        objects={"ref": ["sheep"], "bbox": [[90.9, 160.8, 135, 212.8], [360.9, 480.8, 495, 532.8]]},
    )
    literal_bbox = conv("<image>Where is the dog?", "<bbox>", images=["x.png"])
    qwen_boxes = conv(
        "<image>Describe the image.",
        "<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(221,423),(569,886)<|box_end|>",
        images=["x.png"],
    )
    found = reasons(write(tmp_path / "g.json", [swift_objects, literal_bbox, qwen_boxes]))
    assert found[0] == [
        "grounding not supported: 'objects' fills ms-swift's <ref-object> / <bbox> placeholders "
        "with boxes, which vlmfit does not implement"
    ]
    assert found[1] == [
        "grounding not supported: '<bbox>' in turn 1; vlmfit does not implement box / "
        "reference markup and will not train on it as text"
    ]
    assert found[2][0].startswith("grounding not supported: '<|object_ref_start|>' in turn 1")


def test_kto_labels_are_refused_not_read_as_sft(tmp_path: Path) -> None:
    swift_kto = conv("Tell me tomorrow's weather", "I don't know", label=False)
    trl_unpaired = {"prompt": "The sky is", "completion": " green.", "label": False}
    found = reasons(write(tmp_path / "kto.json", [swift_kto, trl_unpaired]))
    assert [r[0].split(":")[0] for r in found.values()] == ["unpaired preference not supported"] * 2


# --------------------------------------------------------------------------- processor


def _qwen_refuses(size: tuple[int, int]) -> str:
    """What the real (tiny) Qwen2-VL image processor says about an image of ``size``."""
    from vlmfit.models import builders as tiny
    from vlmfit.models.processors import load_processor

    spec = registry.get("tiny-qwen2-vl")
    processor = load_processor(tiny.ensure_tiny(spec.name), spec.family.name)
    with pytest.raises(ValueError) as err:
        processor.image_processor([Image.new("RGB", size)])
    return str(err.value)


def test_processor_refusal_is_a_per_record_problem_in_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlmfit.cli.data import cli_check

    img(tmp_path / "ok.png", (40, 30))
    img(tmp_path / "strip.png", (1, 300))  # aspect ratio 300 > 200
    rows = [conv("<image>A?", "a", images=["ok.png"]), conv("<image>B?", "b", images=["strip.png"])]
    path = write(tmp_path / "d.json", rows)
    why = _qwen_refuses((1, 300))
    assert reasons(path, model="tiny-qwen2-vl") == {
        1: [f"refused by the tiny-qwen2-vl processor: image strip.png is 1x300 ({why})"]
    }
    assert reasons(path, model="tiny-smolvlm") == {}  # Idefics3 rescales it without complaint
    assert cli_check([str(path), "--model", "tiny-qwen2-vl"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0]
        == f"{path}:1: refused by the tiny-qwen2-vl processor: image strip.png is 1x300 ({why})"
    )
    assert cli_check([str(path), "--model", "tiny-qwen2-vl", "--skip-bad"]) == 0
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .startswith("visual tokens per image (tiny-qwen2-vl)")
    )


def test_processor_refusal_in_preprocess_and_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlmfit.cli.budget import cli_tokens
    from vlmfit.preprocess import preprocess

    img(tmp_path / "ok.png", (40, 30))
    img(tmp_path / "strip.png", (600, 2))
    rows = [conv("<image>A?", "a", images=["ok.png"]), conv("<image>B?", "b", images=["strip.png"])]
    path = write(tmp_path / "d.json", rows)
    kw: dict[str, Any] = dict(cache_dir=tmp_path / "c", workers=1, progress=False)
    with pytest.raises(DataError) as err:
        preprocess(path, "tiny-qwen2-vl", **kw)
    (p,) = err.value.problems
    assert (p.source, p.index) == (str(path), 1)
    assert p.reason.startswith("refused by the tiny-qwen2-vl processor")
    res = preprocess(path, "tiny-qwen2-vl", on_error="skip", **kw)
    assert res.n_out == 1 and [q.index for q in res.problems] == [1]
    capsys.readouterr()
    assert cli_tokens(["--model", "tiny-qwen2-vl", "--image", "600x2"]) == 2  # no traceback
    assert "absolute aspect ratio must be smaller than 200" in capsys.readouterr().err


def test_video_for_an_image_only_model(tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llamafactory_mllm_demo"
    if not demo.is_dir():
        pytest.skip(f"shared fixture {demo} absent")
    found = reasons(demo / "mllm_video_demo.json", model="tiny-smolvlm")
    assert found == {
        i: ["video not supported: tiny-smolvlm (idefics3) takes images only"] for i in range(3)
    }


# --------------------------------------------------------------------------- folders


def test_reading_a_folder_lists_every_file_it_skips(tmp_path: Path) -> None:
    img(tmp_path / "images" / "a.png")
    img(tmp_path / "images" / "b.png")
    write(tmp_path / "train.json", [conv("<image>?", "x", images=["images/a.png"])])
    (tmp_path / "notes.md").write_text("# notes")
    (tmp_path / "labels.csv").write_text("a,b\n")
    (tmp_path / ".cache.json").write_text("[]")
    (tmp_path / "meta.json").write_text("{}")
    res = load_records(tmp_path)
    assert res.problems == [] and len(res.records) == 1
    assert sorted(res.skipped) == sorted(
        [
            f"{tmp_path}/.cache.json: hidden",
            f"{tmp_path}/images/: 2 image/video file(s), read only when a record names them",
            f"{tmp_path}/labels.csv: not a data file (.csv)",
            f"{tmp_path}/meta.json: metadata, not records",
            f"{tmp_path}/notes.md: not a data file (.md)",
        ]
    )


# --------------------------------------------------------------------------- still true


def test_decompression_bomb_refused_from_the_header(tmp_path: Path) -> None:
    big = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(big)  # 81 Mpx, a few KB on disk
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 2])  # truncated: decoding would fail differently
    path = write(tmp_path / "d.json", [conv("<image>?", "x", images=["bomb.png"])])
    (reason,) = reasons(path)[0]
    assert reason.startswith("image too large: bomb.png is 9000x9000 = 81,000,000 pixels")


def test_sources_never_modified_across_formats_and_preprocess(tmp_path: Path) -> None:
    from vlmfit.preprocess import preprocess

    src = tmp_path / "src"
    img(src / "a.png")
    write(
        src / "alpaca_train.json",
        [{"instruction": "<image>Colour?", "output": "red", "images": ["a.png"]}],
    )
    write(src / "bad_train.json", [conv("<image>?", "x", images=["missing.png"]), {"junk": 1}])
    before = tree_hash(src)
    check_dataset(src, on_error="skip")
    res = preprocess(
        src, "tiny-smolvlm", on_error="skip", cache_dir=tmp_path / "c", workers=1, progress=False
    )
    assert res.n_out == 1 and all(LINE.match(str(p)) for p in res.problems)
    assert tree_hash(src) == before
