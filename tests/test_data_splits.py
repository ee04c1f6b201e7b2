"""Dataset splits (issue 9.3) and one training kind per dataset (issue 9.2).

Run: ``.venv/bin/python -m pytest -q tests/test_data_splits.py``. Folders are laid out as
Hugging Face ``datasets`` resolves them (a split word in the file name; no word: ``train``),
and as vlmfit's own generator writes them (``sft_train.json`` beside ``sft_test.json``).
Preprocessing runs the real pipeline on the tiny SmolVLM (built once per session).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmfit import budget as B
from vlmfit.data.formats import load_records
from vlmfit.data.records import DataError
from vlmfit.data.validate import check_dataset


@pytest.fixture(autouse=True)
def _tiny_env(tiny_cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMFIT_CACHE", tiny_cache)
    from vlmfit.models import builders as tiny

    monkeypatch.setattr(tiny, "DEFAULT_CACHE", Path(tiny_cache))


def sft(answer: str, image: str = "img/a.png") -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": "<image>What colour?"},
            {"role": "assistant", "content": answer},
        ],
        "images": [image],
    }


def pref(answer: str) -> dict[str, Any]:
    return {
        "conversations": [{"from": "human", "value": "<image>What colour?"}],
        "chosen": {"from": "gpt", "value": answer},
        "rejected": {"from": "gpt", "value": "no idea"},
        "images": ["img/a.png"],
    }


def folder(root: Path, files: dict[str, list[dict[str, Any]]]) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), "red").save(root / "img" / "a.png")
    for name, records in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(records))
    return root


def answers(records) -> list[str]:
    return [r.all_turns()[-1]["content"][0]["text"] for r in records]


# --------------------------------------------------------------------------- splits


def test_folder_split_words_as_hf_datasets(tmp_path: Path) -> None:
    root = folder(
        tmp_path / "d",
        {
            "data/train-00000-of-00002.json": [sft("t1")],
            "data/train-00001-of-00002.json": [sft("t2")],
            "data/validation-00000-of-00001.json": [sft("v")],
            "data/test-00000-of-00001.json": [sft("x")],
            "extra.json": [sft("e")],
        },
    )
    res = load_records(root)  # split="train" by default
    assert res.problems == [] and answers(res.records) == ["t1", "t2"]
    assert f"{root}/data/test-00000-of-00001.json: split 'test'" in res.skipped
    assert f"{root}/data/validation-00000-of-00001.json: split 'validation'" in res.skipped
    assert f"{root}/extra.json: names no split" in res.skipped
    assert answers(load_records(root, split="dev").records) == ["v"]  # dev = validation
    assert answers(load_records(root, split="test").records) == ["x"]
    assert len(load_records(root, split=None).records) == 5


def test_folder_without_split_words_is_all_train(tmp_path: Path) -> None:
    root = folder(tmp_path / "d", {"part1.json": [sft("a")], "part2.json": [sft("b")]})
    assert answers(load_records(root).records) == ["a", "b"]
    res = load_records(root, split="test")
    assert res.records == []
    assert (
        res.problems[0].reason == "no data files (.json, .jsonl, .parquet, .arrow) for split 'test'"
    )
    assert f"{root}/part1.json: names no split, so it is 'train'" in res.skipped


def test_training_reads_only_the_train_split(tmp_path: Path) -> None:
    from vlmfit.train import load_training_records

    root = folder(
        tmp_path / "shapes",
        {"sft_train.json": [sft("a"), sft("b")], "sft_test.json": [sft("held out")]},
    )
    assert answers(load_training_records(str(root), preference=False)) == ["a", "b"]
    report = check_dataset(root, split="test")
    assert answers(report.records) == ["held out"]


def test_preprocess_split_keeps_test_rows_out(tmp_path: Path) -> None:
    from vlmfit.preprocess import preprocess

    root = folder(
        tmp_path / "d", {"sft_train.json": [sft("a"), sft("b")], "sft_test.json": [sft("held out")]}
    )
    kw: dict[str, Any] = dict(cache_dir=tmp_path / "cache", workers=1, progress=False)
    train = preprocess(root, "tiny-smolvlm", **kw)
    rows = [json.loads(x) for x in train.records_path.read_text().splitlines()]
    assert [r["messages"][-1]["content"][0]["text"] for r in rows] == ["a", "b"]
    test = preprocess(root, "tiny-smolvlm", split="test", **kw)
    assert test.fingerprint != train.fingerprint and test.n_out == 1


def test_preprocess_cli_dataset_split_and_image_splitting_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlmfit.cli.budget import budget_from_args
    from vlmfit.cli.preprocess import cli_preprocess
    from vlmfit.cli.preprocess import parser as _parser

    args = _parser().parse_args(["d", "--model", "tiny-smolvlm", "--no-image-splitting"])
    assert args.split == "train" and budget_from_args(args).do_image_splitting is False
    assert B.Budget(do_image_splitting=True).describe() == "--image-splitting"
    root = folder(
        tmp_path / "d", {"sft_train.json": [sft("a")], "sft_test.json": [sft("b"), sft("c")]}
    )
    argv = [
        str(root),
        "--model",
        "tiny-smolvlm",
        "--cache-dir",
        str(tmp_path / "c"),
        "--workers",
        "1",
    ]
    assert cli_preprocess([*argv, "--split", "test", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"skipped file {root}/sft_train.json: split 'train'" in out
    records = Path(out.split("records: ")[-1].strip())
    assert [json.loads(x)["messages"][-1]["content"][0]["text"] for x in records.open()] == [
        "b",
        "c",
    ]
    with pytest.raises(SystemExit):  # the old Idefics3 flag is gone, not silently renamed
        _parser().parse_args(["d", "--model", "tiny-smolvlm", "--split"])


# --------------------------------------------------------------------------- one kind


def test_folder_mixing_sft_and_preference_is_refused(tmp_path: Path) -> None:
    root = folder(
        tmp_path / "d", {"sft_train.json": [sft("a"), sft("b")], "dpo_train.json": [pref("red")]}
    )
    res = load_records(root)
    assert res.records == []
    (p,) = res.problems
    assert (p.source, p.index) == (str(root), "-")
    assert p.reason.startswith(
        f"mixed SFT and preference data: 2 SFT record(s) in {root}/sft_train.json and "
        f"1 preference record(s) in {root}/dpo_train.json; train one kind at a time"
    )
    with pytest.raises(DataError, match="mixed SFT and preference data"):
        check_dataset(root)
    # naming one kind's file works
    assert len(load_records(root / "dpo_train.json").records) == 1


def test_preprocess_never_writes_one_file_with_both_kinds(tmp_path: Path) -> None:
    from vlmfit.preprocess import preprocess

    root = folder(tmp_path / "d", {"sft_train.json": [sft("a")], "dpo_train.json": [pref("red")]})
    kw: dict[str, Any] = dict(cache_dir=tmp_path / "cache", workers=1, progress=False)
    with pytest.raises(DataError, match="mixed SFT and preference data"):
        preprocess(root, "tiny-smolvlm", **kw)
    res = preprocess(root, "tiny-smolvlm", on_error="skip", **kw)
    assert res.n_out == 0 and not res.records_path.read_text().strip()
    assert [p.reason.split(":")[0] for p in res.problems] == ["mixed SFT and preference data"]
