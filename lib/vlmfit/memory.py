"""Training memory: predict it (``estimate``), pick a config that fits (``plan``), measure it
(``profile_steps``, ``ladder``).

The estimator is arithmetic on the published architecture (``vlmfit/configs/*.json``, or a
tiny model's saved config): parameter counts per module group, bytes per parameter for
weights / gradients / optimizer states, and bytes per token (language model, logits) and
per patch (vision tower) for activations. All sizes are GiB (2**30 bytes). It predicts
``torch.cuda.max_memory_allocated()`` of one training step; ``Estimate.device_gib`` adds
the CUDA context and allocator slack, i.e. what must fit on the card.

Where a training step's peak comes from: the weights, the trainable parameters, their
gradients and optimizer states, and the activations of the phase of the step that peaks
(``Estimate.peak_phase``). For LoRA that is the start of the backward: every decoder layer's
saved tensors (or, with gradient checkpointing, each layer's bf16 input) plus the last
layer's backward (checkpointing: the layer recomputed and what is alive with it). What a
decoder layer saves is counted tensor by tensor from transformers 5.23 / PEFT 0.21 / TRL 1.16
under bf16 autocast (the ``LAYER_*`` / ``LORA_*`` constants; exact on CPU against
``torch.autograd.graph.saved_tensors_hooks``): the RMSNorms' fp32 input copies, SDPA's
query, key, value, output and log-sum-exp (key and value at query width, and a bf16 mask,
when padding forces ``repeat_kv``), the gated MLP's gate, SiLU and up outputs, and the LoRA
inputs: once per shared input with fused LoRA or 4-bit layers, once per adapted linear
with PEFT's bf16 layer (``fused_lora=False``). TRL's fused LM head projects only the scored
positions, one [4096 x 32768] bf16 tile at a time; the plain recipe materializes the logits
(~14 bytes x vocab per token). A frozen vision tower without autograd costs only its
forward's transient (per patch, before the language model runs); DPO adds the reference
forward while the policy's activations are kept; full fine-tuning peaks when every
gradient and optimizer state exists.

Validation: 27 configurations measured on one H200 (docs/memory.md, ``docs/memory-validation.
json``; five models, LoRA / QLoRA / full, three image sizes, micro-batch 1-4, checkpointing
on and off, SFT and DPO): all within 10 % (-2.4 % to +6.4 %), pinned by
``tests/test_memory_sweep.py``; the 15 earlier H200 fast-path points and the H100 reference
below by ``tests/test_memory.py``. Estimate vs. measured peak allocated on one H100 for the
plain recipe (random weights, bf16 LoRA r=16, SDPA, checkpointing, AdamW, 256 text tokens +
one square image at processor defaults). "ref" = ``shared/reference/architectures.md``;
"here" = ``memory.ladder`` on an H100 (torch 2.11, transformers 5.17), GiB::

    case                                              estimate   ref    here
    Qwen2.5-VL-7B  448 px (256 vt), mb1                 17.35    17.3   17.11
    Qwen2.5-VL-7B 1000 px (1296 vt), mb1                19.93    19.9   19.47
    Qwen2.5-VL-7B 2000 px (5041 vt), mb1                29.25    29.5     -
    Qwen2.5-VL-7B 1000 px, mb4 / mb8                    31.3 / 46.5   31.7 / 47.2   -
    Qwen2.5-VL-7B 1000 px, vision without autograd      19.54    19.5   19.01
    ... same, mb4                                       29.72    29.7   27.93
    Qwen2.5-VL-3B 1000 px, mb1                          11.24      -    10.84
    Qwen2.5-VL-3B 1000 px, no checkpointing             19.12      -    21.09
    SmolVLM-256M 1000 px split (1088 vt), mb1 / mb4     1.89 / 5.59   1.9 / 5.9   1.80 / -
    SmolVLM-256M, vision without autograd, mb1 / mb4    1.59 / 4.39     -     1.47 / 4.08
    SmolVLM-256M no split (64 vt), mb1 / mb4            0.89 / 1.60   0.85 / 1.6   -
    Qwen2.5-VL-7B weights alone                         15.45    15.5   15.66 (+ adapters)

QLoRA: NF4 language-model linears (and, by default, the vision tower's), projector and
lm_head bf16; the vlmfit path's QLoRA rows are within +4 % to +6 % on the H200. The plain
recipe's ``prepare_model_for_kbit_training`` (fp32 upcasts) is modelled as an fp32
activation stream and over-predicts (+9 % to +30 %); ``plan`` keeps a margin for QLoRA.

Approximate by construction: attention is memory-efficient (SDPA / flash: no sequence x
sequence matrices but the padding mask), the scored positions are taken as all the text
tokens (an upper bound), gradients are counted whole in every phase (as under gradient
accumulation), and allocator workspaces are a flat allowance; sharded engines (FSDP2,
ZeRO-3) are not validated.

Usage::

    >>> from vlmfit import memory
    >>> e = memory.estimate("qwen2.5-vl-7b", image_size=(1000, 1000))
    >>> round(e.peak_gib)                              # doctest: +SKIP
    20
    >>> print(e.table())                               # breakdown in GiB  # doctest: +SKIP
    >>> memory.plan("qwen2.5-vl-7b", 24, text_tokens=256, image_size=(1000, 1000))[0]
    ...                                                # doctest: +SKIP

Command line::

    python -m vlmfit plan --model qwen2.5-vl-7b --gpu-gib 80 --image 1000x1000 --text-tokens 256

Measured (builds the model with ``vlmfit.train.build_model``; tiny models on CPU, full-size
``weights="random"`` architectures on a GPU)::

    from vlmfit.config import RunConfig
    rows = memory.ladder(RunConfig(model="smolvlm", weights="random"),
                         [{}, {"vision_no_grad": True}, {"per_device_train_batch_size": 4}])
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vlmfit import registry
from vlmfit.budget import Budget, image_sequence_tokens, image_tokens
from vlmfit.registry import CONFIG_DIR, ModelSpec

GIB = 2**30

# ---------------------------------------------------------------------------------------------
# Constants (bytes unless named otherwise). Derivations in the comments; the two marked
# "calibrated" were fitted to the measured H100 rows in the module docstring.
# ---------------------------------------------------------------------------------------------

#: bytes per parameter of a weight by dtype.
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}

#: NF4 with double quantization (bitsandbytes): 4 bits per weight, one 8-bit absmax per block
#: of 64 weights, one fp32 constant per 256 absmax values (plus a negligible offset).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

#: Optimizer state bytes per trainable parameter, for fp32 parameters (LoRA adapters are fp32:
#: PEFT's ``autocast_adapter_dtype``). torch's AdamW keeps exp_avg and exp_avg_sq in the
#: parameter's dtype, so bf16 full fine-tuning has 2 x 2 bytes.
OPTIMIZER_STATES: dict[str, int] = {"adamw": 2, "sgd": 0, "adamw8bit": 2}  # states per param
OPTIMIZER_STATE_BYTES: dict[str, float] = {"adamw": 4, "sgd": 0, "adamw8bit": 1}

#: The loss over the vocabulary, bytes per vocabulary entry per token at its peak (start of
#: backward): logits in the model dtype (2), their fp32 upcast / log-softmax output (4), the
#: fp32 gradient of the log-probabilities (4) and of the logits (4). Calibrated: the
#: measured Qwen2.5-VL-7B slope (~2.6 MiB per token, 152k vocabulary) needs all four.
LOGITS_BYTES_PER_VOCAB = 14.0  # calibrated
#: Same with fp32 logits (fp32 lm_head, e.g. after prepare_model_for_kbit_training).
LOGITS_BYTES_PER_VOCAB_FP32 = 16.0

#: One decoder layer's activations saved for backward, bytes per token, as multiples of the
#: hidden size h, the attention width q (heads x head dim), the KV width kv and the MLP width
#: i; bf16 under autocast (transformers 5.23 Llama / Qwen2 decoder layers, SDPA). Exact on CPU
#: (``torch.autograd.graph.saved_tensors_hooks`` on one- and two-layer models, docs/memory.md).
#: Frozen linears save nothing (their weight gradient is not needed), so what is kept is:
#: each RMSNorm's fp32 copy of its input (``hidden.to(float32)``, kept by pow and mul) and
#: its fp32 reciprocal RMS (4 bytes a token).
LAYER_NORMS_H, LAYER_NORMS_TOKEN = 2 * 4.0, 2 * 4.0
#: SDPA: query and output (2q + 2q; the output is also o_proj's input, one storage), key and
#: value (2kv + 2kv), log-sum-exp (fp32, 4 per head).
LAYER_ATTN_Q, LAYER_ATTN_KV, LAYER_LSE_PER_HEAD = 4.0, 4.0, 4.0
#: With padding (several rows) transformers passes a mask, so SDPA cannot take GQA natively:
#: ``repeat_kv`` expands key and value to q width (saved), and the memory-efficient kernel
#: saves the mask as a bf16 bias [rows, 1, seq, seq]: 2 x seq bytes per token per layer.
LAYER_MASK_PER_SEQ = 2.0
#: The MLP: gate output (kept by SiLU), its SiLU and the up output (kept by their product).
LAYER_MLP_I = 6.0
#: Inputs kept for the LoRA matmuls (A needs its input), with the inputs shared: q/k/v read
#: one normed tensor, gate/up another (2h each), down reads the product (2i), o reads the
#: SDPA output (already counted). So it is with QLoRA (PEFT's 4-bit layer does not cast under
#: autocast), with ``fused_lora`` (one addmm on the layer's own bf16 input) and for full
#: fine-tuning (the trained weights keep the same inputs).
LORA_SHARED_H, LORA_SHARED_I = 2 * 2.0, 2.0
#: PEFT's bf16 LoRA layer (``fused_lora`` off) casts its input to the fp32 adapter dtype and
#: autocast casts it back to bf16 for A's matmul: each adapted linear keeps its own bf16
#: copy of its input: q, k, v, gate, up (5 x 2h), o (2q), down (2i).
LORA_COPIES_H, LORA_COPIES_Q, LORA_COPIES_I = 5 * 2.0, 2.0, 2.0
#: Without autocast A's matmul runs in fp32 on PEFT's fp32 copy, which it keeps: 2 x the bytes.
LORA_COPIES_NO_AUTOCAST = 2.0
#: LoRA dropout (PEFT's path) keeps a bool mask of each adapted input: 5h + q + i.
LORA_DROPOUT_H, LORA_DROPOUT_Q, LORA_DROPOUT_I = 5.0, 1.0, 1.0
#: Full fine-tuning: each RMSNorm's trained weight keeps its bf16 normalized input (2 x 2h).
FULL_FT_H = 2 * 2.0
#: Gradient checkpointing keeps each layer's bf16 input (2h per token per layer).
CHECKPOINT_H = 2.0
#: During the backward of a checkpointed layer, on top of its recomputed saved activations:
#: what is alive when the recomputation stops (the product feeding down, down's base output,
#: the residual, the incoming gradient): 2i + 8h. PEFT's bf16 LoRA adds the fp32 copy of
#: down's input it holds at that moment (4i). From CPU: 2b..7b within -1k..+9k bytes/token.
RECOMPUTE_EXTRA_H, RECOMPUTE_EXTRA_I, RECOMPUTE_PEFT_FP32_I = 8.0, 2.0, 4.0
#: Without checkpointing, the backward starts with every layer's activations kept; the
#: transient on top is the final RMSNorm's fp32 backward and the first gradients: 17-19h
#: per token on CPU (smolvlm-2b, qwen2-vl-2b, qwen2.5-vl-7b, a stand-in loss), more than
#: any one layer's backward adds there.
BACKWARD_EXTRA_H = 18.0
#: Outside the layers: the final RMSNorm's fp32 copy of its input (4h per token).
FINAL_NORM_H = 4.0
#: The DPO reference forward (no autograd, adapters off) while the policy's activations are
#: kept: one layer's transient (gate, up, SiLU, product: 8i; residual, norm: 8h).
REFERENCE_LAYER_H, REFERENCE_LAYER_I = 8.0, 8.0

#: TRL's ``activation_offloading`` moves what autograd keeps (with checkpointing: each
#: layer's input, saved by the checkpoint) to pinned CPU memory; the last
#: ``max_fwd_stash_size`` = 5 tensors stay on the GPU until the backward begins (the last
#: five layers' inputs). Measured: Qwen2.5-VL-7B LoRA mb 4, 6,869 tokens: 20.03 -> 18.96 GiB
#: (23 of 28 layer inputs off the GPU: 1.06 GiB predicted).
OFFLOAD_STASH_TENSORS = 5
#: Tokens/s with activation offloading relative to without (Qwen2.5-VL-7B LoRA, fused LoRA,
#: micro-batch 4, end to end on an H200, run 6: 4,091 / 5,998): the planner's and the memory
#: check's price for the GiB it frees; ``RunConfig.activation_offloading=None`` pays it only
#: where the run fits no other way.
OFFLOAD_SPEED = 0.68

#: Vision block saved activations per patch (bf16) when autograd tracks the frozen tower (the
#: plain recipe), multiples of vision hidden vh / MLP vi: two norms (fp32 input, 4vh each),
#: attention (q, k, v, out: 8vh), MLP (gate out, its activation, up out: 6vi gated; fc1 out +
#: GELU: 4vi plain). Frozen linears save nothing.
VISION_LAYER_H, VISION_LAYER_I_GATED, VISION_LAYER_I_PLAIN = 16.0, 6.0, 4.0
#: The frozen vision tower's forward without autograd (vlmfit's default), peak bytes per patch:
#: the residual and the norm's output and temporaries (6vh), the MLP's intermediates
#: (fc1 + GELU-tanh: 4vi; QuickGELU's temporaries: 6vi; gated SiLU: 8vi) and the pixels (the
#: batch's bf16 pixel values, the processor's copies: 9 bytes per pixel of a patch).
VISION_NOGRAD_H, VISION_NOGRAD_PIXEL = 6.0, 9.0
#: The chunked tiled tower (``RunConfig.vision_chunk``): the transient of one pass of N tiles,
#: plus the outputs of every tile, two bf16 copies while they are joined (bytes / hidden unit).
VISION_CHUNK_OUT_H = 4.0
#: ``RunConfig.vision_chunk``'s default (tiles a pass), what ``recipe="vlmfit"`` predicts.
VISION_CHUNK_TILES = 32
VISION_NOGRAD_I = {"gelu_tanh": 4.0, "quick_gelu": 6.0, "gated": 8.0}
#: LayerNorm towers (SigLIP, Qwen2-VL) under CUDA autocast: layer_norm runs in fp32, its
#: output is fp32 (+2vh). Measured on CPU with CUDA's fp32 layer_norm, bytes per patch (+ the
#: batch's pixels): smolvlm 23.1k, smolvlm-2b 31.0k, qwen2-vl-2b 49.4k, qwen2.5-vl-3b 46.8k;
#: predicted 25.3k, 31.7k, 51.5k, 45.6k. On the H200 SmolVLM-256M mb 4 (vision peak) measured
#: 2.36 GiB with autocast, 2.26 without: the 2vh per patch.
VISION_AUTOCAST_LN_H = 2.0
#: A 4-bit LayerNorm tower under autocast: bitsandbytes' Linear4bit returns its input's dtype,
#: so after the fp32 LayerNorm the linears, the activation and the residual stream stay fp32:
#: 1.5 x the vh term, 2 x the vi term. Measured on CPU: smolvlm 37.0k, smolvlm-2b 51.7k,
#: qwen2-vl-2b 77.7k bytes per patch (+ pixels); Qwen2.5-VL's RMSNorm returns bf16.
VISION_FP32_H, VISION_FP32_I = 1.5, 2.0

#: Memory allocated outside the model's tensors during a step (cuBLAS / cuDNN workspaces,
#: the batch, rotary tables, small buffers), GiB. Calibrated (small).
ALLOC_OVERHEAD_GIB = 0.1  # calibrated
#: CUDA context + kernels loaded by torch (not counted by max_memory_allocated), GiB.
CUDA_CONTEXT_GIB = 0.6
#: Reserved / allocated: caching-allocator fragmentation (measured 34.1 / 29.5 at 2000 px).
FRAGMENTATION = 0.10

#: TRL's fused LM head (``trl.kernels.chunked_logprob``, on CUDA): only the scored positions
#: (labels != -100: the answer in SFT, the completions in DPO) are projected, in [4096 tokens
#: x 32768 vocabulary] bf16 tiles folded in place by a Triton kernel (2 bytes per element).
#: It keeps the scored hidden states (2h each); its backward accumulates their gradient in
#: fp32 (4h) and casts it (2h), and scatters it into the sequence (2h per token, twice: the
#: mask and the shift). A trained lm_head adds its fp32 gradient accumulator (4 x vocab x h).
FUSED_TILE_TOKENS, FUSED_TILE_VOCAB, FUSED_TILE_BYTES = 4096, 32768, 2.0
FUSED_SCORED_H, FUSED_GRAD_SCORED_H, FUSED_GRAD_TOKEN_H = 2.0, 6.0, 4.0

#: QLoRA is the least validated estimate (docs/memory.md): ``plan`` adds this to its margin.
QLORA_UNCERTAINTY = 0.10

#: Engines of several GPUs (accelerate/*.yaml).
ENGINES = ("ddp", "fsdp2", "zero3")

#: What ``estimate`` can predict: vlmfit's default path, or the textbook recipe.
RECIPES = ("vlmfit", "plain")

#: Relative speed of a step per token (1 = bf16 LoRA without checkpointing), for ranking.
SPEED = {"gc": 0.75, "qlora": 0.59, "full": 0.9}
#: Tokens/s gained by micro-batch mb over mb 1: 1 + MB_GAIN x (1 - 1/mb). Measured on the
#: fast path (H200, Qwen2.5-VL-7B LoRA: 3,017 -> 4,203 tokens/s from mb 1 to 4); QLoRA's
#: 0.59 is 1,778 / 3,017 tokens/s at mb 1 (docs/benchmarks.md).
MB_GAIN = 0.52


def relative_speed(finetune: str, micro_batch: int, gradient_checkpointing: bool) -> float:
    """Tokens/s relative to bf16 LoRA at micro-batch 1 without checkpointing (ranking only)."""
    kind = SPEED.get(finetune, 1.0) if finetune != "lora" else 1.0
    return (
        kind
        * (SPEED["gc"] if gradient_checkpointing else 1.0)
        * (1 + MB_GAIN * (1 - 1 / micro_batch))
    )


# ---------------------------------------------------------------------------------------------
# Architecture: dimensions and parameter counts from a config dict
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """Dimensions and parameter counts of one architecture (counts in parameters)."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_gated: bool
    vision_act: str  # the vision MLP: "gelu_tanh" (SigLIP), "quick_gelu" (Qwen2-VL), "gated"
    vision_layernorm: bool  # LayerNorm blocks (fp32 under CUDA autocast); False: RMSNorm
    patch_pixels: int  # pixel values per vision patch (channels x [frames x] patch^2)
    patches_per_token: int  # vision-tower patches per visual token (merge^2 / scale^2)
    embed_params: int
    lm_head_params: int  # 0 when tied
    lm_linear_params: int  # q/k/v/o/gate/up/down of all layers: what LoRA and NF4 act on
    lm_other_params: int  # norms, biases
    vision_params: int
    projector_params: int
    lora_in_out: int  # sum over one layer's LoRA targets of (in + out) features
    tile_patches: int = 0  # patches per tile of a tiled tower (Idefics3); 0: one flat sequence

    @property
    def q_width(self) -> int:
        """Attention width: heads x head dim (the query, the SDPA output)."""
        return self.heads * self.head_dim

    @property
    def total_params(self) -> int:
        return (
            self.embed_params
            + self.lm_head_params
            + self.lm_linear_params
            + self.lm_other_params
            + self.vision_params
            + self.projector_params
        )

    def lora_params(self, r: int) -> int:
        """LoRA A and B on the language model's seven linear layers per layer."""
        return r * self.lora_in_out * self.layers


