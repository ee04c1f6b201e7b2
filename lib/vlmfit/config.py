"""Run configuration: one dataclass, field names as in TRL / PEFT / transformers.

RunConfig is the one source of defaults: callers pass only what the user set and
:func:`resolve` fills the rest, records where each value came from, and fails before any
model loads (:func:`validate`) with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmfit.models import registry


class ConfigError(ValueError):
    """A configuration that cannot run, found before any model loads."""


class ConfigWarning(UserWarning):
    """A configuration key under an old name, read under its new one."""


class _ByMethod:
    """The default of a field that depends on ``method``: its value in METHOD_DEFAULTS."""

    def __repr__(self) -> str:
        return "by method"


BY_METHOD: Any = _ByMethod()
#: The defaults that differ between SFT and DPO (fields whose default is BY_METHOD).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {
        "data": "data/shapes/sft_train.json",
        "preference_eval_data": None,
        "learning_rate": 2e-4,
    },
    "dpo": {
        "data": "data/shapes/dpo_train.json",
        "preference_eval_data": "data/shapes/dpo_test.json",
        "learning_rate": 5e-5,  # DPO moves a trained policy: a smaller step than SFT's
    },
}
#: Keys of earlier versions -> today's field (runs' config.json, overrides, notebooks).
RENAMED = {"warmup_ratio": "warmup_steps"}


@dataclass
class RunConfig:
    # What
    model: str = "smolvlm"  # registry name (vlmfit.models.registry); tiny-* run offline
    weights: str = "hub"  # hub | random (published architecture, random weights) | a local folder
    revision: str | None = None  # hub revision (commit sha) overriding the registry's pin
    method: Literal["sft", "dpo"] = "sft"  # sft | dpo
    data: str = BY_METHOD  # any supported format (vlmfit.data.formats); the bundled shapes
    eval_data: str | None = "data/shapes/sft_test.json"  # held-out split for generation eval
    dataset_split: str = (
        "train"  # split of DATA read for training (folders, DatasetDicts; a file is read whole)
    )
    eval_split: str = "test"  # split of EVAL_DATA / PREFERENCE_EVAL_DATA when they are folders
    preference_eval_data: str | None = BY_METHOD  # DPO: held-out pairs for reward accuracy
    run: str | None = None  # run id: runs/<run>/ (default: <method>-<model>)
    runs_dir: str = "runs"  # folder of run folders
    init_adapter: str | None = None  # DPO: start from this SFT run's adapter (run id or folder)
    # How much trains
    finetune: Literal["lora", "qlora", "full", "projector"] = "lora"  # qlora: 4-bit NF4, CUDA
    train_vision: bool = False  # vision tower (LoRA on it with lora/qlora; full weights with full)
    train_projector: bool = False  # projector / connector (fully trained, saved with the adapter)
    train_language: bool = True  # language model (LoRA or full)
    lora_r: int = 16  # LoRA rank: adapter size and capacity
    lora_alpha: int = 32  # LoRA scale (alpha / r multiplies the update)
    lora_dropout: float = 0.0  # 0: no dropout pass per adapter (faster); 0.05 regularises
    use_dora: bool = False  # DoRA: +quality at low rank, ~1.3-2x slower steps
    use_rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r)
    init_lora_weights: Literal["default", "gaussian"] = "default"  # default: B = 0
    # Optimisation (transformers.TrainingArguments names)
    learning_rate: float = BY_METHOD  # peak learning rate (cosine schedule after warm-up)
    projector_learning_rate: float | None = None  # separate LR for embeddings / projector
    num_train_epochs: float = 1.0  # passes over the training data (when max_steps is -1)
    max_steps: int = -1  # optimizer steps (-1: num_train_epochs passes)
    per_device_train_batch_size: int = 4  # micro-batch; memory grows with it
    gradient_accumulation_steps: int = 1  # effective batch = micro-batch x this, no extra memory
    warmup_steps: float = 0.05  # learning-rate warm-up: < 1 a share of the steps, else steps
    lr_scheduler_type: str = "cosine"  # transformers scheduler name: cosine, linear, constant...
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    gradient_checkpointing: bool = True  # True reduces activation memory, ~20-30% slower
    # Fast-path levers (vlmfit.train.fastpath; what each buys: docs/benchmarks.md)
    vision_no_grad: bool = True  # frozen vision tower without autograd: exact, less memory, faster
    qlora_vision_4bit: bool = True  # QLoRA: frozen vision tower in 4-bit (-1 GiB on 7B)
    qlora_upcast: bool = False  # True: PEFT's kbit prep: fp32 unquantized weights (more GiB)
    activation_offloading: bool | None = None  # layer inputs on CPU; None: if peak -5% or to fit
    host_embeddings: bool | None = None  # frozen input embeddings on CPU (7B -1 GiB); None: as ^
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention | flash_attention_2
    vision_attention: Literal["varlen", "sdpa"] = "varlen"  # Qwen: all windows in 1 kernel, not 81
    vision_chunk: int = (
        32  # frozen tiled tower (SmolVLM): N tiles a pass, peak flat in batch; 0: all
    )
    fused_lora: bool = True  # LoRA as one addmm on the bf16 input: no fp32 copies per layer
    packing: bool | None = None  # SFT: a batch as 1 padding-free row; None: where varlen runs
    sync_free: bool = True  # metrics stay on the GPU between logs; False: TRL's ~7 syncs a step
    uint8_pixels: bool = True  # SmolVLM SFT: tiles cross as uint8, normalized on the device
    autocast: bool | None = None  # bf16 autocast; None: off for fused LoRA (casts done), else on
    memory_check: bool = True  # refuse before loading a config predicted not to fit this GPU
    expandable_segments: bool = True  # CUDA allocator grows segments: less fragmentation
    train_sampling_strategy: str = "group_by_length"  # less padding; "random": plain shuffling
    dataloader_prefetch_factor: int = 2  # batches each worker prepares ahead (with workers > 0)
    bf16: bool | None = None  # None: on when the GPU supports it
    seed: int = 0  # seeds data order and initialisation
    logging_steps: int = 5  # metrics.jsonl gets a line every N optimizer steps
    save_steps: int = 50  # checkpoint every N optimizer steps (resume with RESUME=1)
    save_total_limit: int = 2  # checkpoints kept (oldest deleted)
    resume: bool = False  # True: continue this run from its last checkpoint (RESUME=1)
    overwrite: bool = False  # True: replace runs/<run>/ when it holds a run (OVERWRITE=1)
    # DPO
    beta: float = 0.1  # DPO temperature: higher stays closer to the reference
    # Data on a budget (vlmfit.budget.Budget)
    max_image_tokens: int | None = None  # visual tokens per image (None: the processor default)
    max_length: int = 2048  # tokens per sample, text + visual, after the chat template
    overlength: Literal["drop", "shrink"] = "drop"  # over max_length: drop, or shrink images
    processor_kwargs: dict[str, Any] = field(default_factory=dict)  # from preprocessing's manifest
    # Evaluation
    eval_max_new_tokens: int = 16  # tokens generated per held-out answer
    eval_limit: int | None = None  # evaluate on the first N held-out samples
    eval_batch_size: int = 16  # held-out samples per generation batch
    dataloader_num_workers: int | None = None  # None: auto (CUDA: cores - 2, up to 16; CPU: 0)

    def __post_init__(self) -> None:
        by_method = METHOD_DEFAULTS.get(self.method, METHOD_DEFAULTS["sft"])
        for name, value in by_method.items():
            if getattr(self, name) is BY_METHOD:
                setattr(self, name, value)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """A RunConfig from a saved ``to_dict`` (a run's config.json), old key names mapped."""
        return cls(**upgrade(values))

    @property
    def run_id(self) -> str:
        return self.run or f"{self.method}-{self.model}"

    @property
    def spec(self) -> registry.ModelSpec:
        return registry.get(self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
_TYPES = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Make-variable strings ("1", "true", "none") into the field's type."""
    if not isinstance(value, str):
        return value
    kind = _TYPES[name]  # the annotation, e.g. "int | None"
    low = value.strip().lower()
    if kind.startswith("dict"):
        import ast

        try:
            return dict(ast.literal_eval(value))
        except (ValueError, SyntaxError, TypeError):
            raise ConfigError(f"{name}: expected a dict like {{'key': 1}}, got {value!r}") from None
    if low in {"none", "null", ""} and "None" in kind:
        return None
    if kind.startswith("bool"):
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name}: expected a boolean, got {value!r}")
    try:
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except ValueError:
        raise ConfigError(f"{name}: expected {kind.split(' ')[0]}, got {value!r}") from None
    return value


def default(name: str, method: str = "sft") -> Any:
    """RunConfig's default of field ``name`` for ``method``."""
    return getattr(RunConfig(method=method), name)  # type: ignore[arg-type]


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """Keys under an earlier name (RENAMED) under today's, with a warning saying so."""
    out = dict(values)
    for old, new in RENAMED.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{old} and {new} are one setting ({old} is {new}'s old name)")
        out[new] = out.pop(old)
        warnings.warn(
            f"{old} is now {new} (the transformers name; a value < 1 is a share of the "
            f"steps): read as {new}={out[new]}",
            ConfigWarning,
            stacklevel=3,
        )
    return out


def resolve(overrides: dict[str, Any] | None = None) -> tuple[RunConfig, dict[str, str]]:
    """Build a RunConfig from overrides (only what the user set; None values count as
    set); returns it and each field's origin.

    Notebooks, Make variables and ``vlmfit train`` pass only what the user set; the rest are
    RunConfig's defaults (``METHOD_DEFAULTS`` for the few that depend on SFT or DPO). The
    origin (default or override) of each value lets the run folder tell the whole story."""
    overrides = upgrade(overrides or {})
    unknown = sorted(set(overrides) - FIELDS)
    if unknown:
        raise ConfigError(f"unknown configuration key(s): {', '.join(unknown)}")
    values = {k: _coerce(k, v) for k, v in overrides.items()}
    cfg = RunConfig(**values)
    defaults = RunConfig(method=cfg.method)
    origin = {
        k: ("override" if k in values and values[k] != getattr(defaults, k) else "default")
        for k in FIELDS
    }
    validate(cfg)
    return cfg, origin


def validate(cfg: RunConfig, *, cuda: bool | None = None) -> None:
    """Fail early with a clear message; never after the model has loaded."""
    import torch

    try:
        spec = registry.get(cfg.model)
    except registry.UnknownModelError as e:
        raise ConfigError(str(e)) from None
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cfg.method not in ("sft", "dpo"):
        raise ConfigError(f"method must be 'sft' or 'dpo', got {cfg.method!r}")
    if cfg.finetune not in ("lora", "qlora", "full", "projector"):
        raise ConfigError(f"finetune must be lora, qlora, full or projector, got {cfg.finetune!r}")
    if cfg.weights not in ("hub", "random") and not spec.tiny:
        from pathlib import Path

        if not Path(cfg.weights).is_dir():
            raise ConfigError(f"WEIGHTS={cfg.weights!r}: expected hub, random or a model folder")
    if cfg.finetune == "qlora" and not cuda:
        raise ConfigError(
            "finetune=qlora needs a CUDA GPU: bitsandbytes 4-bit (NF4) training does not run on "
            "this device. Use finetune=lora (or full) on CPU."
        )
    if cfg.bf16 and not cuda:
        raise ConfigError("bf16=True needs a CUDA GPU with bf16 support; leave bf16 unset on CPU")
    # finetune=projector trains the projector alone, whatever the train_* flags say.
    if cfg.finetune != "projector" and not (
        cfg.train_vision or cfg.train_projector or cfg.train_language
    ):
        raise ConfigError(
            "everything is frozen: set at least one of train_vision, train_projector, "
            "train_language to true"
        )
    if cfg.finetune in ("full", "projector") and (cfg.use_dora or cfg.use_rslora):
        raise ConfigError(f"use_dora / use_rslora are LoRA options; finetune={cfg.finetune}")
    if cfg.finetune == "full" and cfg.init_lora_weights != "default":
        raise ConfigError("init_lora_weights is a LoRA option; finetune=full")
    if cfg.lora_r <= 0 or cfg.lora_alpha <= 0:
        raise ConfigError("lora_r and lora_alpha must be positive")
    if cfg.per_device_train_batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise ConfigError("batch size and gradient accumulation must be >= 1")
    if cfg.learning_rate <= 0:
        raise ConfigError("learning_rate must be positive")
    if cfg.method == "sft" and cfg.init_adapter:
        raise ConfigError("init_adapter is for DPO (start DPO from an SFT run's adapter)")
    if cfg.method == "dpo" and cfg.finetune in ("full", "projector"):
        raise ConfigError(
            "DPO with finetune=full would need a second copy of the weights as reference; "
            "vlmfit's DPO uses the base with the adapter disabled: use finetune=lora or qlora"
        )
    if cfg.max_image_tokens is not None and cfg.max_image_tokens < 1:
        raise ConfigError("max_image_tokens must be >= 1")
    if cfg.qlora_upcast and cfg.finetune != "qlora":
        raise ConfigError(f"qlora_upcast is a QLoRA option; finetune={cfg.finetune}")
    if cfg.train_sampling_strategy not in ("random", "sequential", "group_by_length"):
        raise ConfigError(
            "train_sampling_strategy must be random, sequential or group_by_length, "
            f"got {cfg.train_sampling_strategy!r}"
        )
    if cfg.dataloader_num_workers is not None and cfg.dataloader_num_workers < 0:
        raise ConfigError("dataloader_num_workers must be >= 0 (or None for auto)")
    if cfg.vision_chunk < 0:
        raise ConfigError(
            f"vision_chunk: expected 0 (all tiles at once) or more, got {cfg.vision_chunk}"
        )
    if cfg.overlength not in ("drop", "shrink"):
        raise ConfigError("overlength must be 'drop' or 'shrink'")
