"""Activation bytes per token of one decoder layer (``layer_bytes``) and per patch of the
frozen vision tower's forward (``vision_forward_bytes``)."""

from __future__ import annotations

from vlmfit.memory.architecture import Arch
from vlmfit.memory.constants import (
    FULL_FT_H,
    LAYER_ATTN_KV,
    LAYER_ATTN_Q,
    LAYER_LSE_PER_HEAD,
    LAYER_MASK_PER_SEQ,
    LAYER_MLP_I,
    LAYER_NORMS_H,
    LAYER_NORMS_TOKEN,
    LORA_COPIES_H,
    LORA_COPIES_I,
    LORA_COPIES_NO_AUTOCAST,
    LORA_COPIES_Q,
    LORA_DROPOUT_H,
    LORA_DROPOUT_I,
    LORA_DROPOUT_Q,
    LORA_SHARED_H,
    LORA_SHARED_I,
    VISION_AUTOCAST_LN_H,
    VISION_FP32_H,
    VISION_FP32_I,
    VISION_NOGRAD_H,
    VISION_NOGRAD_I,
    VISION_NOGRAD_PIXEL,
)


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
