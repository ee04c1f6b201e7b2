"""One training run, step by step: ``run(cfg)`` opens the run folder, loads the data,
checks memory, builds the model, evaluates, trains, saves, evaluates again and writes
the summary. Every rank runs every step; rank 0 alone writes the run folder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import get_last_checkpoint

from vlmfit import files, memory
from vlmfit.config import RunConfig, validate
from vlmfit.data.records import Record
from vlmfit.train import distributed, fastpath, runs
from vlmfit.train.data import load_prepared, load_training_records, prepare_data
from vlmfit.train.model import build_model
from vlmfit.train.trainer import build_trainer


def run(
    cfg: RunConfig,
    origin: dict[str, str] | None = None,
    *,
    progress: bool = True,
    callbacks: tuple = (),
):
    """Train (SFT or DPO), evaluate before/after, write the run folder; returns the summary.
    ``callbacks``: more ``transformers.TrainerCallback``s for the Trainer (diagnoses, tests)."""
    out, allocator = open_run(cfg, progress)
    # Data first: bad data or DPO on non-preference data fails before the model loads.
    data = load_data(cfg, out, origin, progress)
    check_memory(cfg, data.worst)
    built = build(cfg)
    evaluate = evaluator(cfg, built.processor, data.eval_records, progress)
    before = evaluate(built.model)  # before the Trainer wraps it: a full replica on every rank
    fit = train(cfg, built, data, out, progress, callbacks)
    save(fit, built.processor, out)
    after, eval_note = evaluate_after(fit, evaluate, data.eval_records, out)
    dpo_eval = fit.trainer.evaluate() if data.eval_ds is not None else {}
    summary = summarize(cfg, out, data, built, fit, allocator)
    summary |= {
        "eval_before": before["metrics"],
        "eval_after": after["metrics"],
        "dpo_eval": _floats(dpo_eval),
        "dpo_eval_before": _floats(fit.dpo_before),
    }
    if distributed.is_distributed():
        summary |= {"processes": distributed.world_size(), "engine": fit.engine}
        if eval_note:
            summary["eval_note"] = eval_note
    write_results(out, before, after, summary)
    return summary


@dataclass
class Data:
    """What a run trains and evaluates on."""

    folder: Path  # the training cache
    train: Any  # datasets.Dataset
    eval_records: list[Record]  # held-out records, evaluated by generation
    eval_ds: Any  # DPO: held-out preference pairs (datasets.Dataset), else None
    env: dict[str, Any]  # runs.environment()
    worst: tuple[int, int]  # (tokens, visual tokens) of the longest training sample


@dataclass
class Built:
    model: Any
    processor: Any
    load_s: float
    trainable: dict[str, int]
    n_language: int  # language-model parameters, for MFU


@dataclass
class Fit:
    trainer: Any
    log: runs.MetricsLog
    per_step: Any  # memory.step_callback
    result: Any  # TrainOutput
    resume_from: str | None
    dpo_before: dict[str, Any]
    train_s: float
    engine: str = "none"


def open_run(cfg: RunConfig, progress: bool) -> tuple[Path, str | None]:
    """Validate, create the run folder (rank 0) and set the allocator; (folder, allocator)."""
    validate(cfg)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" bars at every checkpoint
    out = runs.run_dir(cfg.runs_dir, cfg.run_id)
    # Never replaces a run silently: RESUME=1, OVERWRITE=1 or another RUN.
    if distributed.is_main():
        runs.prepare_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)
    distributed.barrier()
    return out, fastpath.set_allocator(cfg.expandable_segments)  # before the first allocation


def load_data(cfg: RunConfig, out: Path, origin: dict[str, str] | None, progress: bool) -> Data:
    """The training cache (preprocessed here if needed), then the run's config files, then
    the evaluation data."""
    preference = cfg.method == "dpo"
    with distributed.main_process_first():  # rank 0 preprocesses; the others hit its cache
        folder = prepare_data(cfg, cfg.data, split=cfg.dataset_split, progress=progress)
    cfg.data = str(folder / "records.jsonl")
    train_ds = load_prepared(folder, preference=preference)
    env = runs.environment()
    if distributed.is_main():
        files.write_json(out / "config.json", {"config": cfg.to_dict(), "origin": origin or {}})
        files.write_json(out / "environment.json", env)
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
    worst = memory.worst_sample(folder)
    return Data(folder, train_ds, eval_records, eval_ds, env, worst)


def check_memory(cfg: RunConfig, worst: tuple[int, int]) -> None:
    """Before the model loads: refuse what will not fit, say what would."""
    if not cfg.memory_check:
        return
    if distributed.sharded():
        if distributed.is_main():  # the single-GPU prediction overstates a sharded run
            print("memory_check skipped: FSDP / ZeRO-3 divide the weights over the GPUs")
        return
    try:
        memory.check_fits(cfg, *worst)
    except memory.WontFitError:
        raise
    except Exception as e:  # noqa: BLE001 - a gap in the estimator never blocks training
        print(f"memory_check skipped: no estimate for this configuration ({e})")


def build(cfg: RunConfig) -> Built:
    """The model and processor under the run's seed, with what the summary reports of them."""
    torch.manual_seed(cfg.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with distributed.local_main_first():  # one download / tiny-model build per machine
        model, processor = build_model(cfg)
    load_s = time.time() - t0
    n_language = fastpath.language_params(model, cfg.spec)  # before FSDP / ZeRO-3 shard it
    return Built(model, processor, load_s, _trainable(model), n_language)


def evaluator(cfg: RunConfig, processor, records: list[Record], progress: bool):
    """Evaluation by generation, on rank 0 only (the other ranks wait)."""
    from vlmfit.train import evaluate as ev

    def evaluate(model):
        return distributed.on_main(
            lambda: ev.evaluate_generation(model, processor, records, cfg, progress=progress),
            default={"metrics": {}, "samples": []},
        )

    return evaluate


def train(
    cfg: RunConfig, built: Built, data: Data, out: Path, progress: bool, callbacks: tuple = ()
) -> Fit:
    """The Trainer, run (or resumed) to the end; a CUDA OOM becomes one line of advice."""
    log = runs.MetricsLog(out / "metrics.jsonl")
    trainer = build_trainer(
        cfg, built.model, built.processor, data.train, data.eval_ds, out, log, progress
    )
    per_step = memory.step_callback(out / "memory.jsonl")  # allocated / reserved / peak
    trainer.add_callback(per_step)
    for callback in callbacks:
        trainer.add_callback(callback)
    if distributed.is_distributed():
        (out / "ranks").mkdir(exist_ok=True)
        trainer.data_collator = distributed.SampleLog(
            trainer.data_collator, out / "ranks" / f"rank-{distributed.rank()}.jsonl"
        )
    resume_from = None
    if cfg.resume and (out / "checkpoints").is_dir():
        resume_from = get_last_checkpoint(out / "checkpoints")
    # DPO: reward accuracy and margins on the held-out pairs before training, to compare
    dpo_before = trainer.evaluate() if data.eval_ds is not None and resume_from is None else {}
    if torch.cuda.is_available():  # the training peak, without loading and evaluation
        torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError:
        raise memory.explain_oom(cfg, trainer.state.global_step + 1, *data.worst) from None
    if isinstance(trainer.data_collator, distributed.SampleLog):  # log training batches only
        trainer.data_collator = trainer.data_collator.collator
    train_s = time.time() - t1
    return Fit(trainer, log, per_step, result, resume_from, dpo_before, train_s)


def save(fit: Fit, processor, out: Path) -> None:
    """The adapter (or model) into ``out/adapter``: gathered first if sharded."""
    fit.engine = distributed.engine(fit.trainer)
    if fit.engine == "none":
        save_model(fit.trainer.model, processor, out)
    else:
        distributed.save_model(fit.trainer, out)  # gathered if sharded; rank 0 writes


def save_model(model, processor, out: Path) -> Path:
    """The adapter in PEFT's standard format (or the full model), plus the processor."""
    target = out / "adapter"
    with files.atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return target


def evaluate_after(
    fit: Fit, evaluate, eval_records: list[Record], out: Path
) -> tuple[dict[str, Any], str | None]:
    """Held-out evaluation of the trained model; (result, why it was skipped or None)."""
    if fit.engine in ("fsdp", "deepspeed") and eval_records:
        # Generation on sharded weights would need every rank in each forward: skipped.
        note = (
            f"held-out evaluation after training skipped under {fit.engine} (sharded weights): "
            f"evaluate {out / 'adapter'} in one process "
            "(vlmfit.train.evaluate.evaluate_generation)"
        )
        return {"metrics": {}, "samples": []}, note
    return evaluate(fit.trainer.model), None  # DDP: trainer.model is rank 0's unwrapped replica


def summarize(
    cfg: RunConfig, out: Path, data: Data, built: Built, fit: Fit, allocator: str | None
) -> dict[str, Any]:
    """``summary.json`` without the evaluations: steps, loss, time, memory, throughput."""
    trainer, log, model = fit.trainer, fit.log, built.model
    env = data.env
    train_peak = fit.per_step.peak if torch.cuda.is_available() else None
    records = log.read()  # metrics.jsonl, read once
    tokens_per_s = _tokens_per_s(records, fit.train_s)
    return {
        "run": cfg.run_id,
        "model": cfg.model,
        "weights": cfg.weights,
        "method": cfg.method,
        "finetune": cfg.finetune,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "resumed_from": fit.resume_from,
        "train_loss": fit.result.training_loss,
        "runtime_s": fit.train_s,
        "load_s": built.load_s,
        "train_samples": len(data.train),
        "trainable_params": built.trainable,
        "peak_memory_gib": _peak_memory(log),
        "train_peak_memory_gib": train_peak,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_wall": _tokens_per_s_wall(records, fit.train_s),
        "memory_growth": memory.growth(runs.MetricsLog(out / "memory.jsonl").read()),
        "tokens_per_sample": sum(data.train["length"]) / max(len(data.train), 1),
        "data_wait_fraction": _wait_fraction(records),
        "mfu": fastpath.mfu(tokens_per_s, built.n_language, env["gpu"]) if tokens_per_s else None,
        "levers": fastpath.applied_levers(
            cfg,
            vision_parts=getattr(model, "vlmfit_vision_no_grad", []),
            workers=trainer.args.dataloader_num_workers,
            allocator=allocator,
            vision_attention=getattr(model, "vlmfit_vision_attention", "sdpa"),
            fused_lora=getattr(model, "vlmfit_fused_lora", 0),
            packing=getattr(model, "vlmfit_packing", None),
            offloaded_layers=getattr(model, "vlmfit_offloaded_layers", 0),
            host_embeddings=getattr(model, "vlmfit_host_embeddings", 0),
            uint8_pixels=getattr(trainer, "vlmfit_pixel_codec", None) is not None,
        ),
        "device": env["gpu"] or "cpu",
    }


def write_results(out: Path, before: dict, after: dict, summary: dict[str, Any]) -> None:
    """``eval.json`` and ``summary.json`` (rank 0), then every rank waits for them."""
    if distributed.is_main():
        files.write_json(out / "eval.json", {"before": before, "after": after})
        files.write_json(out / "summary.json", summary)
        files.apply_umask(out)  # weights and checkpoints readable as the user's other files
    distributed.barrier()  # no rank exits (ending the launch) before the files exist


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def _tokens_per_s(records: list[dict], train_s: float) -> float | None:
    """Steady-state tokens/s from TRL's ``num_tokens`` log: the median rate of the logging
    intervals after the first two (warm-up: allocator growth, kernel autotuning), as a GPU
    loop reports its median step. Checkpoint saves and evaluations fall outside it; the
    whole run's rate is ``tokens_per_s_wall``."""
    import statistics

    pts = [(r["time"], r["num_tokens"]) for r in records if "num_tokens" in r]
    rates = [
        (n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in zip(pts, pts[1:], strict=False) if t1 > t0
    ][2:]
    if rates:
        return statistics.median(rates)
    return _tokens_per_s_wall(records, train_s)


def _tokens_per_s_wall(records: list[dict], train_s: float) -> float | None:
    """Tokens of the whole run over its training time (warm-up, saves and evaluations in)."""
    pts = [r["num_tokens"] for r in records if "num_tokens" in r]
    return pts[-1] / train_s if pts and train_s > 0 else None


def _wait_fraction(records: list[dict]) -> float | None:
    """Share of the steady-state time spent between steps (first log dropped: warm-up)."""
    pts = [(r["step_s"], r["data_wait_s"]) for r in records if "data_wait_s" in r][1:]
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
