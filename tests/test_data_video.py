"""Fixture videos on the visual-token budget, and video SFT (issue 9.5).

Run: ``.venv/bin/python -m pytest -q tests/test_data_video.py``. The LLaMA-Factory fixture's
three videos (mp4 / avi) go through the real preprocessing for Qwen2-VL and Qwen2.5-VL:
frames sampled within the budget, saved at the size the video processor keeps (a fixed
point of its resize), and, where torchvision imports, the real ``Qwen2VLVideoProcessor`` /
``Qwen2VLProcessor`` count exactly the tokens preprocessing counted. Training: the cache
loads with each video's frames (``train.load_prepared``), ``vlmfit.train.collate`` puts them
through TRL's collator (checked here with a stub processor, no torchvision needed), and,
where torchvision imports, a collated batch holds exactly the ``<|video_pad|>`` tokens
preprocessing counted, image and video records mix in one batch, and ``train.run`` does
two SFT steps on tiny Qwen2-VL / Qwen2.5-VL models (CPU or GPU).

Why the torchvision tests skip on the CPU lock: ``make env`` on a host without
``nvidia-smi`` installs a local CPU build of torch (``torch==2.13.0+cpu``) and leaves
torchvision out (``scripts/lock_filter.py``): PyPI's ``torchvision==0.28.0`` wheel's
``_C.so`` links ``libtorch_cuda.so`` and ``libc10_cuda.so``, which a CPU torch does not
ship, so ``import torchvision`` fails with "operator torchvision::nms does not exist". The
GPU container has both, and runs them:
``PYTHONPATH=lib python -m pytest -q tests/test_data_video.py``. Tests that need
LLaMA-Factory's video demo data skip where it is absent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmfit import budget as B
from vlmfit import train
from vlmfit.budget import Budget
from vlmfit.config import ConfigError
from vlmfit.data import media
from vlmfit.data.formats import load_records
from vlmfit.models import registry

_FIXTURE = Path("shared") / "fixtures" / "llamafactory_mllm_demo"
DEMO = next(
    (p for p in (Path(__file__).resolve().parents[i] / _FIXTURE for i in (2, 1)) if p.is_dir()),
    Path(__file__).resolve().parents[2] / _FIXTURE,
)  # beside the checkout, or inside it (a device machine gets only the checkout)
VIDEOS = DEMO / "mllm_video_demo.json"
needs_demo = pytest.mark.skipif(not VIDEOS.is_file(), reason=f"shared fixture {VIDEOS} absent")


def _torchvision_error() -> str | None:
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or RuntimeError from a build for another torch
        return f"{type(e).__name__}: {e}"
    return None


TV_ERROR = _torchvision_error()
needs_torchvision = pytest.mark.skipif(
    TV_ERROR is not None,
    reason=f"torchvision does not import beside this torch build ({TV_ERROR}); PyPI's "
    "torchvision links libtorch_cuda / libc10_cuda, which the CPU lock's torch lacks",
)


@pytest.fixture(autouse=True)
def _tiny_env(tiny_cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMFIT_CACHE", tiny_cache)
    from vlmfit.models import builders as tiny

    monkeypatch.setattr(tiny, "DEFAULT_CACHE", Path(tiny_cache))


def _preprocess(tmp_path: Path, model: str, budget: Budget, data: Path = VIDEOS) -> Any:
    from vlmfit.models import builders as tiny
    from vlmfit.preprocess import preprocess

    tiny_name = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl"}
    return preprocess(
        data,
        model,
        weights=str(
            tiny.ensure_tiny(tiny_name[registry.get(model).family.name])
        ),  # its tokenizer; the arithmetic is the model's
        budget=budget,
        cache_dir=tmp_path / "cache",
        workers=1,
        progress=False,
        video_fps=2.0,
        video_max_frames=8,
    )


def _frames(res: Any, row: dict[str, Any]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((res.path / row["videos"][0]).iterdir())]


@needs_demo
@pytest.mark.parametrize("model", ["qwen2-vl-2b", "qwen2.5-vl-3b"])
def test_fixture_videos_sampled_within_budget(tmp_path: Path, model: str) -> None:
    spec = registry.get(model)
    budget = Budget(max_image_tokens=64)
    res = _preprocess(tmp_path, model, budget)
    assert res.n_out == 3 and res.counts["videos"] == 3 and res.problems == []
    rows = [json.loads(x) for x in res.records_path.read_text().splitlines()]
    vkw = res.manifest["video_processor_kwargs"]
    source = load_records(VIDEOS).records
    for row, stat, record in zip(rows, res.sample_stats, source, strict=True):
        info = media.probe_video(record.videos[0])
        n = media.sample_count(info, fps=2.0, max_frames=8)
        assert 2 <= n <= 8 and n % 2 == 0  # whole temporal patches, at most video_max_frames
        frames = _frames(res, row)
        assert len(frames) == n
        w, h = B.video_frame_size(spec, info.width, info.height, budget)
        assert {f.size for f in frames} == {(w, h)}
        tokens = B.video_tokens(spec, info.width, info.height, n, budget)
        assert tokens // (n // 2) <= 64  # per temporal patch, as max_image_tokens says
        assert stat["visual_after"] == tokens + 2  # + <|vision_start|> / <|vision_end|>
        # the processor keeps the saved frames as they are: a fixed point of its resize
        assert B.smart_resize(h, w, 28, vkw["min_pixels"], vkw["max_pixels"]) == (h, w)
    assert vkw["do_sample_frames"] is False


@needs_demo
@needs_torchvision
@pytest.mark.parametrize("model", ["qwen2-vl-2b", "qwen2.5-vl-3b"])
def test_fixture_video_tokens_equal_the_processor(tmp_path: Path, model: str) -> None:
    import transformers

    from vlmfit.models.processors import load_processor

    spec = registry.get(model)
    budget = Budget(max_image_tokens=64)
    res = _preprocess(tmp_path, model, budget)
    vkw = res.manifest["video_processor_kwargs"]
    video_processor = transformers.Qwen2VLVideoProcessor(**vkw, cap_pixels_per_frame=False)
    processor = load_processor(res.manifest["weights"], spec.family.name)  # the tiny tokenizer
    processor.video_processor = video_processor
    rows = [json.loads(x) for x in res.records_path.read_text().splitlines()]
    for row, stat, record in zip(rows, res.sample_stats, load_records(VIDEOS).records, strict=True):
        frames = _frames(res, row)
        info = media.probe_video(record.videos[0])
        grid = video_processor(videos=[frames], return_tensors="pt")["video_grid_thw"][0]
        counted = B.video_tokens(spec, info.width, info.height, len(frames), budget)
        assert int(grid.prod()) // 4 == counted  # merge_size 2 x 2
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        ids = processor(text=[text], videos=[frames], return_tensors="pt")["input_ids"]
        assert ids.shape[1] == stat["total_after"]


# ------------------------------------------------------------------------ training data


def _mixed(tmp_path: Path) -> Path:
    """Image-only, video-only and image + video records (LLaMA-Factory layout)."""
    import shutil

    for f in ("1.jpg", "2.avi", "3.jpg", "3.mp4"):  # media inside the dataset's folder
        shutil.copy(DEMO / "mllm_demo_data" / f, tmp_path / f)
    records = [
        {"images": ["1.jpg"], "ask": "<image>Who are they?", "say": "Two football players."},
        {"videos": ["2.avi"], "ask": "<video>What is she doing?", "say": "She is cooking."},
        {
            "images": ["3.jpg"],
            "videos": ["3.mp4"],
            "ask": "<image>Who is this?<video>And in the video?",
            "say": "A baby, playing.",
        },
    ]
    rows = [
        {
            "messages": [
                {"role": "user", "content": r["ask"]},
                {"role": "assistant", "content": r["say"]},
            ],
            **{k: r[k] for k in ("images", "videos") if k in r},
        }
        for r in records
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    return path


def _rows(res: Any) -> list[dict[str, Any]]:
    return [json.loads(x) for x in res.records_path.read_text().splitlines()]


@pytest.fixture
def torchvision_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_prepared as where torchvision imports (what it loads needs no torchvision)."""
    monkeypatch.setattr("vlmfit.train.data._torchvision_error", lambda: None)


