"""TRL's trainer for a run: its config (``training_args``), the trainer with vlmfit's
collator and optimizer (``build_trainer``), and the callback that writes the metrics log."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from vlmfit.config import RunConfig
from vlmfit.train import distributed, fastpath, runs
from vlmfit.train.data import video_collator
from vlmfit.train.model import make_optimizer, torch_dtype


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


def training_args(cfg: RunConfig, out: Path, n_train: int, progress: bool = True):
    """TRL config (SFTConfig / DPOConfig) from the run configuration."""
    from trl import DPOConfig, SFTConfig

    workers = fastpath.dataloader_workers(cfg.dataloader_num_workers)
    pin = torch.cuda.is_available()
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
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=False,  # applied in build_model (non-reentrant), before PEFT
        # no autocast: bf16 weights without the Trainer's per-op casts (fastpath.uses_autocast)
        bf16=torch_dtype(cfg) == torch.bfloat16 and fastpath.uses_autocast(cfg),
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,
        # The image processor runs in DataLoader workers, ahead of the GPU (vlmfit.train.fastpath)
        dataloader_num_workers=workers,
        dataloader_prefetch_factor=cfg.dataloader_prefetch_factor if workers else None,
        dataloader_persistent_workers=workers > 0,
        dataloader_pin_memory=pin,
        # sync_free: batches copied to the GPU without the host waiting, the NaN filter of the
        # logged loss on the GPU (vlmfit.train.syncfree)
        accelerator_config={"non_blocking": pin and cfg.sync_free},
        logging_nan_inf_filter=not cfg.sync_free,
        train_sampling_strategy=cfg.train_sampling_strategy,
        length_column_name="length",
        activation_offloading=fastpath.trl_offloading(cfg),  # else train.offload's
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
    from trl import DPOTrainer

    from vlmfit.train import pixels, syncfree

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
    if cfg.method == "sft":
        trainer = syncfree.sft_trainer_class()(**kwargs)
        trainer.vlmfit_sync_free = cfg.sync_free
    else:
        trainer = (syncfree.dpo_trainer_class() if cfg.sync_free else DPOTrainer)(**kwargs)
    codec = None
    if cfg.uint8_pixels and cfg.method == "sft" and hasattr(trainer.data_collator, "processor"):
        found = pixels.codec_for(processor, cfg.spec.family.name)
        if found is not None:  # the collator's processor leaves the pixels raw
            codec, trainer.data_collator.processor = found
            trainer.vlmfit_pixel_codec, trainer.vlmfit_pixel_dtype = codec, torch_dtype(cfg)
    trainer.data_collator = fastpath.WorkerCollator(
        video_collator(trainer.data_collator, train_ds), torch_dtype(cfg), codec=codec
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
