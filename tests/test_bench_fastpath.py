"""GPU: the fast path stays ahead of the plain recipe (ratios within one process).

pytest -q -m gpu tests/test_bench_fastpath.py      (also run by `make bench`)

SmolVLM-256M with random weights, LoRA r16, micro-batch 4, one 1000x1000 image and a
~200-word answer per sample (benchmarks/fastpath.py's work). Measured on an H200
(docs/benchmarks.md): plain 5.79 GiB / 12,146 tokens/s, fast path 2.28 GiB / 13,283.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "fastpath.py"


def _bench():
    spec = importlib.util.spec_from_file_location("fastpath_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fast_path_beats_the_plain_recipe_on_the_gpu(tmp_path):
    import torch

    bench = _bench()
    data = bench.make_data(tmp_path / "data", n=8)
    rows = {}
    for path in ("plain", "vlmfit-loop"):
        case = {"path": path, "model": "smolvlm", "finetune": "lora", "mb": 4}
        rows[path] = bench.gpu_loop(case, data, steps=4, warmup=2)
        gc.collect()
        torch.cuda.empty_cache()
    plain, fast = rows["plain"], rows["vlmfit-loop"]
    assert fast["peak_gib"] <= 0.6 * plain["peak_gib"], rows
    assert fast["tokens_per_s"] >= 0.95 * plain["tokens_per_s"], rows


def _gpu_or_skip():
    import torch

    from vlmfit.train import fastpath

    why = fastpath.varlen_available("cuda") if torch.cuda.is_available() else "no CUDA GPU"
    if why:
        pytest.skip(f"torch's varlen attention: {why}")


def test_varlen_kernels_compute_what_sdpa_computes_on_the_gpu():
    """The real CUDA kernels behind vision_attention=varlen and packing: non-causal windows
    and causal packed rows with grouped key / value heads, forward and backward, in bf16.
    The reference is SDPA per segment in fp32; the varlen kernel's bf16 error must be no
    larger than twice bf16 SDPA's own (the test flash-attention's authors use: a few
    gradient elements of bf16 SDPA itself are 0.08 off)."""
    import functools

    import torch

    from vlmfit.train import fastpath

    _gpu_or_skip()
    torch.manual_seed(0)
    cu = torch.tensor([0, 64, 128, 300, 301, 512], dtype=torch.int32, device="cuda")
    lens = (cu[1:] - cu[:-1]).tolist()

    def sdpa(q, k, v, causal, gqa):
        return torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                is_causal=causal, enable_gqa=gqa,
            ).transpose(0, 1)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
        ])  # fmt: skip

    def out_and_grads(fn, q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(q, k, v)
        return [out.float(), *torch.autograd.grad(out.float().square().sum(), (q, k, v))]

    for causal, heads, kv in ((False, 16, 16), (True, 28, 4)):
        q = torch.randn(512, heads, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(512, kv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        gqa = kv != heads
        base = functools.partial(sdpa, causal=causal, gqa=gqa)
        ref = out_and_grads(base, q.float(), k.float(), v.float())
        bf16 = out_and_grads(base, q, k, v)
        varlen = functools.partial(
            fastpath._varlen_kernel, cu_seqlens=cu, max_seqlen=max(lens), scale=128**-0.5,
            causal=causal,
        )  # fmt: skip
        got = out_and_grads(varlen, q, k, v)
        for name, g, b, r in zip(("out", "dq", "dk", "dv"), got, bf16, ref, strict=True):
            err, floor = (g - r).abs().max().item(), (b - r).abs().max().item()
            assert err <= 2 * floor + 1e-3, f"{name}: varlen {err:.4f} vs bf16 SDPA {floor:.4f}"


def test_packed_qwen_rows_train_like_padded_batches_on_the_gpu(tmp_path):
    """Qwen2.5-VL-3B with random weights on the GPU: the packed row through the varlen
    kernels gives the padded batch's loss within bf16 rounding."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlmfit import train
    from vlmfit.config import resolve
    from vlmfit.train import packing

    _gpu_or_skip()
    bench = _bench()
    data = bench.make_data(tmp_path / "data", n=8, side=448, vary=True)
    cfg, _ = resolve({"model": "qwen2.5-vl-3b", "weights": "random", "data": str(data),
                      "eval_data": None, "runs_dir": str(tmp_path / "runs")})  # fmt: skip
    model, processor = train.build_model(cfg)
    assert model.vlmfit_vision_attention == "varlen"
    folder = train.prepare_data(cfg, str(data), progress=False)
    ds = train.load_prepared(folder, preference=False)
    batch = DataCollatorForVisionLanguageModeling(processor)([ds[i] for i in range(4)])
    batch = {k: v.cuda() for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    model.train()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(**batch).loss
        packing.enable(model, varlen=True)
        got = model(**batch).loss
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
