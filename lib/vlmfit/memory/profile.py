"""Measure training memory on this device: ``profile_steps`` on a synthetic batch, the
``ladder`` of variants, and memory per step during training (``step_callback``, ``growth``)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import statistics
import sys
import threading
import time
from typing import Any

from vlmfit.budget import Budget, image_sequence_tokens
from vlmfit.memory.constants import GIB
from vlmfit.memory.estimator import estimate
from vlmfit.models.registry import ModelSpec


def synthetic_batch(
    processor,
    spec: ModelSpec,
    *,
    image_size: tuple[int, int] = (448, 448),
    text_tokens: int = 256,
    micro_batch: int = 1,
    max_image_tokens: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """A training batch from the model's processor: one random image + ``text_tokens``.

    The text is a chat turn padded with filler words to exactly ``text_tokens`` tokens
    outside the image span (when the chat markup alone is shorter); ``labels`` = input ids.
    """
    import numpy as np
    import torch
    from PIL import Image

    from vlmfit.budget import budget_size, processor_kwargs

    rng = np.random.default_rng(seed)
    w, h = image_size
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    kwargs: dict[str, Any] = {}
    budget = Budget(max_image_tokens=max_image_tokens) if max_image_tokens else None
    if budget is not None:
        if spec.is_qwen:
            img = img.resize(budget_size(spec, w, h, budget))
        else:
            kwargs = processor_kwargs(spec, budget)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False)
    enc = processor(
        text=[prompt] * micro_batch,
        images=[[img] for _ in range(micro_batch)],
        return_tensors="pt",
        **kwargs,
    )
    ids = enc["input_ids"]
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(spec.family.image_token)
    n_image = int((ids[0] == image_id).sum())
    span = n_image + (2 if spec.is_qwen else 0)
    if not spec.is_qwen:  # Idefics3 markup around tiles: count it as image span
        span = image_sequence_tokens(spec, w, h, budget) if not spec.tiny else n_image
    have = ids.shape[1] - span
    need = max(0, text_tokens - have)
    if need:
        words = tok(" the red circle is left of the blue square", add_special_tokens=False)
        filler = (words["input_ids"] * (need // max(len(words["input_ids"]), 1) + 1))[:need]
        extra = torch.tensor([filler] * micro_batch, dtype=ids.dtype)
        for key, value in list(enc.items()):  # token-type ids etc.: text = 0
            if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
                continue
            if value.dim() == 2 and tuple(value.shape) == tuple(ids.shape):
                enc[key] = torch.cat([value, torch.zeros_like(extra, dtype=value.dtype)], dim=1)
        enc["input_ids"] = torch.cat([ids, extra], dim=1)
        enc["attention_mask"] = torch.cat(
            [enc["attention_mask"], torch.ones_like(extra, dtype=enc["attention_mask"].dtype)],
            dim=1,
        )
    enc["labels"] = enc["input_ids"].clone()
    out = dict(enc)
    out["_visual_tokens"] = n_image
    return out


def model_batch(model, processor, spec, cfg, image_size, text_tokens):
    """``synthetic_batch`` for ``cfg``'s micro-batch on ``model``'s device and float dtype:
    (batch, visual tokens a sample, sequence length, that dtype)."""
    import torch

    device = next(p.device for p in model.parameters())
    batch = synthetic_batch(
        processor,
        spec,
        image_size=image_size,
        text_tokens=text_tokens,
        micro_batch=cfg.per_device_train_batch_size,
        max_image_tokens=cfg.max_image_tokens,
    )
    visual = batch.pop("_visual_tokens")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    batch = {
        k: (v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in batch.items()
    }
    return batch, visual, int(batch["input_ids"].shape[1]), dtype


class _RssSampler:
    """Peak resident set size of this process (bytes), sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def free_memory() -> None:
    """Release what a previous measurement left: garbage, CUDA cache, peak statistics."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elif sys.platform.startswith("linux"):  # hand freed heap back, so RSS peaks mean something
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def loop_estimate(cfg, spec, mb: int, seq: int, visual: int, dtype, vision_no_grad: bool):
    """The estimate of the measuring loop's own step: ``model(**batch).loss`` (no fused LM
    head), no autocast, ``cfg``'s LoRA and fused-LoRA settings."""
    import torch

    est_dtype = "bf16" if dtype == torch.bfloat16 else "fp16" if dtype == torch.float16 else "fp32"
    return estimate(
        spec,
        finetune=cfg.finetune,
        lora_r=cfg.lora_r,
        micro_batch=mb,
        text_tokens=seq - (visual + 2 if spec.is_qwen else visual),
        visual_tokens=visual,
        gradient_checkpointing=cfg.gradient_checkpointing,
        dtype=est_dtype,
        vision_no_grad=vision_no_grad,
        lora_dropout=cfg.lora_dropout > 0,
        kbit_upcast=cfg.qlora_upcast,
        fused_lm_head=False,
        fused_lora=bool(getattr(cfg, "fused_lora", True)),  # build_model applies cfg's
        autocast=False,
    )


