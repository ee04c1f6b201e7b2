"""Qwen2-VL / Qwen2.5-VL: image tokens from transformers' image processor, and the inverse
(a budget -> ``min_pixels`` / ``max_pixels`` and a pre-resize target that keeps the cost).

``smart_resize`` rescales only when the area leaves ``[min_pixels, max_pixels]``, so the hub
default never downscales ordinary photos (1000x1000 -> 1,296 tokens). Video tokens are
counted here: transformers' video processor needs torchvision, absent from the CPU install.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from vlmfit.models.registry import ModelSpec

if TYPE_CHECKING:
    from vlmfit.budget.cost import Budget

# Constants copied from transformers 5.23 (tests check them against the installed classes).

#: Qwen2VLImageProcessor class defaults, used when a spec leaves a setting out.
QWEN_IMAGE_DEFAULTS: dict[str, int] = {
    "min_pixels": 56 * 56,  # 3,136 px = 4 tokens
    "max_pixels": 28 * 28 * 1280,  # 1,003,520 px = 1,280 tokens (hub configs override this)
    "patch_size": 14,
    "merge_size": 2,
}

#: Qwen2VLVideoProcessor class defaults (video_processing_qwen2_vl.py). Qwen2.5-VL uses the
#: same class. Per-frame pixel limits are much lower than the image ones.
QWEN_VIDEO_DEFAULTS: dict[str, Any] = {
    "min_pixels": 128 * 28 * 28,  # 100,352 px = 128 tokens per frame pair
    "max_pixels": 768 * 28 * 28,  # 602,112 px = 768 tokens per frame pair
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,  # 2 frames share one temporal patch
}


#: The Qwen model cards recommend max_pixels = 1280 * 28 * 28 (and min_pixels = 256 * 28 * 28).
QWEN_CARD_MAX_TOKENS = 1280

#: smart_resize refuses images more elongated than this (a literal in transformers' code).
QWEN_MAX_ASPECT_RATIO = 200


def _hf() -> Any:
    """transformers' Qwen2-VL image-processor module (imported on first use: it loads torch)."""
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl

    return image_processing_pil_qwen2_vl


@functools.cache
def _processor() -> Any:
    return _hf().Qwen2VLImageProcessorPil()


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """transformers' ``smart_resize``: ``(height, width)``, multiples of ``factor``, rescaled
    only when the rounded area leaves ``[min_pixels, max_pixels]``; ``ValueError`` beyond 200:1."""
    return _hf().smart_resize(height, width, factor, min_pixels=min_pixels, max_pixels=max_pixels)


def qwen_pixel_range(settings: dict[str, Any], budget: Budget | None) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of Qwen image or video ``settings`` under ``budget``: the
    one rule for both (``min_image_tokens`` sets the floor; ``max_pixels`` and
    ``max_image_tokens`` lower the cap, per image or per frame)."""
    token_px = (settings["patch_size"] * settings["merge_size"]) ** 2  # 784 px per token
    lo, hi = settings["min_pixels"], settings["max_pixels"]
    if budget is not None:
        if budget.min_image_tokens is not None:
            lo = budget.min_image_tokens * token_px
        if budget.max_pixels is not None:
            hi = min(hi, budget.max_pixels)
        if budget.max_image_tokens is not None:
            hi = min(hi, budget.max_image_tokens * token_px)
    return lo, hi


def qwen_settings(spec: ModelSpec, budget: Budget | None = None) -> dict[str, int]:
    """Effective Qwen image-processor settings: published ones, then the budget's pixel caps."""
    s = {**QWEN_IMAGE_DEFAULTS, **spec.processor}
    s["min_pixels"], s["max_pixels"] = qwen_pixel_range(s, budget)
    if s["max_pixels"] < s["min_pixels"]:
        token_px = (s["patch_size"] * s["merge_size"]) ** 2
        raise ValueError(
            f"budget allows at most {s['max_pixels']} px per image but the processor's "
            f"min_pixels is {s['min_pixels']} px ({s['min_pixels'] // token_px} tokens)"
        )
    return s


