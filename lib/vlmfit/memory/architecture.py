"""Dimensions and parameter counts of a VLM from its transformers config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vlmfit.models.registry import CONFIG_DIR, ModelSpec


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
        from vlmfit.models import builders as tiny

        cfg = json.loads((tiny.ensure_tiny(spec.name) / "config.json").read_text())
    else:
        cfg = json.loads((CONFIG_DIR / spec.arch_config).read_text())
    return arch_from_config(cfg)
