"""The GPU path, end to end, on full-size architectures with random weights.

    python scripts/gpu_proof.py --models smolvlm qwen2.5-vl-3b --out results/gpu

For each model: preprocess the bundled dataset for it (visual-token budget, cache),
SFT with LoRA in bf16, DPO from that SFT adapter (reference = adapter disabled),
and SFT with QLoRA (4-bit NF4, double quantization, bf16 compute; the random weights
are saved once and reloaded quantized, as a hub load would). Each run writes its
run folder; this script prints one table (steps, peak allocated GiB, s/step) and
writes ``gpu_proof.json``. Needs CUDA; the same library calls as the notebooks.

On a GPU host without internet whose Python lacks trl / datasets / bitsandbytes, the
2026-11-23 H100 run carried them unpacked in one xz tarball (the device limit was 64 MiB):
``pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
manylinux_2_28_x86_64 ...`` of trl, datasets, pyarrow, pandas, dill, multiprocess, xxhash,
python-dateutil, six, tzdata, transformers and bitsandbytes at the lock's pins; unzip
them into one folder; keep only ``libbitsandbytes_cuda130.so`` (the host's CUDA) and drop
pyarrow's flight / cloud-filesystem modules (``libarrow_substrait`` must stay); then
``tar c . | xz > .gpu/site.tar.xz`` (43 MB), and on the host
``tar xJf .gpu/site.tar.xz -C /tmp/site && PYTHONPATH=/tmp/site:lib python3 scripts/gpu_proof.py``.
With internet, `make setup` is all it takes.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path


def one(cfg_over: dict, label: str, rows: list, pre_data: dict) -> None:
    import torch

    from vlmfit import train
    from vlmfit.config import resolve

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gib = lambda f: round(f() / 2**30, 2) if cuda else None  # noqa: E731
    t = time.time()
    try:
        cfg, origin = resolve(cfg_over)
        cfg.data = pre_data.get(cfg.method, cfg.data)
        s = train.run(cfg, origin, progress=False)
        rows.append(
            {
                "label": label,
                "model": cfg.model,
                "method": cfg.method,
                "finetune": cfg.finetune,
                "steps": s["global_step"],
                "peak_alloc_gib": gib(torch.cuda.max_memory_allocated),
                "peak_reserved_gib": gib(torch.cuda.max_memory_reserved),
                "s_per_step": round(s["runtime_s"] / max(s["global_step"], 1), 3),
                "train_loss": s["train_loss"],
                "dpo": {k: v for k, v in s["dpo_eval"].items() if "rewards" in k},
                "wall_s": round(time.time() - t, 1),
                "ok": True,
            }
        )
    except Exception as e:  # noqa: BLE001 - record and go on to the next run
        traceback.print_exc()
        rows.append({"label": label, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
    print(json.dumps(rows[-1]), flush=True)


def run_ladder(model: str) -> list[dict]:
    """The reference recipe (1000x1000 image + 256 text tokens) and what each lever buys."""
    from vlmfit import memory
    from vlmfit.config import RunConfig

    base = RunConfig(model=model, weights="random", finetune="lora", per_device_train_batch_size=1)
    variants = [
        {"label": "plain bf16 LoRA r16, grad ckpt, mb 1"},
        {"label": "+ frozen vision tower without autograd", "vision_no_grad": True},
        {"label": "+ budget 256 visual tokens", "max_image_tokens": 256},
        {"label": "+ micro-batch 4", "per_device_train_batch_size": 4},
    ]
    try:
        rows = memory.ladder(base, variants, steps=3, image_size=(1000, 1000), text_tokens=256)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return [{"error": f"{type(e).__name__}: {e}"[:500]}]
    print(f"\nmemory ladder, {model} (random weights), 1000x1000 image + 256 text tokens")
    for r in rows:
        print(json.dumps(r, default=str), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["smolvlm", "qwen2.5-vl-3b"])
    p.add_argument("--out", default="results/gpu")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip-qlora", action="store_true")
    p.add_argument("--ladder", nargs="*", default=[], help="models for the memory ladder")
    a = p.parse_args(argv)
    import torch

    from vlmfit import preprocess
    from vlmfit.budget import Budget
    from vlmfit.data import synth
    from vlmfit.train.runs import environment

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    synth.generate("data/shapes", seed=0)
    rows: list[dict] = []
    env = environment()
    print(json.dumps(env), flush=True)
    for model in a.models:
        pre = {}
        for method, path in (
            ("sft", "data/shapes/sft_train.json"),
            ("dpo", "data/shapes/dpo_train.json"),
        ):
            r = preprocess.preprocess(
                path, model, weights="random", budget=Budget(), progress=False
            )
            pre[method] = str(r.records_path)
        common = {
            "model": model,
            "weights": "random",
            "runs_dir": str(out / "runs"),
            "max_steps": a.steps,
            "per_device_train_batch_size": 4,
            "save_steps": a.steps,
            "logging_steps": 2,
            "eval_limit": 8,
            "eval_max_new_tokens": 4,
            "gradient_checkpointing": True,
        }
        sft_run = f"sft-{model}"
        one({**common, "run": sft_run, "finetune": "lora"}, f"{model} SFT LoRA bf16", rows, pre)
        one(
            {
                **common,
                "method": "dpo",
                "run": f"dpo-{model}",
                "init_adapter": sft_run,
                "max_steps": max(a.steps // 2, 2),
                "per_device_train_batch_size": 2,
                "preference_eval_data": "data/shapes/dpo_test.json",
            },
            f"{model} DPO LoRA bf16 (from SFT adapter)",
            rows,
            pre,
        )
        if not a.skip_qlora:
            one(
                {**common, "run": f"sft-qlora-{model}", "finetune": "qlora"},
                f"{model} SFT QLoRA nf4",
                rows,
                pre,
            )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ladders = {m: run_ladder(m) for m in a.ladder}
    (out / "gpu_proof.json").write_text(
        json.dumps({"environment": env, "runs": rows, "ladders": ladders}, indent=2, default=str)
    )
    print("\n| run | steps | peak alloc GiB | peak reserved GiB | s/step | ok |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['label']} | {r.get('steps', '-')} | {r.get('peak_alloc_gib', '-')} | "
            f"{r.get('peak_reserved_gib', '-')} | {r.get('s_per_step', '-')} | {r['ok']} |"
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
