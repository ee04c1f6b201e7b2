"""Preprocessing (vlmfit.preprocess): budget, exact sequence lengths, policies, cache, video.

Run: ``.venv/bin/python -m pytest -q tests/test_preprocess.py``
(``-m "not slow"`` skips the notebook run). Tiny models are built once per session into a
temporary VLMFIT_CACHE; images are small, so most of the time is importing transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import vlmfit
from vlmfit import budget as B
from vlmfit.budget import Budget
from vlmfit.data import media
from vlmfit.data.records import DataError
from vlmfit.models import registry

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llamafactory_mllm_demo"
VIDEO_DEMO = FIXTURE / "mllm_video_demo.json"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _tiny_env(tiny_cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny models in the session's temporary cache (conftest's ``tiny_cache``)."""
    monkeypatch.setenv("VLMFIT_CACHE", tiny_cache)
    from vlmfit.models import builders as tiny

    monkeypatch.setattr(tiny, "DEFAULT_CACHE", Path(tiny_cache))


@pytest.fixture
def pp():
    from vlmfit import preprocess

    return preprocess


def tiny_path(name: str) -> Path:
    from vlmfit.models import builders as tiny

    return tiny.ensure_tiny(name)


def write_image(path: Path, size: tuple[int, int], colour=(200, 40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (235, 235, 235))
    w, h = size
    img.paste(Image.new("RGB", (max(1, w // 2), max(1, h // 2)), colour), (w // 4, h // 4))
    img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)


def write_dataset(
    folder: Path, samples: list[list[tuple[int, int]]], name: str = "data.json"
) -> Path:
    """LLaMA-Factory JSON: sample k has one image per size (JPEG when large, else PNG)."""
    records = []
    for k, sizes in enumerate(samples):
        paths = []
        for j, size in enumerate(sizes):
            rel = f"img/{k}_{j}.{'jpg' if max(size) > 150 else 'png'}"
            write_image(folder / rel, size, colour=(40 * k % 255, 90, 200))
            paths.append(rel)
        question = "<image>" * len(sizes) + f"What colour is the shape number {k}?"
        records.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": "red" if k % 2 else "blue and green"},
                ],
                "images": paths,
            }
        )
    out = folder / name
    out.write_text(json.dumps(records, indent=1))
    return out


SIZES = [[(64, 64)], [(200, 150), (30, 100)], [(13, 7)], [(500, 90)], [(1000, 1000)]]


# --------------------------------------------------------------------------- budget


def test_budget_applied_qwen_snapped_sizes(tmp_path: Path, pp) -> None:
    data = write_dataset(tmp_path / "d", [[(1000, 1000)], [(640, 480), (300, 1200)], [(64, 64)]])
    res = pp.preprocess(
        data,
        "qwen2-vl-2b",
        weights=str(tiny_path("tiny-qwen2-vl")),
        budget=Budget(max_image_tokens=64),
        cache_dir=tmp_path / "cache",
        workers=1,
        progress=False,
    )
    rows = res.image_stats
    assert len(rows) == 4
    by_size = {(r["width"], r["height"]): r for r in rows}
    assert by_size[1000, 1000]["tokens_before"] == 1296  # the seed pitfall: hub defaults
    for r in rows:
        assert r["tokens_after"] <= 64
        assert r["new_width"] % 28 == 0 and r["new_height"] % 28 == 0
        assert r["new_width"] <= max(r["width"], 28) + 14  # never a real upscale
        with Image.open(res.path / r["output"]) as im:
            assert im.size == (r["new_width"], r["new_height"])
            assert im.mode == "RGB"
            assert im.format == ("JPEG" if r["source"].endswith(".jpg") else "PNG")
        tokens = B.image_tokens(registry.get("qwen2-vl-2b"), r["new_width"], r["new_height"])
        assert tokens == r["tokens_after"]  # saved size is a fixed point of the processor
    assert res.manifest["processor_kwargs"]["max_pixels"] == 64 * 784


def test_budget_applied_smolvlm(tmp_path: Path, pp) -> None:
    data = write_dataset(tmp_path / "d", [[(1000, 700)], [(64, 64)]])
    res = pp.preprocess(
        data,
        "smolvlm",
        weights=str(tiny_path("tiny-smolvlm")),
        budget=Budget(max_image_tokens=320),
        cache_dir=tmp_path / "cache",
        workers=1,
        progress=False,
    )
    big = next(r for r in res.image_stats if r["width"] == 1000)
    assert big["tokens_before"] == 13 * 64  # 2048 px: 4x3 tiles + global
    assert all(r["tokens_after"] <= 320 for r in res.image_stats)
    assert res.manifest["processor_kwargs"]["size"] == {"longest_edge": 1024}


# --------------------------------------------------------------------------- exact counts


def _processor_lengths(res, model_dir: Path, family: str, **kwargs) -> list[int]:
    """``len(processor(text=..., images=...)["input_ids"][0])`` for every written record."""
    from vlmfit.models.processors import load_processor

    processor = load_processor(model_dir, family, **res.manifest["processor_kwargs"], **kwargs)
    out = []
    for line in res.records_path.read_text().splitlines():
        row = json.loads(line)
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        images = [Image.open(res.path / p).convert("RGB") for p in row["images"]]
        out.append(len(processor(text=text, images=images)["input_ids"][0]))
    return out


@pytest.mark.parametrize("model", ["tiny-smolvlm", "tiny-qwen2-vl"])
@pytest.mark.parametrize("budget", [None, "small"])
def test_token_count_equals_processor(tmp_path: Path, pp, model: str, budget) -> None:
    spec = registry.get(model)
    if budget == "small":
        budget = Budget(max_image_tokens=2) if spec.is_qwen else Budget(do_image_splitting=False)
    data = write_dataset(tmp_path / "d", SIZES)
    res = pp.preprocess(
        data, model, budget=budget, cache_dir=tmp_path / "c", workers=1, progress=False
    )
    assert res.n_out == len(SIZES)
    expected = _processor_lengths(res, tiny_path(model), spec.family.name)
    assert [r["total_after"] for r in res.sample_stats] == expected
    if spec.is_qwen and budget is not None:
        assert any(r["total_after"] < r["total_before"] for r in res.sample_stats)


def test_token_count_split_tiles_smolvlm_settings(tmp_path: Path, pp) -> None:
    """SmolVLM's published settings (multi-row tiles, '\\n' between rows) with the tiny
    tokenizer, which does not merge '\\n\\n'."""
    spec = registry.get("smolvlm")
    data = write_dataset(tmp_path / "d", [[(1000, 700)], [(300, 900), (64, 64)]])
    res = pp.preprocess(
        data,
        "smolvlm",
        weights=str(tiny_path("tiny-smolvlm")),
        budget=Budget(max_image_tokens=320),
        cache_dir=tmp_path / "c",
        workers=1,
        progress=False,
    )
    expected = _processor_lengths(
        res, tiny_path("tiny-smolvlm"), "idefics3", image_seq_len=spec.processor["image_seq_len"]
    )
    assert [r["total_after"] for r in res.sample_stats] == expected


# --------------------------------------------------------------------------- policies


def _over(pp, tmp_path: Path, model: str, policy: str, cut: int, **kw):
    data = write_dataset(tmp_path / "d", [[(64, 64)], [(200, 200), (200, 200), (200, 200)]])
    ref = pp.preprocess(data, model, cache_dir=tmp_path / "ref", workers=1, progress=False, **kw)
    big = ref.sample_stats[1]["total_after"]
    res = pp.preprocess(
        data,
        model,
        max_length=big - cut,
        overlength=policy,
        cache_dir=tmp_path / policy,
        workers=1,
        progress=False,
        **kw,
    )
    return ref, res


def test_overlength_drop(tmp_path: Path, pp) -> None:
    ref, res = _over(pp, tmp_path, "tiny-qwen2-vl", "drop", 1)
    assert res.n_out == 1 and res.counts["dropped"] == 1
    assert res.dropped[0]["where"].endswith("data.json:1")
    assert "max_length" in res.dropped[0]["reason"]
    assert len(res.records_path.read_text().splitlines()) == 1
    assert [r["status"] for r in res.sample_stats] == ["kept", "dropped"]


def test_overlength_shrink(tmp_path: Path, pp) -> None:
    ref, res = _over(pp, tmp_path, "tiny-qwen2-vl", "shrink", 3)
    assert res.n_out == 2 and res.counts["shrunk"] == 1 and not res.dropped
    row = res.sample_stats[1]
    assert row["status"] == "shrunk" and row["total_after"] <= res.max_length
    assert row["max_image_tokens"] < 4
    rows = [r for r in res.image_stats if r["where"] == row["where"]]
    assert all(r["tokens_after"] <= row["max_image_tokens"] for r in rows)
    for r in rows:
        with Image.open(res.path / r["output"]) as im:
            assert im.size == (r["new_width"], r["new_height"])
    expected = _processor_lengths(res, tiny_path("tiny-qwen2-vl"), "qwen2_vl")
    assert [r["total_after"] for r in res.sample_stats] == expected


def test_shrink_impossible_drops(tmp_path: Path, pp) -> None:
    _, res = _over(pp, tmp_path, "tiny-qwen2-vl", "shrink", 40)  # below the text alone
    assert res.counts["dropped"] == 2 and "smallest" in res.dropped[-1]["reason"]
    _, res = _over(pp, tmp_path / "s", "tiny-smolvlm", "shrink", 1)  # idefics3 cannot shrink
    assert res.counts["dropped"] == 1 and "cannot shrink" in res.dropped[0]["reason"]


# --------------------------------------------------------------------------- cache


def test_cache_hit_and_invalidation(tmp_path: Path, pp, monkeypatch, capsys) -> None:
    data = write_dataset(tmp_path / "d", [[(64, 64)], [(120, 80)]])
    cache = tmp_path / "cache"

    def run(model: str = "tiny-qwen2-vl", **kw):
        return pp.preprocess(data, model, cache_dir=cache, workers=1, progress=False, **kw)

    first = run()
    assert not first.cache_hit
    capsys.readouterr()
    again = run()
    assert again.cache_hit and again.fingerprint == first.fingerprint
    assert f"cache hit: {cache / first.fingerprint}" in capsys.readouterr().out
    assert again.sample_stats == first.sample_stats

    seen = {first.fingerprint}

    def changed(res) -> None:
        assert not res.cache_hit and res.fingerprint not in seen
        seen.add(res.fingerprint)

    changed(run(budget=Budget(max_image_tokens=2)))  # budget
    changed(run("tiny-smolvlm"))  # model
    changed(run(max_length=100))  # max_length
    changed(run(overlength="shrink"))  # policy
    version = vlmfit.__version__
    monkeypatch.setattr(vlmfit, "__version__", "9.9.9")
    changed(run())  # vlmfit version
    monkeypatch.setattr(vlmfit, "__version__", version)
    assert run().cache_hit
    text = data.read_text().replace("blue and green", "green")
    data.write_text(text)
    changed(run())  # data edit
    write_image(data.parent / "img/0_0.png", (64, 64), colour=(0, 255, 0))
    changed(run())  # image edit (same size, new pixels)
    before = {p: p.read_bytes() for p in data.parent.rglob("*") if p.is_file()}
    run(budget=Budget(max_image_tokens=3))
    assert before == {p: p.read_bytes() for p in data.parent.rglob("*") if p.is_file()}


def test_atomic_output_on_failure(tmp_path: Path, pp, monkeypatch) -> None:
    data = write_dataset(tmp_path / "d", [[(64, 64)], [(80, 80)]])
    cache = tmp_path / "cache"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pp.output, "_trl_row", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        pp.preprocess(data, "tiny-qwen2-vl", cache_dir=cache, workers=1, progress=False)
    assert list(cache.iterdir()) == []  # no half-written folder, no temporary left behind
    monkeypatch.undo()
    res = pp.preprocess(data, "tiny-qwen2-vl", cache_dir=cache, workers=1, progress=False)
    assert not res.cache_hit and [p.name for p in cache.iterdir()] == [res.fingerprint]


# --------------------------------------------------------------------------- output


def test_round_trip_through_load_records(tmp_path: Path, pp) -> None:
    from vlmfit.data import synth
    from vlmfit.data.formats import load_records

    synth.generate(tmp_path / "shapes", n_train=8, n_test=12, n_dpo_train=6, n_dpo_test=12)
    for name, fmt in (("sft_train.json", "trl"), ("dpo_train.json", "trl_preference")):
        src = load_records(tmp_path / "shapes" / name)
        res = pp.preprocess(
            tmp_path / "shapes" / name,
            "tiny-smolvlm",
            cache_dir=tmp_path / "c",
            workers=1,
            progress=False,
        )
        back = load_records(res.records_path)
        assert not back.problems and back.counts == {fmt: len(src.records)}
        for a, b in zip(src.records, back.records, strict=True):
            assert (a.messages, a.chosen, a.rejected) == (b.messages, b.chosen, b.rejected)
            assert len(a.images) == len(b.images)
            for ref in b.images:
                assert Path(ref.path).parent == res.path / "images"
                assert media.image_size(ref) == (64, 64)  # no budget: kept as is
        manifest = json.loads((res.path / "manifest.json").read_text())
        assert manifest["fingerprint"] == res.fingerprint
        assert manifest["counts"]["kept"] == len(src.records)
        assert set(json.loads((res.path / "stats.json").read_text())) == {
            "image_stats",
            "sample_stats",
        }


def test_workers_equal_inline(tmp_path: Path, pp) -> None:
    data = write_dataset(tmp_path / "d", SIZES + [[(333, 777)], [(90, 90), (64, 64)]])
    kw = dict(budget=Budget(max_image_tokens=3), progress=False)
    one = pp.preprocess(data, "tiny-qwen2-vl", cache_dir=tmp_path / "one", workers=1, **kw)
    two = pp.preprocess(data, "tiny-qwen2-vl", cache_dir=tmp_path / "two", workers=2, **kw)
    assert one.fingerprint == two.fingerprint and not two.cache_hit
    assert one.records_path.read_text() == two.records_path.read_text()
    assert one.image_stats == two.image_stats and one.sample_stats == two.sample_stats
    for f in (one.path / "images").iterdir():
        assert f.read_bytes() == (two.path / "images" / f.name).read_bytes()


def test_bad_records_fail_or_skip(tmp_path: Path, pp) -> None:
    data = write_dataset(tmp_path / "d", [[(64, 64)], [(64, 64)]])
    (data.parent / "img/1_0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"data.json:1: .*corrupt"):
        pp.preprocess(data, "tiny-qwen2-vl", cache_dir=tmp_path / "c", workers=1, progress=False)
    assert not (tmp_path / "c").exists() or list((tmp_path / "c").iterdir()) == []
    res = pp.preprocess(
        data, "tiny-qwen2-vl", on_error="skip", cache_dir=tmp_path / "c", progress=False
    )
    assert res.n_in == 2 and res.n_out == 1 and res.counts["skipped"] == 1
    assert str(res.problems[0]).startswith(f"{data}:1: ")


# --------------------------------------------------------------------------- video


@pytest.mark.skipif(not VIDEO_DEMO.exists(), reason="LLaMA-Factory video fixture not present")
def test_video_fixture_qwen2_vl_counts(tmp_path: Path, pp) -> None:
    from vlmfit.data.formats import load_records
    from vlmfit.models.processors import load_processor

    spec = registry.get("qwen2-vl-2b")
    folder = tiny_path("tiny-qwen2-vl")
    res = pp.preprocess(
        VIDEO_DEMO,
        "qwen2-vl-2b",
        weights=str(folder),
        cache_dir=tmp_path / "c",
        workers=1,
        progress=False,
        video_fps=2.0,
        video_max_frames=8,
    )
    assert res.n_out == 3 and res.counts["videos"] == 3
    tok = load_processor(folder, "qwen2_vl")
    rows = [json.loads(x) for x in res.records_path.read_text().splitlines()]
    for row, stat, src in zip(
        rows, res.sample_stats, load_records(VIDEO_DEMO).records, strict=True
    ):
        info = media.probe_video(src.videos[0])
        n = media.sample_count(info, fps=2.0, max_frames=8)
        frames = sorted((res.path / row["videos"][0]).iterdir())
        assert len(frames) == n
        fw, fh = B.video_frame_size(spec, info.width, info.height)
        with Image.open(frames[0]) as im:
            assert im.size == (fw, fh)
        pads = B.video_tokens(spec, info.width, info.height, n)
        # what Qwen2VLProcessor does: expand <|video_pad|> to one token per visual token
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        text = text.replace("<|video_pad|>", "<|video_pad|>" * pads)
        assert stat["total_after"] == len(tok.tokenizer(text)["input_ids"])
    assert res.manifest["video_processor_kwargs"]["do_sample_frames"] is False
    back = load_records(res.records_path)
    assert not back.problems and [len(r.videos) for r in back.records] == [1, 1, 1]


@pytest.mark.skipif(not VIDEO_DEMO.exists(), reason="LLaMA-Factory video fixture not present")
def test_idefics3_rejects_video(tmp_path: Path, pp) -> None:
    with pytest.raises(DataError) as err:
        pp.preprocess(VIDEO_DEMO, "tiny-smolvlm", cache_dir=tmp_path / "c", progress=False)
    for k in range(3):
        assert f"{VIDEO_DEMO}:{k}: video not supported" in str(err.value)
    res = pp.preprocess(
        VIDEO_DEMO, "tiny-smolvlm", on_error="skip", cache_dir=tmp_path / "c", progress=False
    )
    assert res.n_out == 0 and len(res.problems) == 3


# --------------------------------------------------------------------------- cli + report


def test_cli_and_report_helpers(tmp_path: Path, pp, capsys) -> None:
    from vlmfit.cli.preprocess import cli_preprocess

    data = write_dataset(tmp_path / "d", [[(64, 64)], [(640, 480)]])
    argv = [str(data), "--model", "tiny-qwen2-vl", "--cache-dir", str(tmp_path / "c")]
    assert cli_preprocess([*argv, "--max-image-tokens", "2", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "records: " in out and "records.jsonl" in out
    assert cli_preprocess([*argv, "--max-length", "5", "--no-progress"]) == 1  # all dropped
    (data.parent / "img/0_0.png").write_bytes(b"")
    assert cli_preprocess(argv) == 1
    assert "data.json:0: empty image" in capsys.readouterr().out
    rows = pp.pitfall_table("tiny-smolvlm", Budget(max_image_tokens=9))
    qwen = next(r for r in rows if r["model"] == "qwen2-vl-2b" and r["width"] == 1000)
    assert qwen["tokens_before"] == 1296


# --------------------------------------------------------------------------- notebook


@pytest.mark.slow
def test_notebook_report(tmp_path: Path, monkeypatch) -> None:
    from vlmfit.data import synth
    from vlmfit.report.runner import run_notebook

    repo = Path(__file__).resolve().parents[1]
    synth.generate(tmp_path / "shapes", n_train=24, n_test=12, n_dpo_train=12, n_dpo_test=12)
    monkeypatch.chdir(repo)
    nb, html_path = run_notebook(
        repo / "notebooks" / "preprocess.ipynb",
        "preprocess-test",
        {
            "data": str(tmp_path / "shapes" / "sft_train.json"),
            "model": "tiny-smolvlm",
            "max_image_tokens": 9,
            "max_length": 40,
            "workers": 1,
            "cache_dir": str(tmp_path / "cache"),
        },
        tmp_path / "reports",
        progress=False,
    )
    html = html_path.read_text()
    assert html.count("data:image/png") >= 5  # histograms, truncation, grid
    assert "<img" in html and '<script src="http' not in html
    assert (tmp_path / "cache").is_dir()
    shutil.rmtree(tmp_path / "cache")


def test_exif_rotated_big_jpeg(tmp_path: Path, pp) -> None:
    """A sideways-stored JPEG (EXIF orientation 6) is budgeted and saved upright."""
    folder = tmp_path / "d"
    folder.mkdir()
    img = Image.new("RGB", (1200, 400), (250, 250, 250))
    img.paste(Image.new("RGB", (300, 400), (255, 0, 0)), (0, 0))  # red on the stored left
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: red ends up on top
    img.save(folder / "r.jpg", quality=95, exif=exif)
    record = {
        "messages": [
            {"role": "user", "content": "<image>Where is the red?"},
            {"role": "assistant", "content": "top"},
        ],
        "images": ["r.jpg"],
    }
    (folder / "d.json").write_text(json.dumps([record]))
    res = pp.preprocess(
        folder / "d.json",
        "qwen2-vl-2b",
        weights=str(tiny_path("tiny-qwen2-vl")),
        budget=Budget(max_image_tokens=16),
        cache_dir=tmp_path / "c",
        workers=1,
        progress=False,
    )
    row = res.image_stats[0]
    assert (row["width"], row["height"]) == (400, 1200)
    with Image.open(res.path / row["output"]) as out:
        assert out.size == (row["new_width"], row["new_height"]) and out.height > out.width
        assert out.getpixel((out.width // 2, 2))[0] > 200 > out.getpixel((out.width // 2, 2))[1]
