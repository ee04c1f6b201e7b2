"""The model registry: one entry per supported model, holding all of its quirks.

Everything model-specific (hub id and revision, classes, module groups for freezing and LoRA
targeting, image/video token handling, processor settings, chat template) lives here, so the
rest of vlmfit never branches on a model class. Adding a model is one ``ModelSpec`` in ``MODELS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"

# Chat templates of the hub models (copied from their tokenizer/processor configs),
# used for the tiny offline models; hub models bring their own.
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """What all models of one architecture family share."""

    name: str  # "idefics3" | "qwen2_vl" | "qwen2_5_vl"
    model_class: str  # transformers class name
    processor_class: str
    image_processor_class: str
    # Module groups, as prefixes of ``named_modules()`` names (transformers 5 layout).
    vision_modules: tuple[str, ...]
    projector_modules: tuple[str, ...]
    language_modules: tuple[str, ...]
    # Regex for LoRA on the language model's linear layers (PEFT ``target_modules``).
    lora_target_regex: str
    # Placeholder the chat template writes for one image / video (before expansion).
    image_placeholder: str
    video_placeholder: str | None
    # Token the processor repeats for every visual token, and the template's turn markers;
    # used by the assistant-only loss mask.
    image_token: str
    video_token: str | None
    assistant_header: str  # what precedes an assistant reply
    turn_end: str  # what closes a turn (trained on, so the model learns to stop)
    chat_template: str
    special_tokens: tuple[str, ...]  # for tiny offline tokenizers
    supports_video: bool = False
    pad_token: str = "<|endoftext|>"


IDEFICS3 = Family(
    name="idefics3",
    model_class="Idefics3ForConditionalGeneration",
    processor_class="Idefics3Processor",
    image_processor_class="Idefics3ImageProcessor",
    vision_modules=("model.vision_model",),
    projector_modules=("model.connector",),
    language_modules=("model.text_model", "lm_head"),
    lora_target_regex=r"model\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    image_placeholder="<image>",
    video_placeholder=None,
    image_token="<image>",
    video_token=None,
    assistant_header="Assistant:",
    turn_end="<end_of_utterance>",
    chat_template=IDEFICS3_CHAT_TEMPLATE,
    special_tokens=(
        "<|im_start|>",
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
    ),
    supports_video=False,
)

_QWEN_COMMON: dict[str, Any] = dict(
    processor_class="Qwen2VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    vision_modules=("model.visual",),  # the merger inside it is the projector
    projector_modules=("model.visual.merger",),
    language_modules=("model.language_model", "lm_head"),
    lora_target_regex=r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    video_placeholder="<|vision_start|><|video_pad|><|vision_end|>",
    image_token="<|image_pad|>",
    video_token="<|video_pad|>",
    assistant_header="<|im_start|>assistant\n",
    turn_end="<|im_end|>",
    chat_template=QWEN2_VL_CHAT_TEMPLATE,
    special_tokens=(
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ),
    supports_video=True,
)
QWEN2_VL = Family(name="qwen2_vl", model_class="Qwen2VLForConditionalGeneration", **_QWEN_COMMON)
QWEN2_5_VL = Family(
    name="qwen2_5_vl", model_class="Qwen2_5_VLForConditionalGeneration", **_QWEN_COMMON
)
FAMILIES = {f.name: f for f in (IDEFICS3, QWEN2_VL, QWEN2_5_VL)}

# Qwen's hub preprocessor defaults: no downscaling below ~12.8 MP (the seed pitfall).
QWEN_HUB_PROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2}


@dataclass(frozen=True)
class ModelSpec:
    """One supported model."""

    name: str
    family: Family
    hub_id: str
    revision: str  # pinned hub revision (branch or commit); override with REVISION=
    arch_config: str  # file in models/configs/ with the published architecture (random weights)
    # Image-processor settings as published in the model's preprocessor_config.json.
    processor: dict[str, Any] = field(default_factory=dict)
    params_b: float = 0.0  # total parameters, billions (published)
    tiny: bool = False  # built offline from a config in code

    @property
    def is_qwen(self) -> bool:
        return self.family.name.startswith("qwen")


def _idefics3(longest_edge: int, tile: int, patch: int, scale: int) -> dict[str, Any]:
    return {
        "size": {"longest_edge": longest_edge},
        "max_image_size": {"longest_edge": tile},
        "patch_size": patch,
        "scale_factor": scale,
        "image_seq_len": (tile // patch) ** 2 // scale**2,
        "do_image_splitting": True,
    }


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(
            "smolvlm",
            IDEFICS3,
            "HuggingFaceTB/SmolVLM-256M-Instruct",
            "main",
            "smolvlm-256m.json",
            _idefics3(2048, 512, 16, 4),
            0.256,
        ),
        ModelSpec(
            "smolvlm-500m",
            IDEFICS3,
            "HuggingFaceTB/SmolVLM-500M-Instruct",
            "main",
            "smolvlm-500m.json",
            _idefics3(2048, 512, 16, 4),
            0.507,
        ),
        ModelSpec(
            "smolvlm-2b",
            IDEFICS3,
            "HuggingFaceTB/SmolVLM-Instruct",
            "main",
            "smolvlm-2b.json",
            _idefics3(1536, 384, 14, 3),
            2.25,
        ),
        ModelSpec(
            "qwen2-vl-2b",
            QWEN2_VL,
            "Qwen/Qwen2-VL-2B-Instruct",
            "main",
            "qwen2-vl-2b.json",
            dict(QWEN_HUB_PROCESSOR),
            2.21,
        ),
        ModelSpec(
            "qwen2-vl-7b",
            QWEN2_VL,
            "Qwen/Qwen2-VL-7B-Instruct",
            "main",
            "qwen2-vl-7b.json",
            dict(QWEN_HUB_PROCESSOR),
            8.29,
        ),
        ModelSpec(
            "qwen2.5-vl-3b",
            QWEN2_5_VL,
            "Qwen/Qwen2.5-VL-3B-Instruct",
            "main",
            "qwen2.5-vl-3b.json",
            dict(QWEN_HUB_PROCESSOR),
            3.75,
        ),
        ModelSpec(
            "qwen2.5-vl-7b",
            QWEN2_5_VL,
            "Qwen/Qwen2.5-VL-7B-Instruct",
            "main",
            "qwen2.5-vl-7b.json",
            dict(QWEN_HUB_PROCESSOR),
            8.29,
        ),
        # Tiny offline models: a few layers, built from a config in code (vlmfit.models.builders).
        ModelSpec(
            "tiny-smolvlm",
            IDEFICS3,
            "vlmfit/tiny-smolvlm",
            "local",
            "",
            _idefics3(48, 48, 8, 2),
            tiny=True,
        ),
        ModelSpec(
            "tiny-qwen2-vl",
            QWEN2_VL,
            "vlmfit/tiny-qwen2-vl",
            "local",
            "",
            {"min_pixels": 28 * 28, "max_pixels": 56 * 56, "patch_size": 14, "merge_size": 2},
            tiny=True,
        ),
        ModelSpec(
            "tiny-qwen2.5-vl",
            QWEN2_5_VL,
            "vlmfit/tiny-qwen2.5-vl",
            "local",
            "",
            {"min_pixels": 28 * 28, "max_pixels": 56 * 56, "patch_size": 14, "merge_size": 2},
            tiny=True,
        ),
    )
}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def get(name: str) -> ModelSpec:
    """Look up a model by registry name (or hub id).

    >>> from vlmfit.models import registry
    >>> spec = registry.get("smolvlm")
    >>> spec.family.name, spec.hub_id
    ('idefics3', 'HuggingFaceTB/SmolVLM-256M-Instruct')
    """
    if name in MODELS:
        return MODELS[name]
    for spec in MODELS.values():
        if spec.hub_id == name:
            return spec
    import difflib

    close = difflib.get_close_matches(name, list(MODELS), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}{hint}; choose one of: {', '.join(MODELS)} (or a registered hub id)"
    )


def names(include_tiny: bool = True) -> list[str]:
    return [n for n, m in MODELS.items() if include_tiny or not m.tiny]
