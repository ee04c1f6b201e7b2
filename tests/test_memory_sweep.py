"""benchmarks/memory_sweep.py: its configurations (CPU), and the estimator pinned to the GPU
table it produced (``docs/memory-validation.json``, once committed).

    pytest -q tests/test_memory_sweep.py                  # CPU: list, estimates, the pin
    pytest -q -m slow tests/test_memory_sweep.py          # + the sweep end to end on tiny models
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benchmarks" / "memory_sweep.py"
VALIDATION = ROOT / "docs" / "memory-validation.json"
MODELS = {"smolvlm", "smolvlm-2b", "qwen2-vl-2b", "qwen2.5-vl-3b", "qwen2.5-vl-7b"}


def _sweep():
    spec = importlib.util.spec_from_file_location("memory_sweep", SWEEP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sweep():
    return _sweep()


@pytest.fixture(scope="module")
def listed(sweep):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert sweep.main(["--list", "--json"]) == 0
    return json.loads(buf.getvalue())


def test_list_covers_the_issue(listed):
    """30+ configurations over the five models, SFT and DPO, methods x images x micro-batch
    x checkpointing; no more 7B cases than fit the run's time."""
    assert len(listed) >= 30
    assert {c["model"] for c in listed} == MODELS
    assert {c["kind"] for c in listed} == {"sft", "dpo"}
    assert {"lora", "qlora", "full"} <= {c["finetune"] for c in listed}
    assert {c["mb"] for c in listed} == {1, 2, 4}
    assert {c["ckpt"] for c in listed} == {True, False}
    assert len({tuple(c["image"]) for c in listed}) >= 3
    assert len({c["id"] for c in listed}) == len(listed)
    for m in MODELS:
        kinds = {(c["kind"], c["finetune"]) for c in listed if c["model"] == m}
        assert ("sft", "lora") in kinds and ("dpo", "lora") in kinds, m
    assert sum(c["model"] == "qwen2.5-vl-7b" for c in listed) <= 9
    assert all(c["finetune"] in ("lora", "qlora") for c in listed if c["kind"] == "dpo")


def test_every_configuration_estimates_on_cpu(sweep, listed):
    for c in listed:
        args = sweep.estimate_args(c, sweep.NOMINAL_TEXT_TOKENS)
        e = sweep.predict(args)
        assert 0 < e.peak_gib < 0.8 * sweep.H200_GIB, c["id"]  # fits the H200 it runs on
        assert e.peak_gib == pytest.approx(c["predicted_gib"])
        assert sweep.estimate_command(args).startswith("python -m vlmfit estimate --model ")


