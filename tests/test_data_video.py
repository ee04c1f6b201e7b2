"""Fixture videos on the visual-token budget (issue 9.5, the part that needs no GPU).

Run: ``.venv/bin/python -m pytest -q tests/test_data_video.py``. The LLaMA-Factory fixture's
three videos (mp4 / avi) go through the real preprocessing for Qwen2-VL and Qwen2.5-VL:
frames sampled within the budget, saved at the size the video processor keeps (a fixed
point of its resize), and, where torchvision imports, the real ``Qwen2VLVideoProcessor`` /
``Qwen2VLProcessor`` count exactly the tokens preprocessing counted.

Why the torchvision tests skip on the CPU lock: ``make env`` on a host without
``nvidia-smi`` installs a local CPU build of torch (``torch==2.13.0+cpu``) and leaves
torchvision out (``scripts/lock_filter.py``): PyPI's ``torchvision==0.28.0`` wheel's
``_C.so`` links ``libtorch_cuda.so`` and ``libc10_cuda.so``, which a CPU torch does not
ship, so ``import torchvision`` fails with "operator torchvision::nms does not exist". The
GPU container has both, and runs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmfit import budget as B
from vlmfit import registry
from vlmfit.budget import Budget
from vlmfit.data import media
from vlmfit.data.formats import load_records

DEMO = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llamafactory_mllm_demo"
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
    from vlmfit import tiny

    monkeypatch.setattr(tiny, "DEFAULT_CACHE", Path(tiny_cache))


def _preprocess(tmp_path: Path, model: str, budget: Budget) -> Any:
    from vlmfit import tiny
    from vlmfit.preprocess import preprocess

    tiny_name = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl"}
    return preprocess(
        VIDEOS,
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
        w, h = B.video_frame_size(spec, info.width, info.height, n, budget)
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

    from vlmfit.procs import load_processor

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