def arch_from_config(cfg: dict[str, Any]) -> Arch:
    """Parse a transformers config dict (Idefics3, Qwen2-VL, Qwen2.5-VL) into an ``Arch``."""
    mt = cfg["model_type"]
    t, v = cfg["text_config"], cfg["vision_config"]
    h, i, n = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    heads = t["num_attention_heads"]
    kvh = t.get("num_key_value_heads") or heads
    hd = t.get("head_dim") or h // heads
    vocab = t["vocab_size"]
    tied = bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    qkv_bias = mt.startswith("qwen")
    q, kv = heads * hd, kvh * hd
    per_layer_linear = h * q + 2 * h * kv + q * h + 3 * h * i
    per_layer_other = 2 * h + ((q + 2 * kv) if qkv_bias else 0)
    lora_in_out = (h + q) + 2 * (h + kv) + (q + h) + 3 * (h + i)
    if mt == "idefics3":
        vh, vi, vl = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
        p, img = v["patch_size"], v["image_size"]
        scale = cfg.get("scale_factor", 2)
        block = 4 * (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh) + 4 * vh
        vision = 3 * p * p * vh + vh + (img // p) ** 2 * vh + vl * block + 2 * vh
        projector = vh * scale * scale * h
        gated, ppt = False, scale * scale
        act, layernorm, pixels = "gelu_tanh", True, 3 * p * p
    else:
        merge, tp, p = (
            v.get("spatial_merge_size", 2),
            v.get("temporal_patch_size", 2),
            v.get("patch_size", 14),
        )
        if mt == "qwen2_vl":
            vh = v["embed_dim"]
            vi = vh * v.get("mlp_ratio", 4)
            block = (
                4 * vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh)
            )
            out, ln = v["hidden_size"], 2 * vh
            gated, act, layernorm = False, "quick_gelu", True
        else:
            vh, vi = v["hidden_size"], v["intermediate_size"]
            block = (
                2 * vh
                + (3 * vh * vh + 3 * vh)
                + (vh * vh + vh)
                + 2 * (vh * vi + vi)
                + (vi * vh + vh)
            )
            out, ln = v["out_hidden_size"], vh
            gated, act, layernorm = True, "gated", False
        vl = v["depth"]
        vision = 3 * tp * p * p * vh + vl * block
        pixels = 3 * tp * p * p
        m = vh * merge * merge
        projector = ln + (m * m + m) + (m * out + out)
        ppt = merge * merge
    return Arch(
        model_type=mt,
        vocab=vocab,
        hidden=h,
        intermediate=i,
        layers=n,
        heads=heads,
        kv_heads=kvh,
        head_dim=hd,
        tied=tied,
        qkv_bias=qkv_bias,
        vision_hidden=vh,
        vision_intermediate=vi,
        vision_layers=vl,
        vision_gated=gated,
        vision_act=act,
        vision_layernorm=layernorm,
        patch_pixels=pixels,
        patches_per_token=ppt,
        embed_params=vocab * h,
        lm_head_params=0 if tied else vocab * h,
        lm_linear_params=n * per_layer_linear,
        lm_other_params=n * per_layer_other + h,
        vision_params=vision,
        projector_params=projector,
        lora_in_out=lora_in_out,
        tile_patches=(v["image_size"] // v["patch_size"]) ** 2 if mt == "idefics3" else 0,
    )


def arch(spec: ModelSpec) -> Arch:
    """The architecture of a registered model (tiny models: their saved config)."""
    if spec.tiny:
        from vlmfit import tiny

        cfg = json.loads((tiny.ensure_tiny(spec.name) / "config.json").read_text())
    else:
        cfg = json.loads((CONFIG_DIR / spec.arch_config).read_text())
    return arch_from_config(cfg)


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------


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


def lora_copies(
    finetune: str, fused_lora: bool, lora_dropout: bool, autocast: bool, fp32_stream: bool
) -> bool:
    """Whether each adapted linear keeps its own copy of its input. PEFT's own forward runs
    with ``fused_lora`` off, or with dropout (the fused path leaves it to PEFT): its bf16
    layer always copies (the fp32 cast); its 4-bit layer only when dropout makes a new tensor
    per adapter, the input is not bf16 (fp32 stream) or there is no autocast (it then casts
    to fp32 itself)."""
    if fused_lora and not lora_dropout:
        return False
    return finetune == "lora" or (
        finetune == "qlora" and (lora_dropout or fp32_stream or not autocast)
    )


def layer_bytes(
    a: Arch,
    *,
    finetune: str = "lora",
    lora_r: int = 16,
    fused_lora: bool = True,
    lora_dropout: bool = False,
    autocast: bool = True,
    seq: int | None = None,
    fp32_stream: bool = False,
) -> float:
    """Bytes one decoder layer keeps for backward per token (the ``LAYER_*`` / ``LORA_*``
    terms). ``seq``: the padded length when the batch has padding (several rows of
    different lengths), None without: the mask and ``repeat_kv``'s key / value copies."""
    h, i, kv, q = a.hidden, a.intermediate, a.kv_heads * a.head_dim, a.q_width
    attn = (
        LAYER_ATTN_Q * q
        + LAYER_ATTN_KV * (q if seq is not None else kv)
        + LAYER_LSE_PER_HEAD * a.heads
        + (LAYER_MASK_PER_SEQ * seq if seq is not None else 0.0)
    )
    layer = LAYER_NORMS_H * h + LAYER_NORMS_TOKEN + attn + LAYER_MLP_I * i
    if finetune in ("lora", "qlora"):
        copy_bytes = 1.0
        if lora_copies(finetune, fused_lora, lora_dropout, autocast, fp32_stream):
            copy_bytes = 1.0 if autocast else LORA_COPIES_NO_AUTOCAST
            layer += (LORA_COPIES_H * h + LORA_COPIES_Q * q + LORA_COPIES_I * i) * copy_bytes
        else:
            layer += LORA_SHARED_H * h + LORA_SHARED_I * i
        if lora_dropout:
            layer += LORA_DROPOUT_H * h + LORA_DROPOUT_Q * q + LORA_DROPOUT_I * i
        layer += 2.0 * lora_r * 7 * copy_bytes  # each adapter's r-wide A output, kept by B
    elif finetune == "full":
        layer += LORA_SHARED_H * h + LORA_SHARED_I * i + FULL_FT_H * h
    # projector only: the LM's weights are frozen, but the gradient flows through every
    # layer to the projector, so the layers keep what their input gradient needs
    return layer * (2.0 if fp32_stream else 1.0)


def vision_forward_bytes(a: Arch, *, autocast: bool = True, four_bit: bool = False) -> float:
    """Peak bytes per patch of the frozen vision tower's forward without autograd (the
    ``VISION_NOGRAD_*`` terms), the batch's pixels included."""
    vd = VISION_NOGRAD_H * a.vision_hidden
    vi = VISION_NOGRAD_I[a.vision_act] * a.vision_intermediate
    if autocast and a.vision_layernorm:  # fp32 LayerNorm output
        vd += VISION_AUTOCAST_LN_H * a.vision_hidden
        if four_bit:  # Linear4bit keeps fp32 going
            vd, vi = vd * VISION_FP32_H, vi * VISION_FP32_I
    return vd + vi + VISION_NOGRAD_PIXEL * a.patch_pixels


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
    activation_offloading: bool | None = False,
    autocast: bool | None = None,
    vision_chunk: int | None = None,
) -> Estimate:
    """Predict the peak memory of one training step (GiB), with its breakdown.

    ``finetune``: "lora" (bf16 base, fp32 adapters on the language model's linear layers),
    "qlora" (NF4 language-model linears; with ``kbit_upcast`` every other weight fp32, as
    ``prepare_model_for_kbit_training`` does), "full" (language model + projector train;
    vision frozen) or "projector". ``visual_tokens`` overrides the count derived from
    ``image_size`` and ``budget`` (``vlmfit.budget.image_tokens``); ``images`` per sample.
    ``recipe``: "vlmfit" predicts vlmfit's default path (``vlmfit.fastpath``: the frozen
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
    an fp32 copy in flight). ``activation_offloading`` (``RunConfig.activation_offloading``,
    TRL's): what autograd keeps goes to pinned CPU memory but for the last few tensors;
    None: off (training turns it on only where the run fits no other way: ``check_fits``). ``autocast`` (``RunConfig.autocast``; None: vlmfit's rule, off for
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
            lm_kept = min(n_layers, OFFLOAD_STASH_TENSORS) * per_layer_kept
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


# ---------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One configuration that fits; ``required_gib`` includes the safety margin and context."""

    finetune: str
    micro_batch: int
    max_image_tokens: int | None
    gradient_checkpointing: bool
    vision_no_grad: bool | None
    estimate: Estimate
    required_gib: float
    gpu_gib: float
    score: float  # relative tokens/s (``relative_speed``), for ranking
    effective_batch: int = 16  # samples per optimizer step: micro-batch x accumulation x GPUs
    nproc: int = 1
    engine: str = "ddp"
    fused_lora: bool = True  # RunConfig.fused_lora the estimate assumed
    activation_offloading: bool | None = None  # as asked (None: off unless needed to fit)
    autocast: bool | None = None  # as asked (None: vlmfit's rule, the default)

    @property
    def headroom_gib(self) -> float:
        return self.gpu_gib - self.required_gib

    @property
    def accumulation(self) -> int:
        return max(1, math.ceil(self.effective_batch / (self.micro_batch * self.nproc)))

    def make_args(self) -> str:
        """The configuration as ``make train`` variables (PARAMS: RunConfig field names)."""
        params = [
            f"per_device_train_batch_size={self.micro_batch}",
            f"gradient_accumulation_steps={self.accumulation}",
        ]
        if not self.gradient_checkpointing:
            params.append("gradient_checkpointing=False")
        if not self.fused_lora:  # levers off their RunConfig default: the run must match
            params.append("fused_lora=False")
        if self.activation_offloading is not None:
            params.append(f"activation_offloading={self.activation_offloading}")
        if self.autocast is not None:
            params.append(f"autocast={self.autocast}")
        mit = self.max_image_tokens or 0  # 0: the processor's default
        return f"FINETUNE={self.finetune} MAX_IMAGE_TOKENS={mit} PARAMS='{' '.join(params)}'"

    def make_command(self) -> str:
        gpus = f" NPROC={self.nproc} DIST={self.engine}" if self.nproc > 1 else ""
        return f"make train MODEL={self.estimate.model}{gpus} {self.make_args()}"

    def row(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "finetune": self.finetune,
            "micro_batch": self.micro_batch,
            "max_image_tokens": self.max_image_tokens,
            "visual_tokens": e.visual_tokens,
            "sequence_tokens": e.sequence_tokens,
            "gradient_checkpointing": self.gradient_checkpointing,
            "vision_no_grad": self.estimate.vision_no_grad,
            "peak_gib": round(e.peak_gib, 2),
            "required_gib": round(self.required_gib, 2),
            "headroom_gib": round(self.headroom_gib, 2),
            "score": round(self.score),
            "make": self.make_command(),
        }


