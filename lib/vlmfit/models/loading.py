"""Loading models and processors, freezing module groups, and PEFT adapters.

One path for all three sources of weights (``hub``, ``tiny``, ``random``): :func:`load_model`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import transformers

from vlmfit.files import atomic_folder
from vlmfit.models.processors import load_processor
from vlmfit.models.registry import ModelSpec


def resolve_source(
    spec: ModelSpec, weights: str, revision: str | None = None
) -> tuple[str | Path, str | None]:
    """Where ``from_pretrained`` reads from, and the revision (None for local folders)."""
    from vlmfit.models import builders

    if spec.tiny:
        return builders.ensure_tiny(spec.name), None
    if weights == "random":
        return builders.ensure_random(spec.name), None
    if weights == "hub":
        return spec.hub_id, revision or spec.revision
    path = Path(weights)  # a local folder with a downloaded / merged model
    if not path.is_dir():
        raise ValueError(f"WEIGHTS must be 'hub', 'random' or an existing folder, got {weights!r}")
    return path, None


def quantization_config(
    kind: str, compute_dtype: torch.dtype, skip_modules: list[str] | tuple[str, ...] = ()
):
    """bitsandbytes 4-bit NF4 with double quantization (QLoRA), or None.

    ``skip_modules``: full module names kept out of 4-bit. transformers matches each from the
    start of a module's full name or as its suffix, so a bare ``"visual"`` would match
    nothing inside ``model.visual``: pass full paths (``qlora_skip_modules``).
    """
    if kind in ("", "none", None):
        return None
    if kind != "nf4":
        raise ValueError(f"unknown quantization {kind!r} (use 'nf4' or 'none')")
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(skip_modules) or None,
    )


def qlora_skip_modules(spec: ModelSpec, *, vision_4bit: bool) -> list[str]:
    """What stays bf16 under QLoRA: the projector and lm_head always (small, precision-
    sensitive, often trained), the frozen vision tower unless ``vision_4bit``."""
    fam = spec.family
    keep = [*fam.projector_modules, "lm_head"]
    if not vision_4bit:
        keep += list(fam.vision_modules)
    return keep


def load_model(
    spec: ModelSpec,
    *,
    weights: str = "hub",
    dtype: torch.dtype = torch.float32,
    quantization: str = "none",
    attn_implementation: str | None = "sdpa",
    device: str | torch.device | None = None,
    path: str | Path | None = None,
    processor_kwargs: dict[str, Any] | None = None,
    revision: str | None = None,
    vision_4bit: bool = True,
):
    """Load (or build) the model and its processor (``processor_kwargs``: image settings).

    One path for all three sources (``weights``):

    - ``hub``: ``from_pretrained(spec.hub_id, revision=spec.revision)`` (the real thing);
    - ``tiny``: a tiny model saved locally by ``vlmfit.models.builders`` and loaded by the
      same ``from_pretrained`` call;
    - ``random``: the published full-size architecture with random weights, built directly
      on the target device (memory and speed do not depend on the weights' values).
    """
    source, revision = (path, None) if path else resolve_source(spec, weights, revision)
    cls = getattr(transformers, spec.family.model_class)
    rev = {"revision": revision} if revision else {}
    processor = load_processor(source, spec.family.name, processor_kwargs, **rev)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    qcfg = quantization_config(
        quantization, dtype, qlora_skip_modules(spec, vision_4bit=vision_4bit)
    )
    if weights == "random" and not spec.tiny and not path and qcfg is not None:
        # Quantize exactly as a real load does: random weights saved once, reloaded in 4-bit.
        source = save_random(spec, dtype=dtype)
        if torch.cuda.is_available():  # building them is set-up, not part of the run's peak
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if weights == "random" and not spec.tiny and not path and qcfg is None:
        config = transformers.AutoConfig.from_pretrained(source)
        if attn_implementation:
            config._attn_implementation = attn_implementation
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(0)  # the same random weights as save_random() (QLoRA) writes
        with target:
            model = cls._from_config(config, dtype=dtype)
    else:
        if qcfg is not None:
            kwargs["quantization_config"] = qcfg
            kwargs["device_map"] = {"": device or 0}
        if revision:
            kwargs["revision"] = revision
        model = cls.from_pretrained(source, **kwargs)
        if device and qcfg is None:
            model.to(device)
    return model, processor


def save_random(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Full-size random weights saved with ``save_pretrained`` (once), for quantized loads."""
    from vlmfit.models import builders

    src = builders.ensure_random(spec.name)
    out = src.parent / f"{src.name}-weights-{str(dtype).split('.')[-1]}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    config = transformers.AutoConfig.from_pretrained(src)
    cls = getattr(transformers, spec.family.model_class)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = cls._from_config(config, dtype=dtype)

    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        load_processor(src, spec.family.name).save_pretrained(tmp)
    return out


def module_groups(model, spec: ModelSpec) -> dict[str, list[str]]:
    """Parameter names per group: vision, projector, language (projector wins over vision)."""
    fam = spec.family
    groups: dict[str, list[str]] = {"vision": [], "projector": [], "language": [], "other": []}
    for name, _ in model.named_parameters():
        clean = name.replace("base_model.model.", "")
        if any(clean.startswith(p) for p in fam.projector_modules):
            groups["projector"].append(name)
        elif any(clean.startswith(p) for p in fam.vision_modules):
            groups["vision"].append(name)
        elif any(clean.startswith(p) for p in fam.language_modules):
            groups["language"].append(name)
        else:
            groups["other"].append(name)
    return groups


def set_trainable(model, spec: ModelSpec, *, vision: bool, projector: bool, language: bool) -> None:
    """Freeze / unfreeze whole module groups (full fine-tuning)."""
    groups = module_groups(model, spec)
    wanted = {"vision": vision, "projector": projector, "language": language, "other": language}
    params = dict(model.named_parameters())
    for group, names in groups.items():
        for n in names:
            params[n].requires_grad_(wanted[group])


def lora_targets(
    model, spec: ModelSpec, *, language: bool = True, vision: bool = False, projector: bool = False
) -> list[str]:
    """Full module names of the linear layers LoRA goes on, per module group.

    The projector gets LoRA on its linear layers rather than PEFT's ``modules_to_save``:
    wrapping the projector module changes its class, and transformers 5 records the
    vision tower's output by module class (Qwen's merger), which the wrapper breaks.
    """
    pattern = re.compile(spec.family.lora_target_regex)
    names = [n for n, m in model.named_modules() if pattern.fullmatch(n)] if language else []
    vis = tuple(spec.family.vision_modules)
    proj = tuple(spec.family.projector_modules)
    for n, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if (
            projector
            and n.startswith(proj)
            or vision
            and n.startswith(vis)
            and not n.startswith(proj)
        ):
            names.append(n)
    if not names:
        raise ValueError(f"no LoRA target modules found for {spec.name}")
    return names
