"""Visual-token budget: what an image (or video) costs, exactly as the processor counts it.

Every supported family turns an image into a model-specific number of placeholder tokens,
and that number, not the file size, drives memory and step time. This module re-implements
the image processors' size arithmetic (transformers 5.23, checked against the real
``Qwen2VLImageProcessorPil`` / ``Idefics3ImageProcessorPil`` in ``tests/test_budget.py``) and
resizes images to a user budget.

Qwen2-VL / Qwen2.5-VL
    ``smart_resize`` snaps H x W to multiples of 28 px (patch 14 px x spatial merge 2) and
    rescales only when the pixel count leaves ``[min_pixels, max_pixels]``. One visual token
    covers 28 x 28 = 784 px. The hub default ``max_pixels`` is 12,845,056 px (16,384 tokens),
    so the processor does NOT downscale ordinary photos: 1000x1000 -> 1008x1008 -> 1,296
    tokens, a 12 MP phone photo -> 15,552 tokens (the seed pitfall). The budget sets
    ``max_pixels`` and, for exact control, pre-resizes with ``budget_size``.

SmolVLM / Idefics3
    The processor ALWAYS rescales so the longest edge is ``size.longest_edge`` (small
    images are scaled up), stretches each side up to a multiple of the tile
    (``max_image_size.longest_edge``), cuts rows x cols tiles and adds one global tile.
    Every tile costs ``(tile // patch)**2 // scale**2`` ``<image>`` tokens. Pre-resizing
    therefore cannot lower the cost; the budget acts through processor settings
    (``processor_kwargs``: a smaller ``size.longest_edge`` or ``do_image_splitting=False``).

Usage::

    >>> from vlmfit import registry
    >>> from vlmfit.budget import Budget, image_tokens, budget_size, processor_kwargs
    >>> spec = registry.get("qwen2.5-vl-7b")
    >>> image_tokens(spec, 1000, 1000)                       # hub defaults
    1296
    >>> image_tokens(spec, 1000, 1000, Budget(max_image_tokens=256))
    256
    >>> budget_size(spec, 1000, 1000, Budget(max_image_tokens=256))   # (w, h) to resize to
    (448, 448)
    >>> image_tokens(registry.get("smolvlm"), 4032, 3024)    # 3x4 tiles + global, 64 each
    832

Command line::

    python -m vlmfit tokens --model qwen2.5-vl-7b --image 1000x1000 --max-image-tokens 256
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

from vlmfit import registry
from vlmfit.registry import ModelSpec

# ---------------------------------------------------------------------------------------------
# Constants copied from transformers 5.23 (tests read them back from the installed source).
# ---------------------------------------------------------------------------------------------

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

#: Idefics3 never lets a side exceed this after the longest-edge resize (4k).
IDEFICS3_MAX_IMAGE_SIZE = 4096

#: The Qwen model cards recommend max_pixels = 1280 * 28 * 28 (and min_pixels = 256 * 28 * 28).
QWEN_CARD_MAX_TOKENS = 1280

#: Qwen's smart_resize refuses images more elongated than this.
QWEN_MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class Budget:
    """A user budget for visual tokens; every field optional, ``None`` = processor default.

    ``max_image_tokens``: visual tokens per image (Qwen ``<|image_pad|>``, Idefics3 ``<image>``).
    ``max_pixels``: pixels per image after resizing. ``max_longest_edge``: px.
    ``min_image_tokens``: Qwen only (sets ``min_pixels``). ``do_image_splitting``: Idefics3 only.
    Fields that do not apply to a family are ignored for it.
    """

    max_image_tokens: int | None = None
    max_pixels: int | None = None
    max_longest_edge: int | None = None
    min_image_tokens: int | None = None  # Qwen only (min_pixels)
    do_image_splitting: bool | None = None  # Idefics3 only

    def __post_init__(self) -> None:
        for name in ("max_image_tokens", "max_pixels", "max_longest_edge", "min_image_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Budget.{name} must be >= 1, got {value}")
        if (
            self.min_image_tokens is not None
            and self.max_image_tokens is not None
            and self.min_image_tokens > self.max_image_tokens
        ):
            raise ValueError(
                f"Budget.min_image_tokens={self.min_image_tokens} > "
                f"max_image_tokens={self.max_image_tokens}"
            )

    def is_empty(self) -> bool:
        return all(v is None for v in asdict(self).values())

    def describe(self) -> str:
        """The budget as CLI flags, e.g. ``--max-image-tokens 256``."""
        parts = []
        for key, value in asdict(self).items():
            if value is None:
                continue
            flag = "--" + key.replace("_", "-")
            if key == "do_image_splitting":
                parts.append("--image-splitting" if value else "--no-image-splitting")
            else:
                parts.append(f"{flag} {value}")
        return " ".join(parts) or "no budget"


# ---------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL
# ---------------------------------------------------------------------------------------------


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


def _qwen_settings(spec: ModelSpec, budget: Budget | None = None) -> dict[str, int]:
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


def _qwen_tokens_at(spec: ModelSpec, width: int, height: int, settings: dict[str, int]) -> int:
    gh, gw = qwen_grid(
        width,
        height,
        min_pixels=settings["min_pixels"],
        max_pixels=settings["max_pixels"],
        patch_size=settings["patch_size"],
        merge_size=settings["merge_size"],
    )
    return gh * gw // settings["merge_size"] ** 2


def _qwen_budget_size(spec: ModelSpec, width: int, height: int, budget: Budget) -> tuple[int, int]:
    """Qwen target (w, h): multiples of 28, a fixed point of the processor's smart_resize."""
    s = _qwen_settings(spec, budget)
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


