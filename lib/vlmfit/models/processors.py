"""Processor loading that works with and without torchvision.

Where torchvision does not import, Qwen models get :class:`Qwen2VLImageOnlyProcessor` (why:
its docstring): images work exactly as before; videos need torchvision.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import transformers
from transformers import ProcessorMixin, Qwen2VLProcessor


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL / Qwen2.5-VL processor without a video processor (no torchvision).

    transformers 5 builds Qwen2-VL's video processor with torchvision. On a CPU-only
    machine whose torch is a local CPU build, PyPI's torchvision does not import, so
    ``AutoProcessor`` fails for Qwen models; vlmfit then uses this processor (images work
    exactly as before; videos need torchvision, as in the GPU container).
    """

    attributes = ["image_processor", "tokenizer"]  # older 5.x releases read this list
    video_processor_class = None

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = None

    def save_pretrained(self, save_directory, **kwargs):
        out = super().save_pretrained(save_directory, **kwargs)
        # Saved under the standard class name, so hosts with torchvision load it normally.
        cfg = Path(save_directory) / "processor_config.json"
        if cfg.exists():
            cfg.write_text(cfg.read_text().replace("Qwen2VLImageOnlyProcessor", "Qwen2VLProcessor"))
        return out


def qwen_image_only(image_processor, tokenizer, chat_template=None) -> Qwen2VLImageOnlyProcessor:
    return Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=chat_template)


def load_processor(path: str | Path, family: str, image_kwargs: dict | None = None, **kwargs):
    """``AutoProcessor.from_pretrained`` with the image-only fallback for Qwen.

    ``image_kwargs`` override the image processor's settings (the visual-token budget
    from preprocessing: Qwen ``min_pixels`` / ``max_pixels``, Idefics3 ``size``...).
    """
    if family.startswith("qwen") and not has_torchvision():
        tok = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
        # AutoImageProcessor itself needs torchvision in some 5.x releases: name the PIL class.
        ip = transformers.Qwen2VLImageProcessorPil.from_pretrained(
            path, **kwargs, **(image_kwargs or {})
        )
        return qwen_image_only(ip, tok, chat_template=getattr(tok, "chat_template", None))
    processor = transformers.AutoProcessor.from_pretrained(path, **kwargs)
    if image_kwargs:
        processor.image_processor = transformers.AutoImageProcessor.from_pretrained(
            path, **kwargs, **image_kwargs
        )
    return processor
