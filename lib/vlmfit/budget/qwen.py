"""Qwen2-VL / Qwen2.5-VL visual tokens, image and video, as the processors count them.

``smart_resize`` snaps H x W to multiples of 28 px (patch 14 x merge 2) and rescales only
when the area leaves ``[min_pixels, max_pixels]``: one token per 28 x 28 px. The hub default
``max_pixels`` (16,384 tokens) never downscales ordinary photos (1000x1000 -> 1,296 tokens),
so a budget sets ``max_pixels`` and pre-resizes with ``budget_size``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vlmfit.models.registry import ModelSpec

if TYPE_CHECKING:
    from vlmfit.budget.cost import Budget

# Constants copied from transformers 5.23 (tests read them back from the installed source).

#: Qwen2VLImageProcessor class defaults, used when a spec leaves a setting out.
QWEN_IMAGE_DEFAULTS: dict[str, int] = {
    "min_pixels": 56 * 56,  # 3,136 px = 4 tokens
    "max_pixels": 28 * 28 * 1280,  # 1,003,520 px = 1,280 tokens (hub configs override this)
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
}

#: Qwen2VLVideoProcessor class defaults (video_processing_qwen2_vl.py). Qwen2.5-VL uses the
#: same class. Per-frame pixel limits are much lower than the image ones.
QWEN_VIDEO_DEFAULTS: dict[str, Any] = {
    "min_pixels": 128 * 28 * 28,  # 100,352 px = 128 tokens per frame pair
    "max_pixels": 768 * 28 * 28,  # 602,112 px = 768 tokens per frame pair
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,  # 2 frames share one temporal patch
    "min_frames": 4,
    "max_frames": 768,
    # cap_pixels_per_frame=None behaves as False in 5.23 (with a warning): no total bound.
    "cap_pixels_per_frame": False,
    "max_video_tokens": 128000,
}


#: The Qwen model cards recommend max_pixels = 1280 * 28 * 28 (and min_pixels = 256 * 28 * 28).
QWEN_CARD_MAX_TOKENS = 1280

#: Qwen's smart_resize refuses images more elongated than this.
QWEN_MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """Qwen2-VL's ``smart_resize``, re-implemented operation for operation.

    Returns ``(height, width)`` in px, both multiples of ``factor`` (28 px = patch 14 x merge
    2). Sides are rounded to the nearest multiple; only when the rounded area leaves
    ``[min_pixels, max_pixels]`` is the image rescaled (floor when shrinking, ceil when
    growing). Images inside the range are NOT downscaled. Raises ``ValueError`` for aspect
    ratios above 200, like the processor.
    """
    if max(height, width) / min(height, width) > QWEN_MAX_ASPECT_RATIO:
        raise ValueError(
            "absolute aspect ratio must be smaller than 200, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)  # linear shrink factor
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))  # linear growth factor
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_grid(
    width: int,
    height: int,
    *,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = 14,
    merge_size: int = 2,
) -> tuple[int, int]:
    """``(grid_h, grid_w)`` in 14-px patches, as the processor's ``image_grid_thw[1:]``.

    Visual tokens = grid_h * grid_w / merge_size**2 (2x2 patches merge into one token).
    """
    factor = patch_size * merge_size
    h, w = smart_resize(height, width, factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return h // patch_size, w // patch_size


def qwen_settings(spec: ModelSpec, budget: Budget | None = None) -> dict[str, int]:
    """Effective Qwen image-processor settings: published ones, then the budget's pixel caps."""
    s = {**QWEN_IMAGE_DEFAULTS, **spec.processor}
    token_px = (s["patch_size"] * s["merge_size"]) ** 2  # 784 px per visual token
    if budget is not None:
        if budget.min_image_tokens is not None:
            s["min_pixels"] = budget.min_image_tokens * token_px
        caps = [s["max_pixels"]]
        if budget.max_pixels is not None:
            caps.append(budget.max_pixels)
        if budget.max_image_tokens is not None:
            caps.append(budget.max_image_tokens * token_px)
        s["max_pixels"] = min(caps)
        if s["max_pixels"] < s["min_pixels"]:
            raise ValueError(
                f"budget allows at most {s['max_pixels']} px per image but the processor's "
                f"min_pixels is {s['min_pixels']} px ({s['min_pixels'] // token_px} tokens)"
            )
    return s


