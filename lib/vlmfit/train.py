"""SFT and DPO through TRL's trainers, with PEFT adapters, in run folders.

    python -m vlmfit train --model tiny-smolvlm --method sft --finetune full \
        --data data/shapes/sft_train.json --eval_data data/shapes/sft_test.json

The notebooks (``notebooks/sft.ipynb``, ``notebooks/dpo.ipynb``) call ``run(cfg)``.
What vlmfit adds on top of TRL: the model registry (module groups, LoRA targets),
assistant-only loss checked for every family (TRL's training chat templates), a
separate learning rate for projector / embeddings, the reference model of DPO as
the base with the adapter disabled, memory in the metrics log, evaluation by
generation, and run folders that resume.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from vlmfit import distributed, fastpath, memory, runs
from vlmfit.config import ConfigError, RunConfig, resolve, validate
from vlmfit.data.records import Record

# ----------------------------------------------------------------------------- data


def load_training_records(
    path: str, *, preference: bool, split: str | None = "train", model: str | None = None
) -> list[Record]:
    """Read any supported format, validate (fail listing every problem; with ``model``,
    images its processor refuses too)."""
    from vlmfit.data.validate import check_dataset

    report = check_dataset(path, on_error="fail", split=split, model=model)
    records = report.records
    if preference and not all(r.is_preference for r in records):
        n = sum(not r.is_preference for r in records)
        raise ConfigError(
            f"method=dpo needs preference data (prompt/chosen/rejected): {n} of {len(records)} "
            f"records in {path} have no chosen/rejected pair"
        )
    return records


def to_dataset(rows: list[dict[str, Any]]):
    """A ``datasets.Dataset`` with an ``images`` column of PIL images (TRL's VLM layout).

    Built straight from an Arrow table with a fingerprint of our own: ``from_dict`` would
    hash every image's bytes through dill to make one (slow, and it fails on some
    Python 3.12 / pyarrow combinations: "Can't pickle <class 'MonthDayNano'>").
    """
    import hashlib
    import json

    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    cols = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    features = {}
    for k, v in cols.items():
        if k == "images":
            features[k] = datasets.Sequence(datasets.Image())
        else:
            features[k] = datasets.Features.from_arrow_schema(pa.Table.from_pydict({k: v}).schema)[
                k
            ]
    features = datasets.Features(features)
    encoded = features.encode_batch(cols)
    table = pa.Table.from_pydict(encoded, schema=features.arrow_schema)
    # Images as file paths are part of the identity; decoded PIL images are not hashed.
    lazy = all(isinstance(i, dict) for im in cols.get("images", []) for i in im)
    text = json.dumps(
        {k: v for k, v in cols.items() if k != "images" or lazy}, sort_keys=True, default=str
    )
    fp = hashlib.sha256(f"{len(rows)}:{text}".encode()).hexdigest()[:16]
    return datasets.Dataset(
        InMemoryTable(table), info=datasets.DatasetInfo(features=features), fingerprint=fp
    )


def use_preprocessed(cfg: RunConfig, result) -> RunConfig:
    """Train on a preprocessing result: its cached records and its processor settings.

    Idefics3 applies the visual-token budget through the processor (``size``); Qwen's
    pre-resized images are a fixed point of its own resize, with ``max_pixels`` as guard.
    """
    cfg.data = str(result.records_path)
    cfg.processor_kwargs = dict(result.manifest.get("processor_kwargs") or {})
    return cfg


def prepared_folder(path: str | Path) -> Path | None:
    """The preprocessing cache folder ``path`` names (folder or its records.jsonl), else None."""
    p = Path(path)
    folder = p.parent if p.name == "records.jsonl" else p
    if (folder / "manifest.json").is_file() and (folder / "records.jsonl").is_file():
        return folder
    return None


def prepare_data(
    cfg: RunConfig, data: str, *, split: str | None = "train", progress: bool = True
) -> Path:
    """The cache training reads for ``data``: itself when preprocessed, else ``preprocess``'s.

    Preprocessing validated every record and stored each image at its budgeted size, so
    training neither re-validates nor re-decodes the source (a rerun is a cache hit). The
    processor settings of the budget go to ``cfg.processor_kwargs`` when not set yet.
    """
    folder = prepared_folder(data)
    if folder is None:
        from vlmfit import preprocess
        from vlmfit.budget import Budget

        result = preprocess.preprocess(
            data,
            cfg.model,
            weights=cfg.weights,
            budget=Budget(max_image_tokens=cfg.max_image_tokens),
            max_length=cfg.max_length,
            overlength=cfg.overlength,
            split=None if split == "all" else split,
            progress=progress,
        )
        folder, manifest = Path(result.path), result.manifest
    else:
        manifest = runs.read_json(folder / "manifest.json")
    if not cfg.processor_kwargs:
        cfg.processor_kwargs = dict(manifest.get("processor_kwargs") or {})
    return folder


def load_prepared(folder: Path, *, preference: bool):
    """The cache's records as a ``datasets.Dataset`` in TRL's VLM layout.

    Images stay file paths (``datasets.Image`` decodes them lazily, in the DataLoader's
    workers); ``length`` (tokens after the budget) feeds length-grouped batches. A cache
    with videos (SFT, where torchvision imports) adds ``videos``: per record, each video's
    frame files in name order, and ``video_kwargs``: the manifest's video-processor
    settings and sampling rate, which :mod:`vlmfit.collate` hands the video processor.
    """
    import json

    rows = [
        json.loads(line)
        for line in (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    kinds = {"preference" if "chosen" in r else "sft" for r in rows}
    want = "preference" if preference else "sft"
    if kinds - {want}:
        n = sum(("chosen" in r) != preference for r in rows)
        raise ConfigError(
            f"method={'dpo' if preference else 'sft'} needs {want} data: {n} of {len(rows)} "
            f"records in {folder} are not (DPO needs prompt/chosen/rejected pairs)"
        )
    video_kwargs = (
        _video_kwargs(folder, rows, preference) if any(r.get("videos") for r in rows) else None
    )
    for r in rows:
        videos = r.pop("videos", None) or []
        r["images"] = [{"path": str(folder / p), "bytes": None} for p in r["images"]]
        if video_kwargs is not None:
            r["videos"] = [_frame_paths(folder, v) for v in videos]
            r["video_kwargs"] = video_kwargs
        r.setdefault("length", 0)
    return to_dataset(rows)


def _video_kwargs(folder: Path, rows: list[dict[str, Any]], preference: bool) -> dict[str, Any]:
    """A video cache's settings for the collator; ConfigError where its videos can't train."""
    n = sum(bool(r.get("videos")) for r in rows)
    if preference:
        raise ConfigError(
            f"{folder}: {n} of {len(rows)} records have videos; video records train with SFT "
            "only (TRL's DPO collator passes images only)"
        )
    why = _torchvision_error()
    if why is not None:
        raise ConfigError(
            f"{folder}: {n} of {len(rows)} records have videos, and transformers' Qwen2-VL video "
            f"processor needs torchvision, which does not import here ({why}). The CPU install "
            "leaves it out: PyPI's torchvision links libtorch_cuda.so / libc10_cuda.so, which "
            "the CPU torch build lacks (README, 'Video needs torchvision'). Train video "
            "records in the GPU container, or drop them"
        )
    manifest = runs.read_json(folder / "manifest.json")
    vkw = manifest.get("video_processor_kwargs") or {}
    if not {"min_pixels", "max_pixels"} <= set(vkw) or not manifest.get("video_fps"):
        raise ConfigError(
            f"{folder}/manifest.json: no video_processor_kwargs / video_fps for its video "
            "records (a cache from an older vlmfit?): preprocess the data again"
        )
    return {
        "min_pixels": int(vkw["min_pixels"]),
        "max_pixels": int(vkw["max_pixels"]),
        "fps": float(manifest["video_fps"]),
    }


def _frame_paths(folder: Path, video: str) -> list[str]:
    """One cached video's frame files (``videos/<n>/000.jpg, 001.jpg, ...``), in name order."""
    d = folder / video
    frames = sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []
    if not frames:
        raise ConfigError(
            f"{folder}: video {video!r} has no frames in {d}: preprocess the data again"
        )
    return [str(p) for p in frames]


