"""The fast path: what vlmfit changes on top of the plain TRL + PEFT recipe, lever by lever.

Each lever is a named ``RunConfig`` field (see its one-line trade-off in ``config.py``);
``train.build_model`` and ``train.training_args`` apply them, and ``applied_levers``
records which ran in the run's ``summary.json``. What each lever does and buys:
docs/benchmarks.md ("The levers"), measured by ``benchmarks/fastpath.py`` (``make bench``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from vlmfit.models.registry import ModelSpec

#: Dense bf16 peak of the GPUs we report MFU for (FLOP/s, vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def _no_grad_forward(module: torch.nn.Module, chunk: int = 0) -> None:
    original = module.forward

    def forward(*args, **kwargs):
        with torch.no_grad():
            if chunk:
                return chunked_tiles(original, chunk, args, kwargs)
            return original(*args, **kwargs)

    module.forward = forward
    for sub in module.modules():  # recomputing what stores nothing would only cost time
        if getattr(sub, "gradient_checkpointing", False):
            sub.gradient_checkpointing = False


#: Registered with transformers' AttentionInterface. "flash" in the name makes Qwen's vision
#: attention pass ``cu_seqlens`` (one call) instead of splitting per window.
VARLEN_ATTENTION = "vlmfit_flash_varlen"


def chunked_tiles(forward, chunk: int, args: tuple, kwargs: dict):
    """``forward`` over at most ``chunk`` tiles at a time, outputs concatenated.

    For a tower that takes a batch of tiles (Idefics3 / SmolVLM: ``pixel_values`` of shape
    ``[tiles, 3, H, W]``, each tile attended on its own): exact, and without autograd the
    transient activations of one pass (a 1000x1000 image is 17 tiles of ~23 MB each in
    SigLIP's MLP) stop growing with the micro-batch. Other inputs (Qwen's flat patch
    sequence) pass through unchanged.
    """
    pixels = kwargs.get("pixel_values", args[0] if args else None)
    if not (isinstance(pixels, torch.Tensor) and pixels.dim() == 4 and len(pixels) > chunk):
        return forward(*args, **kwargs)
    n = len(pixels)

    def part(x, a, b):
        return x[a:b] if isinstance(x, torch.Tensor) and x.dim() and len(x) == n else x

    outs = [
        forward(*(part(x, a, a + chunk) for x in args),
                **{k: part(v, a, a + chunk) for k, v in kwargs.items()})
        for a in range(0, n, chunk)
    ]  # fmt: skip
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs)
    for key, value in first.items():  # a ModelOutput: per-tile tensors are joined
        if isinstance(value, torch.Tensor):  # a tower's outputs are per tile
            first[key] = torch.cat([o[key] for o in outs])
        elif value is not None:
            raise ValueError(f"chunked vision forward: cannot join output {key!r}")
    return first


@functools.cache
def _varlen_params() -> frozenset[str]:
    """The keyword names of this torch's ``varlen_attn`` (read once, not per layer call)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_kernel(q, k, v, cu_seqlens, max_seqlen, scale, causal=False):
    """torch's fused variable-length attention (CUDA, sm80+) on (tokens, heads, dim); grouped
    key / value heads are shared as SDPA's ``enable_gqa`` shares them."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kw: dict[str, Any] = {"scale": scale} if "scale" in params else {}
    if causal:  # torch 2.10-2.11: is_causal; later: window_size (left, right)
        kw |= {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


def _varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                      cu_seq_lens_q=None, max_length_q=None, is_causal=False, **_):  # fmt: skip
    """transformers attention function: (1, heads, tokens, dim) in, (1, tokens, heads, dim)
    out, over the segments ``cu_seq_lens_q`` delimits (non-causal, no mask)."""
    if attention_mask is not None or is_causal or cu_seq_lens_q is None or dropout:
        raise ValueError(f"{VARLEN_ATTENTION} serves non-causal vision windows only")
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))
    cu = cu_seq_lens_q.to(torch.int32)
    max_len = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
    dtype = q.dtype  # flash / cuDNN take half precision only (Qwen2-VL's tower can run fp32)
    if dtype not in (torch.float16, torch.bfloat16):
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    return _varlen_kernel(q, k, v, cu, max_len, scaling).to(dtype).unsqueeze(0), None


#: The language model's attention under ``packing`` (vlmfit.train.packing): one causal varlen
#: kernel over a packed row's samples; SDPA (and SDPA's masks) for every other batch.
PACKED_ATTENTION = "vlmfit_packed_sdpa"


def _packed_attention(module, query, key, value, attention_mask=None, dropout=0.0,
                      scaling=None, vlmfit_packed=None, **kwargs):  # fmt: skip
    if vlmfit_packed is None or dropout or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cu, max_len = vlmfit_packed
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))
    return _varlen_kernel(q, k, v, cu, max_len, scaling, causal=True).unsqueeze(0), None


def set_packed_attention(model) -> None:
    """The language model of ``model`` attends through ``_packed_attention``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.get_decoder().config._attn_implementation = PACKED_ATTENTION