def qwen_tokens_at(width: int, height: int, settings: dict[str, int]) -> int:
    """``<|image_pad|>`` tokens for a ``width`` x ``height`` image: the processor's own count."""
    keys = ("min_pixels", "max_pixels", "patch_size", "merge_size")
    patches = _processor().get_number_of_image_patches(
        height, width, {k: settings[k] for k in keys}
    )
    return patches // settings["merge_size"] ** 2


def qwen_budget_size(spec: ModelSpec, width: int, height: int, budget: Budget) -> tuple[int, int]:
    """Qwen target (w, h): multiples of 28, a fixed point of the processor's smart_resize."""
    s = qwen_settings(spec, budget)
    factor = s["patch_size"] * s["merge_size"]  # 28 px
    token_px = factor * factor
    max_px = s["max_pixels"]
    longest = budget.max_longest_edge
    if longest is not None:
        if longest < factor:
            raise ValueError(f"max_longest_edge={longest} is below Qwen's {factor} px grid")
        # An image scaled to longest edge L keeps L * L * (short / long) px: cap the area so
        # smart_resize's own aspect-preserving shrink lands inside the longest edge.
        max_px = min(max_px, int(longest * longest * min(width, height) / max(width, height)))
        max_px = max(max_px, token_px)
    h, w = smart_resize(height, width, factor, min_pixels=s["min_pixels"], max_pixels=max_px)
    # smart_resize keeps each side >= 28 px, so very elongated images can still exceed the
    # cap (e.g. 4000x30 at 64 tokens: 28 x 2576 px = 92 tokens): trim the long side. Rounding
    # can also push the aspect ratio past 200 (6000x30 -> 5992x28 = 214:1), which the
    # processor would then refuse for the pre-resized image: trim that too.
    max_tokens = s["max_pixels"] // token_px
    long_cap = (longest // factor) * factor if longest is not None else None
    while True:
        over_tokens = (h // factor) * (w // factor) > max_tokens
        over_edge = long_cap is not None and max(h, w) > long_cap
        over_ratio = max(h, w) / min(h, w) > QWEN_MAX_ASPECT_RATIO
        if not (over_tokens or over_edge or over_ratio):
            break
        if max(h, w) <= factor:
            raise ValueError(f"budget {budget.describe()} cannot fit even one 28x28 grid cell")
        if h >= w:
            h -= factor
        else:
            w -= factor
    if h * w < s["min_pixels"]:
        raise ValueError(
            f"budget {budget.describe()} leaves {w}x{h} px, below min_pixels={s['min_pixels']}"
        )
    return w, h


def video_frame_size(
    spec: ModelSpec,
    width: int,
    height: int,
    budget: Budget | None = None,
) -> tuple[int, int]:
    """(w, h) every frame is resized to by Qwen2VLVideoProcessor: per-frame smart_resize with
    the VIDEO min/max pixels (vlmfit passes ``cap_pixels_per_frame=False``: no whole-video
    pixel cap)."""
    if not spec.family.supports_video:
        raise ValueError(f"{spec.name} ({spec.family.name}) does not take video")
    v = QWEN_VIDEO_DEFAULTS
    factor = v["patch_size"] * v["merge_size"]
    min_px, max_px = qwen_pixel_range(v, budget)
    h, w = smart_resize(height, width, factor, min_pixels=min_px, max_pixels=max_px)
    return w, h


def video_tokens(
    spec: ModelSpec,
    width: int,
    height: int,
    n_frames: int,
    budget: Budget | None = None,
) -> int:
    """``<|video_pad|>`` tokens for ``n_frames`` frames (after sampling) of ``width`` x ``height``.

    cost = ceil(n_frames / 2) temporal patches (the last frame is repeated to pad)
    x (h' / 28) x (w' / 28) tokens per temporal patch. Budget ``max_image_tokens`` /
    ``max_pixels`` cap each temporal patch. Raises ``ValueError`` for families without video.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    w, h = video_frame_size(spec, width, height, budget)
    v = QWEN_VIDEO_DEFAULTS
    t = v["temporal_patch_size"]
    grid_t = (n_frames + -n_frames % t) // t
    factor = v["patch_size"] * v["merge_size"]
    return grid_t * (h // factor) * (w // factor)
