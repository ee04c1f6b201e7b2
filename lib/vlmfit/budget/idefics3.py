"""SmolVLM / Idefics3 visual tokens, as the image processor counts them.

The processor ALWAYS rescales the longest edge to ``size.longest_edge`` (up or down), cuts
rows x cols tiles plus one global tile, each ``(tile // patch)**2 // scale**2`` tokens.
Pre-resizing cannot lower the cost: a budget acts through processor settings.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vlmfit.models.registry import ModelSpec

if TYPE_CHECKING:
    from vlmfit.budget.cost import Budget

#: Idefics3 never lets a side exceed this after the longest-edge resize (4k).
IDEFICS3_MAX_IMAGE_SIZE = 4096


def idefics3_resize(width: int, height: int, longest_edge: int) -> tuple[int, int]:
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
    rw, rh = idefics3_resize(width, height, longest_edge)
    if not do_image_splitting:
        return rw, rh, 0, 0  # the whole image is squashed into one tile x tile square
    cw, ch = _idefics3_canvas(rw, rh, tile)
    if ch > tile or cw > tile:
        # split_images: (H - T) // T + 1 rows of T px (H is a multiple of T here)
        return rw, rh, (ch - tile) // tile + 1, (cw - tile) // tile + 1
    return rw, rh, 0, 0


def idefics3_processor_kwargs(spec: ModelSpec, budget: Budget) -> dict[str, Any]:
    """Idefics3's side of :func:`~vlmfit.budget.processor_kwargs`."""
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


def idefics3_settings(spec: ModelSpec, budget: Budget | None = None) -> dict[str, Any]:
    p = spec.processor
    tile = p["max_image_size"]["longest_edge"]
    seq = (tile // p["patch_size"]) ** 2 // p["scale_factor"] ** 2  # tokens per tile
    kw = idefics3_processor_kwargs(spec, budget) if budget is not None else {}
    return {
        "longest_edge": kw.get("size", p["size"])["longest_edge"],
        "tile": tile,
        "tile_tokens": seq,
        "do_image_splitting": kw.get("do_image_splitting", p.get("do_image_splitting", True)),
    }


def idefics3_tiles(spec: ModelSpec, width: int, height: int, budget: Budget | None):
    s = idefics3_settings(spec, budget)
    rw, rh, rows, cols = idefics3_layout(
        width,
        height,
        longest_edge=s["longest_edge"],
        tile=s["tile"],
        do_image_splitting=s["do_image_splitting"],
    )
    n_tiles = rows * cols + 1 if rows or cols else 1
    return s, (rw, rh, rows, cols), n_tiles
