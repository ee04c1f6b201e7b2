"""The user's visual-token budget, and what an image costs under it, for every family."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vlmfit.budget.idefics3 import (
    idefics3_processor_kwargs,
    idefics3_resize,
    idefics3_settings,
    idefics3_tiles,
)
from vlmfit.budget.qwen import qwen_budget_size, qwen_settings, qwen_tokens_at, smart_resize
from vlmfit.models.registry import ModelSpec


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
        s = qwen_settings(spec, budget)
        return {"min_pixels": s["min_pixels"], "max_pixels": s["max_pixels"]}
    return idefics3_processor_kwargs(spec, budget)


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
        return qwen_budget_size(spec, width, height, budget)
    s = idefics3_settings(spec, budget)
    if max(width, height) <= s["longest_edge"]:
        return width, height
    return idefics3_resize(width, height, s["longest_edge"])


def image_tokens(spec: ModelSpec, width: int, height: int, budget: Budget | None = None) -> int:
    """Image-token placeholders the processor produces for a ``width`` x ``height`` image.

    Qwen: ``<|image_pad|>`` count = grid_h * grid_w / 4. Idefics3: ``<image>`` count =
    tiles * tokens-per-tile. With a budget: the cost when the budget is applied the vlmfit
    way (``budget_size`` pre-resize + ``processor_kwargs``). ``vlmfit tokens`` prints it.

    >>> from vlmfit.models import registry
    >>> from vlmfit.budget import Budget, image_tokens
    >>> image_tokens(registry.get("qwen2.5-vl-7b"), 1000, 1000, Budget(max_image_tokens=256))
    256
    """
    if spec.is_qwen:
        if budget is not None and not budget.is_empty():
            width, height = qwen_budget_size(spec, width, height, budget)
        return qwen_tokens_at(width, height, qwen_settings(spec, budget))
    s, _, n_tiles = idefics3_tiles(spec, width, height, budget)
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
    s, (_, _, rows, cols), _ = idefics3_tiles(spec, width, height, budget)
    t = s["tile_tokens"]
    if rows == 0 and cols == 0:
        return t + 3
    row_len = cols * (t + 2) + 1  # tiles + trailing "\n"
    return rows * row_len + (t + 3) + (0 if merges_double_newline else 1)


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
            row["processed_before"] = list(processed_size(spec, width, height, None))
        except ValueError as err:
            row.update(tokens_before=None, tokens_after=None, new_width=None, new_height=None)
            row.update(processed_before=None, error=str(err))
        rows.append(row)
    return rows


def processed_size(
    spec: ModelSpec, width: int, height: int, budget: Budget | None
) -> tuple[int, int]:
    """(w, h) the processor resizes to (Qwen: smart_resize; Idefics3: longest-edge resize)."""
    if spec.is_qwen:
        s = qwen_settings(spec, budget)
        h, w = smart_resize(
            height,
            width,
            s["patch_size"] * s["merge_size"],
            min_pixels=s["min_pixels"],
            max_pixels=s["max_pixels"],
        )
        return w, h
    _, (rw, rh, _, _), _ = idefics3_tiles(spec, width, height, budget)
    return rw, rh
