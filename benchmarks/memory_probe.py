"""What a decoder layer keeps for backward, and what the frozen vision tower's forward takes,
measured on the CPU against ``vlmfit.memory``'s terms (no GPU needed).

    python benchmarks/memory_probe.py                        # the five sweep models, all modes
    python benchmarks/memory_probe.py --models qwen2-vl-2b --modes peft,fused --json

Layers: a model with the published widths but 1 and 2 decoder layers (random bf16 weights,
the vision tower cut to one block and not run), LoRA as ``train.build_model`` puts it
(``models.lora_targets``, r 16, dropout 0; ``fused``: ``fastpath.fuse_lora`` on top), in
train mode under bf16 autocast (CPU autocast casts linear inputs as CUDA's does; the norms
compute in fp32 by themselves). Every tensor autograd saves is counted once per storage
(``torch.autograd.graph.saved_tensors_hooks``; parameters and their casts excluded by taking
the slope over two sequence lengths): bytes per token of one layer = the difference between
the two- and the one-layer model. Modes: ``peft`` (PEFT's own LoRA layer), ``fused``,
``full`` (the language model trains), ``projector`` (frozen language model, the gradient
flowing to the image features). Compared with ``memory.layer_bytes``.

Vision: the frozen tower's ``get_image_features`` under ``torch.no_grad`` and bf16 autocast
with ``layer_norm`` run in fp32 as CUDA autocast does (CPU autocast leaves it bf16);
``--fourbit`` mimics bitsandbytes' ``Linear4bit`` (bf16 matmul, output in the input's dtype).
The peak of live heap bytes (glibc ``mallinfo2``, read after every aten op) per patch, from
the slope over two image sizes, against ``memory``'s per-patch term (less the batch's
pixels, which the probe does not count).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import sys
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

MODELS = ["smolvlm", "smolvlm-2b", "qwen2-vl-2b", "qwen2.5-vl-3b", "qwen2.5-vl-7b"]
MODES = ["peft", "fused", "full", "projector"]


# ------------------------------------------------------------------------ live heap bytes


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                  "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.mallinfo2.restype = _MallInfo2


def live_bytes() -> int:
    """Bytes allocated on the C heap now (glibc: in-use arena chunks + mmapped blocks)."""
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd


class PeakBytes(TorchDispatchMode):
    """The largest ``live_bytes`` seen after any aten op run under it."""

    def __init__(self):
        super().__init__()
        self.peak = live_bytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, live_bytes())
        return out


def _trim() -> None:
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


# ---------------------------------------------------------------------------------- models


def _config(name: str, layers: int, vision_depth: int = 1):
    import transformers

    from vlmfit.models import builders as tiny
    from vlmfit.models import registry
    from vlmfit.models.registry import CONFIG_DIR

    spec = registry.get(name)
    if spec.tiny:
        cfg = json.loads((tiny.ensure_tiny(spec.name) / "config.json").read_text())
    else:
        cfg = json.loads((CONFIG_DIR / spec.arch_config).read_text())
    cfg["text_config"]["num_hidden_layers"] = layers
    cfg["text_config"]["layer_types"] = None
    v = cfg["vision_config"]
    v["depth" if "depth" in v else "num_hidden_layers"] = vision_depth
    config = transformers.AutoConfig.for_model(**cfg)
    config._attn_implementation = "sdpa"
    return spec, config


def build(name: str, layers: int, mode: str):
    """``name``'s architecture with ``layers`` decoder layers, set up as ``mode`` trains."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from vlmfit.models import lora_targets
    from vlmfit.train import fastpath

    spec, config = _config(name, layers)
    torch.manual_seed(0)
    model = getattr(transformers, spec.family.model_class)._from_config(
        config, dtype=torch.bfloat16
    )
    for n, p in model.named_parameters():
        p.requires_grad_(mode == "full" and any(k in n for k in ("language_model", "text_model")))
    if mode in ("peft", "fused"):
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=lora_targets(model, spec))  # fmt: skip
        model = get_peft_model(model, lora)
        if mode == "fused":
            fastpath.fuse_lora(model)
    model.train()
    return spec, model


def _saved_bytes(name: str, layers: int, mode: str, seq: int, rows: int, autocast: bool) -> int:
    spec, model = build(name, layers, mode)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    torch.manual_seed(1)
    vocab = base.config.get_text_config().vocab_size
    ids = torch.randint(3, min(1000, vocab), (rows, seq))
    special = [v for k, v in base.config.to_dict().items() if k.endswith("_token_id")]
    for t in (v for v in special if isinstance(v, int)):  # text only: no image placeholders
        ids[ids == t] = 2
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved.setdefault(s.data_ptr(), s.nbytes())
        return t

    kwargs: dict[str, Any] = {"input_ids": ids}
    if mode == "projector":  # the gradient flows through the frozen layers to the image
        emb = base.model.get_input_embeddings()(ids).detach().requires_grad_()
        kwargs = {"inputs_embeds": emb}
    ac = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ac, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = base.model(attention_mask=torch.ones(rows, seq, dtype=torch.long),
                         use_cache=False, **kwargs)  # fmt: skip
    del out, model, base
    _trim()  # the full-size 7B takes ~4 GB a build: one at a time
    return sum(saved.values())


