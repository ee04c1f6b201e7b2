"""TRL's trainers without host-GPU syncs between log steps (``RunConfig.sync_free``).

Each ``.item()`` or ``if tensor`` in a step makes the host wait for the GPU; the host work
that follows (bookkeeping, the next batch, the next launches) then runs while the GPU idles.
TRL's SFT loss makes four such syncs per step for its metrics and the Trainer one for its
NaN filter. Here the metrics stay on the GPU and reach the host once per log, with the same
values. Details: docs/benchmarks.md ("Steps without syncs").
"""

from __future__ import annotations

from typing import Any

import torch


class SyncFreeSteps:
    """Mixin for a ``transformers.Trainer``: the NaN filter on the GPU, a cached FLOP count.

    ``training_step`` does what ``TrainingArguments.logging_nan_inf_filter`` does (a
    non-finite loss adds the running mean of the logged loss instead) with ``torch.where``;
    the filter in the Trainer's loop must be off (``training_args`` does that).
    """

    _vlmfit_params: int | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        running = getattr(self, "_tr_loss", None)
        if not isinstance(running, torch.Tensor):
            return loss
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


def sft_trainer_class():
    """``trl.SFTTrainer`` whose training loss keeps its metrics on the GPU."""
    from trl import SFTTrainer

    class SyncFreeSFTTrainer(SyncFreeSteps, SFTTrainer):
        """Entropy, token accuracy and token count per micro-batch stay GPU tensors; ``log``
        turns them into TRL's metrics with one transfer. Other losses (a custom
        ``compute_loss_func``, label smoothing, MoE aux loss, sequence parallelism) and
        evaluation take TRL's own path."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._vlmfit_pending: list[torch.Tensor] = []

        def _own_loss(self, model, return_outputs: bool) -> bool:
            sp = getattr(getattr(self.accelerator, "parallelism_config", None), "sp_enabled", 0)
            return (
                model.training
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
            else:
                ids = inputs["position_ids"]
                tokens = torch.tensor(ids.size(1), device=ids.device)
            gather = self.accelerator.gather_for_metrics
            parts = (
                outputs.label_mask.sum(),
                outputs.entropy.detach().sum(),
                outputs.is_top1.sum(),
                tokens,
            )
            row = torch.stack([gather(p.detach().double()).sum() for p in parts])
            self._vlmfit_pending.append(row)
            return loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self._vlmfit_pending and self.model.training:
                rows = torch.stack(self._vlmfit_pending).tolist()  # the one sync per log
                self._vlmfit_pending.clear()
                metrics = self._metrics["train"]
                for valid, entropy, correct, tokens in rows:
                    metrics["entropy"].append(entropy / valid if valid > 0 else 0.0)
                    metrics["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
                    self._total_train_tokens += int(tokens) // self._tp_size
                metrics["num_tokens"] = [self._total_train_tokens]
            super().log(logs, start_time)

    return SyncFreeSFTTrainer


def dpo_trainer_class():
    """``trl.DPOTrainer`` with the NaN filter on the GPU (its metrics still sync)."""
    from trl import DPOTrainer

    class SyncFreeDPOTrainer(SyncFreeSteps, DPOTrainer):
        pass

    return SyncFreeDPOTrainer
