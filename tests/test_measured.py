"""Memory in the reports (issue 8, points 5 and 6): the growth figure of the SFT / DPO
reports, the reference table built from measured runs, predicted vs measured per phase.

    pytest -q tests/test_measured.py
"""

from __future__ import annotations

import json
import math

import pytest

from vlmfit import memory, report
from vlmfit.budget import Budget
from vlmfit.config import RunConfig
from vlmfit.memory import phases, planner, reference


def _memory_jsonl(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _cuda_rows(n, alloc, reserved, peak):
    return [
        {"step": s, "mem_allocated_gib": alloc(s), "mem_reserved_gib": reserved(s),
         "mem_peak_gib": peak(s)}
        for s in range(1, n + 1)
    ]  # fmt: skip


# ------------------------------------------------------------------ growth over steps (5)


def test_growth_figure_draws_the_three_series_and_the_trend(tmp_path):
    rows = _cuda_rows(200, lambda s: 17.0 + 0.002 * s, lambda s: 18.0 + 0.004 * s,
                      lambda s: 19.0 + 0.002 * s)  # fmt: skip
    fig = report.memory_growth(_memory_jsonl(tmp_path / "leak", rows))
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.lines]
    for series in ("allocated", "reserved", "peak allocated (per step)"):
        assert series in labels, labels
    trends = {line.get_label(): line for line in ax.lines if line.get_label().endswith("steps)")}
    assert sorted(trends) == [
        "allocated trend (+0.200 GiB/100 steps)",
        "reserved trend (+0.400 GiB/100 steps)",
    ]
    # the trend is memory.growth's fit: drawn over the steps after the warm-up, on the data
    x, y = trends["allocated trend (+0.200 GiB/100 steps)"].get_data()
    assert x[0] == 21 and x[-1] == 200
    assert y[0] == pytest.approx(17.0 + 0.002 * 21) and y[-1] == pytest.approx(17.4)
    assert "GROWING (flagged)" in ax.get_title()
    caption = fig.texts[0].get_text().replace("\n", " ")
    assert "FLAGGED" in caption and "leak" in caption
    assert (
        "allocated +0.200 GiB/100 steps" in caption and "reserved +0.400 GiB/100 steps" in caption
    )
    assert fig.vlmfit_growth == memory.growth(rows)
    # visible: the axis is not stretched to zero, so a 0.4 GiB creep shows
    lo, hi = ax.get_ylim()
    assert lo > 15 and hi < 21

    steady = _cuda_rows(40, lambda s: 17.0 + 0.01 * (s % 3), lambda s: 18.0, lambda s: 19.0)
    fig = report.memory_growth(_memory_jsonl(tmp_path / "steady", steady))
    assert "steady (not flagged)" in fig.axes[0].get_title()
    assert fig.texts[0].get_text().startswith("not flagged (steady)")


def test_growth_figure_of_a_cpu_run_is_one_line(tmp_path, capsys):
    rss = [{"step": s, "mem_rss_gib": 0.7} for s in range(1, 30)]
    assert report.memory_growth(_memory_jsonl(tmp_path / "cpu", rss)) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA rows" in out and "29 steps" in out
    assert report.memory_growth(tmp_path / "nothing") is None
    assert "no CUDA rows" in capsys.readouterr().out


def test_growth_caption_with_too_few_steps():
    trend = memory.growth(_cuda_rows(3, lambda s: 1.0, lambda s: 1.0, lambda s: 1.0))
    assert report.growth_caption(trend).startswith("no trend: fewer than 5 steps")


# ------------------------------------------------------------------ reference table (6)


def _validation():
    if not reference.VALIDATION.exists():
        pytest.skip("docs/memory-validation.json is not in this checkout (a GPU sweep writes it)")
    doc = json.loads(reference.VALIDATION.read_text())
    return doc, [r for r in doc["rows"] if r.get("measured_gib") is not None]


