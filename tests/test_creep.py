"""benchmarks/creep.py: memory over steps on images of mixed sizes. On CPU: the image
schedule, the summary / table / figure on GPU-shaped rows, and the whole driver on a tiny
Qwen2.5-VL (child processes, JSON lines, creep.json); the memory itself needs a GPU.

    pytest -q tests/test_creep.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CREEP = ROOT / "benchmarks" / "creep.py"


@pytest.fixture(scope="module")
def creep():
    spec = importlib.util.spec_from_file_location("creep_bench", CREEP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_schedule_is_seeded_mixed_and_sets_the_high_water_mark_first(creep):
    sizes = creep.schedule(200, 224, 1400, seed=0)
    assert sizes == creep.schedule(200, 224, 1400, seed=0)
    assert sizes != creep.schedule(200, 224, 1400, seed=1)
    assert sizes[:2] == [[1400, 1400], [224, 224]]
    assert all(224 <= s <= 1400 for wh in sizes for s in wh)
    assert len({tuple(wh) for wh in sizes}) > 190  # a different image nearly every step
    ratios = [w / h for w, h in sizes]
    assert min(ratios) < 0.5 and max(ratios) > 2
    assert creep.schedule(5, 224, 1400, 0, largest_first=False)[0] != [1400, 1400]


def _gpu_rows(n: int, reserved_rise: float = 0.0, allocated_rise: float = 0.0) -> list[dict]:
    rows, peak = [], 0.0
    for i in range(n):
        step_peak = 14.0 + (i % 7) * 0.3
        peak = max(peak, step_peak)
        reserved = 18.0 + reserved_rise * i / (n - 1)
        rows.append({
            "step": i, "image": [224 + i, 300], "visual_tokens": 100 + i % 9, "step_s": 0.2,
            "mem_allocated_gib": 7.0 + allocated_rise * i / (n - 1), "mem_reserved_gib": reserved,
            "mem_peak_gib": step_peak, "peak_so_far_gib": peak, "reserved_slack_gib": reserved - peak,
            "inactive_split_gib": 0.5, "segments": 40 + i // 10, "alloc_retries": i // 50,
            "device_allocs": 60 + i // 10, "device_frees": 0, "ooms": 0, "rss_gib": 3.0,
        })  # fmt: skip
    return rows


def test_summary_tells_fragmentation_from_a_leak_and_a_flat_run(creep, tmp_path):
    frag = creep.summarize(_gpu_rows(100, reserved_rise=2.0))
    assert frag["gpu_measured"] and frag["growing"]
    assert "fragmentation" in frag["why"]
    assert not frag["allocated"]["trend"]["growing"]
    assert frag["reserved"]["trend"]["growing"]
    assert frag["reserved"]["trend"]["slope_mib_per_100_steps"] == pytest.approx(
        2.0 / 99 * 100 * 1024, rel=1e-6
    )
    assert frag["reserved_slack"]["trend"]["growing"]
    assert frag["reserved"]["start_gib"] == pytest.approx(18.0 + 2.0 * 10 / 99)
    assert frag["reserved"]["end_gib"] == pytest.approx(20.0)
    assert frag["warmup_steps"] == 10
    assert frag["peak_gib"] == pytest.approx(14.0 + 6 * 0.3)
    assert frag["alloc_retries"] == 1 and frag["device_allocs_after_warmup"] == 8
    assert frag["segments_start_end"] == [41, 49]
    leak = creep.summarize(_gpu_rows(100, allocated_rise=1.0))
    assert leak["growing"] and "leak" in leak["why"]
    flat = creep.summarize(_gpu_rows(100))
    assert flat["growing"] is False and flat["why"] == "steady"

    doc = {
        "args": {"model": "qwen2.5-vl-3b", "mb": 1, "min_side": 224, "max_side": 1400,
                 "text_tokens": 256},
        "gpu": "NVIDIA H200",
        "configs": {
            "sdpa": {"rows": _gpu_rows(100, reserved_rise=2.0), "summary": frag},
            "varlen-expandable": {"rows": _gpu_rows(100), "summary": flat},
            "varlen": {"rows": [], "summary": creep.summarize([]),
                       "error": "exit 1: Traceback\ntorch.OutOfMemoryError: CUDA out of memory"},
        },
    }  # fmt: skip
    md = creep.table(doc["configs"])
    lines = md.splitlines()
    assert len(lines) == 5 and all(ln.count("|") == 12 for ln in lines), md
    assert "GROWING" in lines[2] and "18.20 -> 20.00 (+2069)" in lines[2]
    assert lines[3].endswith("| flat |")
    assert "OutOfMemoryError" in lines[4]
    png = creep.plot(doc, tmp_path / "creep.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_read_stream_keeps_what_a_killed_child_wrote(creep, tmp_path):
    path = tmp_path / "s.jsonl"
    lines = [
        {"kind": "meta", "name": "sdpa", "gpu": "cpu", "levers": {"vision_attention": "sdpa"}},
        {"kind": "row", "step": 0, "visual_tokens": 4, "step_s": 0.1},
        {"kind": "snapshot", "step": 0, "segments": 3},
        {"kind": "row", "step": 1, "visual_tokens": 2, "step_s": 0.1},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"kind": "row", "st')
    rec = creep.read_stream(path)
    assert rec["name"] == "sdpa" and rec["levers"] == {"vision_attention": "sdpa"}
    assert [r["step"] for r in rec["rows"]] == [0, 1] and rec["snapshots"][0]["segments"] == 3
    assert "stopped_early" not in rec  # no "end" line: the child died
    assert creep.read_stream(tmp_path / "missing.jsonl") == {"rows": [], "snapshots": []}


def test_creep_runs_end_to_end_on_a_tiny_qwen(creep, tiny_cache, tmp_path):
    """Two configurations, three steps each, each in its own process."""
    import torch

    out = tmp_path / "out"
    argv = ["--model", "tiny-qwen2.5-vl", "--steps", "3", "--configs", "sdpa,varlen-expandable",
            "--out", str(out), "--work", str(tmp_path / "work"), "--snapshot-every", "1"]  # fmt: skip
    assert creep.main(argv) == 0
    doc = json.loads((out / "creep.json").read_text())
    assert doc["benchmark"] == "creep" and "creep.py" in doc["command"]
    assert doc["versions"]["torch"] and doc["versions"]["transformers"]
    assert doc["args"]["configs"] == ["sdpa", "varlen-expandable"] and doc["args"]["steps"] == 3
    assert doc["schedule"][0] == [1400, 1400] and len(doc["schedule"]) == 3
    cuda = torch.cuda.is_available()
    assert (doc["gpu"] == "cpu") != cuda
    assert list(doc["configs"]) == ["sdpa", "varlen-expandable"]
    for name, c in doc["configs"].items():
        assert "error" not in c, c.get("error")
        assert c["config"]["overrides"] == creep.CONFIGS[name][0]
        assert c["over"]["model"] == "tiny-qwen2.5-vl" and c["over"]["weights"] == "random"
        assert c["env_alloc_conf"] is None  # removed from every child's environment
        want = "sdpa" if name == "sdpa" else "varlen" if cuda else "sdpa (needs a CUDA GPU)"
        assert c["levers"]["vision_attention"] == want
        assert c["levers"]["expandable_segments"] is (cuda and c["over"]["expandable_segments"])
        assert c["stopped_early"] is False and c["load_s"] > 0
        rows = c["rows"]
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert [r["image"] for r in rows] == doc["schedule"]
        vt = [r["visual_tokens"] for r in rows]
        assert all(v > 0 for v in vt) and len(set(vt)) > 1, vt  # the image varies per step
        for r in rows:
            assert r["sequence_tokens"] >= 256 and r["step_s"] > 0 and r["rss_gib"] > 0
            assert r["grid_thw"][0] == 1
            assert ("mem_allocated_gib" in r) == cuda and ("alloc_retries" in r) == cuda
        s = c["summary"]
        for key in ("steps", "warmup_steps", "gpu_measured", "visual_tokens",
                    "distinct_visual_tokens", "step_s_median", "growth", "growing", "why", "rss"):  # fmt: skip
            assert key in s, key
        assert s["steps"] == 3 and s["gpu_measured"] == cuda and s["distinct_visual_tokens"] > 1
        assert s["visual_tokens"]["max"] > s["visual_tokens"]["min"]
        assert set(s["rss"]) == {"start_gib", "end_gib", "max_gib", "trend"}
        assert bool(c["snapshots"]) == cuda
    md = (out / "creep.md").read_text()
    assert "| sdpa | 3 |" in md and "| varlen-expandable | 3 |" in md
    assert md == doc["table"] + "\n"
    assert (out / "creep.png").read_bytes()[:4] == b"\x89PNG"