def _torchvision_error() -> str | None:
    """Why ``import torchvision`` fails here (None: it imports)."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or RuntimeError from a build for another torch
        return f"{type(e).__name__}: {e}"
    return None


def video_collator(collator, dataset):
    """``collator`` for a dataset of :func:`load_prepared`: wrapped for video records
    (:func:`vlmfit.collate.with_videos`) when it has them, else unchanged."""
    if "videos" not in (getattr(dataset, "column_names", None) or []):
        return collator
    from vlmfit.collate import with_videos

    return with_videos(collator, dataset)


# ---------------------------------------------------------------------------- model


def _device() -> str:
    return distributed.device()  # cuda:LOCAL_RANK under a launcher


def _dtype(cfg: RunConfig) -> torch.dtype:
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


def _init_source(cfg: RunConfig) -> tuple[Path | None, Path | None]:
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
    that run without autograd (``vlmfit.fastpath``).
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    from vlmfit import fastpath
    from vlmfit.models import load_model, set_trainable

    spec = cfg.spec
    dtype = _dtype(cfg)
    full_init, adapter_init = _init_source(cfg)
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
    vision_parts: list[str] = []
    if fastpath.vision_runs_without_grad(cfg):
        vision_parts = fastpath.vision_without_autograd(model, spec, cfg.vision_chunk)
    model.vlmfit_vision_no_grad = vision_parts
    model.vlmfit_fused_lora = fastpath.fuse_lora(model) if cfg.fused_lora else 0
    model.vlmfit_packing = None
    if cfg.packing and cfg.method == "sft":
        from vlmfit import packing

        why = fastpath.varlen_available(next(model.parameters()).device)
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


# -------------------------------------------------------------------------- callbacks


def memory_now() -> dict[str, float]:
    """GPU allocated / peak (GiB) on CUDA, process RSS (GiB) otherwise."""
    gib = 2**30
    if torch.cuda.is_available():
        return {
            "mem_allocated_gib": torch.cuda.memory_allocated() / gib,
            "mem_peak_gib": torch.cuda.max_memory_allocated() / gib,
            "mem_reserved_gib": torch.cuda.memory_reserved() / gib,
        }
    import psutil

    return {"mem_rss_gib": psutil.Process().memory_info().rss / gib}


def _metrics_callback(log: runs.MetricsLog):
    from transformers import TrainerCallback

    class MetricsToJsonl(TrainerCallback):
        """Every log event (loss, lr, grad_norm, DPO rewards) + memory, one JSON line.

        ``step_s``: mean time from step begin to end since the last log (forward, backward,
        optimizer); ``data_wait_s``: mean time between steps (waiting for the next batch,
        logging): the share of time the GPU is starved.
        """

        def __init__(self):
            self.end = None
            self.steps: list[float] = []
            self.waits: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()
            if self.end is not None:
                self.waits.append(self.begin - self.end)

        def on_step_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()
            self.steps.append(self.end - self.begin)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:  # one writer under several processes
                timing = {}
                if self.steps:
                    timing["step_s"] = sum(self.steps) / len(self.steps)
                if self.waits:
                    timing["data_wait_s"] = sum(self.waits) / len(self.waits)
                self.steps, self.waits = [], []
                log.write(
                    {"step": state.global_step, "epoch": state.epoch, "time": time.time()}
                    | {"max_steps": state.max_steps}
                    | {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
                    | timing
                    | memory_now()
                )

    return MetricsToJsonl()


# ------------------------------------------------------------------------- training


def training_args(cfg: RunConfig, out: Path, n_train: int, progress: bool = True):
    """TRL config (SFTConfig / DPOConfig) from the run configuration."""
    from trl import DPOConfig, SFTConfig

    from vlmfit import fastpath

    workers = fastpath.dataloader_workers(cfg.dataloader_num_workers)
    if cfg.dataloader_num_workers is None and distributed.is_distributed():
        # auto counts this machine's cores: its processes share them
        workers //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    common: dict[str, Any] = dict(
        output_dir=str(out / "checkpoints"),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=False,  # applied in build_model (non-reentrant), before PEFT
        # no autocast: bf16 weights without the Trainer's per-op casts (fastpath.uses_autocast)
        bf16=_dtype(cfg) == torch.bfloat16 and fastpath.uses_autocast(cfg),
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,
        # The image processor runs in DataLoader workers, ahead of the GPU (vlmfit.fastpath)
        dataloader_num_workers=workers,
        dataloader_prefetch_factor=cfg.dataloader_prefetch_factor if workers else None,
        dataloader_persistent_workers=workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        train_sampling_strategy=cfg.train_sampling_strategy,
        length_column_name="length",
        activation_offloading=fastpath.offloads_activations(cfg),
        use_cpu=not torch.cuda.is_available(),
        # Off in reports: in a notebook the Trainer prints a table row per log step (the
        # curves in the report show the same numbers as plots).
        disable_tqdm=not progress,
    )
    if cfg.method == "sft":
        # VLMs: no truncation inside the trainer (it would cut image tokens: "Image features
        # and image tokens do not match"); vlmfit enforces max_length in preprocessing.
        return SFTConfig(max_length=None, assistant_only_loss=True, **common)
    return DPOConfig(beta=cfg.beta, max_length=None, precompute_ref_log_probs=False, **common)


def build_trainer(
    cfg: RunConfig, model, processor, train_ds, eval_ds, out: Path, log, progress: bool = True
):
    from trl import DPOTrainer, SFTTrainer

    args = training_args(cfg, out, len(train_ds), progress)
    optimizer = make_optimizer(cfg, model)
    kwargs: dict[str, Any] = dict(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=processor,
        callbacks=[_metrics_callback(log), *_tensorboard(out)],
    )
    if optimizer is not None:
        kwargs["optimizers"] = (optimizer, None)
    # PEFT model + no ref_model: DPO's reference is the base with the adapter disabled.
    trainer = SFTTrainer(**kwargs) if cfg.method == "sft" else DPOTrainer(**kwargs)
    trainer.data_collator = fastpath.WorkerCollator(
        video_collator(trainer.data_collator, train_ds), _dtype(cfg)
    )
    if not progress:  # reports: the metrics log and the curves carry the numbers
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _tensorboard(out: Path) -> list:
    """TensorBoard event files in ``runs/<run>/tensorboard`` when tensorboard is installed."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(SummaryWriter(str(out / "tensorboard")))]