def varlen_available(device: torch.device | str | None = None) -> str | None:
    """None when torch's varlen attention runs here, else why not."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if not torch.cuda.is_available() or torch.device(device or "cuda").type != "cuda":
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 0):
        return "needs an Ampere or newer GPU (flash attention)"
    return None


def set_vision_attention(model, spec: ModelSpec, kind: str) -> str:
    """Point the vision tower of a Qwen model at one fused kernel over all its windows.

    Returns what runs: ``varlen``, or ``sdpa (why)`` where varlen cannot (SmolVLM's tower
    attends per tile in one batched call already; no CUDA; old torch)."""
    if kind != "varlen":
        return kind
    if spec.family.name not in ("qwen2_vl", "qwen2_5_vl"):
        return "sdpa (batched tiles: nothing to fuse)"
    device = next(model.parameters()).device
    why = varlen_available(device)
    if why:
        return f"sdpa ({why})"
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = base.model.visual if hasattr(base.model, "visual") else base.visual
    vision.config._attn_implementation = VARLEN_ATTENTION
    return "varlen"


def _fused_lora_forward(self, x, *args, **kwargs):
    """A PEFT LoRA linear's forward as one addmm; PEFT's own forward where that is not
    plain LoRA (disabled or merged adapters, several adapters, DoRA, dropout, bias)."""
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or name not in self.lora_A
        or name in getattr(self, "lora_variant", {})
        or not isinstance(self.lora_dropout[name], torch.nn.Identity)
        or getattr(self, "lora_bias", {}).get(name, False)
    ):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dt = result.dtype
    a = self.lora_A[name].weight.to(dt)
    b = self.lora_B[name].weight.to(dt)
    h = (x if x.dtype == dt else x.to(dt)).reshape(-1, x.shape[-1]) @ a.t()
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b.t(), alpha=self.scaling[name])
    return out.view(result.shape)


def fuse_lora(model) -> int:
    """Route every plain LoRA linear of ``model`` through ``_fused_lora_forward`` (bound to
    the module, so copies of the model stay consistent). Returns how many."""
    import types

    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module, torch.nn.Module):
            base = module.get_base_layer()
            if isinstance(base, torch.nn.Linear):  # bnb's Linear4bit / 8bit subclass it
                module.forward = types.MethodType(_fused_lora_forward, module)
                n += 1
    return n


def offloads_activations(cfg) -> bool:
    """Whether the checkpointed layer inputs go to pinned CPU memory.

    ``None`` (the default) is off here; before the model loads, ``train.run``'s memory
    check (``memory.check_fits``, a GPU only) turns it on where vlmfit's own offloading is
    predicted to lower the peak by 5% or more (run 7: the 7B -2.05 GiB at the same speed)
    or where the run fits only with it, as ``make plan`` does.
    """
    if cfg.activation_offloading is not None:
        return bool(cfg.activation_offloading)
    return False


def offloads_layer_inputs(cfg) -> bool:
    """Offloading through vlmfit's checkpoint function (``vlmfit.train.offload``): only the
    language model's layer inputs, copied on a side stream and prefetched back. Needs
    gradient checkpointing; one process (under FSDP2 / DDP TRL's offloading runs instead)."""
    from vlmfit.train import distributed

    return (
        offloads_activations(cfg)
        and cfg.gradient_checkpointing
        and not distributed.is_distributed()
    )


def uses_host_embeddings(cfg) -> bool:
    """``host_embeddings``; ``None`` follows ``activation_offloading`` (both trade a copy per
    step for device memory, and the memory check turns them on together). One process only,
    and only where the table is frozen and not the LM head's (``offload.host_embeddings``)."""
    from vlmfit.train import distributed

    on = cfg.host_embeddings if cfg.host_embeddings is not None else offloads_activations(cfg)
    return bool(on) and not distributed.is_distributed()


def trl_offloading(cfg) -> bool:
    """TRL's ``activation_offloading`` (every tensor autograd keeps, through saved-tensor
    hooks): where offloading is on but :func:`offloads_layer_inputs` cannot serve it."""
    return offloads_activations(cfg) and not offloads_layer_inputs(cfg)


def uses_autocast(cfg) -> bool:
    """The Trainer's bf16 autocast. ``None``: off for LoRA / QLoRA with ``fused_lora``, whose
    layers already compute in the activations' dtype (the rest of the model is bf16), so
    autocast would only add per-op dispatch on the host (SmolVLM end to end measured +10% and
    +18% without it, runs 4 and 5); on for full fine-tuning (fp32 master weights under FSDP2)."""
    if cfg.autocast is not None:
        return bool(cfg.autocast)
    return not (cfg.finetune in ("lora", "qlora") and cfg.fused_lora)


def vision_runs_without_grad(cfg) -> bool:
    """The lever applies when the vision tower is frozen (``finetune=projector`` freezes it
    whatever ``train_vision`` says)."""
    return cfg.vision_no_grad and not (cfg.train_vision and cfg.finetune != "projector")


def frozen_vision_parts(model, spec: ModelSpec) -> list[tuple[str, torch.nn.Module]]:
    """The vision modules that run before the projector, by name (PEFT wrappers too).

    Idefics3's projector (``connector``) sits outside the vision tower: the whole tower.
    Qwen's projector (``merger``) is the tower's last child: the tower when the merger is
    frozen too, else every child but the merger (``blocks`` expanded into its layers).
    """
    fam = spec.family
    named = {n.replace("base_model.model.", ""): (n, m) for n, m in model.named_modules()}
    parts: list[tuple[str, torch.nn.Module]] = []
    for prefix in fam.vision_modules:
        if prefix not in named:
            raise ValueError(f"{spec.name}: vision module {prefix!r} not found")
        name, tower = named[prefix]
        inner = [p for p in fam.projector_modules if p.startswith(prefix + ".")]
        if not inner or not any(p.requires_grad for p in tower.parameters()):
            parts.append((name, tower))
            continue
        projector = {named[p][1] for p in inner if p in named}
        for child_name, child in tower.named_children():
            if child in projector:
                continue
            if isinstance(child, torch.nn.ModuleList | torch.nn.ModuleDict):
                parts += [(f"{name}.{child_name}.{k}", m) for k, m in child.named_children()]
            else:
                parts.append((f"{name}.{child_name}", child))
    return parts


def vision_without_autograd(model, spec: ModelSpec, chunk: int = 0) -> list[str]:
    """Run the frozen vision tower (up to the projector) under ``torch.no_grad``, a tiled
    tower ``chunk`` tiles at a time (:func:`chunked_tiles`; 0: all at once).

    Exact: these modules take only pixels, so nothing upstream needs their gradient.
    Raises when a vision weight trains (``train_vision``). Returns the wrapped names.
    """
    parts = frozen_vision_parts(model, spec)
    trainable = [n for n, m in parts for p in m.parameters() if p.requires_grad]
    if trainable:
        raise ValueError("vision_no_grad needs a frozen vision tower (train_vision=False)")
    for _, module in parts:
        _no_grad_forward(module, chunk)
    return [n.replace("base_model.model.", "") for n, _ in parts]


def prepare_kbit_lean(model, *, gradient_checkpointing: bool) -> None:
    """4-bit training set-up without fp32 upcasts: freeze, checkpoint, inputs need grad.

    ``peft.prepare_model_for_kbit_training`` also casts every non-quantized parameter to
    fp32: on Qwen2.5-VL-7B that is the vision tower, embeddings and lm_head (~3.5 GB more).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def set_allocator(expandable_segments: bool) -> bool:
    """Turn on the CUDA allocator's expandable segments (before or after CUDA starts)."""
    if not expandable_segments or not torch.cuda.is_available():
        return False
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments" in conf:  # the user's own setting wins
        return "expandable_segments:True" in conf
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    return True


def dataloader_workers(requested: int | None) -> int:
    """``None`` (auto): on CUDA up to 8 workers, leaving cores for the main process; CPU 0.

    On CPU the training step itself uses every core, so workers only compete with it.
    """
    if requested is not None:
        return requested
    if not torch.cuda.is_available():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(16, (cores or 1) - 2))  # the main process and the pin-memory thread


