"""SmolVLM / Idefics3: tiles from transformers' image processor, with a fix for each case its
count gets wrong, and the inverse (a budget -> ``size.longest_edge`` and splitting).

The processor ALWAYS rescales the longest edge to ``size.longest_edge`` (up or down), then
cuts rows x cols tiles plus one global tile of ``image_seq_len`` tokens each. Pre-resizing
cannot lower the cost: a budget acts through processor settings.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

from vlmfit.models.registry import ModelSpec

if TYPE_CHECKING:
    from vlmfit.budget.cost import Budget


def _hf() -> Any:
    """transformers' Idefics3 image-processor module (imported on first use: it loads torch)."""
    from transformers.models.idefics3 import image_processing_pil_idefics3

    return image_processing_pil_idefics3


@functools.cache
def _processor() -> Any:
    return _hf().Idefics3ImageProcessorPil()


def idefics3_resize(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """(w, h) after the processor's first resize (longest edge -> ``longest_edge``, then
    capped at 4096 px), by the processor's own functions."""
    m = _hf()
    h, w = m._resize_output_size_rescale_to_max_len(height, width, max_len=longest_edge)
    h, w = m._resize_output_size_scale_below_upper_bound(h, w, max_len=m.MAX_IMAGE_SIZE)
    return w, h


def idefics3_layout(
    width: int, height: int, *, longest_edge: int, tile: int, do_image_splitting: bool = True
) -> tuple[int, int, int, int]:
    """``(resized_w, resized_h, rows, cols)`` as the Idefics3 image processor produces them.

    ``rows`` x ``cols`` local tiles plus one global tile are encoded; ``rows == cols == 0``
    means a single tile (no splitting, or the image fits in one tile). From the processor's
    ``get_number_of_image_patches``, except where it differs from what processing does
    (``tests/test_budget.py``): it derives the short side of the tile canvas from the resized
    side, processing from the long side rounded up to whole tiles (they differ when the
    resized long side is not a multiple of ``tile``, e.g. ``size.longest_edge=1000``).
    """
    rw, rh = idefics3_resize(width, height, longest_edge)
    settings = {
        "size": {"longest_edge": longest_edge},
        "max_image_size": {"longest_edge": tile},
        "do_image_splitting": do_image_splitting,
    }
    _, rows, cols = _processor().get_number_of_image_patches(height, width, settings)
    if do_image_splitting and max(rw, rh) % tile:  # resize_for_vision_encoder's canvas
        if rw >= rh:
            cw = math.ceil(rw / tile) * tile
            ch = math.ceil(int(cw / (rw / rh)) / tile) * tile
        else:
            ch = math.ceil(rh / tile) * tile
            cw = math.ceil(int(ch * (rw / rh)) / tile) * tile
        rows, cols = (ch // tile, cw // tile) if ch > tile or cw > tile else (0, 0)
    return rw, rh, rows, cols


def idefics3_processor_kwargs(spec: ModelSpec, budget: Budget) -> dict[str, Any]:
    """Idefics3's side of :func:`~vlmfit.budget.processor_kwargs`."""
    p = spec.processor
    tile = p["max_image_size"]["longest_edge"]
    seq = p["image_seq_len"]
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
    kw = idefics3_processor_kwargs(spec, budget) if budget is not None else {}
    return {
        "longest_edge": kw.get("size", p["size"])["longest_edge"],
        "tile": p["max_image_size"]["longest_edge"],
        "tile_tokens": p["image_seq_len"],
        "do_image_splitting": kw.get("do_image_splitting", p.get("do_image_splitting", True)),
    }


def idefics3_tiles(spec: ModelSpec, width: int, height: int, budget: Budget | None):
    """Settings, layout and tiles encoded. A single tile counts 1 here, where the processor's
    ``get_number_of_image_patches`` says 0 patches (it encodes one all the same)."""
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
