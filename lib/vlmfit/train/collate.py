"""Video records through TRL's vision-language collator (Qwen2-VL / Qwen2.5-VL SFT).

TRL's ``DataCollatorForVisionLanguageModeling`` hands the processor images only;
:class:`VideoCollator` wraps it and fills in each record's video frames (what it changes: its
docstring). Batches without a video go straight to TRL's collator.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from PIL import Image


def load_frames(paths: list[str]) -> list[Image.Image]:
    """A video's frames, RGB, in the order given (the cache's name order)."""
    from transformers.image_utils import load_image

    return [load_image(p) for p in paths]  # frames vlmfit wrote: no errors to name


def fill_video_parts(messages: list[dict[str, Any]], videos: list[Any]) -> list[dict[str, Any]]:
    """``messages`` (new dicts; the input is left as is) with the n-th empty video part
    holding ``videos[n]``; a count that differs from the parts' raises ValueError."""

    def empty(part: dict[str, Any]) -> bool:
        return part.get("type") == "video" and part.get("video") is None

    lists = [m["content"] for m in messages if isinstance(m.get("content"), list)]
    n = sum(empty(p) for content in lists for p in content)
    if n != len(videos):
        raise ValueError(
            f"{len(videos)} video(s) for {n} video placeholder(s) in the messages: each "
            '{"type": "video"} part takes one video, in order'
        )
    it = iter(videos)
    return [
        {**m, "content": [{**p, "video": next(it)} if empty(p) else p for p in m["content"]]}
        if isinstance(m.get("content"), list)
        else m
        for m in messages
    ]


def videos_kwargs(settings: dict[str, Any], frame_counts: list[int], processor) -> dict[str, Any]:
    """The video processor's settings for one batch's videos (``frame_counts``, in order).

    ``settings``: ``min_pixels`` / ``max_pixels`` (the manifest's ``video_processor_kwargs``)
    and ``fps``, the rate the frames were sampled at.
    """
    fps = settings.get("fps")
    kw: dict[str, Any] = {
        "size": {"shortest_edge": settings["min_pixels"], "longest_edge": settings["max_pixels"]},
        "do_sample_frames": False,
        "video_metadata": [
            {"total_num_frames": n, "fps": fps, "frames_indices": list(range(n))}
            for n in frame_counts
        ],
    }
    valid = getattr(getattr(processor.video_processor, "valid_kwargs", None), "__annotations__", {})
    if "cap_pixels_per_frame" in valid:  # no whole-video pixel cap: preprocessing had none
        kw["cap_pixels_per_frame"] = False
    return kw


class _WithVideosKwargs:
    """The processor, with ``videos_kwargs`` added to its ``apply_chat_template`` calls."""

    def __init__(self, processor, kwargs: dict[str, Any]):
        self.processor = processor
        self.kwargs = kwargs

    def __getattr__(self, name):
        if name in ("processor", "kwargs"):
            raise AttributeError(name)
        return getattr(self.processor, name)

    def apply_chat_template(self, conversation, *args, processor_kwargs=None, **kwargs):
        processor_kwargs = {**(processor_kwargs or {}), "videos_kwargs": self.kwargs}
        return self.processor.apply_chat_template(
            conversation, *args, processor_kwargs=processor_kwargs, **kwargs
        )


class VideoCollator:
    """TRL's vision-language collator for records with ``videos`` (lists of frame paths)
    and ``video_kwargs`` (see :func:`vlmfit.train.load_prepared`).

    For batches that hold a video it changes two things:

    - each record's frames (the cache's ``videos/<n>/000.jpg, 001.jpg, ...``, decoded here, in
      the DataLoader's workers) fill its ``{"type": "video"}`` content parts, in order, where
      the processor's ``apply_chat_template`` takes videos from;
    - that call also gets ``videos_kwargs``: preprocessing's ``video_processor_kwargs`` as
      ``size`` (every saved frame is a fixed point of the video processor's resize, so the
      ``<|video_pad|>`` count is the one preprocessing counted), no frame sampling (the frames
      are the sampled ones) and each video's ``video_metadata`` (its frame count at the
      sampling rate, which Qwen2.5-VL's temporal positions read).

    Everything else is TRL's collator as is: chat template, padding, images, and the
    assistant-only labels (video tokens, like image tokens, get none). Batches without a
    video go straight to it.
    """

    def __init__(self, collator):
        self.collator = collator

    def __getattr__(self, name):  # the wrapped collator's attributes (TRL reads some)
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, examples: list[dict[str, Any]]):
        if not any(e.get("videos") for e in examples):
            return self.collator(examples)
        settings = {tuple(sorted(e["video_kwargs"].items())) for e in examples if e.get("videos")}
        if len(settings) != 1:
            raise ValueError(f"one batch, several video settings: {sorted(settings)}")
        rows, counts = [], []
        for e in examples:
            videos = [load_frames(paths) for paths in e.get("videos") or []]
            counts += [len(v) for v in videos]
            rows.append({**e, "messages": fill_video_parts(e["messages"], videos)})
        processor = self.collator.processor
        kw = videos_kwargs(dict(next(iter(settings))), counts, processor)
        inner = dataclasses.replace(self.collator, processor=_WithVideosKwargs(processor, kw))
        return inner(rows)


def with_videos(collator, dataset):
    """``collator`` for ``dataset``: a :class:`VideoCollator` around it when the records
    carry videos, else ``collator`` itself (the image-only path, unchanged)."""
    if "videos" not in (getattr(dataset, "column_names", None) or []):
        return collator
    processor = getattr(collator, "processor", None)
    if not dataclasses.is_dataclass(collator) or processor is None:
        raise TypeError(
            f"video records need TRL's DataCollatorForVisionLanguageModeling (SFT), "
            f"got {type(collator).__name__}"
        )
    if getattr(processor, "video_processor", None) is None:
        raise RuntimeError(
            f"{type(processor).__name__} has no video processor: transformers builds Qwen2-VL's "
            "with torchvision, which does not import here (see README, 'Video needs "
            "torchvision'); train video records where torchvision imports (the GPU container)"
        )
    return VideoCollator(collator)


__all__ = ["VideoCollator", "fill_video_parts", "load_frames", "videos_kwargs", "with_videos"]