def qwen_tokens_at(spec: ModelSpec, width: int, height: int, settings: dict[str, int]) -> int:
    gh, gw = qwen_grid(
        width,
        height,
        min_pixels=settings["min_pixels"],
        max_pixels=settings["max_pixels"],
        patch_size=settings["patch_size"],
        merge_size=settings["merge_size"],
    )
    return gh * gw // settings["merge_size"] ** 2


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


def sampled_frames(
    total_frames: int,
    video_fps: float | None = None,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int = QWEN_VIDEO_DEFAULTS["min_frames"],
    max_frames: int = QWEN_VIDEO_DEFAULTS["max_frames"],
    temporal_patch_size: int = QWEN_VIDEO_DEFAULTS["temporal_patch_size"],
) -> int:
    """Frames Qwen2VLVideoProcessor.sample_frames keeps (``do_sample_frames=True``).

    ``num_frames`` is rounded to a multiple of the temporal patch (2); ``fps`` samples
    duration * fps frames, clamped to [min_frames, min(max_frames, total)] and floored to a
    multiple of 2. Neither given: all ``total_frames`` (the 5.23 default, do_sample_frames
    False).
    """
    if fps is not None and num_frames is not None:
        raise ValueError("`num_frames` and `fps` are mutually exclusive")
    if num_frames is not None:
        n = round(num_frames / temporal_patch_size) * temporal_patch_size
    elif fps is not None:
        if video_fps is None:
            raise ValueError("sampling by fps needs the video's own fps")
        cap = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
        n = total_frames / video_fps * fps
        n = min(max(n, min_frames), cap, total_frames)
        n = math.floor(n / temporal_patch_size) * temporal_patch_size
    else:
        return total_frames
    if n > total_frames:
        raise ValueError(f"cannot sample {n} frames from a {total_frames}-frame video")
    return int(n)


def video_frame_size(
    spec: ModelSpec,
    width: int,
    height: int,
    n_frames: int,
    budget: Budget | None = None,
    *,
    cap_pixels_per_frame: bool | None = None,
) -> tuple[int, int]:
    """(w, h) every frame is resized to by Qwen2VLVideoProcessor (per-frame smart_resize with
    the VIDEO min/max pixels; with ``cap_pixels_per_frame`` an even share of
    0.9 * max_video_tokens tokens' worth of pixels per frame, floored at 1.05 * min_pixels)."""
    if not spec.family.supports_video:
        raise ValueError(f"{spec.name} ({spec.family.name}) does not take video")
    v = {**QWEN_VIDEO_DEFAULTS, **spec.processor.get("video", {})}
    factor = v["patch_size"] * v["merge_size"]
    min_px, max_px = v["min_pixels"], v["max_pixels"]
    if budget is not None:
        if budget.min_image_tokens is not None:
            min_px = budget.min_image_tokens * factor * factor
        if budget.max_pixels is not None:
            max_px = min(max_px, budget.max_pixels)
        if budget.max_image_tokens is not None:
            max_px = min(max_px, budget.max_image_tokens * factor * factor)
    cap = v["cap_pixels_per_frame"] if cap_pixels_per_frame is None else cap_pixels_per_frame
    if cap:
        total_px = int(v["max_video_tokens"] * factor * factor * 0.9)
        max_px = max(
            min(max_px, total_px * v["temporal_patch_size"] // n_frames), int(min_px * 1.05)
        )
    h, w = smart_resize(height, width, factor, min_pixels=min_px, max_pixels=max_px)
    return w, h


def video_tokens(
    spec: ModelSpec,
    width: int,
    height: int,
    n_frames: int,
    budget: Budget | None = None,
    *,
    cap_pixels_per_frame: bool | None = None,
) -> int:
    """``<|video_pad|>`` tokens for ``n_frames`` frames (after sampling) of ``width`` x ``height``.

    cost = ceil(n_frames / 2) temporal patches (the last frame is repeated to pad)
    x (h' / 28) x (w' / 28) tokens per temporal patch. Budget ``max_image_tokens`` /
    ``max_pixels`` cap each temporal patch. Raises ``ValueError`` for families without video.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    w, h = video_frame_size(
        spec, width, height, n_frames, budget, cap_pixels_per_frame=cap_pixels_per_frame
    )
    v = {**QWEN_VIDEO_DEFAULTS, **spec.processor.get("video", {})}
    t = v["temporal_patch_size"]
    grid_t = (n_frames + -n_frames % t) // t
    factor = v["patch_size"] * v["merge_size"]
    return grid_t * (h // factor) * (w // factor)
