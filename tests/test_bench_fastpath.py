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