class PlanResult(list):
    """``plan``'s answer: a list of ``Candidate`` (best first) with ``reason`` when empty."""

    reason: str = ""
    smallest: Candidate | None = None  # the least demanding configuration tried (fits or not)
    advice: list[str] = []  # what would fit when nothing does


def advice(
    spec: ModelSpec,
    gpu_gib: float,
    result: PlanResult,
    *,
    text_tokens: int,
    image_size: tuple[int, int] | None,
) -> list[str]:
    """What would fit when nothing does: QLoRA, a smaller model, more GPUs."""
    tips: list[str] = []
    s = result.smallest
    if s is not None and s.finetune != "qlora":
        tips.append("finetune=qlora (4-bit weights) was not searched: FINETUNE=qlora")
    smaller = []
    for name in registry.names(include_tiny=False):
        other = registry.get(name)
        if other.params_b >= spec.params_b:
            continue
        fits = plan(other, gpu_gib, text_tokens=text_tokens, image_size=image_size,
                    micro_batches=(1,), checkpointing=(True,))  # fmt: skip
        if fits:
            smaller.append(f"MODEL={name} ({fits[0].make_args()})")
    if smaller:
        tips.append("a smaller model: " + ", ".join(smaller[:3]))
    if s is not None and s.nproc == 1:  # weights and optimizer states sharded over GPUs
        for n in (2, 4, 8):
            more = plan(spec, gpu_gib, text_tokens=text_tokens, image_size=image_size,
                        finetune=s.finetune, micro_batches=(1,), nproc=n, engine="fsdp2")  # fmt: skip
            if more:
                tips.append(f"{n} GPUs sharding weights and optimizer states: "
                            f"{more[0].make_command()} (predicted, not validated on GPUs)")  # fmt: skip
                break
    return tips


