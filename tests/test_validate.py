"""Tests for dataset validation and ``vlmfit check`` (``vlmfit.data.validate``); fast, CPU only.

Run: ``.venv/bin/python -m pytest -q tests/test_validate.py``. Every bad file is built in
``tmp_path`` with PIL; the shared LLaMA-Factory fixture is only read.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmfit import cli
from vlmfit.data import media, validate
from vlmfit.data.records import DataError, MediaRef, Record
from vlmfit.data.validate import check_dataset, validate_records

DEMO = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llamafactory_mllm_demo"
needs_demo = pytest.mark.skipif(not DEMO.is_dir(), reason=f"shared fixture {DEMO} absent")
LINE = re.compile(r"^(?P<file>[^:]+):(?P<record>[^:]+): (?P<reason>.+)$")


def png_bytes(size: tuple[int, int] = (8, 6), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    noise = Image.effect_noise(size, 64).convert("RGB")  # noise: JPEG data is not tiny
    noise.save(buf, format=fmt)
    return buf.getvalue()


def sft(content: str = "<image>What?", answer: str = "red", **media: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": answer},
        ],
        **media,
    }


def dataset(
    tmp_path: Path, bad: Any, files: dict[str, bytes] | None = None, good: Any = None
) -> Path:
    """``d.json`` = [good record, bad record] with ``good.png`` and ``files`` beside it."""
    (tmp_path / "good.png").write_bytes(png_bytes())
    for name, data in (files or {}).items():
        (tmp_path / name).write_bytes(data)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([good or sft(images=["good.png"]), bad]))
    return path


def _turns(*roles_texts: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": t} for r, t in roles_texts]


U, A, S = "user", "assistant", "system"

PREF = {
    "messages": _turns((U, "<image>q")),
    "chosen": {"role": A, "content": "c"},
    "rejected": {"role": A, "content": "d"},
    "images": ["good.png"],
}
PREF_CASES = {"preference prompt ends with assistant", "empty chosen"}

CASES: dict[str, tuple[Any, dict[str, bytes], str]] = {
    # name: (bad record, files to write, expected reason prefix)
    "missing image": (sft(images=["nope.png"]), {}, "image not found: nope.png"),
    "corrupt image": (sft(images=["c.png"]), {"c.png": b"garbage" * 20}, "cannot identify image"),
    "truncated image": (
        sft(images=["t.jpg"]),
        {"t.jpg": png_bytes((64, 64), "JPEG")[:400]},
        "truncated image: t.jpg",
    ),
    "unsupported image": (
        sft(images=["u.png"]),
        {"u.png": b"%PDF-1.4\n" + b"0" * 64},
        "unsupported image format PDF",
    ),
    "zero-size image": (sft(images=["z.png"]), {"z.png": b""}, "empty image file (0 bytes)"),
    "bomb": (sft(images=["big.png"]), {"big.png": png_bytes((300, 300))}, "image too large"),
    "missing video": (sft("<video>Why?", videos=["v.mp4"]), {}, "video not found: v.mp4"),
    "corrupt video": (
        sft("<video>Why?", videos=["v.mp4"]),
        {"v.mp4": b"\x00\x01junk" * 50},
        "cannot read video",
    ),
    "absolute path": (sft(images=["/etc/hostname"]), {}, "path escapes the dataset folder"),
    "dotdot path": (sft(images=["../x.png"]), {}, "path escapes the dataset folder"),
    "mismatch": (
        sft("<image><image>Hi", images=["good.png"]),
        {},
        "placeholder/media mismatch: 2 <image> placeholders but 1 image",
    ),
    "empty assistant": (sft(answer="  ", images=["good.png"]), {}, "empty assistant turn"),
    "missing assistant": (
        {"messages": _turns((U, "<image>Hi")), "images": ["good.png"]},
        {},
        "missing assistant turn",
    ),
    "ends with user": (
        {"messages": _turns((U, "a"), (A, "b"), (U, "c"))},
        {},
        "roles out of order: the conversation ends with 'user'",
    ),
    "system not first": (
        {"messages": _turns((U, "a"), (S, "b"), (A, "c"))},
        {},
        "roles out of order: system turn at messages[1]",
    ),
    "starts with assistant": (
        {"messages": _turns((A, "a"), (U, "b"), (A, "c"))},
        {},
        "roles out of order: messages[0] is 'assistant', expected 'user'",
    ),
    "unknown role": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "tool", "value": "b"}]},
        {},
        "unknown role: 'tool'",
    ),
    "not an object": ("just a string", {}, "record is not an object"),
    "preference prompt ends with assistant": (
        {
            "messages": _turns((U, "a"), (A, "b")),
            "chosen": {"role": A, "content": "c"},
            "rejected": {"role": A, "content": "d"},
        },
        {},
        "roles out of order: the preference prompt ends with 'assistant'",
    ),
    "empty chosen": (
        {
            "messages": _turns((U, "a")),
            "chosen": {"role": A, "content": ""},
            "rejected": {"role": A, "content": "d"},
        },
        {},
        "empty assistant turn: chosen[0]",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_reason_gives_exactly_one_problem(tmp_path: Path, name: str) -> None:
    bad, files, reason = CASES[name]
    path = dataset(tmp_path, bad, files, good=PREF if name in PREF_CASES else None)
    report = check_dataset(path, on_error="skip", max_pixels=200 * 200)
    assert [str(p) for p in report.problems] == [str(report.problems[0])]
    (p,) = report.problems
    assert str(p).startswith(f"{path}:1: {reason}"), str(p)
    assert [r.index for r in report.records] == [0] and report.skipped == 1
    assert report.by_reason == {validate.reason_kind(p.reason): 1}


def test_escaping_paths_are_never_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes())
    data = tmp_path / "data"
    data.mkdir()
    opened: list[str] = []
    real = media.check_image

    def spy(ref: Any, **kw: Any) -> tuple[int, int]:
        opened.append(ref.describe())
        return real(ref, **kw)

    monkeypatch.setattr(media, "check_image", spy)
    path = dataset(data, sft("<image>a<image>", images=[str(outside), "../outside.png"]))
    report = check_dataset(path, on_error="skip")
    (p,) = report.problems
    assert p.reason.count("path escapes the dataset folder") == 2
    assert opened == ["good.png"]


def test_fail_policy_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join([json.dumps(sft(images=["x.png"])), "{oops", json.dumps(sft(answer=""))])
    )
    with pytest.raises(DataError) as err:
        check_dataset(path)
    assert [str(p).split(": ")[0] for p in err.value.problems] == [
        f"{path}:1",
        f"{path}:2",
        f"{path}:3",
    ]
    assert "3 problem(s) in the data" in str(err.value)


def test_skip_policy_counts_and_lists(tmp_path: Path) -> None:
    path = dataset(tmp_path, sft(images=["nope.png", "gone.png"], content="<image><image>"))
    report = check_dataset(path, on_error="skip")
    assert report.skipped == 1 and len(report.problems) == 2
    assert report.by_reason == {"image not found": 2}
    assert (report.n_images, report.image_sizes, report.counts) == (
        1,
        [(8, 6)],
        {"llamafactory": 1},
    )


def test_media_checked_once_per_unique_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(media, "check_image", lambda ref, **kw: calls.append(ref.path) or (4, 3))
    (tmp_path / "a.png").write_bytes(b"")  # never decoded: check_image is stubbed
    recs = [sft("<image><image>", images=["a.png", "a.png"]) for _ in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    report = check_dataset(tmp_path / "d.json")
    assert len(calls) == 1 and report.image_sizes == [(4, 3)] * 10


def test_validate_records_preference_switch() -> None:
    prompt = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
    other = [{"role": "assistant", "content": [{"type": "text", "text": "b"}]}]
    pref = Record(prompt, chosen=answer, rejected=other, source="s", index=0)
    sft_rec = Record(prompt + answer, source="s", index=1)
    assert validate_records([pref, sft_rec], check_media=False) == []
    assert [p.reason.split(":")[0] for p in validate_records([sft_rec], preference=True)] == [
        "missing chosen/rejected"
    ]
    assert validate_records([Record(prompt, source="s", index=2)], require_assistant=False) == []
    bad = Record(prompt + answer, images=[MediaRef(data=png_bytes())], source="s", index=3)
    (p,) = validate_records([bad])
    assert p.reason == "placeholder/media mismatch: 0 <image> placeholders but 1 image"


def test_embedded_images_are_checked(tmp_path: Path) -> None:
    from datasets import Dataset, Sequence
    from datasets import Image as HFImage

    rows = {
        "messages": [
            [
                {"role": "user", "content": [{"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
            ]
        ]
        * 2,
        "images": [
            [{"bytes": png_bytes((9, 4)), "path": "a.png"}],
            [{"bytes": b"junk" * 9, "path": "b.png"}],
        ],
    }
    Dataset.from_dict(rows).cast_column("images", Sequence(HFImage())).save_to_disk(
        str(tmp_path / "ds")
    )
    report = check_dataset(tmp_path / "ds", on_error="skip")
    assert report.image_sizes == [(9, 4)] and report.counts == {"trl": 1}
    (p,) = report.problems
    assert p.index == 1 and "b.png (embedded)" in p.reason


# --------------------------------------------------------------------------- command line


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = cli.main(["check", *argv])
    return code, capsys.readouterr().out.splitlines()


@needs_demo
def test_cli_ok_on_demo_data(capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in DEMO.rglob("*") if p.is_file()}
    code, out = run_cli(capsys, str(DEMO), "--model", "tiny-qwen2-vl")
    assert code == 0
    assert out[:2] == [
        f"skipped file {DEMO}/README.md: not a data file (.md)",
        f"skipped file {DEMO}/mllm_demo_data/: 6 image/video file(s), read only when a record "
        "names them",
    ]
    out = out[2:]
    assert out[0].endswith("9 records (llamafactory: 9); format llamafactory")
    assert out[1] == "turns: 30 (system 0, user 15, assistant 15); preference pairs: 0"
    assert out[2].startswith("images: 8, ") and out[3].startswith("videos: 3, ")
    assert out[4].startswith("visual tokens per image (tiny-qwen2-vl): ")
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in DEMO.rglob("*") if p.is_file()}
    assert after == before


def test_cli_lists_problems_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = dataset(tmp_path, sft(images=["nope.png"]))
    before = path.read_bytes()
    code, out = run_cli(capsys, str(path))
    assert code == 1
    assert out[0] == f"{path}:1: image not found: nope.png"
    assert all(LINE.match(line) for line in out[:-1])
    assert out[-1].startswith("1 problem(s) in 1 record(s) of ")
    code, out = run_cli(capsys, str(path), "--skip-bad")
    assert code == 0 and out[1] == "skipped 1 bad record(s) (1 problem(s))"
    assert out[2].endswith("1 records (llamafactory: 1); format llamafactory")
    assert path.read_bytes() == before


def test_cli_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = dataset(tmp_path, sft(images=["good.png"]))
    assert run_cli(capsys, str(path), "--model", "nope")[0] == 2
    try:  # argparse's usage error: exit 2, raised or returned by cli.main
        code = cli.main(["check", str(path), "--format", "sharegpt4v"])
    except SystemExit as e:
        code = e.code
    assert code == 2
    code, out = run_cli(capsys, str(path), "--format", "unsloth")
    assert code == 1 and "record does not match format 'unsloth'" in out[0]


def test_report_fields_on_good_data(tmp_path: Path) -> None:
    path = dataset(
        tmp_path,
        sft("<video>x", videos=[])
        | {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    )
    report = check_dataset(path)

    def fields(r: validate.Report) -> tuple[Any, ...]:
        return (len(r.records), r.skipped, r.n_images, r.n_videos, r.by_reason, r.problems)

    assert fields(report) == (2, 0, 1, 0, {}, [])