@needs_demo
def test_load_prepared_keeps_each_videos_frames_in_name_order(
    tmp_path: Path, torchvision_ok: None
) -> None:
    res = _preprocess(tmp_path, "tiny-qwen2-vl", Budget(max_image_tokens=64))
    ds = train.load_prepared(res.path, preference=False)
    rows = _rows(res)
    assert len(ds) == 3 and {"videos", "video_kwargs"} <= set(ds.column_names)
    vkw = res.manifest["video_processor_kwargs"]
    for i, (row, stat) in enumerate(zip(rows, res.image_stats, strict=True)):
        [paths] = ds[i]["videos"]
        folder = res.path / row["videos"][0]
        assert paths == [str(folder / f"{k:03d}.jpg") for k in range(stat["frames"])]
        assert all(Path(p).is_file() for p in paths)
        assert ds[i]["images"] == [] and ds[i]["length"] == row["length"]
        parts = [[(p["type"], p.get("text")) for p in m["content"]] for m in ds[i]["messages"]]
        assert parts == [
            [(p["type"], p.get("text")) for p in m["content"]] for m in row["messages"]
        ]
        assert ds[i]["video_kwargs"] == {
            "min_pixels": vkw["min_pixels"],
            "max_pixels": vkw["max_pixels"],
            "fps": 2.0,
        }