def _required(e: Estimate, margin: float) -> float:
    extra = QLORA_UNCERTAINTY if e.finetune == "qlora" else 0.0
    return e.peak_gib * (1 + margin + extra) + CUDA_CONTEXT_GIB


def plan(
    spec_or_name: ModelSpec | str,
    gpu_gib: float,
    *,
    text_tokens: int = 256,
    image_size: tuple[int, int] | None = (1000, 1000),
    finetune: str | None = None,
    micro_batches: tuple[int, ...] = (1, 2, 4, 8),
    max_image_tokens: tuple[int | None, ...] = (None, 1280, 1024, 512, 256),
    checkpointing: tuple[bool, ...] = (True, False),
    vision_no_grad: bool | None = None,
    margin: float = 0.10,
    lora_r: int = 16,
    effective_batch: int = 16,
    nproc: int = 1,
    engine: str = "ddp",
    fused_lora: bool = True,
    activation_offloading: bool | None = None,
    autocast: bool | None = None,
) -> PlanResult:
    """Configurations that fit ``gpu_gib`` GiB with ``margin`` to spare, best first.

    Searches finetune (lora and qlora unless given) x micro-batch x visual-token budget x
    gradient checkpointing. A candidate fits when ``peak * (1 + margin) + CUDA context <=
    gpu_gib``. Ranked by image resolution first (the largest visual-token budget that fits),
    then by relative tokens/s (``relative_speed``: measured micro-batch gain, checkpointing
    ~0.75, QLoRA ~0.59), so bf16 LoRA wins over QLoRA whenever both fit. Estimates are of
    vlmfit's default path (``estimate(recipe="vlmfit")``), the one ``make train`` runs.
    """
    spec = _spec(spec_or_name)
    kinds = (finetune,) if finetune else ("lora", "qlora")
    out = PlanResult()
    tried: list[Candidate] = []
    seen: set[tuple] = set()
    for ft in kinds:
        for mit in max_image_tokens:
            try:
                budget = Budget(max_image_tokens=mit) if mit else None
                if budget is not None and image_size is not None:
                    image_tokens(spec, *image_size, budget)
            except ValueError:
                continue  # budget below what the processor can do (e.g. one SmolVLM tile)
            for gc_on in checkpointing:
                for mb in micro_batches:
                    e = estimate(
                        spec,
                        finetune=ft,
                        lora_r=lora_r,
                        micro_batch=mb,
                        text_tokens=text_tokens,
                        image_size=image_size,
                        budget=budget,
                        gradient_checkpointing=gc_on,
                        vision_no_grad=vision_no_grad,
                        nproc=nproc,
                        engine=engine,
                        fused_lora=fused_lora,
                        activation_offloading=activation_offloading,
                        autocast=autocast,
                    )
                    key = (ft, mb, e.visual_tokens, gc_on)
                    if key in seen:  # a budget above the image's cost changes nothing
                        continue
                    seen.add(key)
                    c = Candidate(
                        finetune=ft,
                        micro_batch=mb,
                        max_image_tokens=mit,
                        gradient_checkpointing=gc_on,
                        vision_no_grad=vision_no_grad,
                        estimate=e,
                        required_gib=_required(e, margin),
                        gpu_gib=gpu_gib,
                        score=relative_speed(ft, mb, gc_on),
                        effective_batch=effective_batch,
                        nproc=nproc,
                        engine=engine,
                        fused_lora=fused_lora,
                        activation_offloading=activation_offloading,
                        autocast=autocast,
                    )
                    if (
                        c.required_gib > gpu_gib
                        and activation_offloading is None
                        and gc_on
                        and (nproc == 1 or engine == "ddp")
                    ):  # what RunConfig.activation_offloading=None does: offload to fit
                        e = estimate(
                            spec, finetune=ft, lora_r=lora_r, micro_batch=mb,
                            text_tokens=text_tokens, image_size=image_size, budget=budget,
                            gradient_checkpointing=gc_on, vision_no_grad=vision_no_grad,
                            nproc=nproc, engine=engine, fused_lora=fused_lora,
                            activation_offloading=True, autocast=autocast,
                        )  # fmt: skip
                        c = dataclasses.replace(
                            c, estimate=e, required_gib=_required(e, margin),
                            score=c.score * OFFLOAD_SPEED, activation_offloading=True,
                        )  # fmt: skip
                    tried.append(c)
                    if c.required_gib <= gpu_gib:
                        out.append(c)
    # Best first: the image at the highest resolution that fits, then the fastest.
    out.sort(
        key=lambda c: (
            -c.estimate.visual_tokens,
            -c.score,
            c.finetune == "qlora",
            c.required_gib,
        )
    )
    if tried:
        out.smallest = min(tried, key=lambda c: c.required_gib)
    if not out:
        s = out.smallest
        out.reason = (
            f"nothing fits {gpu_gib:g} GiB: the least demanding configuration tried "
            f"({s.finetune}, micro-batch {s.micro_batch}, "
            f"{s.estimate.visual_tokens} visual tokens, gradient checkpointing "
            f"{'on' if s.gradient_checkpointing else 'off'}) needs {s.required_gib:.1f} GiB "
            f"(weights alone {s.estimate.weights_gib:.1f} GiB, +{margin:.0%} margin and "
            f"{CUDA_CONTEXT_GIB} GiB CUDA context)"
            if s
            else f"nothing fits {gpu_gib:g} GiB: no configuration could be built"
        )
        out.advice = advice(spec, gpu_gib, out, text_tokens=text_tokens, image_size=image_size)
        if out.advice:
            out.reason += ". What would fit: " + "; ".join(out.advice)
    return out