def test_reference_has_one_row_per_measured_configuration():
    doc, measured_rows = _validation()
    rows = reference.reference_rows(runs_dir=None)
    assert len(rows) == len(measured_rows)
    assert all(set(reference.REFERENCE_COLUMNS) <= set(r) for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {r["id"] for r in measured_rows}
    for src in measured_rows:
        row = by_id[src["id"]]
        assert row["measured_gib"] == src["measured_gib"]  # the JSON's value, not an estimate
        assert row["reserved_gib"] == src["reserved_gib"]
        assert row["predicted_gib"] == src["predicted_gib"]
        assert (row["model"], row["method"], row["kind"]) == (
            src["model"], src["finetune"], src["kind"],
        )  # fmt: skip
        assert (row["micro_batch"], row["checkpointing"]) == (src["mb"], src["ckpt"])
        assert row["image"].startswith(f"{src['image'][0]}x{src['image'][1]}")
        assert row["predicted_now_gib"] == pytest.approx(
            memory.estimate(
                src["model"],
                **{k: v for k, v in src["estimate_args"].items()
                   if k not in ("model", "max_image_tokens", "image_size")},
                image_size=tuple(src["estimate_args"]["image_size"]),
                budget=Budget(max_image_tokens=src["max_image_tokens"])
                if src["max_image_tokens"] else None,
            ).peak_gib
        )  # fmt: skip
    # model (by size) x method (LoRA, QLoRA, full) x image budget
    order = [(r["model"], r["method"]) for r in rows]
    assert order == sorted(order, key=order.index)  # each group once, contiguous
    assert {r["method"] for r in rows} >= {"lora", "qlora", "full"}
    failed = {f["id"] for f in doc["summary"]["failed"]}
    assert not failed & set(by_id), "a configuration that failed has no measured row"


def test_reference_renders_with_its_source(capsys):
    doc, measured_rows = _validation()
    rows = reference.reference_rows(runs_dir=None)
    md = reference.reference_markdown(rows, reference.reference_source())
    lines = md.splitlines()
    assert lines[0].startswith("| model | method | kind | image (budget)")
    assert sum(line.startswith("| ") for line in lines) == 1 + len(measured_rows)
    assert doc["gpu"] in md and doc["command"] in md
    assert f"torch {doc['versions']['torch']}" in md
    page = reference.reference_html(rows, reference.reference_source())
    assert page.count("<tr>") == 1 + len(rows) + len({(r["model"], r["method"]) for r in rows})
    assert reference.reference_pivot(rows).count("<tr>") == 1 + len(
        {(r["model"], r["method"]) for r in rows}
    )
    from vlmfit.cli import main

    assert main(["reference", "--json", "--runs", "none-here"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == len(measured_rows) and out["source"]["gpu"] == doc["gpu"]


def test_reference_adds_cuda_runs_and_leaves_out_cpu_runs(tmp_path):
    cache = tmp_path / "cache" / "abc"
    cache.mkdir(parents=True)
    (cache / "stats.json").write_text(
        json.dumps(
            {"sample_stats": [{"status": "kept", "total_after": 1700, "visual_after": 1296}]}
        )
    )
    runs_dir = tmp_path / "runs"
    for run, peak, device in (("gpu-run", 17.2, "NVIDIA H200"), ("cpu-run", None, "cpu")):
        cfg = RunConfig(model="qwen2.5-vl-7b", data=str(cache / "records.jsonl"),
                        per_device_train_batch_size=2)  # fmt: skip
        (runs_dir / run).mkdir(parents=True)
        (runs_dir / run / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
        summary = {"run": run, "model": cfg.model, "method": "sft", "finetune": "lora",
                   "train_peak_memory_gib": peak, "device": device}  # fmt: skip
        (runs_dir / run / "summary.json").write_text(json.dumps(summary))
    _memory_jsonl(
        runs_dir / "gpu-run", _cuda_rows(5, lambda s: 16.0, lambda s: 17.5, lambda s: 17.2)
    )
    rows = reference.reference_rows(tmp_path / "absent.json", runs_dir)
    assert [r["id"] for r in rows] == ["gpu-run"]
    (r,) = rows
    assert r["measured_gib"] == 17.2 and r["reserved_gib"] == 17.5 and r["gpu"] == "NVIDIA H200"
    assert (r["micro_batch"], r["checkpointing"], r["source"]) == (2, True, "runs/gpu-run")
    assert r["predicted_gib"] is None  # a run records no prediction
    expected = planner._cfg_estimate(RunConfig(**json.loads(
        (runs_dir / "gpu-run" / "config.json").read_text())["config"]), 1700, 1296).peak_gib  # fmt: skip
    assert r["predicted_now_gib"] == pytest.approx(expected)
    assert r["error_now_pct"] == pytest.approx(100 * (expected / 17.2 - 1))
    src = reference.reference_source(tmp_path / "absent.json")
    assert "missing" in src and "No measured reference" in reference.reference_markdown(rows, src)


# ------------------------------------------------------------ predicted vs measured (6)


def test_phases_measured_on_cpu_are_the_tensors_and_the_peak_is_not(tiny_cache):
    cfg = RunConfig(model="tiny-smolvlm", per_device_train_batch_size=2)
    res = phases.measure_phases(cfg, image_size=(64, 64), text_tokens=32, steps=2)
    rows = {r["phase"]: r for r in res["rows"]}
    assert list(rows) == [p for p, _, _ in phases.PHASES]
    trainable = res["estimate"].trainable_params
    # LoRA adapters train in fp32: 4 bytes a gradient, AdamW keeps two fp32 moments
    assert rows["gradients"]["measured_gib"] == pytest.approx(4 * trainable / 2**30, rel=0.01)
    assert rows["optimizer states"]["measured_gib"] == pytest.approx(
        2 * rows["gradients"]["measured_gib"], rel=0.01
    )
    assert rows["weights (+ adapters)"]["measured_gib"] > 0
    assert rows["weights (+ adapters)"]["kind"] == "measured"
    for phase in ("activations, logits, temporaries", "peak allocated"):
        assert rows[phase]["kind"] == "not measured" and math.isnan(rows[phase]["measured_gib"])
    assert rows["peak allocated"]["predicted_gib"] == pytest.approx(res["estimate"].peak_gib)
    assert sum(r["predicted_gib"] for p, r in rows.items() if p != "peak allocated") == (
        pytest.approx(res["estimate"].peak_gib)
    )
    table = phases.phase_table(res)
    assert "not measured" in table and "optimizer state tensor bytes" in table
    fig = phases.plot_phases(res)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "weights (+ adapters)\n(measured)"
    assert len(ax.patches) == 5 + 3  # predicted for every phase, measured where measured


@pytest.mark.slow
def test_profile_report_has_phases_and_reference(tiny_cache, tmp_path):
    from vlmfit.report.runner import run_notebook

    _, page = run_notebook(
        "notebooks/profile.ipynb",
        "profile-measured",
        {"model": "tiny-smolvlm", "steps": 1, "image_size": "64x64", "text_tokens": 32},
        tmp_path,
        progress=False,
    )
    text = page.read_text()
    assert "Traceback" not in text
    assert "Predicted vs. measured per phase" in text and "optimizer state tensor bytes" in text
    assert "Reference: measured peaks on an H200" in text
    if reference.VALIDATION.exists():
        doc = json.loads(reference.VALIDATION.read_text())
        assert "measured peak GiB" in text and doc["command"] in text