@needs_demo
def test_load_prepared_mixes_image_and_video_records(tmp_path: Path, torchvision_ok: None) -> None:
    res = _preprocess(tmp_path, "tiny-qwen2.5-vl", Budget(max_image_tokens=64), _mixed(tmp_path))
    assert res.n_out == 3 and res.problems == []
    ds = train.load_prepared(res.path, preference=False)
    assert [len(v) for v in ds["videos"]] == [0, 1, 1]
    assert [len(im) for im in ds["images"]] == [1, 0, 1]
    first = res.image_stats[0]  # record 0's image, at its budgeted size
    assert ds[0]["images"][0].size == (first["new_width"], first["new_height"])
    for i in (1, 2):
        [paths] = ds[i]["videos"]
        assert paths == sorted(paths) and len(paths) >= 2
        assert all(Path(p).parent.parent == res.path / "videos" for p in paths)


def _fake_cache(tmp_path: Path, row: dict[str, Any], manifest: dict[str, Any]) -> Path:
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "records.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


_VIDEO_ROW = {
    "messages": [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ],
    "images": [],
    "videos": ["videos/000001"],
    "length": 30,
}
_MANIFEST = {
    "video_processor_kwargs": {"min_pixels": 3136, "max_pixels": 50176, "do_sample_frames": False},
    "video_fps": 2.0,
}


def _frames_dir(folder: Path, n: int = 4, size: tuple[int, int] = (56, 56)) -> list[Path]:
    d = folder / "videos" / "000001"
    d.mkdir(parents=True)
    paths = []
    for k in reversed(range(n)):  # written out of order: the name order counts
        paths.append(d / f"{k:03d}.jpg")
        Image.new("RGB", size, (40 * k, 0, 0)).save(paths[-1])
    return sorted(paths)


def test_image_only_caches_load_and_collate_as_before(tmp_path: Path) -> None:
    row = json.loads(json.dumps(_VIDEO_ROW)) | {"images": ["images/a.png"]}
    del row["videos"]
    row["messages"][0]["content"][0] = {"type": "image"}
    folder = _fake_cache(tmp_path, row, {"video_processor_kwargs": None})
    ds = train.load_prepared(folder, preference=False)
    assert ds.column_names == ["messages", "images", "length"]
    collator = object()
    assert train.video_collator(collator, ds) is collator  # TRL's collator, untouched