def save_model(model, processor, out: Path) -> Path:
    """The adapter in PEFT's standard format (or the full model), plus the processor."""
    target = out / "adapter"
    tmp = out / ".adapter.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def run(cfg: RunConfig, origin: dict[str, str] | None = None, *, progress: bool = True):
    """Train (SFT or DPO), evaluate before/after, write the run folder; returns the summary."""
    from vlmfit import evaluate as ev

    validate(cfg)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" bars at every checkpoint
    out = runs.run_dir(cfg.runs_dir, cfg.run_id)
    main = distributed.is_main()  # every rank trains; rank 0 alone writes the run folder
    if main:  # never replaces a run silently: RESUME=1, OVERWRITE=1 or another RUN
        runs.prepare_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)
    distributed.barrier()
    allocator = fastpath.set_allocator(cfg.expandable_segments)  # before the first allocation
    # Data first: bad data or DPO on non-preference data fails before the model loads.
    preference = cfg.method == "dpo"
    with distributed.main_process_first():  # rank 0 preprocesses; the others hit its cache
        train_folder = prepare_data(cfg, cfg.data, split=cfg.dataset_split, progress=progress)
    cfg.data = str(train_folder / "records.jsonl")
    train_ds = load_prepared(train_folder, preference=preference)
    env = runs.environment()
    if main:
        runs.write_json(out / "config.json", {"config": cfg.to_dict(), "origin": origin or {}})
        runs.write_json(out / "environment.json", env)
    log = runs.MetricsLog(out / "metrics.jsonl")
    eval_records = (
        load_training_records(
            cfg.eval_data, preference=False, split=cfg.eval_split, model=cfg.model
        )
        if cfg.eval_data
        else []
    )
    if cfg.eval_limit:
        eval_records = eval_records[: cfg.eval_limit]
    eval_ds = None
    if preference and cfg.preference_eval_data:
        with distributed.main_process_first():
            pref = prepare_data(
                cfg, cfg.preference_eval_data, split=cfg.eval_split, progress=progress
            )
        eval_ds = load_prepared(pref, preference=True)
        if cfg.eval_limit:
            eval_ds = eval_ds.select(range(min(cfg.eval_limit, len(eval_ds))))

    worst = memory.worst_sample(train_folder)  # (tokens, visual tokens) of the longest sample
    if cfg.memory_check and distributed.sharded():
        if distributed.is_main():  # the single-GPU prediction overstates a sharded run
            print("memory_check skipped: FSDP / ZeRO-3 divide the weights over the GPUs")
    elif cfg.memory_check:  # before the model loads: refuse what will not fit, say what would
        try:
            memory.check_fits(cfg, *worst)
        except memory.WontFitError:
            raise
        except Exception as e:  # noqa: BLE001 - a gap in the estimator never blocks training
            print(f"memory_check skipped: no estimate for this configuration ({e})")
    torch.manual_seed(cfg.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with distributed.local_main_first():  # one download / tiny-model build per machine
        model, processor = build_model(cfg)
    load_s = time.time() - t0
    trainable = _trainable(model)
    n_language = fastpath.language_params(model, cfg.spec)  # before FSDP / ZeRO-3 shard it

    def evaluate(m):  # by generation, on rank 0 only (the other ranks wait)
        return distributed.on_main(
            lambda: ev.evaluate_generation(m, processor, eval_records, cfg, progress=progress),
            default={"metrics": {}, "samples": []},
        )

    before = evaluate(model)  # before the Trainer wraps it: a full replica on every rank
    trainer = build_trainer(cfg, model, processor, train_ds, eval_ds, out, log, progress)
    per_step = memory.step_callback(out / "memory.jsonl")  # allocated / reserved / peak
    trainer.add_callback(per_step)
    if distributed.is_distributed():
        (out / "ranks").mkdir(exist_ok=True)
        trainer.data_collator = distributed.SampleLog(
            trainer.data_collator, out / "ranks" / f"rank-{distributed.rank()}.jsonl"
        )
    resume_from = None
    if cfg.resume:
        ck = runs.last_checkpoint(out)
        resume_from = str(ck) if ck else None
    # DPO: reward accuracy and margins on the held-out pairs before training, to compare
    dpo_before = trainer.evaluate() if eval_ds is not None and resume_from is None else {}
    if torch.cuda.is_available():  # the training peak, without loading and evaluation
        torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError:
        raise memory.explain_oom(cfg, trainer.state.global_step + 1, *worst) from None
    if isinstance(trainer.data_collator, distributed.SampleLog):  # log training batches only
        trainer.data_collator = trainer.data_collator.collator
    train_s = time.time() - t1
    train_peak = per_step.peak if torch.cuda.is_available() else None
    tokens_per_s = _tokens_per_s(log, train_s)
    engine = distributed.engine(trainer)
    if engine == "none":
        save_model(trainer.model, processor, out)
    else:
        distributed.save_model(trainer, out)  # gathered if sharded; rank 0 writes
    eval_note = None
    if engine in ("fsdp", "deepspeed") and eval_records:
        # Generation on sharded weights would need every rank in each forward: skipped.
        eval_note = (
            f"held-out evaluation after training skipped under {engine} (sharded weights): "
            f"evaluate {out / 'adapter'} in one process (vlmfit.evaluate.evaluate_generation)"
        )
        after = {"metrics": {}, "samples": []}
    else:
        after = evaluate(trainer.model)  # DDP: trainer.model is rank 0's unwrapped replica
    dpo_eval = trainer.evaluate() if eval_ds is not None else {}

    summary = {
        "run": cfg.run_id,
        "model": cfg.model,
        "weights": cfg.weights,
        "method": cfg.method,
        "finetune": cfg.finetune,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "resumed_from": resume_from,
        "train_loss": result.training_loss,
        "runtime_s": train_s,
        "load_s": load_s,
        "train_samples": len(train_ds),
        "trainable_params": trainable,
        "peak_memory_gib": _peak_memory(log),
        "train_peak_memory_gib": train_peak,
        "tokens_per_s": tokens_per_s,
        "memory_growth": memory.growth(runs.MetricsLog(out / "memory.jsonl").read()),
        "tokens_per_sample": sum(train_ds["length"]) / max(len(train_ds), 1),
        "data_wait_fraction": _wait_fraction(log),
        "mfu": fastpath.mfu(tokens_per_s, n_language, env["gpu"]) if tokens_per_s else None,
        "levers": fastpath.applied_levers(
            cfg,
            vision_parts=getattr(model, "vlmfit_vision_no_grad", []),
            workers=trainer.args.dataloader_num_workers,
            allocator=allocator,
            vision_attention=getattr(model, "vlmfit_vision_attention", "sdpa"),
            fused_lora=getattr(model, "vlmfit_fused_lora", 0),
            packing=getattr(model, "vlmfit_packing", None),
        ),
        "device": env["gpu"] or "cpu",
        "eval_before": before["metrics"],
        "eval_after": after["metrics"],
        "dpo_eval": {k: float(v) for k, v in dpo_eval.items() if isinstance(v, int | float)},
        "dpo_eval_before": {
            k: float(v) for k, v in dpo_before.items() if isinstance(v, int | float)
        },
    }
    if distributed.is_distributed():
        summary |= {"processes": distributed.world_size(), "engine": engine}
        if eval_note:
            summary["eval_note"] = eval_note
    if main:
        runs.write_json(out / "eval.json", {"before": before, "after": after})
        runs.write_json(out / "summary.json", summary)
        runs.apply_umask(out)  # weights and checkpoints readable as the user's other files
    distributed.barrier()  # no rank exits (ending the launch) before the files exist
    return summary


def _tokens_per_s(log: runs.MetricsLog, train_s: float) -> float | None:
    """Steady-state tokens/s from TRL's ``num_tokens`` log (first interval dropped: warm-up)."""
    pts = [(r["time"], r["num_tokens"]) for r in log.read() if "num_tokens" in r]
    if len(pts) >= 3 and pts[-1][0] > pts[1][0]:
        return (pts[-1][1] - pts[1][1]) / (pts[-1][0] - pts[1][0])
    if pts and train_s > 0:
        return pts[-1][1] / train_s
    return None


def _wait_fraction(log: runs.MetricsLog) -> float | None:
    """Share of the steady-state time spent between steps (first log dropped: warm-up)."""
    pts = [(r["step_s"], r["data_wait_s"]) for r in log.read() if "data_wait_s" in r][1:]
    if not pts:
        return None
    step, wait = (sum(x) for x in zip(*pts, strict=True))
    return wait / (step + wait) if step + wait > 0 else None


def _trainable(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": train}


def _peak_memory(log: runs.MetricsLog) -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    vals = [r.get("mem_rss_gib") for r in log.read() if r.get("mem_rss_gib")]
    return max(vals) if vals else None


def merge_adapter(run: str | Path, out: str | Path, runs_dir: str = "runs") -> Path:
    """Merge a run's LoRA adapter into its base model and save it for export."""
    from peft import PeftModel

    from vlmfit.models import load_model

    rdir = Path(run) if Path(run).exists() else runs.run_dir(runs_dir, str(run))
    cfg = RunConfig(**runs.read_json(rdir / "config.json")["config"])
    full_init, _ = _init_source(cfg)
    model, processor = load_model(cfg.spec, weights=cfg.weights, path=full_init)
    merged = PeftModel.from_pretrained(model, rdir / "adapter").merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def cli_train(argv: list[str]) -> int:
    """``python -m vlmfit train --key value ...`` with RunConfig field names."""
    parser = argparse.ArgumentParser(prog="vlmfit train", description=__doc__)
    parser.add_argument("--merge", metavar="RUN", help="merge RUN's adapter into its base")
    parser.add_argument("--out", help="output folder for --merge")
    known, rest = parser.parse_known_args(argv)
    if known.merge:
        print(merge_adapter(known.merge, known.out or f"runs/{known.merge}/merged"))
        return 0
    overrides: dict[str, Any] = {}
    it = iter(rest)
    for tok in it:
        if not tok.startswith("--"):
            parser.error(f"unexpected argument {tok!r}")
        key, _, val = tok[2:].partition("=")
        overrides[key.replace("-", "_")] = val if _ else next(it)
    try:
        cfg, origin = resolve(overrides)
    except ConfigError as e:
        print(f"vlmfit train: configuration error: {e}")
        return 2
    summary = run(cfg, origin)
    if distributed.is_main():
        print({k: summary[k] for k in ("run", "global_step", "eval_before", "eval_after")})
    return 0


__all__ = ["run", "build_model", "to_dataset", "merge_adapter", "cli_train"]
