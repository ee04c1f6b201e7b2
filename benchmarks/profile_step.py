"""Where one training step's time goes (GPU): kernels vs host, by op, and the vision share.

    python benchmarks/profile_step.py --model smolvlm --mb 4 --out results/profile
    python benchmarks/profile_step.py --model qwen2.5-vl-7b --mb 4 --set vision_attention=sdpa

Builds vlmfit's path as ``benchmarks/fastpath.py`` does (``train.build_model`` + TRL's fused
LM head, ``model.train()``) on the benchmark's work (1000x1000 image, long answer), or the
plain recipe with ``--plain``; warms up, then profiles two steps with ``torch.profiler``.
Prints and writes (``--out``): step wall time, GPU kernel time per step (busy fraction: low
means the step waits on the host), the vision tower's share, and the top ops by GPU and by
host time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastpath as bench  # noqa: E402  (benchmarks/fastpath.py)


def _value(text: str):
    return json.loads(text) if text[:1] in "0123456789-[{tfn" else text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smolvlm")
    ap.add_argument("--finetune", default="lora")
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--plain", action="store_true", help="the textbook recipe instead")
    ap.add_argument("--set", action="append", default=[], help="RunConfig field=value")
    ap.add_argument("--out", default="results/profile")
    ap.add_argument("--work", default="/tmp/vlmfit-bench")
    a = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()  # without CUDA: a smoke test with a tiny model
    if not cuda:
        torch.cuda.synchronize = lambda: None

    over = {k: _value(v) for k, v in (s.split("=", 1) for s in a.set)}
    case = {"path": "plain" if a.plain else "vlmfit-loop", "model": a.model,
            "finetune": a.finetune, "mb": a.mb, "over": over}  # fmt: skip
    data = bench.make_data(Path(a.work) / "data", n=max(64, a.mb * 4))
    model, batch, step, cfg = bench.loop_setup(case, data)
    tokens = int(batch["attention_mask"].sum())

    def seconds(fn, warmup: int, n: int = 3) -> float:
        """Mean wall time of ``fn`` over ``n`` calls after ``warmup``, GPU synchronized."""
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    step_s = seconds(step, warmup=3)

    # the vision tower alone, as the step runs it (under no_grad on vlmfit's path)
    inner = model.get_base_model().model
    vision_s = None
    try:
        with torch.no_grad():
            feats = lambda: inner.get_image_features(**{k: v for k, v in batch.items()  # noqa: E731
                                                      if k in ("pixel_values", "image_grid_thw",
                                                               "pixel_attention_mask")})  # fmt: skip
            vision_s = seconds(feats, warmup=1)
    except Exception as e:  # noqa: BLE001 - a diagnostic, not the measurement
        print(f"vision timing skipped: {type(e).__name__}: {e}", file=sys.stderr)

    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    from torch.autograd import DeviceType

    # kernels only: an aten op's row repeats the time of the kernels it launched
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 2
    by_gpu = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
    by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    n_kernels = sum(e.count for e in events if e.device_type == DeviceType.CUDA) / 2
    result = {
        "case": case,
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": bench.versions(),
        "tokens": tokens,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "gpu_kernel_s_per_step": gpu_us / 1e6,
        "gpu_busy_fraction": gpu_us / 1e6 / step_s,
        "kernels_per_step": n_kernels,
        "vision_forward_s": vision_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "levers": {"vision_attention": getattr(model, "vlmfit_vision_attention", None)},
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{a.model}-{a.finetune}-mb{a.mb}-{'plain' if a.plain else 'vlmfit'}" + "".join(
        f"-{k}={v}" for k, v in over.items()
    )
    (out / f"{tag}.txt").write_text(
        f"{json.dumps(result)}\n\nby GPU\n{by_gpu}\n\nby host\n{by_cpu}\n"
    )
    print(json.dumps(result))
    print(by_gpu)
    print(by_cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
