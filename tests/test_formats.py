"""Tests for the dataset readers (``vlmfit.data.formats``); fast, CPU only.

Run: ``.venv/bin/python -m pytest -q tests/test_formats.py``. Bad data is built in
``tmp_path``; the shared LLaMA-Factory fixture is only read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmfit.data.formats import FORMATS, detect_format, load_records, parse_record
from vlmfit.data.records import MediaRef, Record

DEMO = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llamafactory_mllm_demo"
needs_demo = pytest.mark.skipif(not DEMO.is_dir(), reason=f"shared fixture {DEMO} absent")


def png(path: Path, size: tuple[int, int] = (8, 6), colour: str = "red") -> str:
    """Write a small PNG and return its name (relative to its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


def write_json(path: Path, records: Any) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMG = {"type": "image"}


def txt(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


# --------------------------------------------------------------------------- peer fixture


@needs_demo
def test_llamafactory_image_demo_loads_unchanged() -> None:
    before = tree_hash(DEMO)
    res = load_records(DEMO / "mllm_demo.json")
    assert res.problems == []
    assert (res.fmt, res.counts) == ("llamafactory", {"llamafactory": 6})
    assert [len(r.messages) for r in res.records] == [4] * 6
    assert [len(r.images) for r in res.records] == [2, 1, 1, 2, 1, 1]
    first = res.records[0]
    assert first.messages[0] == user(IMG, txt("Who are they?"))
    assert first.messages[1] == assistant("They're Kane and Gretzka from Bayern Munich.")
    assert first.messages[2] == user(txt("What are they doing?"), IMG)
    assert [m.origin for m in first.images] == ["mllm_demo_data/1.jpg"] * 2
    assert first.images[0].path == str((DEMO / "mllm_demo_data/1.jpg").resolve())
    assert (first.source, first.index, first.where) == (
        str(DEMO / "mllm_demo.json"),
        0,
        f"{DEMO / 'mllm_demo.json'}:0",
    )
    assert [r.images[0].origin for r in res.records[1:3]] == [
        "mllm_demo_data/2.jpg",
        "mllm_demo_data/3.jpg",
    ]
    assert tree_hash(DEMO) == before


@needs_demo
def test_llamafactory_video_demo_loads_unchanged() -> None:
    res = load_records(DEMO / "mllm_video_demo.json")
    assert res.problems == [] and res.counts == {"llamafactory": 3}
    assert [[v.origin for v in r.videos] for r in res.records] == [
        ["mllm_demo_data/1.mp4"],
        ["mllm_demo_data/2.avi"],
        ["mllm_demo_data/3.mp4"],
    ]
    assert res.records[1].messages[0] == user({"type": "video"}, txt("What is she doing?"))
    assert all(r.images == [] for r in res.records)


@needs_demo
def test_demo_folder_reads_each_file() -> None:
    res = load_records(DEMO)
    assert res.problems == [] and res.counts == {"llamafactory": 9}
    assert sum(len(r.videos) for r in res.records) == 3


# --------------------------------------------------------------------------- formats a..d


def test_sharegpt_conversations_with_system(tmp_path: Path) -> None:
    png(tmp_path / "img" / "a.png")
    rec = {
        "conversations": [
            {"from": "human", "value": "Look: <image> what?"},
            {"from": "gpt", "value": "A red box."},
        ],
        "system": "Be brief.",
        "images": ["img/a.png"],
    }
    res = load_records(write_jsonl(tmp_path / "d.jsonl", [rec]))
    assert res.problems == [] and res.fmt == "llamafactory"
    (r,) = res.records
    assert r.index == 1  # JSONL: 1-based line
    assert r.messages == [
        {"role": "system", "content": [txt("Be brief.")]},
        user(txt("Look: "), IMG, txt(" what?")),
        assistant("A red box."),
    ]
    assert r.images == [MediaRef(str((tmp_path / "img/a.png").resolve()), origin="img/a.png")]


def test_unsloth_numbered_placeholders_follow_text_order(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png", colour="blue")
    rec = {
        "text": "<image_no_2> left, <image_no_1> right,\n<image_no_2> again.",
        "images": ["a.png", "b.png"],
        "question": "Describe.",
    }
    res = load_records(write_json(tmp_path / "u.json", [rec]))
    assert res.problems == [] and res.fmt == "unsloth"
    (r,) = res.records
    assert [m.origin for m in r.images] == ["b.png", "a.png", "b.png"]
    assert r.messages == [user(IMG, IMG, IMG, txt("Describe.")), assistant("left, right, again.")]


def test_unsloth_video_and_plain_caption(tmp_path: Path) -> None:
    rec = {"text": "<video_no_1>A cat jumps.", "videos": ["v.mp4"]}
    (r,) = load_records(write_json(tmp_path / "u.json", [rec])).records
    assert r.messages == [user({"type": "video"}), assistant("A cat jumps.")]
    assert [v.origin for v in r.videos] == ["v.mp4"]


def test_trl_content_parts_paths_and_embedded(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    embedded = {"bytes": (tmp_path / "a.png").read_bytes(), "path": "orig.png"}
    messages = [user(IMG, txt("Colour?"), IMG), assistant("red")]
    r = parse_record(
        {"messages": messages, "images": ["a.png", embedded]},
        "trl",
        base=tmp_path,
        source="x",
        index=0,
    )
    assert r.messages == messages and r.fmt == "trl"
    assert r.images[0].path == str((tmp_path / "a.png").resolve())
    assert r.images[1].data == embedded["bytes"] and r.images[1].describe() == "orig.png (embedded)"
    pil = Image.new("RGB", (4, 4))
    r = parse_record(
        {"messages": messages[:1], "images": [pil, pil]}, "trl", base=tmp_path, source="x", index=0
    )
    assert r.images[0].data is pil


def test_trl_preference_lists_and_plain_strings(tmp_path: Path) -> None:
    recs = [
        {
            "prompt": [user(IMG, txt("What is it?"))],
            "chosen": [assistant("A box.")],
            "rejected": [assistant("A cat.")],
            "images": ["a.png"],
        },
        {
            "prompt": "<image>What is it?",
            "chosen": "A box.",
            "rejected": "A cat.",
            "images": ["a.png"],
        },
    ]
    png(tmp_path / "a.png")
    res = load_records(write_json(tmp_path / "p.json", recs))
    assert res.problems == [] and res.counts == {"trl_preference": 2}
    for r in res.records:
        assert r.is_preference
        assert r.messages == [user(IMG, txt("What is it?"))]
        assert (r.chosen, r.rejected) == ([assistant("A box.")], [assistant("A cat.")])


def test_llamafactory_preference_message_dicts(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    recs = [
        {
            "conversations": [{"from": "human", "value": "<image>Shape?"}],
            "chosen": {"from": "gpt", "value": "circle"},
            "rejected": {"from": "gpt", "value": "square"},
            "images": ["a.png"],
        },
        {
            "messages": [{"role": "user", "content": "<image>Shape?"}],
            "chosen": {"role": "assistant", "content": "circle"},
            "rejected": {"role": "assistant", "content": "square"},
            "images": ["a.png"],
        },
    ]
    res = load_records(write_json(tmp_path / "p.json", recs))
    assert res.problems == [] and res.counts == {"llamafactory_preference": 2}
    for r in res.records:
        assert r.messages == [user(IMG, txt("Shape?"))]
        assert (r.chosen, r.rejected) == ([assistant("circle")], [assistant("square")])


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": [{"role": "user", "content": "<image>hi"}], "images": []}, "llamafactory"),
        ({"conversations": []}, "llamafactory"),
        ({"messages": [user(IMG)], "images": ["a"]}, "trl"),
        ({"text": "<image_no_1>x", "images": ["a"]}, "unsloth"),
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "trl_preference"),
        ({"messages": [], "chosen": {}, "rejected": {}}, "llamafactory_preference"),
        ({"question": "q", "answer": "a"}, None),
        ([1, 2], None),
    ],
)
def test_detect_format(record: Any, fmt: str | None) -> None:
    assert detect_format(record) == fmt


def test_wrong_override_gives_clear_problems(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    path = write_json(
        tmp_path / "d.json",
        [
            {
                "messages": [
                    {"role": "user", "content": "<image>x"},
                    {"role": "assistant", "content": "y"},
                ],
                "images": ["a.png"],
            }
        ],
    )
    assert load_records(path).fmt == "llamafactory"
    res = load_records(path, fmt="unsloth")
    assert res.records == [] and res.fmt == "unsloth"
    assert [str(p) for p in res.problems] == [
        f"{path}:0: record does not match format 'unsloth': no 'text' string "
        "(keys found: images, messages)"
    ]
    res = load_records(path, fmt="trl_preference")
    assert "no 'prompt', 'chosen', 'rejected'" in res.problems[0].reason
    assert load_records(path, fmt="parquet").problems[0].reason.startswith("not a parquet file")
    with pytest.raises(ValueError, match="unknown format"):
        load_records(path, fmt="sharegpt4v")
    assert "hf_disk" in FORMATS


def test_unrecognised_record_names_keys_and_formats(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", [{"question": "q", "answer": "a"}])
    (p,) = load_records(path).problems
    assert p.index == 0
    assert p.reason.startswith(
        "unrecognised record: keys found: answer, question; expected one of:"
    )
    assert "unsloth (text)" in p.reason and "trl_preference" in p.reason


# --------------------------------------------------------------------------- errors


def test_jsonl_bad_line_reported_others_load(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", '{"messages": [', good, "[1]"])
    res = load_records(path)
    assert [r.index for r in res.records] == [1, 4]
    assert [(p.index, p.reason.split(":")[0]) for p in res.problems] == [
        (3, "invalid JSON"),
        (5, "record is not an object"),
    ]
    assert str(res.problems[0]).startswith(f"{path}:3: invalid JSON: ")


def test_json_invalid_reports_position(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [} \n]\n')
    (p,) = load_records(path).problems
    assert (p.source, p.index) == (str(path), "-")
    assert p.reason.startswith("invalid JSON: ") and "line 3 column" in p.reason


def test_json_lines_in_a_json_file(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "d.json", [good, good])
    assert [r.index for r in load_records(path).records] == [1, 2]


@pytest.mark.parametrize(
    ("content", "images", "reason"),
    [
        (
            "<image><image>x",
            ["a.png"],
            "placeholder/media mismatch: 2 <image> placeholders but 1 image",
        ),
        ("x", ["a.png"], "placeholder/media mismatch: 0 <image> placeholders but 1 image"),
        ("<image_no_3>x", ["a.png"], "placeholder/media mismatch: <image_no_3> but 1 image"),
        ("<image>x", "a.png", None),  # a single path is accepted
    ],
)
def test_placeholder_media_mismatch(
    tmp_path: Path, content: str, images: Any, reason: str | None
) -> None:
    png(tmp_path / "a.png")
    rec = {
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "y"}],
        "images": images,
    }
    res = load_records(write_json(tmp_path / "d.json", [rec]))
    assert [p.reason for p in res.problems] == ([reason] if reason else [])


def test_unsloth_unused_entry_is_a_mismatch(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "u.json", [{"text": "<image_no_2> x", "images": ["a.png", "b.png"]}]
    )
    (p,) = load_records(path).problems
    assert p.reason == (
        "placeholder/media mismatch: image 1 of 2 is not referenced by any <image_no_N> placeholder"
    )


def test_literal_placeholder_in_text_part_rejected(tmp_path: Path) -> None:
    rec = {"messages": [user(txt("<image>hi")), assistant("x")], "images": ["a.png"]}
    (p,) = load_records(write_json(tmp_path / "d.json", [rec])).problems
    assert p.reason.startswith("placeholder in a text part: '<image>' in messages[0].content[0]")


def test_unknown_role(tmp_path: Path) -> None:
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}
    (p,) = load_records(write_json(tmp_path / "d.json", [rec])).problems
    assert p.reason.startswith("unknown role: 'bot' in conversations[1]")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_path_escape_rejected(tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside.png"
    png(outside)
    data = tmp_path / "data"
    data.mkdir()
    origin = {"absolute": str(outside), "dotdot": "sub/../../outside.png", "symlink": "link.png"}[
        kind
    ]
    if kind == "symlink":
        os.symlink(outside, data / "link.png")
    rec = {
        "messages": [
            {"role": "user", "content": "<image>x"},
            {"role": "assistant", "content": "y"},
        ],
        "images": [origin],
    }
    res = load_records(write_json(data / "d.json", [rec]))
    assert res.records == []
    (p,) = res.problems
    assert p.reason.startswith(f"path escapes the dataset folder: {origin!r}")


def test_dotdot_staying_inside_is_fine(tmp_path: Path) -> None:
    png(tmp_path / "img" / "a.png")
    rec = {
        "messages": [
            {"role": "user", "content": "<image>x"},
            {"role": "assistant", "content": "y"},
        ],
        "images": ["other/../img/a.png"],
    }
    (r,) = load_records(write_json(tmp_path / "d.json", [rec])).records
    assert r.images[0].path == str((tmp_path / "img/a.png").resolve())


def test_missing_file_and_unsupported_suffix(tmp_path: Path) -> None:
    assert load_records(tmp_path / "nope.json").problems[0].reason == "no such file or folder"
    (tmp_path / "d.csv").write_text("a,b\n")
    assert load_records(tmp_path / "d.csv").problems[0].reason.startswith("unsupported file type")


# --------------------------------------------------------------------------- HF datasets


def _hf_rows(tmp_path: Path) -> dict[str, list[Any]]:
    png(tmp_path / "src" / "a.png")
    png(tmp_path / "src" / "b.png", size=(5, 7))
    blob = [(tmp_path / "src" / n).read_bytes() for n in ("a.png", "b.png")]
    return {
        "messages": [
            [user(IMG, txt("Colour?")), assistant("red")],
            [user(txt("Two:"), IMG, IMG), assistant("both")],
        ],
        "images": [
            [{"bytes": blob[0], "path": "a.png"}],
            [{"bytes": blob[0], "path": "a.png"}, {"bytes": blob[1], "path": "b.png"}],
        ],
    }


def _image_dataset(tmp_path: Path) -> Any:
    from datasets import Dataset, Image, Sequence

    return Dataset.from_dict(_hf_rows(tmp_path)).cast_column("images", Sequence(Image()))


def test_saved_dataset_with_image_feature(tmp_path: Path) -> None:
    ds = _image_dataset(tmp_path)
    ds.save_to_disk(str(tmp_path / "disk"))
    res = load_records(tmp_path / "disk")
    assert res.problems == []
    assert (res.fmt, res.counts) == ("hf_disk", {"trl": 2})
    r = res.records[1]
    assert r.index == 1 and r.fmt == "trl"
    assert r.messages == [user(txt("Two:"), IMG, IMG), assistant("both")]
    assert [m.describe() for m in r.images] == ["a.png (embedded)", "b.png (embedded)"]
    assert isinstance(r.images[1].data, bytes)


def test_saved_dataset_dict_split(tmp_path: Path) -> None:
    from datasets import DatasetDict

    ds = _image_dataset(tmp_path)
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    res = load_records(tmp_path / "dd", split="test")
    assert len(res.records) == 1 and res.records[0].source == str(tmp_path / "dd" / "test")
    assert len(load_records(tmp_path / "dd").records) == 2  # split="train" by default
    assert len(load_records(tmp_path / "dd", split=None).records) == 3
    (p,) = load_records(tmp_path / "dd", split="dev").problems
    assert p.reason.startswith("no split 'dev'")


def test_parquet_with_image_feature(tmp_path: Path) -> None:
    path = tmp_path / "train-00000-of-00001.parquet"
    _image_dataset(tmp_path).to_parquet(str(path))
    res = load_records(path)
    assert res.problems == [] and (res.fmt, res.counts) == ("parquet", {"trl": 2})
    assert [len(r.images) for r in res.records] == [1, 2]
    assert load_records(tmp_path, split="train").counts == {"trl": 2}
    assert load_records(tmp_path, split="test").problems[0].reason.startswith("no data files")


def test_folder_reads_each_file_with_its_format(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    write_json(
        tmp_path / "sft_train.json",
        [
            {
                "messages": [
                    {"role": "user", "content": "<image>x"},
                    {"role": "assistant", "content": "y"},
                ],
                "images": ["a.png"],
            }
        ],
    )
    write_jsonl(
        tmp_path / "caps_train.jsonl", [{"text": "<image_no_1> a box", "images": ["a.png"]}]
    )
    write_json(tmp_path / "sft_test.json", [{"text": "x"}])
    (tmp_path / "meta.json").write_text("{}")
    res = load_records(tmp_path, split="train")
    assert res.problems == []
    assert (res.fmt, res.counts) == ("mixed", {"unsloth": 1, "llamafactory": 1})
    assert isinstance(res.records[0], Record)
