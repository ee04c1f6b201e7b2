"""One step's memory phase by phase (weights, gradients, optimizer states, activations,
peak), measured on this device beside the estimate (``measure_phases``)."""

from __future__ import annotations

import math
import time
from typing import Any

from vlmfit.memory.constants import GIB
from vlmfit.memory.profile import format_rows, free_memory, loop_estimate, model_batch

PHASES = (
    ("weights (+ adapters)", ("weights", "trainable params"), "measured"),
    ("gradients", ("gradients",), "measured"),
    ("optimizer states", ("optimizer states",), "measured"),
    ("activations, logits, temporaries", None, "derived"),
    ("peak allocated", "peak", "measured"),
)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        try:
            key = (t.device, t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            key = id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def measure_phases(
    cfg,
    *,
    image_size: tuple[int, int] = (448, 448),
    text_tokens: int = 256,
    steps: int = 2,
) -> dict[str, Any]:
    """One configuration's step, phase by phase, measured and predicted (GiB).

    ``cfg`` is a ``vlmfit.config.RunConfig`` (vlmfit's defaults: checkpointing, the vision
    tower without autograd when frozen); the model is built by ``train.build_model`` and
    trained for ``steps`` forward + backward + AdamW steps on ``memory.synthetic_batch``,
    as ``memory.profile_steps`` does. Measured, on the last step:

    * weights: ``torch.cuda.memory_allocated`` after loading (CPU: parameter and buffer
      bytes);
    * gradients: bytes of the ``.grad`` tensors after backward (any device);
    * optimizer states: bytes of the optimizer's state tensors after its step (any device);
    * peak: ``torch.cuda.max_memory_allocated`` of the step (CUDA only: a CPU process's RSS
      holds the interpreter and libraries, so it is not compared).

    Derived: activations, logits and temporaries alive at the peak = peak - weights -
    gradients - optimizer states (CUDA only). Predicted: ``memory.estimate``'s breakdown
    for the same batch (tokens counted from it), summed into the same phases; the loop
    materializes the logits (``model(**batch).loss``), so the estimate is made without the
    fused LM head. Returns ``rows`` (phase, kind, predicted_gib, measured_gib) and the
    context: ``device``, ``estimate`` (``Estimate``), tokens, ``step_s``.
    """
    import torch

    from vlmfit import train
    from vlmfit.train import fastpath

    spec = cfg.spec
    cuda = torch.cuda.is_available()
    free_memory()
    model, processor = train.build_model(cfg)
    if cuda:
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated()
    else:
        weights = _tensor_bytes([*model.parameters(), *model.buffers()])
    mb = cfg.per_device_train_batch_size
    batch, visual, seq, dtype = model_batch(model, processor, spec, cfg, image_size, text_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.make_optimizer(cfg, model) or torch.optim.AdamW(params, lr=cfg.learning_rate)
    model.train()
    grads = states = peak = 0
    step_s = float("nan")
    for _ in range(max(1, steps)):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        grads = _tensor_bytes(p.grad for p in params)
        del loss
        opt.step()
        states = _tensor_bytes(
            v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        step_s = time.perf_counter() - t
    e = loop_estimate(cfg, spec, mb, seq, visual, dtype, fastpath.vision_runs_without_grad(cfg))
    measured = {
        "weights (+ adapters)": weights / GIB,
        "gradients": grads / GIB,
        "optimizer states": states / GIB,
        "peak allocated": peak / GIB if cuda else float("nan"),
    }
    measured["activations, logits, temporaries"] = (
        (peak - weights - grads - states) / GIB if cuda else float("nan")
    )
    named = {k for _, keys, _ in PHASES if isinstance(keys, tuple) for k in keys}
    rows = []
    for phase, keys, kind in PHASES:
        if keys == "peak":
            pred = e.peak_gib
        elif keys is None:  # the rest of the breakdown: activations, logits, overhead
            pred = sum(v for k, v in e.breakdown.items() if k not in named)
        else:
            pred = sum(e.breakdown.get(k, 0.0) for k in keys)
        how = {
            "weights (+ adapters)": "allocated after loading" if cuda else "parameter bytes",
            "gradients": ".grad tensor bytes",
            "optimizer states": "optimizer state tensor bytes",
            "activations, logits, temporaries": "peak - the three above",
            "peak allocated": "max_memory_allocated" if cuda else "not measured on CPU",
        }[phase]
        if not cuda and phase in ("activations, logits, temporaries", "peak allocated"):
            kind = "not measured"
        rows.append(
            {
                "phase": phase,
                "kind": kind,
                "how": how,
                "predicted_gib": pred,
                "measured_gib": measured[phase],
            }
        )
    result = {
        "model": cfg.model,
        "finetune": cfg.finetune,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "micro_batch": mb,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "image_size": f"{image_size[0]}x{image_size[1]}",
        "visual_tokens": visual,
        "sequence_tokens": seq,
        "step_s": step_s,
        "estimate": e,
        "rows": rows,
    }
    del model, processor, opt, params, batch
    free_memory()
    return result


def phase_table(result: dict[str, Any]) -> str:
    """``measure_phases`` rows as aligned text: predicted, measured, error, how measured."""
    rows = []
    for r in result["rows"]:
        m, p = r["measured_gib"], r["predicted_gib"]
        err = p / m - 1 if m and not math.isnan(m) else float("nan")
        rows.append(
            {
                "phase": r["phase"],
                "predicted": _gib(p),
                "measured": "-" if math.isnan(m) else _gib(m),
                "error": f"{100 * err:+.0f} %" if not math.isnan(err) else "-",
                "kind": r["kind"],
                "how": r["how"],
            }
        )
    return format_rows(rows)


def plot_phases(result: dict[str, Any]):
    """Predicted and measured side by side per phase (GiB); derived bars hatched, phases
    not measured on this device left without a measured bar."""
    import numpy as np
    from matplotlib.figure import Figure

    rows = result["rows"]
    x = np.arange(len(rows))
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax = fig.subplots()
    pred = [r["predicted_gib"] for r in rows]
    meas = [r["measured_gib"] for r in rows]
    ax.bar(x - 0.2, pred, 0.4, color="#ff7f0e", label="predicted (memory.estimate)")
    for i, r in enumerate(rows):
        if math.isnan(meas[i]):
            ax.text(x[i] + 0.2, 0, "not\nmeasured", ha="center", va="bottom", fontsize=7)
            continue
        derived = r["kind"] == "derived"
        ax.bar(x[i] + 0.2, meas[i], 0.4, color="#1f77b4", hatch="//" if derived else None,
               alpha=0.7 if derived else 1.0,
               label=("measured" if not derived else "derived from measurements")
               if i in (0, next((j for j, q in enumerate(rows) if q["kind"] == "derived"), -1))
               else None)  # fmt: skip
    top = max([v for v in pred + meas if not math.isnan(v)] or [1.0])
    for i, (p, m) in enumerate(zip(pred, meas, strict=True)):
        ax.text(x[i] - 0.2, p + 0.01 * top, _gib(p), ha="center", va="bottom", fontsize=7)
        if not math.isnan(m):
            ax.text(x[i] + 0.2, m + 0.01 * top, _gib(m), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"{r['phase']}\n({r['kind']})" for r in rows], fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_ylim(0, top * 1.15)
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.set_title(
        f"{result['model']} {result['finetune']}, micro-batch {result['micro_batch']}, "
        f"{result['sequence_tokens']} tokens/sample, checkpointing "
        f"{'on' if result['gradient_checkpointing'] else 'off'} ({result['device']})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    return fig


def _gib(v: float) -> str:
    """GiB for people: ``1.23`` GiB from 0.1 up, else MiB or KiB with the unit."""
    if v >= 0.1:
        return f"{v:.2f} GiB"
    return f"{v * 1024:.1f} MiB" if v >= 1 / 1024 else f"{v * 1024 * 1024:.0f} KiB"
