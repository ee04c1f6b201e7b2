"""Visual-token budget: what an image (or video) costs, exactly as the processor counts it.

Per family (``qwen``, ``idefics3``): the processor's own counts, a fix where they differ from
processing, and the inverse, budget to processor settings (checked against the real processors
in ``tests/test_budget.py``); ``cost``: the user's :class:`Budget` and its resize targets.
"""

from vlmfit.budget.cost import (
    Budget,
    budget_size,
    cost_table,
    image_sequence_tokens,
    image_tokens,
    processor_kwargs,
)
from vlmfit.budget.idefics3 import idefics3_layout
from vlmfit.budget.qwen import (
    QWEN_CARD_MAX_TOKENS,
    QWEN_IMAGE_DEFAULTS,
    QWEN_MAX_ASPECT_RATIO,
    QWEN_VIDEO_DEFAULTS,
    qwen_pixel_range,
    smart_resize,
    video_frame_size,
    video_tokens,
)

__all__ = [
    "QWEN_CARD_MAX_TOKENS",
    "QWEN_IMAGE_DEFAULTS",
    "QWEN_MAX_ASPECT_RATIO",
    "QWEN_VIDEO_DEFAULTS",
    "Budget",
    "budget_size",
    "cost_table",
    "idefics3_layout",
    "image_sequence_tokens",
    "image_tokens",
    "processor_kwargs",
    "qwen_pixel_range",
    "smart_resize",
    "video_frame_size",
    "video_tokens",
]