def test_video_records_need_torchvision_and_say_why(tmp_path: Path) -> None:
    if TV_ERROR is None:
        pytest.skip("torchvision imports here: video records train")
    folder = _fake_cache(tmp_path, _VIDEO_ROW, _MANIFEST)
    _frames_dir(folder)
    with pytest.raises(ConfigError) as e:
        train.load_prepared(folder, preference=False)
    msg = str(e.value)
    assert "1 of 1 records have videos" in msg and "torchvision" in msg
    assert "libtorch_cuda.so" in msg and "GPU container" in msg


def test_video_errors_are_clear(tmp_path: Path, torchvision_ok: None) -> None:
    pref = {"prompt": _VIDEO_ROW["messages"][:1], "chosen": [], "rejected": [], "images": []}
    folder = _fake_cache(tmp_path, pref | {"videos": ["videos/000001"]}, _MANIFEST)
    with pytest.raises(ConfigError, match="video records train with SFT only"):
        train.load_prepared(folder, preference=True)
    (folder / "records.jsonl").write_text(json.dumps(_VIDEO_ROW) + "\n")
    with pytest.raises(ConfigError, match=r"'videos/000001' has no frames"):
        train.load_prepared(folder, preference=False)
    _frames_dir(folder)
    (folder / "manifest.json").write_text(json.dumps({"video_processor_kwargs": None}))
    with pytest.raises(ConfigError, match="preprocess the data again"):
        train.load_prepared(folder, preference=False)
    (folder / "manifest.json").write_text(json.dumps(_MANIFEST))
    assert len(train.load_prepared(folder, preference=False)["videos"][0][0]) == 4


# ------------------------------------------------------------ the collator, stub processor


class _StubVideoKwargs:
    __annotations__ = {"size": dict, "do_sample_frames": bool, "cap_pixels_per_frame": bool}


class _StubProcessor:
    """What TRL's collator calls: ``apply_chat_template``; records what it was given."""

    def __init__(self, video_processor: Any = True) -> None:
        self.calls: list[dict[str, Any]] = []
        self.video_processor = (
            type("VP", (), {"valid_kwargs": _StubVideoKwargs})() if video_processor else None
        )

    def apply_chat_template(self, conversation, **kwargs):
        import torch

        self.calls.append({"conversation": conversation, **kwargs})
        n = len(conversation)
        return {
            "input_ids": torch.ones(n, 5, dtype=torch.long),
            "attention_mask": torch.ones(n, 5, dtype=torch.long),
            "assistant_masks": torch.tensor([[0, 0, 0, 1, 1]] * n),
        }


def _stub_collator(processor: _StubProcessor):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    return DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)


