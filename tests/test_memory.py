"""vlmfit.memory: the estimator (against measured H100 figures), the planner, the profiler."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlmfit import memory, registry
from vlmfit.budget import Budget
from vlmfit.config import RunConfig

FULL_SIZE = [n for n in registry.names(include_tiny=False)]

# Measured peak allocated memory (GiB) on one H100, random weights, bf16 LoRA r=16 on the
# language model, SDPA, non-reentrant gradient checkpointing, AdamW, 256 text tokens + one
# square image at the processor's defaults. Source: shared/reference/architectures.md
# ("Measured on one H100"), transformers 5.17 / peft 0.21 / torch 2.11. (model, estimate
# kwargs, measured GiB)
REFERENCE_BF16_LORA = [
    ("qwen2.5-vl-7b", {"image_size": (448, 448)}, 17.3),
    ("qwen2.5-vl-7b", {"image_size": (1000, 1000)}, 19.9),
    ("qwen2.5-vl-7b", {"image_size": (2000, 2000)}, 29.5),
    ("qwen2.5-vl-7b", {"image_size": (1000, 1000), "micro_batch": 4}, 31.7),
    ("qwen2.5-vl-7b", {"image_size": (1000, 1000), "micro_batch": 8}, 47.2),
    ("qwen2.5-vl-7b", {"image_size": (1000, 1000), "vision_no_grad": True}, 19.5),
    ("qwen2.5-vl-7b", {"image_size": (1000, 1000), "vision_no_grad": True, "micro_batch": 4}, 29.7),
    ("smolvlm", {"image_size": (1000, 1000)}, 1.9),
    ("smolvlm", {"image_size": (1000, 1000), "micro_batch": 4}, 5.9),
    ("smolvlm", {"image_size": (1000, 1000), "budget": Budget(do_image_splitting=False)}, 0.85),
    (
        "smolvlm",
        {"image_size": (1000, 1000), "budget": Budget(do_image_splitting=False), "micro_batch": 4},
        1.6,
    ),
]
# Same source: Qwen2.5-VL-7B weights alone, bf16.
REFERENCE_WEIGHTS_7B_GIB = 15.5


def test_parameter_counts_match_published():
    for name in FULL_SIZE:
        spec = registry.get(name)
        total = memory.arch(spec).total_params / 1e9
        assert total == pytest.approx(spec.params_b, rel=0.01), name


@pytest.mark.parametrize("model,kwargs,measured", REFERENCE_BF16_LORA)
def test_estimate_within_15_percent_of_measured(model, kwargs, measured):
    e = memory.estimate(model, **kwargs)
    assert e.peak_gib == pytest.approx(measured, rel=0.15), e.table()


def test_weights_match_measured():
    e = memory.estimate("qwen2.5-vl-7b")
    assert e.weights_gib == pytest.approx(REFERENCE_WEIGHTS_7B_GIB, rel=0.03)


def test_breakdown_sums_to_peak_and_logits_dominate_short_qwen_sequences():
    e = memory.estimate("qwen2.5-vl-7b", image_size=(448, 448))
    assert math.isclose(sum(e.breakdown.values()), e.peak_gib)
    acts = {k: v for k, v in e.breakdown.items() if k != "weights"}
    assert max(acts, key=acts.get) == "logits + loss"
    assert e.device_gib > e.peak_gib


@pytest.mark.parametrize("model", ["qwen2.5-vl-3b", "smolvlm"])
def test_monotonic(model):
    est = memory.estimate
    mbs = [est(model, micro_batch=m).peak_gib for m in (1, 2, 4, 8)]
    assert mbs == sorted(mbs) and mbs[0] < mbs[-1]
    vts = [est(model, visual_tokens=v).peak_gib for v in (64, 256, 1024, 4096)]
    assert vts == sorted(vts) and vts[0] < vts[-1]
    rs = [est(model, lora_r=r).peak_gib for r in (8, 16, 64, 256)]
    assert rs == sorted(rs) and rs[0] < rs[-1]


def test_checkpointing_lowers_activations_and_qlora_lowers_weights():
    on = memory.estimate("qwen2.5-vl-7b", gradient_checkpointing=True)
    off = memory.estimate("qwen2.5-vl-7b", gradient_checkpointing=False)
    assert memory.activations_gib(on) < memory.activations_gib(off)
    assert on.peak_gib < off.peak_gib
    q = memory.estimate("qwen2.5-vl-7b", finetune="qlora")
    assert q.weights_gib < 0.75 * on.weights_gib
    assert q.trainable_params == on.trainable_params
    full = memory.estimate("qwen2.5-vl-7b", finetune="full")
    assert full.breakdown["optimizer states"] > 10 * on.breakdown["optimizer states"]


def test_vision_without_autograd_lowers_memory():
    tracked = memory.estimate("qwen2.5-vl-7b", vision_no_grad=False)
    free = memory.estimate("qwen2.5-vl-7b", vision_no_grad=True)
    assert free.breakdown["activations (vision)"] == 0
    assert free.peak_gib < tracked.peak_gib


def test_budget_lowers_visual_tokens():
    e = memory.estimate("qwen2.5-vl-7b", budget=Budget(max_image_tokens=256))
    assert e.visual_tokens <= 256
    assert e.peak_gib < memory.estimate("qwen2.5-vl-7b").peak_gib


def test_bad_arguments():
    with pytest.raises(ValueError):
        memory.estimate("smolvlm", finetune="lorax")
    with pytest.raises(registry.UnknownModelError):
        memory.estimate("no-such-model")


def test_plan_returns_only_fitting_candidates_best_first():
    res = memory.plan("qwen2.5-vl-7b", 24, text_tokens=256, image_size=(1000, 1000))
    assert res, res.reason
    for c in res:
        assert c.required_gib <= 24
        assert c.estimate.peak_gib * 1.1 < 24
    scores = [c.score for c in res]
    assert scores == sorted(scores, reverse=True)
    assert res[0].finetune == "lora"  # bf16 LoRA fits: preferred over QLoRA
    assert "FINETUNE=" in res[0].make_args()


def test_plan_on_80_gib_prefers_full_resolution_and_larger_batches():
    res = memory.plan("qwen2.5-vl-7b", 80, image_size=(1000, 1000))
    assert res[0].estimate.visual_tokens == 1296
    assert res[0].micro_batch >= 4


def test_plan_nothing_fits_with_reason():
    res = memory.plan("qwen2.5-vl-7b", 2.0, text_tokens=256, image_size=(1000, 1000))
    assert list(res) == []
    assert "nothing fits 2 GiB" in res.reason and "weights alone" in res.reason


def test_cli_plan_exit_codes(capsys):
    assert memory.cli_plan(["--model", "qwen2.5-vl-7b", "--gpu-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "peak allocated" in out and "FINETUNE=lora" in out
    assert memory.cli_plan(["--model", "qwen2.5-vl-7b", "--gpu-gib", "80", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["candidates"][0]["required_gib"] <= 80
    assert memory.cli_plan(["--model", "qwen2.5-vl-7b", "--gpu-gib", "2"]) == 1
    assert "nothing fits" in capsys.readouterr().out
    assert memory.cli_plan(["--model", "nope", "--gpu-gib", "80"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert memory.cli_plan(["--model", "smolvlm", "--gpu-gib", "80", "--image", "big"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cli_plan_needs_gpu_gib_without_cuda(capsys):
    assert memory.cli_plan(["--model", "smolvlm"]) == 2
    assert "--gpu-gib" in capsys.readouterr().err


def test_cli_plan_through_vlmfit_main(capsys):
    from vlmfit import cli

    assert cli.main(["plan", "--model", "smolvlm", "--gpu-gib", "24"]) == 0


def _finite_positive(row: dict, keys: list[str]) -> None:
    for k in keys:
        assert math.isfinite(row[k]) and row[k] > 0, (k, row[k])


def test_profile_steps_and_ladder_tiny_cpu(tiny_cache):
    if torch.cuda.is_available():
        pytest.skip("CPU path")
    cfg = RunConfig(model="tiny-smolvlm", per_device_train_batch_size=1)
    r = memory.profile_steps(cfg, steps=1, image_size=(64, 64), text_tokens=16)
    _finite_positive(r, ["weights_gib", "peak_gib", "step_s", "tokens_per_s", "estimate_gib"])
    assert r["visual_tokens"] > 0 and r["sequence_tokens"] >= 16 + r["visual_tokens"]
    assert r["device"] == "cpu" and math.isfinite(r["loss"])
    rows = memory.ladder(
        cfg,
        [{"label": "base"}, {"vision_no_grad": True, "per_device_train_batch_size": 2}],
        steps=1,
        image_size=(64, 64),
        text_tokens=16,
        progress=False,
    )
    assert [r["label"] for r in rows][0] == "base" and len(rows) == 2
    assert all("error" not in r for r in rows), rows
    assert rows[1]["micro_batch"] == 2 and rows[1]["vision_no_grad"]
    assert rows[0]["peak_change"] == 0


def test_ladder_failure_becomes_a_row(tiny_cache):
    rows = memory.ladder(RunConfig(model="tiny-smolvlm"), [{"lora_r": 0}], steps=1, progress=False)
    assert len(rows) == 1 and "error" in rows[0]


@pytest.mark.gpu
def test_profile_smolvlm_random_matches_estimate(tiny_cache):
    cfg = RunConfig(model="smolvlm", weights="random", per_device_train_batch_size=1)
    r = memory.profile_steps(cfg, steps=2, image_size=(1000, 1000), text_tokens=256)
    est = memory.estimate(
        "smolvlm", visual_tokens=r["visual_tokens"], text_tokens=256, micro_batch=1
    ).peak_gib
    assert r["peak_gib"] == pytest.approx(est, rel=0.30)
    assert r["estimate_gib"] == pytest.approx(r["peak_gib"], rel=0.30)


@pytest.mark.slow
def test_profile_notebook_tiny(tiny_cache, tmp_path):
    from vlmfit.nbrun import run_notebook

    nb, html = run_notebook(
        "notebooks/profile.ipynb",
        "profile-test",
        {"model": "tiny-smolvlm", "steps": 1, "image_size": "64x64", "text_tokens": 32},
        tmp_path,
        progress=False,
    )
    text = html.read_text()
    assert html.exists() and "data:image/png" in text
    assert "Traceback" not in text
