"""Padding-free SFT batches: a micro-batch's samples as one row, attention kept within each.

``RunConfig.packing``: :func:`enable` puts a forward pre-hook on the trained model that turns
the collator's padded batch (B x L) into one row of its real tokens (1 x T) just before the
model runs; how: :func:`pack`. SFT only: DPO scores each sequence of a (B, L) batch.
"""

from __future__ import annotations

from typing import Any

import torch

PADDED_KEYS = ("labels", "mm_token_type_ids", "token_type_ids")


def pack(inner, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model inputs of a padded batch as one padding-free row.

    - positions are the model's own, computed on the padded batch, so they restart in each
      sample (Qwen: its 3D multimodal RoPE from ``get_rope_index``), with transformers'
      text-position row in front (``position_ids`` of shape (4, 1, T) for Qwen). From the
      restarts transformers confines attention to each sample (a block-causal mask for SDPA);
    - the first token of each sample is not a target of the previous sample's last token;
    - the attention mask is dropped and the KV cache off: the positions carry the boundaries.

    Images are untouched (their features fill the image tokens in order), so TRL's collator
    and trainer stay as they are; TRL and Unsloth refuse packing with images. On a GPU the
    language model's attention runs as one causal varlen kernel over the row (``fastpath``),
    so no work goes to padding or across samples.

    ``inner`` is the model holding ``get_rope_index`` for Qwen (None or another model:
    1D positions). A batch without a 2D attention mask is returned unchanged."""
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids")
    if mask is None or ids is None or mask.dim() != 2 or mask.shape != ids.shape:
        return kwargs
    keep = mask.bool()
    text = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = dict(kwargs)
    out["input_ids"] = ids[keep][None]
    for key in PADDED_KEYS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.shape == ids.shape:
            out[key] = value[keep][None]
    row = text[keep][None]
    if "labels" in out:
        out["labels"] = out["labels"].masked_fill(row == 0, -100)
    rope = getattr(inner, "get_rope_index", None)
    if rope is not None:
        grids = {
            k: kwargs.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
        }
        if grids["image_grid_thw"] is not None or grids["video_grid_thw"] is not None:
            positions, _ = rope(
                ids, mm_token_type_ids=kwargs.get("mm_token_type_ids"), attention_mask=mask, **grids
            )
            positions = positions[:, keep][:, None]
        else:  # text only: the three rope rows are the text positions
            positions = row[None].expand(3, 1, -1)
        out["position_ids"] = torch.cat([row[None], positions.to(row.dtype)])
    else:
        out["position_ids"] = row
    out["attention_mask"] = None
    out["use_cache"] = False  # transformers reads the boundaries only without a KV cache
    return out


def enable(model, *, varlen: bool = False) -> None:
    """Pack every training forward of ``model`` (a PEFT or transformers model); ``varlen``:
    its language model attends through one causal varlen kernel per packed row (CUDA)."""
    from vlmfit.train import fastpath

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    inner = inner if hasattr(inner, "get_rope_index") else None
    if varlen:
        fastpath.set_packed_attention(model)

    def hook(module, args, kwargs):
        if not module.training or args or kwargs.get("labels") is None:
            return None  # evaluation and generation see the padded batch
        mask = kwargs.get("attention_mask")
        packed = pack(inner, kwargs)
        if varlen and packed is not kwargs:
            lengths = mask.sum(-1).to(torch.int32)
            cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            packed["vlmfit_packed"] = (cu, int(lengths.max()))
        return args, packed

    model.register_forward_pre_hook(hook, with_kwargs=True)