def test_collator_fills_video_parts_and_passes_the_video_settings(
    tmp_path: Path, torchvision_ok: None
) -> None:
    folder = _fake_cache(tmp_path, _VIDEO_ROW, _MANIFEST)
    _frames_dir(folder, n=4)
    ds = train.load_prepared(folder, preference=False)
    proc = _StubProcessor()
    collator = train.video_collator(_stub_collator(proc), ds)
    image_row = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
        "images": [Image.new("RGB", (28, 28))],
        "videos": [],
        "video_kwargs": ds[0]["video_kwargs"],
        "length": 10,
    }
    batch = collator([image_row, ds[0]])
    assert batch["labels"].tolist() == [[-100, -100, -100, 1, 1]] * 2  # TRL's labels
    [call] = proc.calls
    assert call["return_assistant_tokens_mask"] and call["tokenize"]
    first, second = call["conversation"]
    assert "video" not in str([p.keys() for m in first for p in m["content"]])
    video = second[0]["content"][0]
    assert video["type"] == "video" and len(video["video"]) == 4
    reds = [f.getpixel((0, 0))[0] for f in video["video"]]
    assert [round(r / 40) for r in reds] == [0, 1, 2, 3]  # name order (JPEG: +-1)
    assert call["processor_kwargs"]["padding"] is True  # TRL's own kwargs kept
    assert call["processor_kwargs"]["videos_kwargs"] == {
        "size": {"shortest_edge": 3136, "longest_edge": 50176},
        "do_sample_frames": False,
        "cap_pixels_per_frame": False,
        "video_metadata": [{"total_num_frames": 4, "fps": 2.0, "frames_indices": [0, 1, 2, 3]}],
    }
    assert ds[0]["messages"][0]["content"][0].get("video") is None  # rows stay as they were
    collator([image_row])  # a batch without videos: TRL's collator alone
    assert "videos_kwargs" not in proc.calls[-1]["processor_kwargs"]
    bad = ds[0] | {"videos": ds[0]["videos"] * 2}
    with pytest.raises(ValueError, match=r"2 video\(s\) for 1 video placeholder"):
        collator([bad])


def test_collator_needs_a_video_processor(tmp_path: Path, torchvision_ok: None) -> None:
    folder = _fake_cache(tmp_path, _VIDEO_ROW, _MANIFEST)
    _frames_dir(folder)
    ds = train.load_prepared(folder, preference=False)
    with pytest.raises(RuntimeError, match="no video processor.*torchvision"):
        train.video_collator(_stub_collator(_StubProcessor(video_processor=False)), ds)


# ------------------------------------------------------------- the real thing (torchvision)

TINY_VIDEO = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def _trainer(res: Any, name: str, tmp_path: Path):
    from vlmfit.config import RunConfig

    cfg = RunConfig(
        model=name,
        runs_dir=str(tmp_path / "runs"),
        finetune="lora",
        lora_r=4,
        gradient_checkpointing=False,
        processor_kwargs=dict(res.manifest["processor_kwargs"] or {}),
    )
    model, processor = train.build_model(cfg)
    ds = train.load_prepared(res.path, preference=False)
    trainer = train.build_trainer(cfg, model, processor, ds, None, tmp_path / "out", None)
    return trainer, model, processor, ds


def _on(batch: Any, model: Any) -> dict[str, Any]:
    """The batch on the model's device (the GPU machine runs these tests on CUDA)."""
    device = next(model.parameters()).device
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def _pads(batch: Any, processor: Any, token: str) -> list[int]:
    tid = processor.tokenizer.convert_tokens_to_ids(token)
    return (batch["input_ids"] == tid).sum(1).tolist()