def layer_saved(
    name: str,
    mode: str = "peft",
    *,
    autocast: bool = True,
    rows: int = 1,
    seqs: tuple[int, int] = (64, 128),
) -> float:
    """Bytes one decoder layer saves for backward per token (no padding)."""
    per_token = {}
    for layers in (1, 2):
        b = [_saved_bytes(name, layers, mode, s, rows, autocast) for s in seqs]
        per_token[layers] = (b[1] - b[0]) / (rows * (seqs[1] - seqs[0]))
        _trim()
    return per_token[2] - per_token[1]


def predicted_layer(name: str, mode: str, *, autocast: bool = True) -> float:
    from vlmfit import memory
    from vlmfit.models import registry

    a = memory.arch(registry.get(name))
    ft = {"peft": "lora", "fused": "lora"}.get(mode, mode)
    return memory.layer_bytes(a, finetune=ft, fused_lora=mode == "fused", autocast=autocast)


# ---------------------------------------------------------------------------------- vision

_layer_norm = F.layer_norm


def _layer_norm_fp32(x, shape, weight=None, bias=None, eps=1e-5):
    """CUDA autocast runs layer_norm in fp32 (CPU autocast does not)."""
    if not torch.is_autocast_enabled("cpu"):
        return _layer_norm(x, shape, weight, bias, eps)
    with torch.autocast("cpu", enabled=False):
        return _layer_norm(x.float(), shape, None if weight is None else weight.float(),
                           None if bias is None else bias.float(), eps)  # fmt: skip


def _fourbit_forward(self, x):
    """bitsandbytes ``Linear4bit.forward``'s dtypes: compute in bf16, return the input's."""
    dtype = x.dtype
    with torch.autocast("cpu", enabled=False):
        out = F.linear(x.to(torch.bfloat16), self.weight, self.bias)
    return out.to(dtype)


def vision_peak(name: str, *, fourbit: bool = False, autocast: bool = True) -> float:
    """Peak live bytes per patch of the frozen tower's forward (without the batch)."""
    import transformers

    spec, config = _config(name, 1, vision_depth=2)
    torch.manual_seed(0)
    model = getattr(transformers, spec.family.model_class)._from_config(
        config, dtype=torch.bfloat16
    )
    model.eval()
    inner = model.model
    tower = inner.vision_model if hasattr(inner, "vision_model") else inner.visual
    if fourbit:
        for n, m in tower.named_modules():
            if isinstance(m, torch.nn.Linear) and "merger" not in n:
                m.forward = types.MethodType(_fourbit_forward, m)
    v = config.vision_config
    points = []
    for k in (8, 16) if spec.is_qwen else (2, 4):
        if spec.is_qwen:  # a (28k x 28k)-pixel image: (2k)^2 patches
            g = 2 * k
            patches = g * g
            kwargs = {
                "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, dtype=torch.bfloat16),
                "image_grid_thw": torch.tensor([[1, g, g]]),
            }
        else:  # k tiles
            s = v.image_size
            patches = k * (s // v.patch_size) ** 2
            kwargs = {
                "pixel_values": torch.randn(1, k, 3, s, s, dtype=torch.bfloat16),
                "pixel_attention_mask": torch.ones(1, k, s, s, dtype=torch.bool),
            }
        _trim()
        base = live_bytes()
        ac = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        F.layer_norm = _layer_norm_fp32
        try:
            with torch.no_grad(), ac, PeakBytes() as peak:
                out = inner.get_image_features(**kwargs)
        finally:
            F.layer_norm = _layer_norm
        points.append((patches, peak.peak - base))
        del out
    (p1, b1), (p2, b2) = points
    return (b2 - b1) / (p2 - p1)


def predicted_vision(name: str, *, fourbit: bool = False, autocast: bool = True) -> float:
    """``memory``'s per-patch term, less the batch's pixels (2 bytes each: the probe's
    baseline holds them)."""
    from vlmfit import memory
    from vlmfit.models import registry

    a = memory.arch(registry.get(name))
    return memory.vision_forward_bytes(a, autocast=autocast, four_bit=fourbit) - 2 * a.patch_pixels


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    ap.add_argument("--no-vision", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if _libc is None:
        print("needs Linux glibc (mallinfo2)", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows: list[dict[str, Any]] = []
    for name in a.models.split(","):
        first = len(rows)
        for mode in a.modes.split(","):
            for autocast in (True, False) if mode == "peft" else (True,):
                got = layer_saved(name, mode, autocast=autocast)
                want = predicted_layer(name, mode, autocast=autocast)
                rows.append({"model": name, "what": f"layer {mode}" + ("" if autocast else
                             " (no autocast)"), "measured": got, "predicted": want})  # fmt: skip
        if not a.no_vision:
            for fourbit in (False, True):
                got = vision_peak(name, fourbit=fourbit)
                want = predicted_vision(name, fourbit=fourbit)
                rows.append({"model": name, "what": "vision" + (" 4-bit" if fourbit else ""),
                             "measured": got, "predicted": want})  # fmt: skip
        for r in rows[first:]:
            print(f"{r['model']:15s} {r['what']:24s} measured {r['measured']:10.0f}  predicted "
                  f"{r['predicted']:10.0f} bytes/token|patch  {100 * (r['predicted'] / r['measured'] - 1):+.1f}%",
                  file=sys.stderr, flush=True)  # fmt: skip
    if a.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