def profile_steps(
    cfg,
    *,
    steps: int = 3,
    image_size: tuple[int, int] = (448, 448),
    text_tokens: int = 256,
    vision_no_grad: bool = False,
    warmup: int = 1,
) -> dict[str, Any]:
    """Build ``cfg``'s model (``train.build_model``) and time forward+backward+AdamW steps.

    ``cfg`` is a ``vlmfit.config.RunConfig``; micro-batch = ``per_device_train_batch_size``,
    visual-token budget = ``max_image_tokens``. Runs ``warmup + steps`` steps on a synthetic
    batch (``synthetic_batch``). Returns (GiB, seconds): ``device``; ``weights_gib`` (after
    load and PEFT; CUDA: ``memory_allocated``, CPU: parameter + buffer bytes); ``peak_gib``
    (CUDA: ``max_memory_allocated`` over the steps; CPU: the process's peak RSS, sampled
    every 5 ms, Python and libraries included); ``rss_start_gib`` (CPU: RSS before loading);
    ``reserved_gib`` (CUDA ``max_memory_reserved``); ``step_s`` (median of the
    timed steps, synchronized); ``tokens_per_s``; ``sequence_tokens``, ``visual_tokens``,
    ``micro_batch``, ``loss``, ``load_s``, ``estimate_gib`` (``estimate`` of the same
    configuration, CUDA dtype) and ``trainable_params``.
    """
    import torch

    from vlmfit import train

    spec = cfg.spec
    cuda = torch.cuda.is_available()
    free_memory()
    rss0 = _rss()
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, vision_no_grad=vision_no_grad)
    model, processor = train.build_model(cfg)
    load_s = time.perf_counter() - t0
    tensors = [*model.parameters(), *model.buffers()]
    weights_gib = (
        torch.cuda.memory_allocated()
        if cuda
        else sum(t.numel() * t.element_size() for t in tensors)
    ) / GIB
    del tensors
    mb = cfg.per_device_train_batch_size
    batch, visual, seq, dtype = model_batch(model, processor, spec, cfg, image_size, text_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.make_optimizer(cfg, model) or torch.optim.AdamW(params, lr=cfg.learning_rate)
    model.train()
    times: list[float] = []
    losses: list[float] = []

    def step(model=model, batch=batch, opt=opt) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(**batch).loss  # the outputs object (bf16 logits) is dropped at once
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        losses.append(float(loss.detach()))
        return time.perf_counter() - t

    sampler = contextlib.nullcontext() if cuda else _RssSampler()
    with sampler:
        for _ in range(warmup):
            step()
        for _ in range(max(1, steps)):
            times.append(step())
    if cuda:
        peak = torch.cuda.max_memory_allocated() / GIB
        reserved = torch.cuda.max_memory_reserved() / GIB
    else:  # the whole process (Python, libraries) : compare CPU rows with each other only
        peak = sampler.peak / GIB
        reserved = float("nan")
    step_s = statistics.median(times)
    try:
        est = loop_estimate(cfg, spec, mb, seq, visual, dtype, bool(vision_no_grad)).peak_gib
    except Exception:  # noqa: BLE001 - an estimate is a bonus here, never a failure
        est = float("nan")
    trainable = sum(p.numel() for p in params)
    result = {
        "model": cfg.model,
        "weights": cfg.weights,
        "finetune": cfg.finetune,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "micro_batch": mb,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "vision_no_grad": vision_no_grad,
        "max_image_tokens": cfg.max_image_tokens,
        "image_size": f"{image_size[0]}x{image_size[1]}",
        "visual_tokens": visual,
        "sequence_tokens": seq,
        "weights_gib": weights_gib,
        "peak_gib": peak,
        "reserved_gib": reserved,
        "rss_start_gib": rss0 / GIB,
        "step_s": step_s,
        "tokens_per_s": mb * seq / step_s,
        "loss": losses[-1],
        "load_s": load_s,
        "estimate_gib": est,
        "trainable_params": trainable,
    }
    del model, processor, opt, params, batch, step
    free_memory()
    return result


#: Keys a ladder variant may hold besides RunConfig fields.
PROFILE_KEYS = ("label", "vision_no_grad", "image_size", "text_tokens", "steps")


def ladder(
    base_cfg,
    variants: list[dict[str, Any]],
    *,
    steps: int = 3,
    image_size: tuple[int, int] = (448, 448),
    text_tokens: int = 256,
    cumulative: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """torchtune's memory ladder: ``profile_steps`` per variant, one row each.

    Each variant is a dict of ``RunConfig`` overrides (``per_device_train_batch_size``,
    ``gradient_checkpointing``, ``max_image_tokens``, ``finetune``...) plus optional
    ``label``, ``vision_no_grad``, ``image_size``, ``text_tokens``. With ``cumulative``
    (default) each step adds to the previous ones (baseline -> + technique -> + next);
    otherwise each applies to ``base_cfg`` alone. A variant that fails (out of memory, a
    missing package) gives a row with ``error`` instead of stopping the ladder. Rows carry
    ``peak_change`` and ``speed_change`` relative to the first successful row (fractions).
    """
    rows: list[dict[str, Any]] = []
    acc: dict[str, Any] = {}
    for n, variant in enumerate(variants):
        cur = {**acc, **variant} if cumulative else dict(variant)
        if cumulative:
            acc = {k: v for k, v in cur.items() if k != "label"}
        label = variant.get("label") or (
            "baseline" if not variant else "+ " + ", ".join(f"{k}={v}" for k, v in variant.items())
        )
        overrides = {k: v for k, v in cur.items() if k not in PROFILE_KEYS}
        cfg = dataclasses.replace(base_cfg, **overrides)
        t = time.perf_counter()
        try:
            row = profile_steps(
                cfg,
                steps=cur.get("steps", steps),
                image_size=tuple(cur.get("image_size", image_size)),
                text_tokens=cur.get("text_tokens", text_tokens),
                vision_no_grad=bool(cur.get("vision_no_grad", False)),
            )
        except Exception as err:  # noqa: BLE001 - OOM and friends become a row
            row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            free_memory()
        row = {"step": n, "label": label, **row}
        rows.append(row)
        if progress:
            if "error" in row:
                print(f"[{n}] {label}: {row['error']}", flush=True)
            else:
                print(
                    f"[{n}] {label}: peak {row['peak_gib']:.2f} GiB, {row['tokens_per_s']:.0f} "
                    f"tokens/s ({time.perf_counter() - t:.0f} s)",
                    flush=True,
                )
    base = next((r for r in rows if "error" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["peak_change"] = r["peak_gib"] / base["peak_gib"] - 1 if base["peak_gib"] else 0.0
            r["speed_change"] = r["tokens_per_s"] / base["tokens_per_s"] - 1
    return rows


def format_rows(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows (dicts) as an aligned text table."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


LADDER_COLUMNS = [
    "step", "label", "micro_batch", "visual_tokens", "sequence_tokens", "weights_gib",
    "peak_gib", "estimate_gib", "reserved_gib", "step_s", "tokens_per_s", "peak_change",
]  # fmt: skip


def growth(rows: list[dict[str, Any]], *, warmup: float = 0.1) -> dict[str, Any]:
    """Trend of allocated and reserved memory over steps (``memory.jsonl`` rows).

    Least squares after the first ``warmup`` fraction of steps; ``growing`` when the fitted
    rise over the run exceeds max(64 MiB, 2 % of the mean): a leak (allocated) or
    fragmentation (reserved only).
    """
    import numpy as np

    keys = [
        k
        for k in ("mem_allocated_gib", "mem_reserved_gib", "mem_rss_gib")
        if rows and k in rows[-1]
    ]
    pts = [r for r in rows if "step" in r]
    pts = pts[int(len(pts) * warmup) :]
    out: dict[str, Any] = {"steps": len(pts)}
    if len(pts) < 5:
        return out | {"growing": None, "why": "fewer than 5 steps after warm-up"}
    steps = np.array([r["step"] for r in pts], dtype=float)
    verdicts = []
    for key in keys:
        y = np.array([r[key] for r in pts], dtype=float)
        slope, _ = np.polyfit(steps, y, 1)
        rise = float(slope * (steps[-1] - steps[0]))
        grows = rise > max(64 / 1024, 0.02 * float(y.mean()))
        out[key] = {
            "slope_mib_per_100_steps": slope * 1024 * 100,
            "rise_gib": rise,
            "growing": grows,
        }
        verdicts.append(grows)
    alloc = out.get("mem_allocated_gib", {}).get("growing")
    reserved = out.get("mem_reserved_gib", {}).get("growing")
    out["growing"] = any(verdicts)
    out["why"] = (
        "allocated memory grows: tensors are kept across steps (a leak)"
        if alloc
        else "reserved grows while allocated does not: allocator fragmentation "
        "(expandable_segments=True avoids it)"
        if reserved
        else "steady"
    )
    return out


def step_callback(path):
    """A ``TrainerCallback`` writing allocated / reserved / peak GiB of every step to
    ``path`` (JSON lines; CPU: the process RSS) and keeping the run's peak."""
    import torch
    from transformers import TrainerCallback

    from vlmfit.train.runs import MetricsLog

    class MemoryPerStep(TrainerCallback):
        """Rows are kept in memory and written at each log and at the end: no file I/O on
        the steps in between."""

        def __init__(self):
            self.log = MetricsLog(path)
            self.peak = 0.0
            self.rows: list[dict[str, Any]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if torch.cuda.is_available():
                peak = torch.cuda.max_memory_allocated() / GIB
                row = {
                    "mem_allocated_gib": torch.cuda.memory_allocated() / GIB,
                    "mem_reserved_gib": torch.cuda.memory_reserved() / GIB,
                    "mem_peak_gib": peak,
                }
                torch.cuda.reset_peak_memory_stats()  # the next row is the next step's peak
            else:
                peak = _rss() / GIB
                row = {"mem_rss_gib": peak}
            self.peak = max(self.peak, peak)
            self.rows.append({"step": state.global_step} | row)

        def flush(self) -> None:
            if self.rows:
                self.log.write_many(self.rows)
                self.rows = []

        def on_log(self, args, state, control, **kwargs):
            self.flush()

        def on_train_end(self, args, state, control, **kwargs):
            self.flush()

    return MemoryPerStep()
