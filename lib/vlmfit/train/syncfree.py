"""TRL's trainers without host-GPU syncs between log steps (``RunConfig.sync_free``).

Each ``.item()`` or ``if tensor`` in a step makes the host wait for the GPU; the host work
that follows (bookkeeping, the next batch, the next launches) then runs while the GPU idles.
TRL's SFT loss makes five such syncs per micro-batch for its metrics and the Trainer's NaN
filter up to two. Here the metrics stay on the GPU and reach the host once per log, with
TRL's values. Details: docs/benchmarks.md (the levers, ``sync_free``; run 8).
"""

from __future__ import annotations

import functools
from typing import Any

import torch


class SyncFreeSteps:
    """Mixin for a ``transformers.Trainer``: the NaN filter on the GPU, a cached FLOP count.

    With the Trainer's own ``logging_nan_inf_filter`` off (``training_args`` turns it off
    under ``sync_free``), ``training_step`` does what it does (a non-finite loss adds the
    running mean of the logged loss instead) with ``torch.where``, on the GPU.
    """

    _vlmfit_params: int | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        running = getattr(self, "_tr_loss", None)
        if self.args.logging_nan_inf_filter or not isinstance(running, torch.Tensor):
            return loss  # the Trainer filters (with a sync), or nothing to fall back on
        steps = 1 + self.state.global_step - self._globalstep_last_logged
        return torch.where(torch.isfinite(loss), loss, running / steps)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's count (6 x input tokens x non-embedding parameters) with the
        parameter count taken once: transformers walks every module for it each step."""
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        if ids is None or not hasattr(self.model, "num_parameters"):
            return 0
        if self._vlmfit_params is None:
            self._vlmfit_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * ids.numel() * self._vlmfit_params


@functools.cache
def sft_trainer_class():
    """vlmfit's ``trl.SFTTrainer``: with ``vlmfit_sync_free`` its training loss keeps its
    metrics on the GPU; its batches may carry uint8 pixels (:mod:`vlmfit.train.pixels`)."""
    from trl import SFTTrainer

    from vlmfit.train.pixels import DecodePixels

    class VlmfitSFTTrainer(DecodePixels, SyncFreeSteps, SFTTrainer):
        """TRL's per-micro-batch entropy and token accuracy (computed as TRL computes them)
        and token count are summed on the GPU; ``log`` turns the sums into TRL's metrics
        (their mean over the micro-batches, as TRL's ``log`` averages) with one transfer.
        Other losses (a custom ``compute_loss_func``, label smoothing, MoE aux loss,
        sequence parallelism) and evaluation take TRL's own path."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._vlmfit_sums: torch.Tensor | None = None  # entropy, accuracy, tokens
            self._vlmfit_rows = 0

        vlmfit_sync_free = True  # False: TRL's own loss and metrics

        def _own_loss(self, model, return_outputs: bool) -> bool:
            sp = getattr(getattr(self.accelerator, "parallelism_config", None), "sp_enabled", 0)
            return (
                self.vlmfit_sync_free
                and model.training
                and not return_outputs
                and not sp
                and self.compute_loss_func is None
                and self.label_smoother is None
                and not self.aux_loss_enabled
                and self.args.loss_type in ("nll", "dft")
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self._own_loss(model, return_outputs):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            per_token = -outputs.log_probs  # zero on ignored positions
            if self.args.loss_type == "dft":
                per_token = per_token * outputs.log_probs.exp().detach()
            n = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = per_token.sum() / torch.as_tensor(n).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                ids = inputs["position_ids"]
                tokens = ids.new_full((), ids.size(1))  # made on the GPU: no host copy
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            self._add_metrics(outputs, tokens)
            return loss

        def _add_metrics(self, outputs, tokens: torch.Tensor) -> None:
            parts = (outputs.label_mask.sum(), outputs.entropy.detach().sum())
            parts += (outputs.is_top1.sum(), tokens)
            row = torch.stack([p.double() for p in parts])[None]
            valid, entropy, correct, tokens = self.accelerator.gather_for_metrics(row).sum(0)
            some = valid > 0  # TRL: float32 sum / int count, 0 without valid tokens
            entropy = torch.where(some, entropy.float() / valid.float(), 0.0)
            accuracy = torch.where(some, correct.float() / valid.float(), 0.0)
            tokens = torch.div(tokens, self._tp_size, rounding_mode="floor")
            row = torch.stack([entropy.double(), accuracy.double(), tokens])
            self._vlmfit_sums = row if self._vlmfit_sums is None else self._vlmfit_sums + row
            self._vlmfit_rows += 1

        def _flush_metrics(self) -> None:
            """The summed metrics into TRL's ``_metrics``: the one sync per log."""
            if not self._vlmfit_rows:
                return
            entropy, accuracy, tokens = self._vlmfit_sums.tolist()
            metrics = self._metrics["train"]
            metrics["entropy"].append(entropy / self._vlmfit_rows)
            metrics["mean_token_accuracy"].append(accuracy / self._vlmfit_rows)
            self._total_train_tokens += int(tokens)
            metrics["num_tokens"] = [self._total_train_tokens]
            self._vlmfit_sums, self._vlmfit_rows = None, 0

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self.model.training:
                self._flush_metrics()
            super().log(logs, start_time)

        def evaluate(self, *args, **kwargs):  # eval logs TRL's token total: bring it up to date
            self._flush_metrics()
            return super().evaluate(*args, **kwargs)

    return VlmfitSFTTrainer


@functools.cache
def dpo_trainer_class():
    """``trl.DPOTrainer`` with the NaN filter on the GPU (its metrics still sync)."""
    from trl import DPOTrainer

    class SyncFreeDPOTrainer(SyncFreeSteps, DPOTrainer):
        pass

    return SyncFreeDPOTrainer
