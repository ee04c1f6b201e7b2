"""Several GPUs through vlmfit's launcher (accelerate): LoRA scaling and full fine-tuning.

    python benchmarks/scaling.py --out results/scaling              # on a 2-GPU host

The fast-path benchmark's work (1000x1000 image, ~200-word answer, random weights) on
Qwen2.5-VL-7B, each run launched as users launch it (``python -m vlmfit.train.distributed``):

- LoRA on 1 GPU and on 2 GPUs under DDP, micro-batch 4: steady-state tokens/s from the
  run's ``metrics.jsonl`` (TRL's ``num_tokens`` is gathered over ranks), and the ratio;
- full fine-tuning with AdamW under FSDP2 on 2 GPUs: per-GPU peak (rank 0's
  ``memory.jsonl``), tokens/s, and the exported ``model.safetensors``.

Prints one table and writes ``scaling.json`` / ``scaling.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastpath as bench  # noqa: E402  (benchmarks/fastpath.py: the work and versions)

CASES = [
    {"nproc": 1, "dist": "ddp", "finetune": "lora", "mb": 4, "steps": 16},
    {"nproc": 2, "dist": "ddp", "finetune": "lora", "mb": 4, "steps": 16},
    {"nproc": 2, "dist": "fsdp2", "finetune": "full", "mb": 2, "steps": 8},
]


def steady_tokens_per_s(metrics: Path, skip: int = 5) -> float | None:
    """tokens/s between the ``skip``-th logged step and the last (warm-up dropped)."""
    pts = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    pts = [(r["step"], r["time"], r["num_tokens"]) for r in pts if "num_tokens" in r]
    later = [p for p in pts if p[0] >= skip]
    if len(later) < 2:
        return None
    (_, t0, n0), (_, t1, n1) = later[0], later[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def run_case(case: dict, data: Path, work: Path, model: str) -> dict:
    name = f"scale-{case['finetune']}-{case['dist']}-x{case['nproc']}"
    args = {
        "model": model, "weights": "random", "finetune": case["finetune"], "data": str(data),
        "eval_data": "none", "runs_dir": str(work / "runs"), "run": name,
        "max_steps": case["steps"], "per_device_train_batch_size": case["mb"],
        "logging_steps": 1, "save_steps": 10_000, "lora_alpha": 16,
    }  # fmt: skip
    cmd = [sys.executable, "-m", "vlmfit.train.distributed", "--nproc", str(case["nproc"]),
           "--dist", case["dist"], "--overwrite", "--",
           *[x for k, v in args.items() for x in (f"--{k}", str(v))]]  # fmt: skip
    t = time.time()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=os.environ)
    row = {**case, "model": model, "wall_s": round(time.time() - t, 1)}
    run = work / "runs" / name
    if proc.returncode != 0 or not (run / "summary.json").exists():
        print(proc.stdout[-2000:], proc.stderr[-6000:], file=sys.stderr)
        return row | {"error": (proc.stderr or proc.stdout)[-400:]}
    s = json.loads((run / "summary.json").read_text())
    exported = (
        sorted(p.name for p in (run / "adapter").iterdir()) if (run / "adapter").exists() else []
    )
    return row | {
        "tokens_per_s": steady_tokens_per_s(run / "metrics.jsonl"),
        "tokens_per_s_summary": s.get("tokens_per_s"),
        "peak_gib_per_gpu": s.get("train_peak_memory_gib"),
        "engine": s.get("engine"),
        "processes": s.get("processes"),
        "exported": exported,
        "gpu": s.get("device"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="results/scaling")
    ap.add_argument("--work", default="/tmp/vlmfit-scaling")
    ap.add_argument("--model", default="qwen2.5-vl-7b")
    ap.add_argument("--only", type=int, nargs="*", help="indices of CASES to run")
    a = ap.parse_args(argv)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    data = bench.make_data(work / "data", n=160)
    rows = []
    for i, case in enumerate(CASES):
        if a.only is not None and i not in a.only:
            continue
        row = run_case(case, data, work, a.model)
        rows.append(row)
        with open(out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    one = next((r for r in rows if r["nproc"] == 1 and r.get("tokens_per_s")), None)
    lines = ["| method | engine | GPUs | mb per GPU | peak GiB per GPU | tokens/s | vs 1 GPU |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['finetune']} | {r['dist']} | {r['nproc']} | {r['mb']} | {r['error'][-120:]} |||"
            )
            continue
        ratio = (
            f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x"
            if one and r["finetune"] == "lora"
            else "-"
        )
        lines.append(f"| {r['finetune']} | {r['dist']} | {r['nproc']} | {r['mb']} | "
                     f"{r['peak_gib_per_gpu'] or 0:.2f} | {r['tokens_per_s'] or 0:,.0f} | {ratio} |")  # fmt: skip
    md = "\n".join(lines)
    result = {
        "versions": bench.versions(),
        "rows": rows,
        "command": " ".join([sys.executable, *sys.argv]),
    }
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    (out / "scaling.md").write_text(md + "\n")
    print(json.dumps(result["versions"]))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