# ---------------------------------------------------------------------------------------------
# SmolVLM / Idefics3
# ---------------------------------------------------------------------------------------------


def _idefics3_resize(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """The processor's first resize: longest edge -> ``longest_edge`` (up or down), the other
    side by the aspect ratio, truncated then made even; then capped at 4096 px. Returns (w, h).
    Mirrors ``_resize_output_size_rescale_to_max_len`` + ``..._scale_below_upper_bound``."""
    h, w = height, width
    aspect = w / h
    if w >= h:
        w = longest_edge
        h = int(w / aspect)
        if h % 2 != 0:
            h += 1
    else:
        h = longest_edge
        w = int(h * aspect)
        if w % 2 != 0:
            w += 1
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > IDEFICS3_MAX_IMAGE_SIZE:
        w = IDEFICS3_MAX_IMAGE_SIZE
        h = int(w / aspect)
    elif h > w and h > IDEFICS3_MAX_IMAGE_SIZE:
        h = IDEFICS3_MAX_IMAGE_SIZE
        w = int(h * aspect)
    return max(w, 1), max(h, 1)


def _idefics3_canvas(width: int, height: int, tile: int) -> tuple[int, int]:
    """``resize_for_vision_encoder``: stretch to multiples of ``tile``. Note the short side is
    derived from the ROUNDED long side (int(W' / aspect)), as the processor does; its
    ``get_number_of_image_patches`` helper uses the unrounded side instead (they differ when
    ``size.longest_edge`` is not a multiple of the tile)."""
    aspect = width / height
    if width >= height:
        w = math.ceil(width / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(height / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return w, h


def idefics3_layout(
    width: int, height: int, *, longest_edge: int, tile: int, do_image_splitting: bool = True
) -> tuple[int, int, int, int]:
    """``(resized_w, resized_h, rows, cols)`` as the Idefics3 image processor produces them.

    ``resized_*`` is the size after the longest-edge resize (px). ``rows`` x ``cols`` local
    tiles plus one global tile are encoded; ``rows == cols == 0`` means a single tile (no
    splitting, or the image fits in one tile), which is what the processor reports too.
    """
    rw, rh = _idefics3_resize(width, height, longest_edge)
    if not do_image_splitting:
        return rw, rh, 0, 0  # the whole image is squashed into one tile x tile square
    cw, ch = _idefics3_canvas(rw, rh, tile)
    if ch > tile or cw > tile:
        # split_images: (H - T) // T + 1 rows of T px (H is a multiple of T here)
        return rw, rh, (ch - tile) // tile + 1, (cw - tile) // tile + 1
    return rw, rh, 0, 0


def _idefics3_settings(spec: ModelSpec, budget: Budget | None = None) -> dict[str, Any]:
    p = spec.processor
    tile = p["max_image_size"]["longest_edge"]
    seq = (tile // p["patch_size"]) ** 2 // p["scale_factor"] ** 2  # tokens per tile
    kw = processor_kwargs(spec, budget) if budget is not None else {}
    return {
        "longest_edge": kw.get("size", p["size"])["longest_edge"],
        "tile": tile,
        "tile_tokens": seq,
        "do_image_splitting": kw.get("do_image_splitting", p.get("do_image_splitting", True)),
    }


def _idefics3_tiles(spec: ModelSpec, width: int, height: int, budget: Budget | None):
    s = _idefics3_settings(spec, budget)
    rw, rh, rows, cols = idefics3_layout(
        width,
        height,
        longest_edge=s["longest_edge"],
        tile=s["tile"],
        do_image_splitting=s["do_image_splitting"],
    )
    n_tiles = rows * cols + 1 if rows or cols else 1
    return s, (rw, rh, rows, cols), n_tiles


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def processor_kwargs(spec: ModelSpec, budget: Budget) -> dict[str, Any]:
    """Image-processor overrides implementing ``budget`` for every image.

    Qwen: ``{"min_pixels", "max_pixels"}`` (constructor kwargs of the image processor /
    ``Qwen2VLProcessor.from_pretrained``); a token is 784 px. Longest edge cannot be expressed
    as a processor setting: pre-resize with ``budget_size`` (which also keeps elongated
    images within the token cap, where smart_resize's 28-px minimum side would exceed it).

    Idefics3: ``{"size": {"longest_edge": L}, "max_image_size": {...}, "do_image_splitting"}``
    with L = k * tile, the largest k such that the worst case (a square, k x k tiles + global)
    fits ``max_image_tokens``, L <= ``max_longest_edge`` and L * L <= ``max_pixels``; never
    above the published L. Raises ``ValueError`` if even one tile exceeds the budget.
    """
    if spec.is_qwen:
        s = _qwen_settings(spec, budget)
        return {"min_pixels": s["min_pixels"], "max_pixels": s["max_pixels"]}

    p = spec.processor
    tile = p["max_image_size"]["longest_edge"]
    seq = (tile // p["patch_size"]) ** 2 // p["scale_factor"] ** 2
    split = p.get("do_image_splitting", True)
    if budget.do_image_splitting is not None:
        split = budget.do_image_splitting
    k = max(1, p["size"]["longest_edge"] // tile)  # published: 4 tiles per side (2048 / 512)
    if budget.max_longest_edge is not None:
        k = min(k, max(1, budget.max_longest_edge // tile))  # never below one tile
    if budget.max_pixels is not None:
        k = min(k, max(1, math.isqrt(budget.max_pixels) // tile))
    if budget.max_image_tokens is not None:
        if budget.max_image_tokens < seq:
            raise ValueError(
                f"{spec.name}: max_image_tokens={budget.max_image_tokens} is below one tile "
                f"({seq} tokens); the processor cannot go lower"
            )
        if split:
            # Worst case at L = k * tile is a square: k*k tiles + 1 global (k == 1: one tile).
            while k > 1 and (k * k + 1) * seq > budget.max_image_tokens:
                k -= 1
    longest = k * tile if k * tile < p["size"]["longest_edge"] else p["size"]["longest_edge"]
    return {
        "size": {"longest_edge": longest},
        "max_image_size": {"longest_edge": tile},
        "do_image_splitting": split,
    }


def budget_size(spec: ModelSpec, width: int, height: int, budget: Budget) -> tuple[int, int]:
    """Target ``(w, h)`` to resize an image to before the processor, so it costs <= budget.

    Qwen: multiples of 28 within ``[min_pixels, max_pixels]``, so the processor's own
    smart_resize leaves the image unchanged; aspect ratio kept to within one 28-px grid step
    (unless a side is at the 28-px minimum); never larger than what the processor would make
    of the original anyway. Idefics3: cost is set by ``processor_kwargs``; this returns the
    processor's longest-edge size when that is a downscale (storage saving, same cost) and the
    original size otherwise (never upscales).
    """
    if spec.is_qwen:
        return _qwen_budget_size(spec, width, height, budget)
    s = _idefics3_settings(spec, budget)
    if max(width, height) <= s["longest_edge"]:
        return width, height
    return _idefics3_resize(width, height, s["longest_edge"])


def image_tokens(spec: ModelSpec, width: int, height: int, budget: Budget | None = None) -> int:
    """Image-token placeholders the processor produces for a ``width`` x ``height`` image.

    Qwen: ``<|image_pad|>`` count = grid_h * grid_w / 4. Idefics3: ``<image>`` count =
    tiles * tokens-per-tile. With a budget: the cost when the budget is applied the vlmfit
    way (``budget_size`` pre-resize + ``processor_kwargs``).
    """
    if spec.is_qwen:
        s = _qwen_settings(spec, budget)
        if budget is not None and not budget.is_empty():
            # budget_size returns a fixed point of smart_resize: tokens = (h / 28) * (w / 28)
            w, h = _qwen_budget_size(spec, width, height, budget)
            factor = s["patch_size"] * s["merge_size"]
            return (w // factor) * (h // factor)
        return _qwen_tokens_at(spec, width, height, s)
    s, _, n_tiles = _idefics3_tiles(spec, width, height, budget)
    return n_tiles * s["tile_tokens"]


def image_sequence_tokens(
    spec: ModelSpec,
    width: int,
    height: int,
    budget: Budget | None = None,
    *,
    merges_double_newline: bool = True,
) -> int:
    """All tokens one image adds to the sequence (placeholders plus markup).

    Qwen: ``<|vision_start|>`` + pads + ``<|vision_end|>`` = tokens + 2.

    Idefics3 (``Idefics3Processor.replace_image_token``), T tokens per tile:
    split image, rows x cols: each tile ``<fake_token_around_image><row_i_col_j>`` + T x
    ``<image>`` (T + 2), a ``\\n`` after each row, then ``\\n<fake_token_around_image>
    <global-img>`` + T x ``<image>`` + ``<fake_token_around_image>`` (T + 3). The last row's
    ``\\n`` and the global's ``\\n`` form ``\\n\\n``: one token if the BPE merges it
    (``merges_double_newline=True``; assumed for SmolLM2, not checked offline), two
    otherwise (tokenizers without that merge).
    Single tile: ``<fake><global-img>`` + T + ``<fake>`` = T + 3.
    """
    if spec.is_qwen:
        return image_tokens(spec, width, height, budget) + 2
    s, (_, _, rows, cols), _ = _idefics3_tiles(spec, width, height, budget)
    t = s["tile_tokens"]
    if rows == 0 and cols == 0:
        return t + 3
    row_len = cols * (t + 2) + 1  # tiles + trailing "\n"
    return rows * row_len + (t + 3) + (0 if merges_double_newline else 1)


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


def cost_table(spec: ModelSpec, sizes: list[tuple[int, int]], budget: Budget) -> list[dict]:
    """Per image ``(w, h)``: cost before (processor defaults) and after the budget.

    Keys: width, height, tokens_before, tokens_after, new_width, new_height (what to resize
    to, ``budget_size``), processed_before ([w, h] the processor would feed the encoder
    without a budget) and error (None, or why the processor would refuse the image).
    """
    rows = []
    for width, height in sizes:
        row: dict[str, Any] = {"width": width, "height": height, "error": None}
        try:
            row["tokens_before"] = image_tokens(spec, width, height)
            row["tokens_after"] = image_tokens(spec, width, height, budget)
            row["new_width"], row["new_height"] = budget_size(spec, width, height, budget)
            row["processed_before"] = list(_processed_size(spec, width, height, None))
        except ValueError as err:
            row.update(tokens_before=None, tokens_after=None, new_width=None, new_height=None)
            row.update(processed_before=None, error=str(err))
        rows.append(row)
    return rows


def _processed_size(
    spec: ModelSpec, width: int, height: int, budget: Budget | None
) -> tuple[int, int]:
    """(w, h) the processor resizes to (Qwen: smart_resize; Idefics3: longest-edge resize)."""
    if spec.is_qwen:
        s = _qwen_settings(spec, budget)
        h, w = smart_resize(
            height,
            width,
            s["patch_size"] * s["merge_size"],
            min_pixels=s["min_pixels"],
            max_pixels=s["max_pixels"],
        )
        return w, h
    _, (rw, rh, _, _), _ = _idefics3_tiles(spec, width, height, budget)
    return rw, rh


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # return exit 2 from cli_tokens instead of sys.exit
        raise _UsageError(message)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(p) for p in text.lower().split("x"))
    except ValueError:
        msg = f"--image must look like WIDTHxHEIGHT (e.g. 1000x1000), got {text!r}"
        raise _UsageError(msg) from None
    if w < 1 or h < 1:
        raise _UsageError(f"--image sides must be >= 1 px, got {text!r}")
    return w, h


def _describe(spec: ModelSpec, w: int, h: int, budget: Budget | None) -> tuple[str, dict]:
    """One human-readable clause and a JSON-able dict for one (image, budget)."""
    tokens = image_tokens(spec, w, h, budget)
    info: dict[str, Any] = {"tokens": tokens}
    if spec.is_qwen:
        if budget is not None and not budget.is_empty():
            pw, ph = budget_size(spec, w, h, budget)
        else:
            pw, ph = _processed_size(spec, w, h, None)
        info.update(resized=[pw, ph], grid=[ph // 28, pw // 28])
        text = f"to {pw}x{ph}; grid {ph // 28}x{pw // 28}"
    else:
        s, (rw, rh, rows, cols), n = _idefics3_tiles(spec, w, h, budget)
        info.update(resized=[rw, rh], rows=rows, cols=cols, tiles=n, tile_tokens=s["tile_tokens"])
        layout = f"{rows}x{cols} tiles + global" if rows or cols else f"one {s['tile']} px tile"
        text = f"to {rw}x{rh}; {layout} = {n} x {s['tile_tokens']} tokens"
    info["sequence_tokens"] = image_sequence_tokens(spec, w, h, budget)
    return text, info


def add_budget_arguments(parser) -> None:
    """The budget options shared by ``vlmfit tokens`` and ``vlmfit preprocess``."""
    parser.add_argument("--max-image-tokens", type=int, help="visual tokens per image")
    parser.add_argument("--max-pixels", type=int, help="pixels per image after resizing")
    parser.add_argument("--max-longest-edge", type=int, help="px")
    parser.add_argument("--min-image-tokens", type=int, help="Qwen only (min_pixels)")
    # Idefics3's image splitting into tiles (``--split`` in preprocess names the dataset split)
    tiles = parser.add_mutually_exclusive_group()
    tiles.add_argument(
        "--image-splitting", dest="do_image_splitting", action="store_true", default=None
    )
    tiles.add_argument("--no-image-splitting", dest="do_image_splitting", action="store_false")


def budget_from_args(args) -> Budget:
    return Budget(
        max_image_tokens=args.max_image_tokens,
        max_pixels=args.max_pixels,
        max_longest_edge=args.max_longest_edge,
        min_image_tokens=args.min_image_tokens,
        do_image_splitting=args.do_image_splitting,
    )


def cli_tokens(argv: list[str]) -> int:
    """``python -m vlmfit tokens --model MODEL --image WxH [budget flags] [--json]``.

    Prints the cost at the processor's defaults and, with a budget, after it. The last line
    is always ``tokens: N`` (the final count). Exit 2 on a usage error or unknown model.
    """
    parser = _Parser(prog="vlmfit tokens", description=cli_tokens.__doc__)
    parser.add_argument("--model", required=True, help="registry name or hub id")
    parser.add_argument("--image", required=True, help="WIDTHxHEIGHT in px, e.g. 1000x1000")
    add_budget_arguments(parser)
    parser.add_argument("--video-frames", type=int, help="frames (after sampling); Qwen only")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    try:
        args = parser.parse_args(argv)
        w, h = _parse_size(args.image)
        spec = registry.get(args.model)
        budget = budget_from_args(args)
    except (_UsageError, registry.UnknownModelError, ValueError) as err:
        print(f"vlmfit tokens: error: {err}", file=sys.stderr)
        return 2

    try:
        if args.video_frames is not None:
            return _cli_video(spec, w, h, args.video_frames, budget, args.json)
        text, before = _describe(spec, w, h, None)
        after_text, after = _describe(spec, w, h, budget) if not budget.is_empty() else ("", None)
    except ValueError as err:
        print(f"vlmfit tokens: error: {spec.name} {w}x{h}: {err}", file=sys.stderr)
        return 2

    final = after if after is not None else before
    if args.json:
        out = {
            "model": spec.name,
            "family": spec.family.name,
            "width": w,
            "height": h,
            "tokens": final["tokens"],
            "tokens_before": before["tokens"],
            "before": before,
            "budget": {k: v for k, v in asdict(budget).items() if v is not None},
            "after": after,
            "processor_kwargs": processor_kwargs(spec, budget),
            "budget_size": list(budget_size(spec, w, h, budget)) if after else None,
        }
        print(json.dumps(out))
        return 0
    print(
        f"{spec.name} {w}x{h}: {before['tokens']} visual tokens (resized by the processor {text})"
    )
    if after is not None:
        nw, nh = budget_size(spec, w, h, budget)
        how = (
            f"resize to {nw}x{nh} before the processor (budget_size)"
            if spec.is_qwen
            else f"processor kwargs {processor_kwargs(spec, budget)}"
        )
        where = (
            f"at {after['resized'][0]}x{after['resized'][1]}"
            if spec.is_qwen
            else f"({after_text.replace('to ', 'resized to ', 1)})"
        )
        print(f"  -> {after['tokens']} tokens {where} with {budget.describe()} ({how})")
    elif spec.is_qwen and before["tokens"] > QWEN_CARD_MAX_TOKENS:
        s = _qwen_settings(spec)
        print(
            f"  note: Qwen's processor only downscales above max_pixels={s['max_pixels']} px "
            f"({s['max_pixels'] // 784} tokens); the model card suggests <= "
            f"{QWEN_CARD_MAX_TOKENS}: cap it with --max-image-tokens"
        )
    print(f"  sequence: {final['sequence_tokens']} tokens including markup")
    print(f"tokens: {final['tokens']}")
    return 0


def _cli_video(
    spec: ModelSpec, w: int, h: int, n_frames: int, budget: Budget, as_json: bool
) -> int:
    tokens = video_tokens(spec, w, h, n_frames, budget)
    fw, fh = video_frame_size(spec, w, h, n_frames, budget)
    grid_t = math.ceil(n_frames / QWEN_VIDEO_DEFAULTS["temporal_patch_size"])
    if as_json:
        print(
            json.dumps(
                {
                    "model": spec.name,
                    "width": w,
                    "height": h,
                    "frames": n_frames,
                    "tokens": tokens,
                    "frame_size": [fw, fh],
                    "grid": [grid_t, fh // 28, fw // 28],
                }
            )
        )
        return 0
    print(
        f"{spec.name} video {w}x{h} x {n_frames} frames: {tokens} visual tokens "
        f"(frames resized to {fw}x{fh}; {grid_t} temporal patches x {fh // 28}x{fw // 28})"
    )
    print(f"tokens: {tokens}")
    return 0