# ---------------------------------------------------------------------------------------------
# Measuring: synthetic batches, profile_steps, ladder
# ---------------------------------------------------------------------------------------------


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
    est_dtype = "bf16" if dtype == torch.bfloat16 else "fp16" if dtype == torch.float16 else "fp32"
    try:
        est = estimate(
            spec,
            finetune=cfg.finetune,
            lora_r=cfg.lora_r,
            micro_batch=mb,
            text_tokens=seq - (visual + 2 if spec.is_qwen else visual),
            visual_tokens=visual,
            gradient_checkpointing=cfg.gradient_checkpointing,
            dtype=est_dtype,
            vision_no_grad=bool(vision_no_grad),
            lora_dropout=cfg.lora_dropout > 0,
            kbit_upcast=cfg.qlora_upcast,
            fused_lm_head=False,  # this loop calls model(**batch).loss
            fused_lora=bool(getattr(cfg, "fused_lora", True)),  # build_model applies cfg's
            autocast=False,  # nor does it run under autocast
        ).peak_gib
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


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib Figure objects, no pyplot: notebooks show each once)
# ---------------------------------------------------------------------------------------------


def plot_breakdown(estimates: list[Estimate], labels: list[str] | None = None):
    """Stacked bars of estimate breakdowns (GiB)."""
    from matplotlib.figure import Figure

    labels = labels or [f"{e.finetune} mb{e.micro_batch}" for e in estimates]
    keys: list[str] = []
    for e in estimates:
        keys += [k for k in e.breakdown if k not in keys]
    fig = Figure(figsize=(max(5, 1.3 * len(estimates) + 3), 4))
    ax = fig.subplots()
    bottom = [0.0] * len(estimates)
    for k in keys:
        vals = [e.breakdown.get(k, 0.0) for e in estimates]
        ax.bar(labels, vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for x, b in enumerate(bottom):
        ax.text(x, b, f"{b:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("GiB (predicted peak allocated)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    return fig


def plot_ladder(rows: list[dict[str, Any]], unit: str = "GiB"):
    """Peak memory and tokens/s per ladder step, annotated with the change vs. baseline."""
    from matplotlib.figure import Figure

    ok = [r for r in rows if "error" not in r]
    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    labels = [str(r["label"])[:36] for r in ok]
    peaks = [r["peak_gib"] for r in ok]
    speeds = [r["tokens_per_s"] for r in ok]
    ax1.barh(labels, peaks, color="#1f77b4", label="measured")
    est = [r.get("estimate_gib", float("nan")) for r in ok]
    if any(not math.isnan(v) for v in est):
        ax1.scatter(est, labels, color="#d62728", marker="|", s=200, label="estimate", zorder=3)
        ax1.legend(fontsize=7)
    for y, r in enumerate(ok):
        ax1.text(r["peak_gib"], y, f" {r['peak_gib']:.2f} ({r.get('peak_change', 0):+.0%})",
                 va="center", fontsize=7)  # fmt: skip
        ax2.text(r["tokens_per_s"], y, f" {r['tokens_per_s']:.0f} ({r.get('speed_change', 0):+.0%})",
                 va="center", fontsize=7)  # fmt: skip
    ax2.barh(labels, speeds, color="#2ca02c")
    ax1.set_xlabel(f"peak memory ({unit})")
    ax2.set_xlabel("tokens / s")
    ax2.set_yticklabels([])
    for ax in (ax1, ax2):
        ax.invert_yaxis()
        ax.margins(x=0.35)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit 2 with our prefix, never a traceback
        raise _UsageError(message)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise _UsageError(f"--image expects WIDTHxHEIGHT, got {text!r}") from None
    if w < 1 or h < 1:
        raise _UsageError(f"--image sides must be >= 1, got {text!r}")
    return w, h


def local_gpu_gib() -> float | None:
    """Total memory of CUDA device 0 in GiB, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def _lever_flags(p: argparse.ArgumentParser) -> None:
    """The training-path levers the estimator models (RunConfig fields of the same name)."""
    p.add_argument("--no-fused-lora", action="store_true",
                   help="PEFT's own LoRA layer (fused_lora=False): a bf16 copy of the input "
                   "per adapted linear")  # fmt: skip
    off = p.add_mutually_exclusive_group()
    off.add_argument("--activation-offloading", dest="activation_offloading",
                     action="store_const", const=True, default=None,
                     help="kept activations in pinned CPU memory (default: off; training "
                     "turns it on only where the run fits no other way)")  # fmt: skip
    off.add_argument("--no-activation-offloading", dest="activation_offloading",
                     action="store_const", const=False, help="activation_offloading=False")  # fmt: skip
    p.add_argument("--vision-chunk", type=int, default=None, metavar="TILES",
                   help="a tiled vision tower (SmolVLM) TILES tiles a pass; 0: all at once "
                   f"(default: the recipe's: vlmfit {VISION_CHUNK_TILES}, plain 0)")  # fmt: skip
    p.add_argument("--autocast", choices=["on", "off"], default=None,
                   help="the Trainer's bf16 autocast (default: vlmfit's rule, off with fused "
                   "LoRA)")  # fmt: skip


def _autocast_arg(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def cli_estimate(argv: list[str]) -> int:
    """``python -m vlmfit estimate --model M ...``: predicted peak GiB and its breakdown.

    Exit 0; 2 on a usage error. ``--json``: one object with ``peak_gib`` and ``breakdown``.
    """
    p = _Parser(
        prog="vlmfit estimate", description="Predict the peak GPU memory of a training step."
    )
    p.add_argument("--model", required=True, help="registry name (vlmfit tokens --help lists them)")
    p.add_argument("--method", choices=["lora", "qlora", "full", "projector"], default="lora",
                   help="what trains (FINETUNE)")  # fmt: skip
    p.add_argument("--image", default="1000x1000", help="image size WxH, one per sample")
    p.add_argument("--text-tokens", type=int, default=256, help="text tokens per sample")
    p.add_argument("--batch", type=int, default=1, help="micro-batch (per_device_train_batch_size)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--max-image-tokens", type=int, default=None, help="visual-token budget")
    p.add_argument("--no-grad-ckpt", action="store_true", help="without gradient checkpointing")
    p.add_argument("--recipe", choices=list(RECIPES), default="vlmfit",
                   help="vlmfit's default path (default) or the textbook recipe in train mode")  # fmt: skip
    p.add_argument("--dpo", action="store_true", help="DPO (chosen + rejected per sample)")
    _lever_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    try:
        a = p.parse_args(argv)
        e = estimate(
            registry.get(a.model),
            finetune=a.method,
            lora_r=a.lora_r,
            micro_batch=a.batch,
            text_tokens=a.text_tokens,
            image_size=_parse_size(a.image),
            budget=Budget(max_image_tokens=a.max_image_tokens) if a.max_image_tokens else None,
            gradient_checkpointing=not a.no_grad_ckpt,
            recipe=a.recipe,
            dpo=a.dpo,
            fused_lora=False if a.no_fused_lora else None,  # None: the recipe's default
            activation_offloading=a.activation_offloading,
            autocast=_autocast_arg(a.autocast),
            vision_chunk=a.vision_chunk,
        )
    except (_UsageError, registry.UnknownModelError, ValueError) as err:
        print(f"vlmfit estimate: error: {err}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({**e.as_dict(), "recipe": a.recipe, "dpo": a.dpo}))
    else:
        print(e.table())
    return 0


def cli_plan(argv: list[str]) -> int:
    """``python -m vlmfit plan --model M [--gpu-gib G] ...``: estimate + fitting configs.

    Exit 0 with a table of candidates; 1 when nothing fits (with the reason); 2 on a usage
    error (unknown model, no --gpu-gib and no CUDA device).
    """
    p = _Parser(prog="vlmfit plan", description="Predict training memory; list configs that fit.")
    p.add_argument("--model", required=True, help="registry name (python -m vlmfit tokens)")
    p.add_argument("--gpu-gib", type=float, help="GPU memory, GiB (default: this CUDA device)")
    p.add_argument("--finetune", choices=["lora", "qlora", "full", "projector"], default=None,
                   help="restrict the search (default: lora and qlora)")  # fmt: skip
    p.add_argument("--image", default="1000x1000", help="image size WxH (default 1000x1000)")
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=1, help="for the estimate shown")
    p.add_argument("--max-image-tokens", type=int, default=None, help="for the estimate shown")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--vision-no-grad", action="store_true",
                   help="assume the frozen vision tower runs without autograd")  # fmt: skip
    p.add_argument("--margin", type=float, default=0.10, help="safety margin (fraction)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (make NPROC=)")
    p.add_argument(
        "--engine", choices=list(ENGINES), default="ddp", help="with --nproc > 1 (DIST=)"
    )
    p.add_argument("--effective-batch", type=int, default=16,
                   help="samples per optimizer step: micro-batch x accumulation")  # fmt: skip
    p.add_argument("--top", type=int, default=10, help="candidates to list")
    _lever_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    try:
        a = p.parse_args(argv)
        spec = registry.get(a.model)
        size = _parse_size(a.image)
        gpu = a.gpu_gib if a.gpu_gib is not None else local_gpu_gib()
        if gpu is None:
            raise _UsageError("no CUDA device here: pass --gpu-gib (e.g. --gpu-gib 80 for an H100)")
        if gpu <= 0:
            raise _UsageError("--gpu-gib must be positive")
        ft = a.finetune or "lora"
        budget = Budget(max_image_tokens=a.max_image_tokens) if a.max_image_tokens else None
        e = estimate(
            spec,
            finetune=ft,
            lora_r=a.lora_r,
            micro_batch=a.micro_batch,
            text_tokens=a.text_tokens,
            image_size=size,
            budget=budget,
            vision_no_grad=True if a.vision_no_grad else None,
            nproc=a.nproc,
            engine=a.engine,
            fused_lora=not a.no_fused_lora,
            activation_offloading=a.activation_offloading,
            autocast=_autocast_arg(a.autocast),
        )
    except (_UsageError, registry.UnknownModelError, ValueError) as err:
        print(f"vlmfit plan: error: {err}", file=sys.stderr)
        return 2
    result = plan(
        spec,
        gpu,
        text_tokens=a.text_tokens,
        image_size=size,
        finetune=a.finetune,
        vision_no_grad=True if a.vision_no_grad else None,
        margin=a.margin,
        lora_r=a.lora_r,
        effective_batch=a.effective_batch,
        nproc=a.nproc,
        engine=a.engine,
        fused_lora=not a.no_fused_lora,
        activation_offloading=a.activation_offloading,
        autocast=_autocast_arg(a.autocast),
    )
    if a.json:
        print(
            json.dumps(
                {
                    "model": spec.name,
                    "gpu_gib": gpu,
                    "estimate": e.as_dict(),
                    "candidates": [c.row() for c in result[: a.top]],
                    "fits": bool(result),
                    "reason": result.reason,
                }
            )
        )
        return 0 if result else 1
    print(e.table())
    print(f"\nconfigurations that fit {gpu:g} GiB with {a.margin:.0%} margin (best first):")
    if not result:
        print(f"  none: {result.reason}")
        return 1
    cols = [
        "finetune", "micro_batch", "max_image_tokens", "visual_tokens", "gradient_checkpointing",
        "peak_gib", "required_gib", "headroom_gib", "make",
    ]  # fmt: skip
    print(format_rows([c.row() for c in result[: a.top]], cols))
    return 0


def _main() -> int:  # pragma: no cover - python -m vlmfit.memory
    return cli_plan(sys.argv[1:])


__all__ = [
    "Arch",
    "Candidate",
    "Estimate",
    "PlanResult",
    "arch",
    "arch_from_config",
    "cli_plan",
    "estimate",
    "ladder",
    "plan",
    "plot_breakdown",
    "plot_ladder",
    "profile_steps",
    "synthetic_batch",
]

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())


# ---------------------------------------------------------------------------------------------
# During training: refuse what will not fit, explain an OOM, watch growth over steps
# ---------------------------------------------------------------------------------------------


class WontFitError(ValueError):
    """A configuration predicted (or found) not to fit the GPU, with what would."""


def worst_sample(folder) -> tuple[int, int]:
    """(sequence tokens, visual tokens) of the longest sample of a preprocessing cache."""
    from pathlib import Path

    stats = json.loads((Path(folder) / "stats.json").read_text())
    rows = [r for r in stats["sample_stats"] if r.get("status") in ("kept", "shrunk")]
    if not rows:
        return 0, 0
    worst = max(rows, key=lambda r: r["total_after"])
    return int(worst["total_after"]), int(worst["visual_after"])


def _cfg_estimate(cfg, sequence_tokens: int, visual_tokens: int) -> Estimate:
    from vlmfit import distributed, fastpath

    return estimate(
        cfg.spec,
        finetune=cfg.finetune,
        lora_r=cfg.lora_r,
        micro_batch=cfg.per_device_train_batch_size,
        text_tokens=max(0, sequence_tokens - visual_tokens),
        visual_tokens=visual_tokens,
        gradient_checkpointing=cfg.gradient_checkpointing,
        vision_no_grad=fastpath.vision_runs_without_grad(cfg),
        lora_dropout=cfg.lora_dropout > 0,
        kbit_upcast=cfg.qlora_upcast,
        dpo=cfg.method == "dpo",
        qlora_vision_4bit=cfg.qlora_vision_4bit,
        nproc=distributed.world_size(),
        engine=distributed.launch_engine(),
        **_cfg_levers(cfg),
    )


def _cfg_levers(cfg) -> dict[str, Any]:
    """The levers ``cfg``'s run will train with, as the estimator takes them: ``fused_lora``,
    and TRL's offloading and the Trainer's autocast as ``vlmfit.fastpath`` resolves them."""
    from vlmfit import fastpath

    offloads = getattr(fastpath, "offloads_activations", None)
    uses_autocast = getattr(fastpath, "uses_autocast", None)
    return {
        "fused_lora": bool(getattr(cfg, "fused_lora", True)),
        "activation_offloading": bool(
            offloads(cfg) if offloads else getattr(cfg, "activation_offloading", False)
        ),
        "autocast": bool(uses_autocast(cfg) if uses_autocast else getattr(cfg, "autocast", True)),
        "vision_chunk": int(getattr(cfg, "vision_chunk", 0)),
    }


def _advice_line(cfg, gpu_gib: float, sequence_tokens: int, visual_tokens: int) -> str:
    res = plan(
        cfg.spec,
        gpu_gib,
        text_tokens=max(0, sequence_tokens - visual_tokens),
        fused_lora=bool(getattr(cfg, "fused_lora", True)),
        activation_offloading=getattr(cfg, "activation_offloading", None),
        autocast=getattr(cfg, "autocast", None),
    )
    if res:
        return f"what fits {gpu_gib:.0f} GiB: {res[0].make_command()}"
    return res.reason


def check_fits(cfg, sequence_tokens: int, visual_tokens: int, gpu_gib: float | None = None):
    """Before the model loads: refuse ``cfg`` when its predicted peak (with the planner's
    margin and the CUDA context) exceeds the GPU, saying what would fit. Returns the
    estimate; does nothing without CUDA and no ``gpu_gib``.

    ``activation_offloading=None`` is decided here: ``cfg.activation_offloading`` becomes
    True where the run is predicted to fit only with its checkpoints in CPU memory (at
    ``OFFLOAD_SPEED`` of the speed), else False.
    """
    gpu = gpu_gib if gpu_gib is not None else local_gpu_gib()
    if gpu is None:
        return None
    e = _cfg_estimate(cfg, sequence_tokens, visual_tokens)
    need = _required(e, 0.0)
    if getattr(cfg, "activation_offloading", False) is None:
        from vlmfit import distributed

        cfg.activation_offloading = False
        if need > gpu and cfg.gradient_checkpointing and not distributed.sharded():
            cfg.activation_offloading = True
            e_on = _cfg_estimate(cfg, sequence_tokens, visual_tokens)
            if _required(e_on, 0.0) <= gpu:
                print(
                    f"activation_offloading: on (predicted {e.peak_gib:.1f} GiB without it, "
                    f"{e_on.peak_gib:.1f} GiB with it, on a {gpu:.1f} GiB GPU)"
                )
                return e_on
            cfg.activation_offloading = None  # neither fits: the advice searches both
    if need > gpu:
        raise WontFitError(
            f"{cfg.model} {cfg.finetune}, micro-batch {cfg.per_device_train_batch_size}, "
            f"{sequence_tokens} tokens in the longest sample: predicted peak "
            f"{e.peak_gib:.1f} GiB (+ CUDA context: {need:.1f} GiB) > {gpu:.1f} GiB on this GPU. "
            f"{_advice_line(cfg, gpu, sequence_tokens, visual_tokens)} "
            "(memory_check=False trains anyway)"
        )
    return e


def explain_oom(cfg, step: int, sequence_tokens: int, visual_tokens: int) -> WontFitError:
    """A CUDA out-of-memory error as a one-line message: where, predicted, what fits."""
    gpu = local_gpu_gib() or 0.0
    e = _cfg_estimate(cfg, sequence_tokens, visual_tokens)
    return WontFitError(
        f"CUDA out of memory at step {step} ({cfg.model} {cfg.finetune}, micro-batch "
        f"{cfg.per_device_train_batch_size}; predicted peak {e.peak_gib:.1f} GiB, GPU "
        f"{gpu:.1f} GiB). {_advice_line(cfg, gpu, sequence_tokens, visual_tokens) if gpu else ''}"
    )


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

    from vlmfit.runs import MetricsLog

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