@needs_demo
@needs_torchvision
@pytest.mark.parametrize("name", TINY_VIDEO)
def test_collated_video_tokens_equal_preprocessing(tmp_path: Path, name: str) -> None:
    res = _preprocess(tmp_path, name, Budget(max_image_tokens=64))
    trainer, model, processor, ds = _trainer(res, name, tmp_path)
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    merge = processor.video_processor.merge_size
    grid = batch["video_grid_thw"]
    counted = [s["tokens_after"] for s in res.image_stats]  # <|video_pad|> per video
    assert _pads(batch, processor, "<|video_pad|>") == counted
    assert (grid.prod(1) // merge**2).tolist() == counted
    assert grid[:, 0].tolist() == [s["frames"] // 2 for s in res.image_stats]
    # the whole sample: the processor's length is the one preprocessing counted
    assert batch["attention_mask"].sum(1).tolist() == [s["total_after"] for s in res.sample_stats]
    vid = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    kept = batch["labels"] != -100
    assert not kept[batch["input_ids"] == vid].any(), "video tokens carry no labels"
    assert kept.sum(1).min() > 0, "every reply is trained"
    assert batch["pixel_values_videos"].shape[0] == int(grid.prod(1).sum())
    loss = model(**_on(batch, model)).loss
    assert math.isfinite(loss.item())


@needs_demo
@needs_torchvision
@pytest.mark.parametrize("name", TINY_VIDEO)
def test_image_and_video_records_mix_in_one_batch(tmp_path: Path, name: str) -> None:
    res = _preprocess(tmp_path, name, Budget(max_image_tokens=64), _mixed(tmp_path))
    trainer, model, processor, ds = _trainer(res, name, tmp_path)
    batch = trainer.data_collator([ds[0], ds[1], ds[2]])
    stats = res.image_stats  # one row per use: image (0), video (1), image + video (2)
    tokens = {(s["kind"], s["where"]): s["tokens_after"] for s in stats}
    per_row = [
        [sum(t for (k, w), t in tokens.items() if k == kind and w == s["where"]) for s in res.sample_stats]
        for kind in ("image", "video")
    ]  # fmt: skip
    assert (
        _pads(batch, processor, "<|image_pad|>") == per_row[0] == [per_row[0][0], 0, per_row[0][2]]
    )
    assert _pads(batch, processor, "<|video_pad|>") == per_row[1]
    assert per_row[1][0] == 0 and min(per_row[1][1:]) > 0
    assert batch["image_grid_thw"].shape[0] == 2 and batch["video_grid_thw"].shape[0] == 2
    assert batch["attention_mask"].sum(1).tolist() == [s["total_after"] for s in res.sample_stats]
    loss = model(**_on(batch, model)).loss
    assert math.isfinite(loss.item())
    only_images = trainer.data_collator([ds[0]])  # and a batch of the image record alone
    assert "pixel_values_videos" not in only_images and "pixel_values" in only_images


@needs_demo
@needs_torchvision
def test_qwen2_5_vl_processor_gets_the_sampling_rate(tmp_path: Path) -> None:
    """Qwen2.5-VL's temporal positions read ``second_per_grid_ts`` = temporal patch / fps."""
    import transformers
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlmfit.models import builders as tiny
    from vlmfit.models.processors import load_processor

    res = _preprocess(tmp_path, "tiny-qwen2.5-vl", Budget(max_image_tokens=64))
    p = load_processor(tiny.ensure_tiny("tiny-qwen2.5-vl"), "qwen2_5_vl")
    p25 = transformers.Qwen2_5_VLProcessor(
        image_processor=p.image_processor,
        tokenizer=p.tokenizer,
        video_processor=p.video_processor,
        chat_template=p.chat_template,
    )  # the hub's class for Qwen2.5-VL (the tiny model saves Qwen2VLProcessor)
    ds = train.load_prepared(res.path, preference=False)
    collator = train.video_collator(DataCollatorForVisionLanguageModeling(p25), ds)
    batch = collator([ds[0], ds[1]])
    assert batch["second_per_grid_ts"].tolist() == [2 / 2.0] * 2  # video_fps 2.0


@needs_demo
@needs_torchvision
@pytest.mark.parametrize("name", TINY_VIDEO)
def test_video_sft_runs_two_steps_and_saves_an_adapter(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlmfit.config import resolve

    monkeypatch.chdir(tmp_path)  # preprocessing's cache: data/cache here
    cfg, _ = resolve(
        dict(
            model=name,
            data=str(VIDEOS),
            eval_data=None,
            runs_dir=str(tmp_path / "runs"),
            max_image_tokens=64,
            finetune="lora",
            lora_r=4,
            lora_alpha=8,
            max_steps=2,
            per_device_train_batch_size=2,
            logging_steps=1,
            save_steps=2,
            gradient_checkpointing=False,
            learning_rate=1e-3,
        )
    )
    summary = train.run(cfg, progress=False)
    assert summary["global_step"] == 2 and summary["train_samples"] == 3
    assert math.isfinite(summary["train_loss"]) and summary["train_loss"] > 0
    out = tmp_path / "runs" / cfg.run_id
    losses = [
        m["loss"]
        for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "loss" in m
    ]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
