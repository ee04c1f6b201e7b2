"""Peers' dataset layouts, written as each project documents them, read unchanged (issue 9.1).

Run: ``.venv/bin/python -m pytest -q tests/test_data_formats.py``. Each record below follows
its project's own documentation: LLaMA-Factory ``data/README.md`` and ``dataset_info.json``
(alpaca default format, preference, sharegpt / openai tags), ms-swift's custom-dataset docs
(RLHF ``rejected_response`` / ``rejected_messages``), TRL's dataset-formats guide
(prompt-completion, implicit-prompt preference), the_cauldron's ``images`` + ``texts``,
LLaVA's instruct / pretrain JSON, Qwen's and Unsloth's content parts, OpenAI ``image_url``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmfit.cli.data import cli_check
from vlmfit.data.formats import load_records
from vlmfit.data.records import Record
from vlmfit.data.validate import check_dataset

IMG = {"type": "image"}


def txt(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def turn(role: str, *parts: Any) -> dict[str, Any]:
    return {"role": role, "content": [txt(p) if isinstance(p, str) else p for p in parts]}


def png(path: Path, size: tuple[int, int] = (8, 6), colour: str = "red") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


def write(path: Path, records: Any, jsonl: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def only(path: Path, **kw: Any) -> Record:
    """The one record of a dataset that must load and validate without a problem."""
    res = load_records(path, **kw)
    assert res.problems == [], res.problems
    (record,) = res.records
    report = check_dataset(path, **kw)  # structure and media checks pass too
    assert report.problems == [] and len(report.records) == 1
    return record


# --------------------------------------------------------------------------- LLaMA-Factory


def test_llamafactory_alpaca_with_images_history_and_system(tmp_path: Path) -> None:
    png(tmp_path / "mllm_demo_data" / "1.jpg.png")
    record = {
        "instruction": "<image>Who are they?",
        "input": "Answer briefly.",
        "output": "Kane and Gretzka.",
        "system": "You are a football expert.",
        "history": [["Hello", "Hi, how can I help?"]],
        "images": ["mllm_demo_data/1.jpg.png"],
    }
    r = only(write(tmp_path / "alpaca.json", [record]))
    assert r.fmt == "alpaca" and not r.is_preference
    assert r.messages == [
        turn("system", "You are a football expert."),
        turn("user", "Hello"),
        turn("assistant", "Hi, how can I help?"),
        turn("user", IMG, "Who are they?\nAnswer briefly."),  # instruction \n input, as LF
        turn("assistant", "Kane and Gretzka."),
    ]
    assert [m.origin for m in r.images] == ["mllm_demo_data/1.jpg.png"]


def test_llamafactory_alpaca_preference(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    record = {
        "instruction": "<image>What is shown?",
        "input": "",
        "chosen": "A red square.",
        "rejected": "A blue circle.",
        "images": ["a.png"],
    }
    r = only(write(tmp_path / "pref.json", [record]))
    assert r.fmt == "alpaca_preference" and r.is_preference
    assert r.messages == [turn("user", IMG, "What is shown?")]
    assert r.chosen == [turn("assistant", "A red square.")]
    assert r.rejected == [turn("assistant", "A blue circle.")]


def _dataset_dir(tmp_path: Path) -> Path:
    """A LLaMA-Factory data/ folder: dataset_info.json naming SFT and preference datasets."""
    data = tmp_path / "data"
    png(data / "mllm_demo_data" / "1.png")
    write(
        data / "custom_sft.json",
        [
            {
                "question": "<image>Colour?",
                "answer": "red",
                "sys": "Be brief.",
                "pictures": ["mllm_demo_data/1.png"],
            }
        ],
    )
    write(
        data / "chat" / "talk.jsonl",
        [
            {
                "dialog": [
                    {"speaker": "customer", "text": "<image>What is it?"},
                    {"speaker": "agent", "text": "A red patch."},
                ],
                "pics": ["mllm_demo_data/1.png"],  # relative to the dataset_dir (media_dir)
            }
        ],
        jsonl=True,
    )
    write(
        data / "rlhf.json",
        [
            {
                "conversations": [{"from": "human", "value": "<image>Describe it."}],
                "chosen": {"from": "gpt", "value": "A red patch."},
                "rejected": {"from": "gpt", "value": "A dog."},
                "images": ["mllm_demo_data/1.png"],
            }
        ],
    )
    info = {
        "custom_sft": {
            "file_name": "custom_sft.json",
            "columns": {
                "prompt": "question",
                "response": "answer",
                "system": "sys",
                "images": "pictures",
            },
        },
        "talk": {
            "file_name": "chat",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog", "images": "pics"},
            "tags": {
                "role_tag": "speaker",
                "content_tag": "text",
                "user_tag": "customer",
                "assistant_tag": "agent",
            },
        },
        "rlhf_demo": {
            "file_name": "rlhf.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {
                "messages": "conversations",
                "chosen": "chosen",
                "rejected": "rejected",
                "images": "images",
            },
        },
        "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"},
    }
    write(data / "dataset_info.json", info)
    return data


def test_llamafactory_dataset_info_columns_formatting(tmp_path: Path) -> None:
    data = _dataset_dir(tmp_path)
    before = tree_hash(data)
    r = only(data, dataset="custom_sft")
    assert r.fmt == "alpaca" and r.source == str(data / "custom_sft.json") and r.index == 0
    assert r.messages == [
        turn("system", "Be brief."),
        turn("user", IMG, "Colour?"),
        turn("assistant", "red"),
    ]
    assert r.images[0].path == str((data / "mllm_demo_data" / "1.png").resolve())
    # DATASET_DIR/NAME says the same thing, and so does the command line
    assert load_records(data / "custom_sft").records[0].messages == r.messages
    assert cli_check([str(data), "--dataset", "custom_sft"]) == 0
    assert cli_check([str(data / "rlhf_demo")]) == 0
    assert tree_hash(data) == before


def test_llamafactory_dataset_info_tags_and_folder(tmp_path: Path) -> None:
    data = _dataset_dir(tmp_path)
    r = only(data / "talk")
    assert r.fmt == "llamafactory" and r.source == str(data / "chat" / "talk.jsonl")
    assert r.messages == [turn("user", IMG, "What is it?"), turn("assistant", "A red patch.")]
    assert r.images[0].path == str((data / "mllm_demo_data" / "1.png").resolve())


def test_llamafactory_dataset_info_ranking(tmp_path: Path) -> None:
    data = _dataset_dir(tmp_path)
    r = only(data / "dataset_info.json", dataset="rlhf_demo")
    assert r.fmt == "llamafactory_preference" and r.is_preference
    assert r.messages == [turn("user", IMG, "Describe it.")]
    assert (r.chosen, r.rejected) == (
        [turn("assistant", "A red patch.")],
        [turn("assistant", "A dog.")],
    )


def test_llamafactory_dataset_info_refusals(tmp_path: Path) -> None:
    data = _dataset_dir(tmp_path)
    (p,) = load_records(data).problems
    assert p.source == str(data) and p.index == "-"
    assert p.reason.startswith("a LLaMA-Factory dataset_dir: name one of its datasets")
    assert "alpaca_en, custom_sft, rlhf_demo, talk" in p.reason
    (p,) = load_records(data, dataset="alpaca_en").problems
    assert p.source == str(data / "dataset_info.json")
    assert p.reason.startswith("dataset 'alpaca_en' is not local (hf_hub_url")
    (p,) = load_records(data, dataset="nope").problems
    assert p.reason.startswith("no dataset 'nope' in")


# --------------------------------------------------------------------------- ms-swift


def test_swift_rejected_response_is_a_preference_pair(tmp_path: Path) -> None:
    png(tmp_path / "cat.png")
    record = {
        "messages": [
            {"role": "system", "content": "You are a useful and harmless assistant"},
            {"role": "user", "content": "<image>What is in the image?"},
            {"role": "assistant", "content": "cat"},
        ],
        "images": ["cat.png"],
        "rejected_response": "dog",
    }
    r = only(write(tmp_path / "dpo.jsonl", [record], jsonl=True))
    assert r.fmt == "swift_preference" and r.is_preference and r.index == 1
    assert r.messages == [
        turn("system", "You are a useful and harmless assistant"),
        turn("user", IMG, "What is in the image?"),
    ]
    assert (r.chosen, r.rejected) == ([turn("assistant", "cat")], [turn("assistant", "dog")])


def test_swift_rejected_messages_with_rejected_images(tmp_path: Path) -> None:
    png(tmp_path / "cat.png")
    conv = [{"role": "user", "content": "<image>What is this?"}]
    record = {
        "messages": [*conv, {"role": "assistant", "content": "A kitten."}],
        "images": ["cat.png"],
        "rejected_messages": [*conv, {"role": "assistant", "content": "A puppy."}],
        "rejected_images": ["cat.png"],
    }
    path = write(tmp_path / "dpo.jsonl", [record], jsonl=True)
    r = only(path)
    assert r.fmt == "swift_preference" and len(r.images) == 1
    assert (r.chosen, r.rejected) == (
        [turn("assistant", "A kitten.")],
        [turn("assistant", "A puppy.")],
    )
    # other images for the rejected answer, or another prompt: not one DPO pair, said so
    png(tmp_path / "dog.png")
    bad_images = {**record, "rejected_images": ["dog.png"]}
    other_prompt = {
        **record,
        "rejected_messages": [
            {"role": "user", "content": "<image>Name it."},
            {"role": "assistant", "content": "A puppy."},
        ],
    }
    image_pair = {
        "messages": record["messages"],
        "images": ["cat.png"],
        "rejected_images": ["dog.png"],
    }
    rows = [bad_images, other_prompt, image_pair]
    res = load_records(write(tmp_path / "bad.jsonl", rows, jsonl=True))
    assert res.records == []
    assert [p.index for p in res.problems] == [1, 2, 3]
    assert res.problems[0].reason.startswith("unsupported preference: 'rejected_images' differ")
    assert res.problems[1].reason.startswith("unsupported preference: 'rejected_messages' must")
    assert res.problems[2].reason.startswith(
        "unsupported preference: 'rejected_images' without 'rejected_response'"
    )


# --------------------------------------------------------------------------- TRL


def test_trl_prompt_completion_conversational_with_image(tmp_path: Path) -> None:
    png(tmp_path / "sky.png")
    record = {
        "images": ["sky.png"],
        "prompt": [{"role": "user", "content": [IMG, txt("What color is the sky?")]}],
        "completion": [{"role": "assistant", "content": [txt("It is blue.")]}],
    }
    r = only(write(tmp_path / "pc.jsonl", [record], jsonl=True))
    assert r.fmt == "trl_prompt_completion" and not r.is_preference
    assert r.messages == [
        turn("user", IMG, "What color is the sky?"),
        turn("assistant", "It is blue."),
    ]


def test_trl_prompt_completion_plain_text(tmp_path: Path) -> None:
    r = only(write(tmp_path / "pc.json", [{"prompt": "The sky is", "completion": " blue."}]))
    assert r.messages == [turn("user", "The sky is"), turn("assistant", " blue.")]


def test_trl_implicit_prompt_preference_conversational(tmp_path: Path) -> None:
    q = {"role": "user", "content": "What color is the sky?"}
    record = {
        "chosen": [q, {"role": "assistant", "content": "It is blue."}],
        "rejected": [q, {"role": "assistant", "content": "It is green."}],
    }
    r = only(write(tmp_path / "p.json", [record]))
    assert r.fmt == "trl_implicit_preference" and r.is_preference
    assert r.messages == [turn("user", "What color is the sky?")]
    assert (r.chosen, r.rejected) == (
        [turn("assistant", "It is blue.")],
        [turn("assistant", "It is green.")],
    )


def test_trl_implicit_prompt_preference_plain_text(tmp_path: Path) -> None:
    r = only(
        write(
            tmp_path / "p.json", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
        )
    )
    # TRL's extract_prompt: the shared prefix, the space left with the answers
    assert r.messages == [turn("user", "The sky is")]
    assert (r.chosen, r.rejected) == ([turn("assistant", " blue.")], [turn("assistant", " green.")])


# --------------------------------------------------------------------------- the_cauldron


def test_the_cauldron_images_and_texts_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.new("RGB", (9, 7), "green").save(buf, format="PNG")
    table = pa.table(
        {
            "images": [[{"bytes": buf.getvalue(), "path": None}]],
            "texts": [
                [
                    {"user": "Question: What colour?", "assistant": "Green.", "source": "synth"},
                    {"user": "Is it square?", "assistant": "No.", "source": "synth"},
                ]
            ],
        }
    )
    folder = tmp_path / "ai2d"
    folder.mkdir()
    path = folder / "train-00000-of-00001-abc.parquet"
    pq.write_table(table, path)
    r = only(tmp_path)  # the subset folder, as the hub lays it out
    assert r.fmt == "cauldron" and r.source == str(path)
    assert r.messages == [
        turn("user", IMG, "Question: What colour?"),  # images open the first user turn
        turn("assistant", "Green."),
        turn("user", "Is it square?"),
        turn("assistant", "No."),
    ]
    assert isinstance(r.images[0].data, bytes)


# --------------------------------------------------------------------------- LLaVA


def test_llava_instruct_and_pretrain_json(tmp_path: Path) -> None:
    png(tmp_path / "coco" / "train2017" / "000000033471.png")
    png(tmp_path / "00453" / "004539375.png")
    instruct = {
        "id": "000000033471",
        "image": "coco/train2017/000000033471.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ],
    }
    pretrain = {
        "id": "004539375",
        "image": "00453/004539375.png",
        "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress"},
        ],
    }
    text_only = {
        "id": "sg_1",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    }
    path = write(tmp_path / "llava_v1_5_mix.json", [instruct, pretrain, text_only])
    res = load_records(path)
    assert res.problems == [] and res.counts == {"llava": 3}
    a, b, c = res.records
    assert a.messages[0] == turn("user", IMG, "\nWhat are the colors of the bus in the image?")
    assert [m.origin for m in a.images] == ["coco/train2017/000000033471.png"]
    assert b.messages[0] == turn("user", "Render a clear and concise summary of the photo.\n", IMG)
    assert len(b.images) == 1 and c.images == []
    assert check_dataset(path).problems == []


# --------------------------------------------------------------------------- media in parts


def test_qwen_and_unsloth_image_parts_with_their_source(tmp_path: Path) -> None:
    png(tmp_path / "demo.png")
    png(tmp_path / "two.png", colour="blue")
    record = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "demo.png"},
                    {"type": "image", "image": f"file://{tmp_path / 'two.png'}"},
                    {"type": "text", "text": "Describe these images."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Red, then blue."}]},
        ]
    }
    r = only(write(tmp_path / "qwen.json", [record]))
    assert r.fmt == "trl"
    assert r.messages[0] == turn("user", IMG, IMG, "Describe these images.")
    assert [m.path for m in r.images] == [
        str((tmp_path / "demo.png").resolve()),
        str((tmp_path / "two.png").resolve()),
    ]


def test_unsloth_conversation_with_pil_images_saved_by_datasets(tmp_path: Path) -> None:
    import datasets

    # Unsloth's vision notebooks: {"type": "image", "image": sample["image"]} holding a PIL image
    sample = {"image": Image.new("RGB", (7, 5), "blue"), "text": "A blue patch."}
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe this image.", "image": None},
                        {"type": "image", "text": None, "image": sample["image"]},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": sample["text"], "image": None}],
                },
            ]
        }
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    r = only(tmp_path / "ds")
    assert r.fmt == "trl"
    assert r.messages == [
        turn("user", "Describe this image.", IMG),
        turn("assistant", "A blue patch."),
    ]
    assert r.images[0].describe() == "images[0] (embedded)"
    with Image.open(io.BytesIO(r.images[0].data)) as im:
        assert im.size == (7, 5)


def test_openai_image_url_local_path_and_data_uri(tmp_path: Path) -> None:
    png(tmp_path / "local.png")
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), "yellow").save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    record = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": "local.png"}},
                    {"type": "image_url", "image_url": {"url": uri}},
                ],
            },
            {"role": "assistant", "content": "Red and yellow."},
        ]
    }
    path = write(tmp_path / "openai.jsonl", [record], jsonl=True)
    r = only(path)
    assert r.messages == [turn("user", "Compare", IMG, IMG), turn("assistant", "Red and yellow.")]
    assert r.images[0].path == str((tmp_path / "local.png").resolve())
    assert r.images[1].data == buf.getvalue()  # decoded in memory, never "image not found"
    assert (
        r.images[1].describe() == f"images[1] (data:image/png;base64, {len(buf.getvalue())} bytes)"
    )
    assert check_dataset(path).image_sizes == [(8, 6), (5, 4)]


def test_data_uri_in_the_images_column_and_bad_base64(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), "white").save(buf, format="PNG")
    good = {
        "messages": [
            {"role": "user", "content": "<image>?"},
            {"role": "assistant", "content": "white"},
        ],
        "images": ["data:image;base64," + base64.b64encode(buf.getvalue()).decode()],
    }
    bad = {**good, "images": ["data:image;base64,@@not base64@@"]}
    res = load_records(write(tmp_path / "d.json", [good, bad]))
    assert len(res.records) == 1 and res.records[0].images[0].data == buf.getvalue()
    (p,) = res.problems
    assert p.index == 1 and p.reason.startswith(
        "malformed record: images[0] data URI is not valid base64"
    )


def test_parts_mixing_sources_and_column_are_refused(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    conv = lambda *parts: [  # noqa: E731
        {"role": "user", "content": [*parts, txt("?")]},
        {"role": "assistant", "content": [txt("x")]},
    ]
    twice = {"messages": conv({"type": "image", "image": "a.png"}), "images": ["a.png"]}
    half = {"messages": conv({"type": "image", "image": "a.png"}, IMG), "images": []}
    res = load_records(write(tmp_path / "d.json", [twice, half]))
    assert res.records == []
    assert [p.reason for p in res.problems] == [
        "malformed record: images given twice, in content parts and 'images'",
        "malformed record: some image parts carry a source, others do not",
    ]


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/hostname", "http://x.org/a.png"])
def test_part_sources_obey_the_folder_rule(tmp_path: Path, bad: str) -> None:
    data = tmp_path / "data"
    png(tmp_path / "outside.png")
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": bad}, txt("?")]},
            {"role": "assistant", "content": [txt("x")]},
        ]
    }
    (p,) = load_records(write(data / "d.json", [record])).problems
    assert p.reason.startswith(("path escapes the dataset folder", "unsupported media"))
