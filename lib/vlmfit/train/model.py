"""The model a run trains: loaded, frozen or wrapped in PEFT adapters, with the fast-path
levers applied (``build_model``), and its optimizer (``make_optimizer``)."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmfit.config import ConfigError, RunConfig
from vlmfit.train import distributed, fastpath, runs


def _device() -> str:
    return distributed.device()  # cuda:LOCAL_RANK under a launcher


def torch_dtype(cfg: RunConfig) -> torch.dtype:
    """bf16 when asked, or (``bf16=None``) where the GPU supports it; fp32 otherwise."""
    if cfg.bf16 or (
        cfg.bf16 is None and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return torch.float32


def lora_config(cfg: RunConfig, model, spec):
    from peft import LoraConfig

    from vlmfit.models import lora_targets

    targets = lora_targets(
        model,
        spec,
        language=cfg.train_language,
        vision=cfg.train_vision,
        projector=cfg.train_projector,
    )
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights="gaussian" if cfg.init_lora_weights == "gaussian" else True,
        task_type="CAUSAL_LM",
    )


def init_source(cfg: RunConfig) -> tuple[Path | None, Path | None]:
    """(full model folder, adapter folder) of the run DPO starts from."""
    if not cfg.init_adapter:
        return None, None
    p = Path(cfg.init_adapter)
    if not p.exists():
        p = runs.run_dir(cfg.runs_dir, cfg.init_adapter) / "adapter"
    if (p / "adapter" / "adapter_config.json").exists():
        p = p / "adapter"
    if (p / "adapter_config.json").exists():
        return None, p
    if (p / "config.json").exists():
        return p, None
    raise ConfigError(f"init_adapter {cfg.init_adapter!r}: no adapter or model found at {p}")


def build_model(cfg: RunConfig):
    """Load the model, apply freezing / PEFT and the fast-path levers.

    Returns (model, processor); ``model.vlmfit_vision_no_grad`` lists the vision modules
    that run without autograd (``vlmfit.train.fastpath``).
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    from vlmfit.models import load_model, set_trainable

    spec = cfg.spec
    dtype = torch_dtype(cfg)
    full_init, adapter_init = init_source(cfg)
    quant = "nf4" if cfg.finetune == "qlora" else "none"
    model, processor = load_model(
        spec,
        weights=cfg.weights,
        dtype=dtype,
        quantization=quant,
        attn_implementation=cfg.attn_implementation,
        device=_device(),
        path=full_init,
        processor_kwargs=cfg.processor_kwargs,
        revision=cfg.revision,
        vision_4bit=cfg.qlora_vision_4bit,
    )
    if adapter_init is not None and quant == "none":
        # Fold the SFT adapter into the weights: DPO's reference (adapter disabled) is then
        # the SFT model, as DPO intends, with no second copy of the weights.
        model = PeftModel.from_pretrained(model, adapter_init).merge_and_unload()
    if cfg.finetune in ("full", "projector"):
        proj_only = cfg.finetune == "projector"
        set_trainable(
            model,
            spec,
            vision=cfg.train_vision and not proj_only,
            projector=cfg.train_projector or proj_only,
            language=cfg.train_language and not proj_only,
        )
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if quant != "none" and cfg.qlora_upcast:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif cfg.gradient_checkpointing:
            fastpath.prepare_kbit_lean(model, gradient_checkpointing=True)
        if adapter_init is not None and quant != "none":
            model = PeftModel.from_pretrained(model, adapter_init, is_trainable=True)
        else:
            model = get_peft_model(model, lora_config(cfg, model, spec))
    from vlmfit.train import offload

    offloads = fastpath.offloads_layer_inputs(cfg)
    model.vlmfit_offloaded_layers = offload.enable(model) if offloads else 0
    host = fastpath.uses_host_embeddings(cfg)
    model.vlmfit_host_embeddings = offload.host_embeddings(model) if host else 0
    vision_parts: list[str] = []
    if fastpath.vision_runs_without_grad(cfg):
        vision_parts = fastpath.vision_without_autograd(model, spec, cfg.vision_chunk)
    model.vlmfit_vision_no_grad = vision_parts
    model.vlmfit_fused_lora = fastpath.fuse_lora(model) if cfg.fused_lora else 0
    model.vlmfit_packing = None
    if cfg.method == "sft" and cfg.packing is not False:
        from vlmfit.train import packing

        # None: only where the varlen kernel runs (CUDA): on CPU the block mask is slower
        why = fastpath.varlen_available(next(model.parameters()).device)
        if cfg.packing or why is None:
            packing.enable(model, varlen=why is None)
            model.vlmfit_packing = "varlen" if why is None else f"sdpa block mask ({why})"
    model.vlmfit_vision_attention = fastpath.set_vision_attention(model, spec, cfg.vision_attention)
    return model, processor


def make_optimizer(cfg: RunConfig, model):
    """AdamW with a separate learning rate for projector and embeddings (when set)."""
    if cfg.projector_learning_rate is None:
        return None
    spec = cfg.spec
    special = tuple(m.split(".")[-1] for m in spec.family.projector_modules) + ("embed_tokens",)
    fast, base = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (fast if any(s in n for s in special) else base).append(p)
    groups = [{"params": base, "lr": cfg.learning_rate}]
    if fast:
        groups.append({"params": fast, "lr": cfg.projector_learning_rate})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
