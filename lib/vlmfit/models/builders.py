"""Offline models: tiny ones for tests and the demo, and full-size random-weight ones.

Nothing here downloads. Both kinds are saved with ``save_pretrained`` and loaded back through
the same ``from_pretrained`` path that hub models take (``vlmfit.models.load_model``), so tests
exercise the real loading code. Tiny: :func:`ensure_tiny`; random weights: :func:`random_config`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlmfit.files import atomic_folder
from vlmfit.models.registry import CONFIG_DIR, Family, ModelSpec

# Bump when the tiny builders change: cached tiny models are rebuilt.
TINY_VERSION = "8"
TINY_HIDDEN = int(os.environ.get("VLMFIT_TINY_HIDDEN", 128))  # width of tiny models
TINY_LAYERS = int(os.environ.get("VLMFIT_TINY_LAYERS", 2))  # language-model depth
DEFAULT_CACHE = Path(os.environ.get("VLMFIT_CACHE", Path.home() / ".cache" / "vlmfit"))

# Text the tiny tokenizer is trained on: the bundled dataset's words, chat-template
# words and common English, so typical prompts tokenize into few tokens. Byte-level
# BPE still encodes ANY text (Chinese, emoji) through its 256 byte symbols.
_CORPUS = """
What colour is the shape? What shape is this? Where is the shape? How many shapes are there?
red green blue yellow purple orange circle square triangle left middle right one two three four
User Assistant System user assistant system You are a helpful assistant.
Who are they? What are they doing? Please describe this image. Why is he on the ground?
the a an is are of and to in on with for this that they he she it what who where why how
image video picture photo describe answer question yes no
"""


def _train_tokenizer(family: Family, vocab_size: int = 600):
    """A byte-level BPE tokenizer with the family's special tokens, trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[family.pad_token, *family.special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    extra: dict[str, Any] = {}
    if family.name == "idefics3":
        extra = {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>"}
        extra["extra_special_tokens"] = {
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
        }
    else:
        extra = {"eos_token": "<|im_end|>"}
        extra["extra_special_tokens"] = {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        }
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=family.pad_token,
        additional_special_tokens=[t for t in family.special_tokens if t != family.pad_token],
        model_max_length=4096,
        padding_side="right",
        **extra,
    )


def build_processor(spec: ModelSpec, tokenizer=None):
    """The family's real processor class with ``spec.processor`` image settings."""
    import transformers

    from vlmfit.models.processors import has_torchvision, qwen_image_only

    fam = spec.family
    tokenizer = tokenizer or _train_tokenizer(fam)
    p = spec.processor
    if fam.name == "idefics3":
        ip = transformers.Idefics3ImageProcessorPil(
            size={"longest_edge": p["size"]["longest_edge"]},
            max_image_size={"longest_edge": p["max_image_size"]["longest_edge"]},
            do_image_splitting=p.get("do_image_splitting", True),
        )
        return transformers.Idefics3Processor(
            image_processor=ip,
            tokenizer=tokenizer,
            image_seq_len=p["image_seq_len"],
            chat_template=fam.chat_template,
        )
    ip = transformers.Qwen2VLImageProcessorPil(
        min_pixels=p["min_pixels"],
        max_pixels=p["max_pixels"],
        patch_size=p.get("patch_size", 14),
        merge_size=p.get("merge_size", 2),
    )
    if not has_torchvision():
        return qwen_image_only(ip, tokenizer, chat_template=fam.chat_template)
    return transformers.Qwen2VLProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(),
        chat_template=fam.chat_template,
    )


def _token_ids(tokenizer, family: Family) -> dict[str, int]:
    conv = tokenizer.convert_tokens_to_ids
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family.name == "idefics3":
        ids["image_token_id"] = conv("<image>")
        ids["bos_token_id"] = tokenizer.bos_token_id
    else:
        ids.update(
            image_token_id=conv("<|image_pad|>"),
            video_token_id=conv("<|video_pad|>"),
            vision_start_token_id=conv("<|vision_start|>"),
            vision_end_token_id=conv("<|vision_end|>"),
            bos_token_id=conv("<|endoftext|>"),
        )
    return ids


