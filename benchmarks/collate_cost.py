"""What one training batch costs a DataLoader worker (CPU seconds) and carries to the GPU.

    python benchmarks/collate_cost.py --model smolvlm --mb 12

The benchmark's work (``benchmarks/fastpath.py``: 1000x1000 images, long answers) through
what the workers run during training: TRL's collator (the image processor) wrapped in
vlmfit's ``WorkerCollator``, with ``uint8_pixels`` off and on. Prints the median seconds a
batch and an image, and the bytes of the batch's tensors. CPU only: on a GPU host the
workers run the same code (with transformers' torchvision image processor, if installed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastpath as bench  # noqa: E402  (benchmarks/fastpath.py)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smolvlm")
    ap.add_argument("--mb", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default="/tmp/vlmfit-bench")
    a = ap.parse_args(argv)

    import torch
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlmfit import train
    from vlmfit.config import resolve
    from vlmfit.models import loading
    from vlmfit.models.processors import load_processor
    from vlmfit.train import fastpath, pixels

    data = bench.make_data(Path(a.work) / "data", n=max(64, a.mb))
    cfg, _ = resolve({"model": a.model, "weights": "random", "data": str(data)})
    processor = load_processor(loading.save_random(cfg.spec), cfg.spec.family.name)
    ds = train.load_prepared(train.prepare_data(cfg, str(data), progress=False), preference=False)
    samples = [ds[i] for i in range(a.mb)]
    rows = []
    for on in (False, True):
        found = pixels.codec_for(processor, cfg.spec.family.name) if on else None
        codec, proc = found if found else (None, processor)
        collate = fastpath.WorkerCollator(
            DataCollatorForVisionLanguageModeling(proc), torch.bfloat16, codec=codec
        )
        times = []
        for _ in range(a.repeat):
            t = time.process_time()
            batch = collate(samples)
            times.append(time.process_time() - t)
        sec = statistics.median(times)
        rows.append(
            {
                "model": a.model,
                "mb": a.mb,
                "uint8_pixels": codec is not None,
                "cpu_s_per_batch": round(sec, 3),
                "cpu_s_per_image": round(sec / a.mb, 3),
                "batch_mb": round(
                    sum(v.nbytes for v in batch.values() if isinstance(v, torch.Tensor)) / 2**20
                ),
                "pixel_values": f"{batch['pixel_values'].dtype}",
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
