"""Predict the peak memory of one training step (``estimate``) from the architecture.

Arithmetic on parameter counts and bytes per token / patch; the terms and their
validation are in docs/memory.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlmfit.budget import Budget, image_sequence_tokens, image_tokens
from vlmfit.memory.activations import layer_bytes, lora_copies, vision_forward_bytes
from vlmfit.memory.architecture import arch
from vlmfit.memory.constants import (
    ALLOC_OVERHEAD_GIB,
    BACKWARD_EXTRA_H,
    CHECKPOINT_H,
    CUDA_CONTEXT_GIB,
    DTYPE_BYTES,
    ENGINES,
    FINAL_NORM_H,
    FRAGMENTATION,
    FUSED_GRAD_SCORED_H,
    FUSED_GRAD_TOKEN_H,
    FUSED_SCORED_H,
    FUSED_TILE_BYTES,
    FUSED_TILE_TOKENS,
    FUSED_TILE_VOCAB,
    GIB,
    LOGITS_BYTES_PER_VOCAB,
    LOGITS_BYTES_PER_VOCAB_FP32,
    NF4_BYTES_PER_PARAM,
    OFFLOAD_LAYER_INPUTS,
    OFFLOAD_STASH_TENSORS,
    OPTIMIZER_STATES,
    RECIPES,
    RECOMPUTE_EXTRA_H,
    RECOMPUTE_EXTRA_I,
    RECOMPUTE_PEFT_FP32_I,
    REFERENCE_LAYER_H,
    REFERENCE_LAYER_I,
    VISION_CHUNK_OUT_H,
    VISION_CHUNK_TILES,
    VISION_LAYER_H,
    VISION_LAYER_I_GATED,
    VISION_LAYER_I_PLAIN,
    VISION_NOGRAD_PIXEL,
)
from vlmfit.models import registry
from vlmfit.models.registry import ModelSpec


@dataclass
class Estimate:
    """Predicted memory of one training step; every ``*_gib`` is GiB (2**30 bytes).

    ``breakdown`` sums to ``peak_gib`` (the prediction of ``torch.cuda.max_memory_allocated``);
    ``device_gib`` adds allocator fragmentation and the CUDA context: what must fit on the GPU.
    """

    model: str
    finetune: str
    dtype: str
    micro_batch: int
    text_tokens: int  # per sample, everything but the image span
    visual_tokens: int  # per sample (placeholder tokens)
    sequence_tokens: int  # per sample, text + image span
    patches: int  # vision-tower patches per sample
    gradient_checkpointing: bool
    vision_no_grad: bool
    lora_r: int
    optimizer: str
    max_image_tokens: int | None
    total_params: int
    trainable_params: int
    breakdown: dict[str, float]
    # which phase of the step peaks: "loss" | "backward" | "vision" | "reference" (DPO) |
    # "optimizer" (full fine-tuning: every gradient and optimizer state at once)
    peak_phase: str
    notes: list[str] = field(default_factory=list)
    fused_lora: bool = False  # LoRA as one addmm on the bf16 input (no per-adapter copies)
    activation_offloading: bool = False  # kept activations in pinned CPU memory
    autocast: bool = True  # bf16 autocast (the Trainer's); off: no per-op casts

    @property
    def peak_gib(self) -> float:
        return float(sum(self.breakdown.values()))

    @property
    def weights_gib(self) -> float:
        return self.breakdown["weights"]

    @property
    def device_gib(self) -> float:
        return self.peak_gib * (1 + FRAGMENTATION) + CUDA_CONTEXT_GIB

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.sequence_tokens

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(peak_gib=self.peak_gib, device_gib=self.device_gib)
        return d

    def table(self) -> str:
        """The breakdown as aligned text, largest first."""
        lines = [
            f"{self.model} {self.finetune} ({self.dtype}), micro-batch {self.micro_batch}, "
            f"{self.sequence_tokens} tokens/sample ({self.visual_tokens} visual, "
            f"{self.text_tokens} text), gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}, vision tower "
            f"{'without autograd' if self.vision_no_grad else 'tracked by autograd'}"
            + (", fused LoRA" if self.fused_lora and self.finetune in ("lora", "qlora") else "")
            + (", activation offloading" if self.activation_offloading else "")
        ]
        for k, v in sorted(self.breakdown.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {k:<28} {v:8.2f} GiB")
        lines.append(
            f"  {'peak allocated':<28} {self.peak_gib:8.2f} GiB  (phase: {self.peak_phase})"
        )
        lines.append(
            f"  {'on the device':<28} {self.device_gib:8.2f} GiB  (+ fragmentation, context)"
        )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _spec(spec_or_name: ModelSpec | str) -> ModelSpec:
    return spec_or_name if isinstance(spec_or_name, ModelSpec) else registry.get(spec_or_name)


def estimate(
    spec_or_name: ModelSpec | str,
    *,
    finetune: str = "lora",
    lora_r: int = 16,
    micro_batch: int = 1,
    text_tokens: int = 256,
    image_size: tuple[int, int] | None = (1000, 1000),
    visual_tokens: int | None = None,
    budget: Budget | None = None,
    gradient_checkpointing: bool = True,
    dtype: str = "bf16",
    vision_no_grad: bool | None = None,
    optimizer: str = "adamw",
    lora_dropout: bool | None = None,
    kbit_upcast: bool | None = None,
    images: int = 1,
    recipe: str = "vlmfit",
    fused_lm_head: bool | None = None,
    dpo: bool = False,
    qlora_vision_4bit: bool = True,
    nproc: int = 1,
    engine: str = "ddp",
    fused_lora: bool | None = None,
    activation_offloading: bool | str | None = False,
    autocast: bool | None = None,
    vision_chunk: int | None = None,
    host_embeddings: bool | None = None,
) -> Estimate:
    """Predict the peak memory of one training step (GiB), with its breakdown.

    ``finetune``: "lora" (bf16 base, fp32 adapters on the language model's linear layers),
    "qlora" (NF4 language-model linears; with ``kbit_upcast`` every other weight fp32, as
    ``prepare_model_for_kbit_training`` does), "full" (language model + projector train;
    vision frozen) or "projector". ``visual_tokens`` overrides the count derived from
    ``image_size`` and ``budget`` (``vlmfit.budget.image_tokens``); ``images`` per sample.
    ``recipe``: "vlmfit" predicts vlmfit's default path (``vlmfit.train.fastpath``: the frozen
    vision tower without autograd, LoRA dropout 0, 4-bit without fp32 upcasts, the loss
    through TRL's chunked fused LM head); "plain" the textbook recipe in train mode
    (``enable_input_require_grads`` tracks the frozen tower, logits materialized,
    ``prepare_model_for_kbit_training`` upcasts). Each of ``vision_no_grad``,
    ``lora_dropout``, ``kbit_upcast`` and ``fused_lm_head`` overrides its recipe default.
    ``dpo``: TRL's DPOTrainer runs chosen and rejected as one batch of 2 x ``micro_batch``
    (the reference forward, without autograd, adds no stored activations).
    ``fused_lora`` (default: on for "vlmfit", off for "plain"): LoRA as one addmm on the
    layer's bf16 input (``RunConfig.fused_lora``), so adapted linears that share an input
    keep it once; off, PEFT's layer keeps a bf16 copy of its input per adapted linear (and
    an fp32 copy in flight). ``activation_offloading`` (``RunConfig.activation_offloading``):
    the layer inputs the checkpoints keep go to pinned CPU memory but for two (one process,
    ``vlmfit.train.offload``) or five (``"trl"``: TRL's, as under several processes); None: off (training turns
    it on only where the run fits no other way: ``check_fits``). ``host_embeddings`` (None:
    with offloading): a frozen, untied input-embedding table in host memory. ``autocast`` (``RunConfig.autocast``; None: vlmfit's rule, off for
    LoRA / QLoRA with fused LoRA, else on): without it PEFT's LoRA keeps fp32 input copies
    and LayerNorm vision towers run in bf16.
    ``nproc`` / ``engine`` (ddp, fsdp2, zero3): the peak of one GPU of ``nproc``
    (docs/distributed.md): DDP keeps a second copy of the gradients in its buckets; FSDP2
    and ZeRO-3 divide weights, gradients and optimizer states (fp32 for what trains) and
    gather one unit at a time. The sharded figures are not validated on GPUs yet.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if nproc < 1:
        raise ValueError("nproc must be >= 1")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    fast = recipe == "vlmfit"
    if lora_dropout is None:
        lora_dropout = not fast
    if kbit_upcast is None:
        kbit_upcast = not fast
    if fused_lm_head is None:  # TRL's DPOTrainer always scores through its fused head
        fused_lm_head = fast or dpo
    if fused_lora is None:
        fused_lora = fast
    spec = _spec(spec_or_name)
    if finetune not in ("lora", "qlora", "full", "projector"):
        raise ValueError(f"finetune must be lora, qlora, full or projector, got {finetune!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}")
    if micro_batch < 1 or text_tokens < 0 or lora_r < 1:
        raise ValueError("micro_batch >= 1, text_tokens >= 0 and lora_r >= 1 required")
    a = arch(spec)
    notes: list[str] = []
    if vision_no_grad is None:  # the plain recipe's input-grad hook tracks the tower
        vision_no_grad = fast or not (finetune in ("lora", "qlora") and gradient_checkpointing)
    if autocast is None:  # fastpath.uses_autocast: fused LoRA already computes in bf16
        autocast = not (fast and finetune in ("lora", "qlora") and fused_lora)
    if vision_chunk is None:  # RunConfig.vision_chunk (the plain recipe: all tiles at once)
        vision_chunk = VISION_CHUNK_TILES if fast else 0
    if activation_offloading is None:  # fastpath.offloads_activations: only to fit (check_fits)
        activation_offloading = False
    trl_offloading = activation_offloading == "trl" or bool(activation_offloading and nproc > 1)
    if host_embeddings is None:  # fastpath.uses_host_embeddings
        host_embeddings = bool(activation_offloading) and not trl_offloading

    # -- tokens
    if visual_tokens is None:
        if image_size is None or images == 0:
            vt, span = 0, 0
        else:
            w, h = image_size
            vt = image_tokens(spec, w, h, budget) * images
            span = image_sequence_tokens(spec, w, h, budget) * images
    else:
        vt = int(visual_tokens)
        span = vt + (2 * images if spec.is_qwen else 3 * images) if vt else 0
    seq = span + text_tokens
    patches = vt * a.patches_per_token
    rows = micro_batch * (2 if dpo else 1)  # DPO: chosen + rejected in one forward
    tokens = rows * seq
    pt = rows * patches

    # -- parameters and their bytes
    wb = DTYPE_BYTES[dtype]
    frozen_bytes = float(wb)  # bytes of a non-quantized weight
    qlora = finetune == "qlora"
    fp32_stream = dtype == "fp32" or (qlora and kbit_upcast)
    if qlora:
        if kbit_upcast:
            frozen_bytes = 4.0
            notes.append(
                "qlora: prepare_model_for_kbit_training upcasts every non-4-bit weight "
                "(embeddings, lm_head, vision tower, norms) to fp32"
            )
        four_bit = a.lm_linear_params + (a.vision_params if qlora_vision_4bit else 0)
        lin = four_bit * NF4_BYTES_PER_PARAM
        rest = (a.total_params - four_bit) * frozen_bytes
        weights = (lin + rest) / GIB
    else:
        weights = a.total_params * wb / GIB
    if host_embeddings and finetune in ("lora", "qlora") and not a.tied and nproc == 1:
        weights -= a.embed_params * frozen_bytes / GIB
        notes.append("host embeddings: the frozen input-embedding table in host memory")
    trainable = 0
    if finetune in ("lora", "qlora"):
        trainable = a.lora_params(lora_r)
        param_bytes = 4.0  # fp32 adapters (PEFT autocast_adapter_dtype)
        adapters = trainable * param_bytes / GIB
    elif finetune == "full":
        trainable = (
            a.embed_params + a.lm_head_params + a.lm_linear_params + a.lm_other_params
        ) + a.projector_params
        param_bytes = float(wb)
        adapters = 0.0  # the trainable weights are part of "weights"
    else:  # projector
        trainable = a.projector_params
        param_bytes = float(wb)
        adapters = 0.0
    grads = trainable * param_bytes / GIB
    state_bytes = (
        OPTIMIZER_STATES[optimizer] * (param_bytes if optimizer == "adamw" else 1.0)
        if optimizer != "sgd"
        else 0.0
    )
    opt_states = trainable * state_bytes / GIB

    # -- activations, bytes per token / patch (docs/memory.md: where each term comes from)
    act = 2.0 if fp32_stream else 1.0  # activation dtype multiplier (bf16 = 1)
    h, i = a.hidden, a.intermediate
    padded = rows > 1  # rows of different lengths: a mask, and repeat_kv under GQA
    lora_like = finetune in ("lora", "qlora")
    copies = lora_copies(finetune, fused_lora, lora_dropout, autocast, fp32_stream)
    layer = layer_bytes(
        a,
        finetune=finetune,
        lora_r=lora_r,
        fused_lora=fused_lora,
        lora_dropout=lora_dropout,
        autocast=autocast,
        seq=seq if padded else None,
        fp32_stream=fp32_stream,
    )
    n_layers = a.layers
    if gradient_checkpointing:
        per_layer_kept = CHECKPOINT_H * h * act
        lm_backward = layer + (RECOMPUTE_EXTRA_H * h + RECOMPUTE_EXTRA_I * i) * act
        if finetune == "lora" and copies and autocast:  # down's fp32 input copy, in flight
            lm_backward += RECOMPUTE_PEFT_FP32_I * i * act
    else:
        per_layer_kept = layer
        lm_backward = BACKWARD_EXTRA_H * h * act
    if activation_offloading:  # the kept tensors go to pinned CPU memory but the last few
        if gradient_checkpointing:
            stash = OFFLOAD_STASH_TENSORS if trl_offloading else OFFLOAD_LAYER_INPUTS
            lm_kept = min(n_layers, stash) * per_layer_kept
        else:  # the stash holds 5 tensors (the largest per token: 2i); each layer returns
            lm_kept = OFFLOAD_STASH_TENSORS * max(2.0 * i, 4.0 * h) * act  # in its backward
            lm_backward += layer
        notes.append("activation offloading: kept activations in pinned CPU memory")
    else:
        lm_kept = n_layers * per_layer_kept
    lm_kept += FINAL_NORM_H * h * act
    # Without checkpointing the bf16 casts of the fp32 adapters are kept by every layer.
    adapter_copies = trainable * 2.0 / GIB if lora_like and not gradient_checkpointing else 0.0

    scored = rows * min(text_tokens, seq)  # positions with a label: the answer (an upper bound)
    lm_head_trains = finetune == "full"
    if fused_lm_head:  # one [4096 tokens x 32768 vocab] tile at a time, never the logits
        tile = min(scored, FUSED_TILE_TOKENS) * min(a.vocab, FUSED_TILE_VOCAB) * FUSED_TILE_BYTES
        head = (
            tile
            + scored * (FUSED_SCORED_H + FUSED_GRAD_SCORED_H) * h
            + tokens * FUSED_GRAD_TOKEN_H * h
            + (4.0 * a.vocab * h if lm_head_trains else 0.0)  # fp32 gradient accumulator
            + (FUSED_TILE_VOCAB * h * 2.0 if fp32_stream else 0.0)  # bf16 cast of a chunk
        )
        head_backward = 0.0  # done before the layers' backward starts
        head_forward = tile + scored * FUSED_SCORED_H * h
    else:
        per_vocab = LOGITS_BYTES_PER_VOCAB_FP32 if fp32_stream else LOGITS_BYTES_PER_VOCAB
        head = tokens * a.vocab * per_vocab
        head_backward = tokens * a.vocab * 4.0  # log-probabilities saved for backward
        head_forward = head

    # The vision tower (frozen): kept for backward when autograd tracks it, else only the
    # forward's transient (the largest block's intermediates and the pixels).
    vh, vi = a.vision_hidden, a.vision_intermediate
    vgated = VISION_LAYER_I_GATED if a.vision_gated else VISION_LAYER_I_PLAIN
    vlayer = (VISION_LAYER_H * vh + vgated * vi) * act
    vision_tracked = not vision_no_grad
    if vision_tracked and gradient_checkpointing:
        v_kept = a.vision_layers * 2 * vh * act
    elif vision_tracked:
        v_kept = a.vision_layers * vlayer
    else:
        v_kept = 0.0
    if vision_tracked:
        v_forward = v_kept + vlayer * 2  # one block recomputed / back-propagated at a time
    else:
        v_forward = vision_forward_bytes(a, autocast=autocast, four_bit=qlora and qlora_vision_4bit)
        v_forward += (act - 1.0) * (v_forward - VISION_NOGRAD_PIXEL * a.patch_pixels)
        notes.append("vision tower without autograd: no activations kept for backward")
    v_phase = pt * v_forward  # bytes of the tower's forward for the whole batch
    if vision_no_grad and vision_chunk and a.tile_patches and pt > vision_chunk * a.tile_patches:
        pixel = VISION_NOGRAD_PIXEL * a.patch_pixels
        chunk_pt = vision_chunk * a.tile_patches
        v_phase = pt * (pixel + VISION_CHUNK_OUT_H * vh * act) + chunk_pt * (v_forward - pixel)
        notes.append(f"vision tower {vision_chunk} tiles a pass (vision_chunk)")

    g = 1 / GIB
    vis_kept = pt * v_kept * g
    lm_kept_gib = tokens * lm_kept * g
    phases = {
        # the forward's end and the loss (with TRL's fused head, its backward too)
        "loss": {"activations (vision)": vis_kept, "activations (LM)": lm_kept_gib,
                 "activations (adapter copies)": adapter_copies, "logits + loss": head * g},
        # the backward of the last decoder layer (the first to run; checkpointing: recomputed)
        "backward": {"activations (vision)": vis_kept, "activations (LM)": lm_kept_gib,
                     "activations (LM backward)": tokens * lm_backward * g,
                     "activations (adapter copies)": adapter_copies,
                     "logits + loss": head_backward * g},
        # the frozen vision tower's forward, before the language model runs
        "vision": {"activations (vision)": 0.0, "activations (vision forward)": v_phase * g,
                   "activations (LM)": 0.0, "logits + loss": 0.0},
    }  # fmt: skip
    if dpo:  # the reference forward (no autograd) runs while the policy's activations are kept
        ref_lm = (tokens * (REFERENCE_LAYER_H * h + REFERENCE_LAYER_I * i) * act + head_forward) * g
        ref_vision = v_phase * g if vision_no_grad else 0.0  # its tower, then its layers
        phases["reference"] = {
            "activations (vision)": vis_kept,
            "activations (vision forward)": ref_vision if ref_vision > ref_lm else 0.0,
            "activations (LM)": lm_kept_gib,
            "activations (adapter copies)": adapter_copies,
            "logits + loss": ref_lm if ref_lm >= ref_vision else 0.0,
        }
    if lm_head_trains and a.tied:  # the embedding's dense gradient, before it is added to
        phases["optimizer"] = {"tied embedding gradient": a.embed_params * wb * g}  # lm_head's
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    kept = ("activations (vision)", "activations (LM)", "logits + loss")
    breakdown = {
        "weights": weights,
        "trainable params": adapters,
        "gradients": grads,
        "optimizer states": opt_states,
        **{k: v for k, v in phases[phase].items() if v or k in kept},
        "overhead": ALLOC_OVERHEAD_GIB,
    }
    for k in kept:
        breakdown.setdefault(k, 0.0)
    if nproc > 1 and engine == "ddp":
        breakdown["DDP gradient buckets"] = grads + (adapters if adapters else 0.0)
        notes.append(f"DDP over {nproc} GPUs: a full replica on each")
    elif nproc > 1:  # FSDP2 / ZeRO-3: what trains is held in fp32 and sharded
        frozen = a.total_params - trainable
        per_trainable = 16.0 if engine == "fsdp2" else 18.0  # fp32 weight, grad, 2 Adam states
        # the largest unit (a decoder layer, the embedding or lm_head), gathered with the next
        # one prefetched: in fp32 when it trains under FSDP2's autocast, else in the load dtype
        unit = max(a.lm_linear_params // max(a.layers, 1), a.embed_params, a.lm_head_params)
        unit_bytes = 4.0 if finetune == "full" and engine == "fsdp2" else float(wb)
        gathered = 2 * unit_bytes * unit
        breakdown["weights"] = frozen * frozen_bytes / nproc / GIB
        breakdown["trainable params"] = trainable * per_trainable / nproc / GIB
        breakdown["gradients"] = breakdown["optimizer states"] = 0.0
        breakdown["gathered unit"] = gathered / GIB
        notes.append(f"{engine} over {nproc} GPUs: weights and optimizer states sharded")
    if fused_lm_head:
        notes.append("loss through TRL's chunked fused LM head: the logits are never stored")
    return Estimate(
        model=spec.name,
        finetune=finetune,
        dtype=dtype,
        micro_batch=micro_batch,
        text_tokens=text_tokens,
        visual_tokens=vt,
        sequence_tokens=seq,
        patches=patches,
        gradient_checkpointing=gradient_checkpointing,
        vision_no_grad=vision_no_grad,
        lora_r=lora_r,
        optimizer=optimizer,
        max_image_tokens=budget.max_image_tokens if budget else None,
        total_params=a.total_params,
        trainable_params=trainable,
        breakdown=breakdown,
        peak_phase=phase,
        notes=notes,
        fused_lora=bool(fused_lora),
        activation_offloading=bool(activation_offloading),
        autocast=bool(autocast),
    )


def activations_gib(e: Estimate) -> float:
    """The activation terms of an estimate (vision, LM, logits), GiB."""
    return sum(v for k, v in e.breakdown.items() if k.startswith(("activations", "logits")))