def tiny_config(spec: ModelSpec, tokenizer):
    """A config of a few layers for the family, with the tokenizer's special ids."""
    import transformers

    fam = spec.family
    ids = _token_ids(tokenizer, fam)
    vocab = len(tokenizer)
    text = dict(
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=4096,
        pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        tie_word_embeddings=False,
    )
    if fam.name == "idefics3":
        p = spec.processor
        vision = dict(
            hidden_size=TINY_HIDDEN,
            intermediate_size=2 * TINY_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=p["max_image_size"]["longest_edge"],
            patch_size=p["patch_size"],
        )
        return transformers.Idefics3Config(
            text_config={"model_type": "llama", **text},
            vision_config=vision,
            scale_factor=p["scale_factor"],
            image_token_id=ids["image_token_id"],
            pad_token_id=ids["pad_token_id"],
            tie_word_embeddings=False,
        )
    # M-RoPE sections (temporal, height, width) sum to head_dim / 2, split 1:1.5:1.5 as in Qwen.
    half = TINY_HIDDEN // text["num_attention_heads"] // 2
    sections = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": sections, "rope_theta": 1e6}
    if fam.name == "qwen2_vl":
        vision = dict(
            depth=2, embed_dim=64, hidden_size=TINY_HIDDEN, num_heads=4, mlp_ratio=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, in_chans=3,
        )  # fmt: skip
        cls = transformers.Qwen2VLConfig
    else:
        vision = dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=TINY_HIDDEN,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3,
            window_size=56, fullatt_block_indexes=[1],
        )  # fmt: skip
        cls = transformers.Qwen2_5_VLConfig
    ids_top = {k: v for k, v in ids.items() if k.endswith("token_id") and "pad" not in k}
    return cls(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        pad_token_id=ids["pad_token_id"],
        **ids_top,
    )


def _strong_positions(model, std: float | None = None):
    """Give a tiny vision tower position embeddings a usable scale (std 0.15, not 0.02).

    At the usual init a 2-layer random ViT's outputs say *what* is in a patch but hardly
    *where*, and a 2-layer language model cannot recover "where" from attention scores
    alone (RoPE moves scores, not values): position questions stayed at chance (1/3)
    in every run. Pretrained towers carry position signals; this gives the tiny one the
    same property. Measured on the shapes dataset (2400 samples, 25 epochs, frozen tower):
    std 0.02 -> position 0.33; 0.15 -> 1.00 with colour 1.00; 0.3 or 1.0 drowns the content
    (colour falls to chance). Families with rotary vision positions (Qwen) are left alone.
    """
    import torch

    std = float(os.environ.get("VLMFIT_TINY_POS_STD", 0.15)) if std is None else std
    emb = getattr(getattr(getattr(model, "model", None), "vision_model", None), "embeddings", None)
    pos = getattr(emb, "position_embedding", None)
    if isinstance(pos, torch.nn.Embedding) and std > 0:
        with torch.no_grad():
            pos.weight.normal_(0.0, std)


def ensure_tiny(name: str, cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Build (once) and return the folder of a tiny model, saved with ``save_pretrained``.

    ``tiny-<family>``: a few layers (hidden 64), a byte-level BPE tokenizer trained here in
    milliseconds, the family's real processor class with small image settings. Usage::

        python -c "from vlmfit.models import builders; print(builders.ensure_tiny('tiny-smolvlm'))"
    """
    import torch
    import transformers

    from vlmfit.models import registry

    spec = registry.get(name)
    if not spec.tiny:
        raise ValueError(f"{name} is not a tiny model")
    tag = f"h{TINY_HIDDEN}l{TINY_LAYERS}p{os.environ.get('VLMFIT_TINY_POS_STD', '0.15')}"
    out = Path(cache_dir or DEFAULT_CACHE) / f"{name}-v{TINY_VERSION}-{tag}-s{seed}"
    if (out / "vlmfit_tiny.json").exists():
        return out

    with atomic_folder(out) as tmp:
        processor = build_processor(spec)
        config = tiny_config(spec, processor.tokenizer)
        torch.manual_seed(seed)
        model = getattr(transformers, spec.family.model_class)(config)
        _strong_positions(model)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "vlmfit_tiny.json").write_text(json.dumps({"name": name, "seed": seed}))
    return out


def random_config(spec: ModelSpec, tokenizer):
    """The published full-size architecture from ``configs/``, special ids remapped.

    ``WEIGHTS=random``: a registered model's published architecture
    (``vlmfit/models/configs/<model>.json``) at full size with random weights, for memory and
    speed measurements. Its special-token ids are remapped to the local tokenizer's ids (all
    below the published vocabulary size), which changes no tensor shape.
    """
    import transformers

    if not spec.arch_config:
        raise ValueError(f"{spec.name} has no architecture config for random weights")
    cfg: dict[str, Any] = json.loads((CONFIG_DIR / spec.arch_config).read_text())
    ids = _token_ids(tokenizer, spec.family)
    for k, v in ids.items():
        if k in cfg or k.endswith("token_id"):
            cfg[k] = v
    cfg.setdefault("text_config", {}).update(
        {k: ids[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    )
    cfg.pop("_source", None)
    model_type = cfg.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **cfg)


def ensure_random(name: str, cache_dir: str | Path | None = None) -> Path:
    """A folder with the full-size config and a local processor (no weights file).

    ``vlmfit.models.load_model`` builds the model from this config with random
    weights directly on the target device (saving billions of random weights would
    only cost disk and time).
    """
    from vlmfit.models import registry

    spec = registry.get(name)
    out = Path(cache_dir or DEFAULT_CACHE) / f"{name}-random-v{TINY_VERSION}"
    if (out / "vlmfit_random.json").exists():
        return out

    with atomic_folder(out) as tmp:
        processor = build_processor(spec)
        config = random_config(spec, processor.tokenizer)
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "vlmfit_random.json").write_text(json.dumps({"name": name}))
    return out