@pytest.mark.parametrize("fused,offload", [(True, False), (False, False), (True, True)])
def test_estimate_command_is_the_cli(sweep, capsys, fused, offload):
    """Each row's command line predicts what its ``estimate_args`` do, levers included."""
    from vlmfit.cli import main

    c = sweep.case("qwen2.5-vl-7b", "lora", (1600, 1200), 1, kind="dpo", max_image_tokens=1024)
    args = sweep.estimate_args(c, 420, fused_lora=fused, activation_offloading=offload)
    words = sweep.estimate_command(args).split()[3:]
    assert main([*words, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_gib"] == pytest.approx(
        sweep.predict(args).peak_gib
    )


def test_queues_split_the_big_model_evenly(sweep, listed):
    cases = sweep.sweep_cases()
    for n in (1, 2, 4):
        queues = sweep.assign(cases, n)
        assert sorted(c["id"] for q in queues for c in q) == sorted(c["id"] for c in cases)
        big = [sum(c["model"] == "qwen2.5-vl-7b" for c in q) for q in queues]
        assert max(big) - min(big) <= 1, big
        for q in queues:
            assert [c["extra"] for c in q] == sorted(c["extra"] for c in q)  # extras last
        qlora = {c["model"]: k for k, q in enumerate(queues) for c in q if c["finetune"] == "qlora"}
        for k, q in enumerate(queues):
            assert all(qlora[c["model"]] == k for c in q if c["finetune"] == "qlora")
    # two GPUs, two cases at a time on each: GPU q % 2 gets half the 7B cases
    queues = sweep.assign(cases, 4)
    per_gpu = [sum(c["model"] == "qwen2.5-vl-7b" for q in queues[g::2] for c in q) for g in (0, 1)]
    assert per_gpu[0] == per_gpu[1]
    assert sweep.devices_for(2, 2, smoke=False) == ["0", "1", "0", "1"]


def _validation_rows():
    if not VALIDATION.exists():
        pytest.skip(
            "docs/memory-validation.json is not committed yet: it comes from a GPU run of "
            "benchmarks/memory_sweep.py (2 GPUs, ~9 minutes); copy its OUT/memory-validation."
            "{json,md} into docs/"
        )
    doc = json.loads(VALIDATION.read_text())
    return doc, [r for r in doc["rows"] if r.get("measured_gib")]


def test_validation_table_covers_the_issue():
    """The five models, SFT and DPO. The issue asks for 30+ measured configurations: run 5
    measured 27 of the 38 planned before the session's device time ran out; the rest are
    listed in the JSON (``not_run``) and ``memory_sweep.py --resume`` measures them."""
    doc, rows = _validation_rows()
    assert len(rows) >= 27, f"{len(rows)} measured rows in {VALIDATION.name}"
    assert len(rows) + len(doc["not_run"]) >= 30
    assert {r["model"] for r in rows} >= MODELS
    assert {r["kind"] for r in rows} == {"sft", "dpo"}


def test_estimator_pinned_to_the_validation_table(sweep):
    """The estimator as it is now, on every measured row: never more than 10 % under (an
    under-prediction is an OOM), and within 10 % on at least 90 % of the rows."""
    _, rows = _validation_rows()
    errors = {}
    for r in rows:
        # run 5 trained PEFT's own LoRA layer: the fused LoRA lever came after it
        e = sweep.predict({**r["estimate_args"], "fused_lora": False})
        errors[r["id"]] = e.peak_gib / r["measured_gib"] - 1
    under = {k: f"{100 * v:+.1f}%" for k, v in errors.items() if v < -sweep.TOLERANCE}
    assert not under, f"more than 10 % under the measured peak: {under}"
    within = sum(abs(v) <= sweep.TOLERANCE for v in errors.values())
    off = {k: f"{100 * v:+.1f}%" for k, v in errors.items() if abs(v) > sweep.TOLERANCE}
    assert within >= 0.9 * len(errors), f"{within}/{len(errors)} within 10 %; off: {off}"


def test_repredict_rewrites_predictions_and_keeps_measurements(sweep, tmp_path):
    """``--repredict JSON --out DIR``: the estimator now on the measured rows, the run's own
    prediction kept beside; the source JSON is left as it is."""
    doc, rows = _validation_rows()
    before = VALIDATION.read_text()
    assert sweep.main(["--repredict", str(VALIDATION), "--out", str(tmp_path)]) == 0
    assert VALIDATION.read_text() == before
    new = json.loads((tmp_path / "memory-validation.json").read_text())
    by_id = {r["id"]: r for r in new["rows"]}
    for r in rows:
        n = by_id[r["id"]]
        assert n["measured_gib"] == r["measured_gib"]
        assert n["predicted_at_run_gib"] == r["predicted_gib"]
        assert n["predicted_gib"] == pytest.approx(sweep.predict(r["estimate_args"]).peak_gib)
        assert "--no-fused-lora" in n["estimate_command"]
    assert not new["summary"]["under_more_than_10pct"]
    md = (tmp_path / "memory-validation.md").read_text()
    assert "at the run GiB (error)" in md and "Predicted again by the estimator" in md


@pytest.mark.slow
def test_sweep_runs_end_to_end_on_cpu(tmp_path):
    """--smoke: tiny models through the same child processes, queues and files (no peaks)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SWEEP), "--smoke", "--gpus", "1", "--per-gpu", "2",
         "--out", str(out), "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == len(_sweep().smoke_cases())
    for r in rows:
        assert not r.get("error"), (r["id"], r.get("error"), (out / "failures.log").read_text())
        assert r["predicted_gib"] > 0 and r["measured_gib"] is None
        assert r["sequence_tokens"] > r["text_tokens"] > 0
        assert r["visual_tokens"] == r["predicted_visual_tokens"], r["id"]
        assert r["batch_rows"] == r["mb"] * (2 if r["kind"] == "dpo" else 1)
    doc = json.loads((out / "memory-validation.json").read_text())
    assert doc["summary"]["configurations"] == len(rows) and doc["versions"]["torch"]
    assert (
        "| model | method | image | mb | ckpt | kind |"
        in (out / "memory-validation.md").read_text()
    )