class WorkerCollator:
    """Wrap a collator for the DataLoader's workers.

    - Floating pixel tensors leave the worker in the model's dtype. Exact: the vision
      towers cast ``pixel_values`` to their dtype first thing; in bf16 it halves what
      crosses shared memory, the pin-memory copy and PCIe (214 MB -> 107 MB for four
      SmolVLM samples of 17 tiles).
    - A worker process lowers its own CPU priority (``os.nice``) on its first batch: the
      main process launches thousands of small CUDA kernels a step (LoRA, checkpointing)
      and must never wait for a core while workers fill their prefetch queues.
    """

    def __init__(self, collator, dtype: torch.dtype, niceness: int = 10, codec=None):
        self.collator = collator
        self.dtype = dtype
        self.codec = codec  # vlmfit.train.pixels.PixelCodec: pixels leave as uint8
        self.niceness = niceness
        self.main_pid = os.getpid()
        self.niced_pid = None

    def __getattr__(self, name):  # the wrapped collator's attributes (TRL reads some)
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, examples):
        pid = os.getpid()
        if pid != self.main_pid and self.niced_pid != pid and hasattr(os, "nice"):
            os.nice(self.niceness)
            self.niced_pid = pid
        batch = self.collator(examples)
        if self.codec is not None:
            self.codec.encode(batch)
        for key in ("pixel_values", "pixel_values_videos"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                batch[key] = value.to(self.dtype)
        return batch


def language_params(model, spec: ModelSpec) -> int:
    """Parameters of the language model (lm_head included), the N of MFU's 6N."""
    from vlmfit.models import module_groups

    params = dict(model.named_parameters())
    names = module_groups(model, spec)["language"]
    total = 0
    for n in names:
        if "lora_" in n:
            continue
        state = getattr(params[n], "quant_state", None)  # 4-bit: two weights per byte
        total += state.shape.numel() if state is not None else params[n].numel()
    return total


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, else None (MFU then not reported)."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if device_name and key in device_name:
            return flops
    return None


def mfu(tokens_per_s: float, n_language: int, device_name: str | None) -> float | None:
    """Model-FLOPs utilization by the usual 6N convention (forward 2N + backward 4N per
    token, language model only; checkpoint recompute and the vision tower not counted)."""
    peak = peak_flops(device_name)
    return 6 * n_language * tokens_per_s / peak if peak else None


def applied_levers(
    cfg,
    *,
    vision_parts: list[str],
    workers: int,
    allocator: bool,
    vision_attention: str = "sdpa",
    fused_lora: int = 0,
    packing: str | None = None,
    offloaded_layers: int = 0,
    host_embeddings: int = 0,
    uint8_pixels: bool = False,
) -> dict[str, Any]:
    """What ran, for summary.json and the report."""
    return {
        "vision_no_grad": bool(vision_parts),
        "vision_no_grad_modules": vision_parts,
        "vision_chunk": cfg.vision_chunk if vision_parts else None,
        "qlora_upcast": cfg.qlora_upcast if cfg.finetune == "qlora" else None,
        "lora_dropout": cfg.lora_dropout if cfg.finetune in ("lora", "qlora") else None,
        "fused_lora_layers": fused_lora,
        "packing": packing,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "activation_offloading": offloads_activations(cfg),
        "offloaded_layer_inputs": offloaded_layers,  # vlmfit.train.offload (0: TRL's or off)
        "host_embeddings_gib": round(host_embeddings / 2**30, 3),  # the table moved off the GPU
        "fused_lm_head": True,  # TRL's trainers always score through it
        "sync_free": cfg.sync_free,
        "uint8_pixels": uint8_pixels,
        "dataloader_num_workers": workers,
        "dataloader_prefetch_factor": cfg.dataloader_prefetch_factor if workers else None,
        "pin_memory": torch.cuda.is_available(),
        "train_sampling_strategy": cfg.train_sampling_strategy,
        "expandable_segments": allocator,
        "attn_implementation": cfg.attn_implementation,
        "vision_attention": vision_attention,
        "autocast": uses_autocast(cfg),
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "max_image_tokens": cfg.max_image_tokens,
    }
