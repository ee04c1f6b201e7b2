"""The memory estimator against the GPU: predicted vs measured peak on 30+ configurations.

    python benchmarks/memory_sweep.py --out results/mem                  # every GPU, 2 cases each
    python benchmarks/memory_sweep.py --out results/mem --limit-s 520    # stop launching at 520 s
    python benchmarks/memory_sweep.py --list                             # the configurations, no GPU
    python benchmarks/memory_sweep.py --smoke --out /tmp/mem-smoke       # CPU: tiny models, the code path

For each configuration (model x method x image x micro-batch x checkpointing, SFT or DPO)
a fresh process trains the full-size architecture with random weights on vlmfit's own
path: ``train.build_model`` (every default lever), then ``train.build_trainer`` (TRL's
SFTTrainer / DPOTrainer exactly as ``make train`` builds them: the collator with the
assistant-only loss, the fused LM head, the Trainer's fused AdamW, bf16 autocast, gradient
clipping; DPO scores chosen and rejected as one batch of 2 x micro-batch and runs the
reference forward with the adapter disabled), 1 warm-up + 3 optimizer steps. That is
``train.run``'s training phase without its bookkeeping (evaluation, saving); cases with
``path="run"`` go through ``train.run`` itself as a cross-check. Measured: the largest
per-step ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) of the steps
after the warm-up, each step's peak read and reset at the step's end.

Predicted: ``vlmfit.memory.estimate`` with what ``python -m vlmfit estimate`` takes (model,
method, image size and budget, micro-batch, checkpointing, ``--dpo``) and the text tokens of
the real batch (its padded length minus the estimator's image span), so the predicted
sequence is the trained one. Each row keeps those arguments (``estimate_args``) and the
equivalent command line; ``tests/test_memory_sweep.py`` re-runs them against the measured
peaks of a committed ``docs/memory-validation.json``.

Configurations run in queues, ``--per-gpu`` (default 2) at a time on each GPU
(``CUDA_VISIBLE_DEVICES``): a peak is the process's own allocator statistic, so a
neighbour on the same GPU changes no figure, and every configuration here needs under
30 GiB of an H200's 139 (``--per-gpu 1``: one at a time). Queues are balanced by expected
seconds, the 7B cases dealt out evenly over GPUs and queues, every QLoRA case of one model
in one queue (the first writes the random weights that 4-bit loading reads). Each finished
row is appended to ``OUT/rows.jsonl`` and ``OUT/memory-validation.{md,json}`` are rewritten,
so a run cut off keeps what it measured; ``--resume`` runs only what ``rows.jsonl`` lacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

GIB = 2**30
#: Text tokens a sample is assumed to have where no batch was seen (``--list``, CPU tests):
#: the ~200-word answer below gives 406-421 with the random-weights tokenizer (H200 runs).
NOMINAL_TEXT_TOKENS = 400
#: Within this relative error a prediction counts as right; more than this under is an OOM.
TOLERANCE = 0.10
#: Memory of the GPU the sweep was sized for (H200), GiB: every prediction must fit it.
H200_GIB = 139.0

WORDS = [
    "the", "red", "circle", "sits", "left", "of", "a", "blue", "square", "while", "two",
    "green", "triangles", "point", "up", "toward", "the", "yellow", "sky",
]  # fmt: skip

# ------------------------------------------------------------------------------ cases


def case(
    model: str,
    finetune: str,
    image: tuple[int, int],
    mb: int,
    *,
    ckpt: bool = True,
    kind: str = "sft",
    max_image_tokens: int | None = None,
    path: str = "trainer",
    extra: bool = False,
) -> dict[str, Any]:
    """One configuration. ``extra``: run last in its queue (first to go when time runs out)."""
    c = {
        "model": model,
        "finetune": finetune,
        "kind": kind,
        "image": list(image),
        "max_image_tokens": max_image_tokens,
        "mb": mb,
        "ckpt": ckpt,
        "path": path,
        "extra": extra,
    }
    c["id"] = case_id(c)
    c["est_s"] = expected_seconds(c)
    return c


def case_id(c: dict[str, Any]) -> str:
    w, h = c["image"]
    budget = f"@{c['max_image_tokens']}" if c.get("max_image_tokens") else ""
    ck = "ckpt" if c["ckpt"] else "nockpt"
    return f"{c['model']}:{c['kind']}:{c['finetune']}:{w}x{h}{budget}:mb{c['mb']}:{ck}:{c['path']}"


#: Seconds a case takes on an H200, process start to exit (imports ~10 s, random weights
#: built on the GPU, preprocessing cache hit, trainer set-up, 4 steps). From the fast-path
#: runs (docs/bench-raw: a 7B loop case took 25-36 s, a 7B DPO case end to end 56 s, 7B
#: QLoRA ~50 s more the first time, when the random weights are written for 4-bit loading).
BASE_S = {
    "smolvlm": 22,
    "smolvlm-2b": 26,
    "qwen2-vl-2b": 26,
    "qwen2.5-vl-3b": 30,
    "qwen2.5-vl-7b": 36,
}
QLORA_FIRST_S = {"smolvlm": 5, "smolvlm-2b": 15, "qwen2-vl-2b": 15, "qwen2.5-vl-3b": 20,
                 "qwen2.5-vl-7b": 50}  # fmt: skip


def expected_seconds(c: dict[str, Any]) -> float:
    s = BASE_S.get(c["model"], 15)
    big = c["model"] == "qwen2.5-vl-7b"
    if c["kind"] == "dpo":
        s += 12 if big else 8
    if c["finetune"] == "qlora":  # 4-bit load from disk (+ writing the weights once)
        s += 10 + QLORA_FIRST_S.get(c["model"], 0)
    if c["finetune"] == "full":
        s += 6 if big else 3
    if c["path"] == "run":
        s += 15
    if c["mb"] * c["image"][0] * c["image"][1] >= 4 * 10**6:
        s += 5
    return float(s)


L448, L1000, L1600 = (448, 448), (1000, 1000), (1600, 1200)


def sweep_cases() -> list[dict[str, Any]]:
    """The GPU configurations: 38 over five models (8 of them Qwen2.5-VL-7B), 7 DPO; two
    through ``train.run`` (one repeats a trainer-path case: the two paths should agree)."""
    c = case
    return [
        # SmolVLM-256M: every image is upscaled to 2048 px (17 tiles) unless the budget says
        # otherwise, so the image axis is the budget and the 4x3 layout of 1600x1200.
        c("smolvlm", "lora", L1000, 4),  # the fast-path table's row (2.28 / 2.36 GiB)
        c("smolvlm", "lora", L1000, 1, ckpt=False),
        c("smolvlm", "lora", L1600, 2),
        c("smolvlm", "lora", L1000, 4, ckpt=False, max_image_tokens=320),
        c("smolvlm", "qlora", L1000, 4),
        c("smolvlm", "full", L1000, 2),
        c("smolvlm", "projector", L1000, 4),
        c("smolvlm", "lora", L1000, 2, kind="dpo", path="run"),  # through train.run
        c("smolvlm", "lora", L448, 1, kind="dpo", ckpt=False),
        c("smolvlm", "lora", L1000, 4, path="run", extra=True),  # the first row, by train.run
        # SmolVLM-2B (Idefics3, 384 px tiles)
        c("smolvlm-2b", "lora", L1000, 1),
        c("smolvlm-2b", "lora", L1600, 2, ckpt=False),
        c("smolvlm-2b", "lora", L448, 4),
        c("smolvlm-2b", "qlora", L1000, 2),
        c("smolvlm-2b", "full", L1000, 1),
        c("smolvlm-2b", "lora", L1000, 1, kind="dpo"),
        # Qwen2-VL-2B
        c("qwen2-vl-2b", "lora", L448, 4),
        c("qwen2-vl-2b", "lora", L1000, 2, ckpt=False),
        c("qwen2-vl-2b", "lora", L1600, 1),
        c("qwen2-vl-2b", "qlora", L1000, 1),
        c("qwen2-vl-2b", "full", L448, 2),
        c("qwen2-vl-2b", "projector", L1000, 2, extra=True),
        c("qwen2-vl-2b", "lora", L448, 2, kind="dpo"),
        # Qwen2.5-VL-3B
        c("qwen2.5-vl-3b", "lora", L1000, 1),
        c("qwen2.5-vl-3b", "lora", L1000, 4),
        c("qwen2.5-vl-3b", "lora", L448, 2, ckpt=False),
        c("qwen2.5-vl-3b", "lora", L1600, 1, ckpt=False),
        c("qwen2.5-vl-3b", "qlora", L1600, 2),
        c("qwen2.5-vl-3b", "lora", L1000, 1, kind="dpo"),
        c("qwen2.5-vl-3b", "full", L448, 1, extra=True),
        # Qwen2.5-VL-7B (8: ~40 s each, the QLoRA one ~100 s)
        c("qwen2.5-vl-7b", "lora", L1000, 1),  # fast-path table: 17.00 GiB
        c("qwen2.5-vl-7b", "lora", L1000, 4),  # fast-path table: 20.33 / 20.03 GiB
        c("qwen2.5-vl-7b", "lora", L448, 2),
        c("qwen2.5-vl-7b", "lora", L1600, 1),
        c("qwen2.5-vl-7b", "lora", L1000, 1, ckpt=False),
        c("qwen2.5-vl-7b", "qlora", L1000, 1),
        c("qwen2.5-vl-7b", "lora", L1000, 1, kind="dpo"),  # fast-path table: 18.13 GiB
        c("qwen2.5-vl-7b", "lora", L1600, 1, kind="dpo", max_image_tokens=1024, extra=True),
    ]


def smoke_cases() -> list[dict[str, Any]]:
    """CPU: tiny models through the same code (nothing measured; every path exercised)."""
    c = case
    return [
        c("tiny-smolvlm", "lora", (64, 64), 2),
        c("tiny-qwen2-vl", "full", (96, 72), 1, ckpt=False),
        c("tiny-qwen2.5-vl", "projector", (64, 64), 1),
        c("tiny-qwen2-vl", "lora", (64, 64), 1, kind="dpo"),
        c("tiny-smolvlm", "lora", (96, 72), 1, kind="dpo", ckpt=False, path="run"),
        c("tiny-qwen2-vl", "lora", (64, 64), 2, path="run"),
    ]


# ------------------------------------------------------------------------- prediction


def estimate_args(
    c: dict[str, Any],
    text_tokens: int,
    *,
    fused_lora: bool = True,
    activation_offloading: bool = False,
    autocast: bool | None = None,
    vision_chunk: int = 0,
    host_embeddings: bool | None = None,
) -> dict[str, Any]:
    """What ``python -m vlmfit estimate`` takes for case ``c`` (JSON-able), with the levers
    the run trained with (``RunConfig.fused_lora``, TRL's activation offloading and the
    Trainer's autocast as ``vlmfit.train.fastpath`` resolves them; autocast None: its rule)."""
    return {
        "model": c["model"],
        "finetune": c["finetune"],
        "micro_batch": c["mb"],
        "text_tokens": int(text_tokens),
        "image_size": list(c["image"]),
        "max_image_tokens": c.get("max_image_tokens"),
        "gradient_checkpointing": bool(c["ckpt"]),
        "dpo": c["kind"] == "dpo",
        "fused_lora": bool(fused_lora),
        "activation_offloading": bool(activation_offloading),
        "autocast": autocast,
        "vision_chunk": int(vision_chunk),
        "host_embeddings": host_embeddings,
    }


def predict(args: dict[str, Any]):
    """``memory.estimate`` from ``estimate_args`` (the default recipe: vlmfit's own path).

    Rows without ``fused_lora`` were measured before that lever existed (run 5, commit
    d0f14c7's path): PEFT's own LoRA layer, so ``fused_lora=False``; rows without
    ``vision_chunk`` ran SmolVLM's tower over every tile at once (``vision_chunk=0``)."""
    from vlmfit import memory
    from vlmfit.budget import Budget

    a = dict(args)
    model = a.pop("model")
    mit = a.pop("max_image_tokens", None)
    a["image_size"] = tuple(a["image_size"])
    a.setdefault("fused_lora", False)
    a.setdefault("vision_chunk", 0)  # rows before RunConfig.vision_chunk: all tiles at once
    if a.get("activation_offloading") and "host_embeddings" not in a:  # rows before run 7:
        a["activation_offloading"] = "trl"  # TRL's offloading, the embeddings on the GPU
    return memory.estimate(model, budget=Budget(max_image_tokens=mit) if mit else None, **a)


def estimate_command(args: dict[str, Any]) -> str:
    w, h = args["image_size"]
    cmd = (
        f"python -m vlmfit estimate --model {args['model']} --method {args['finetune']} "
        f"--image {w}x{h} --text-tokens {args['text_tokens']} --batch {args['micro_batch']}"
    )
    if args.get("max_image_tokens"):
        cmd += f" --max-image-tokens {args['max_image_tokens']}"
    if not args["gradient_checkpointing"]:
        cmd += " --no-grad-ckpt"
    if args["dpo"]:
        cmd += " --dpo"
    if not args.get("fused_lora", False):
        cmd += " --no-fused-lora"
    if args.get("activation_offloading"):
        cmd += " --activation-offloading"
    else:  # explicit: rows measured before run 6 ran with the old rule (on for 1B+ models)
        cmd += " --no-activation-offloading"
    if args.get("autocast") is not None:
        cmd += f" --autocast {'on' if args['autocast'] else 'off'}"
    cmd += f" --vision-chunk {args.get('vision_chunk', 0)}"  # the CLI's default is the recipe's
    return cmd


def image_span(c: dict[str, Any]) -> int:
    """Tokens of one sample's image span as the estimator counts them (placeholders + markup)."""
    return predict(estimate_args(c, 0)).sequence_tokens


# ------------------------------------------------------------------------------ queues


def assign(cases: list[dict[str, Any]], n: int) -> list[list[dict[str, Any]]]:
    """``n`` queues: the big models' cases (7B and up) dealt out evenly by count, the rest
    balanced by expected seconds (longest first onto the lightest queue).

    QLoRA cases of one model stay together (the first writes the random weights the others
    read). Each queue runs its larger models first and ``extra`` cases last.
    """
    n = max(1, n)
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in cases:
        key = f"{c['model']}:qlora" if c["finetune"] == "qlora" else c["id"]
        groups.setdefault(key, []).append(c)
    order = sorted(
        groups.values(),
        key=lambda g: (
            any(c["extra"] for c in g),
            -params_b(g[0]["model"]),
            -sum(c["est_s"] for c in g),
        ),
    )
    queues: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    load = [0.0] * n
    for g in order:
        model = g[0]["model"]
        if params_b(model) >= BIG_B:  # evenly by count, then by load
            i = min(range(n), key=lambda k: (sum(c["model"] == model for c in queues[k]), load[k]))
        else:
            i = min(range(n), key=lambda k: (load[k], k))
        queues[i] += g
        load[i] += sum(c["est_s"] for c in g)
    pos = {c["id"]: k for k, c in enumerate(cases)}
    for q in queues:
        q.sort(key=lambda c: (c["extra"], -params_b(c["model"]), pos[c["id"]]))
    return queues


#: Models of at least this many billion parameters are dealt out evenly over the queues.
BIG_B = 5.0


def params_b(model: str) -> float:
    from vlmfit.models import registry

    try:
        return registry.get(model).params_b
    except KeyError:
        return 0.0


# --------------------------------------------------------------------------------- data


def make_data(folder: Path, n: int, size: tuple[int, int]) -> tuple[Path, Path]:
    """``n`` photo-like JPEGs of ``size`` with a ~200-word answer: SFT and DPO files."""
    import numpy as np
    from PIL import Image

    w, h = size
    sft, dpo = folder / "train.json", folder / "dpo.json"
    if sft.exists() and dpo.exists():
        return sft, dpo
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    y, x = y / h, x / w
    sft_recs, dpo_recs = [], []
    for i in range(n):
        img = np.stack([x * 255, y * 255, (x + y) * 127], -1) + rng.normal(0, 20, (h, w, 3))
        name = f"img/{i}.jpg"
        Image.fromarray(img.clip(0, 255).astype("uint8")).save(folder / name, quality=90)
        prompt = "<image>Describe this picture in detail."
        answer = " ".join(rng.choice(WORDS, 200))
        other = " ".join(rng.choice(WORDS, 200))
        sft_recs.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ],
                "images": [name],
            }
        )
        dpo_recs.append(
            {
                "conversations": [{"from": "human", "value": prompt}],
                "chosen": {"from": "gpt", "value": answer},
                "rejected": {"from": "gpt", "value": other},
                "images": [name],
            }
        )
    tmp = folder / ".tmp.json"
    for path, recs in ((sft, sft_recs), (dpo, dpo_recs)):
        tmp.write_text(json.dumps(recs))
        tmp.rename(path)
    return sft, dpo


def data_folder(work: Path, size: list[int] | tuple[int, int]) -> Path:
    return work / "data" / f"{size[0]}x{size[1]}"


# ------------------------------------------------------------------- one case (a child)


def run_config(c: dict[str, Any], work: Path, steps: int, warmup: int) -> dict[str, Any]:
    """RunConfig overrides of case ``c``: vlmfit's defaults but what the case sets."""
    folder = data_folder(work, c["image"])
    return {
        "model": c["model"],
        "weights": "random",
        "method": c["kind"],
        "finetune": c["finetune"],
        "data": str(folder / ("dpo.json" if c["kind"] == "dpo" else "train.json")),
        "eval_data": None,
        "preference_eval_data": None,
        "run": c["id"].replace(":", "_").replace("@", "-b"),
        "runs_dir": str(work / "runs"),
        "per_device_train_batch_size": c["mb"],
        "gradient_checkpointing": c["ckpt"],
        "max_image_tokens": c.get("max_image_tokens"),
        # 1600x1200 at Qwen's default budget is 2,451 visual tokens: over the default 2048,
        # which preprocessing would drop
        "max_length": 8192,
        "max_steps": warmup + steps,
        "logging_steps": 1,
        "save_steps": 100_000,
        "overwrite": True,
        # workers only prepare batches on the CPU: no GPU memory, seconds of start-up
        "dataloader_num_workers": 0,
    }


class _Probe:
    """Per-step GPU peaks (read and reset at each step's end) and the shapes of the batches
    the trainer's loss saw, attached to the trainer ``train.build_trainer`` returns."""

    def __init__(self, spec):
        self.spec = spec
        self.steps: list[dict[str, float]] = []
        self.batches: list[dict[str, int]] = []
        self.image_id: int | None = None
        self.weights_gib: float | None = None
        self.load_s: float | None = None
        self.levers: dict[str, Any] = {}

    def wrap(self, train) -> None:
        import torch

        build_model, build_trainer = train.build_model, train.build_trainer

        def built_model(cfg):
            t = time.perf_counter()
            model, processor = build_model(cfg)
            self.load_s = time.perf_counter() - t
            if torch.cuda.is_available():
                self.weights_gib = torch.cuda.memory_allocated() / GIB
            self.levers = {
                "vision_no_grad": bool(getattr(model, "vlmfit_vision_no_grad", None)),
                "vision_attention": getattr(model, "vlmfit_vision_attention", None),
            }
            tok = getattr(processor, "tokenizer", processor)
            self.image_id = tok.convert_tokens_to_ids(self.spec.family.image_token)
            return model, processor

        def built_trainer(*args, **kwargs):
            trainer = build_trainer(*args, **kwargs)
            self.attach(trainer)
            return trainer

        train.build_model, train.build_trainer = built_model, built_trainer

    def attach(self, trainer) -> None:
        import torch
        from transformers import TrainerCallback

        probe = self

        class StepPeak(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    probe.steps.append(
                        {
                            "step": state.global_step,
                            "peak_gib": torch.cuda.max_memory_allocated() / GIB,
                            "reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                            "allocated_gib": torch.cuda.memory_allocated() / GIB,
                        }
                    )
                    torch.cuda.reset_peak_memory_stats()

        trainer.add_callback(StepPeak())
        compute_loss = trainer.compute_loss

        def loss_with_shapes(model, inputs, *args, **kwargs):
            if model.training:
                self.batches.append(self.shape(inputs))
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = loss_with_shapes

    def shape(self, inputs) -> dict[str, int]:
        ids = inputs["input_ids"]
        out = {"rows": int(ids.shape[0]), "seq": int(ids.shape[1])}
        if self.image_id is not None:
            out["visual"] = int((ids[0] == self.image_id).sum())
        if inputs.get("attention_mask") is not None:
            out["tokens"] = int(inputs["attention_mask"].sum())
        if inputs.get("labels") is not None:
            out["label_tokens"] = int((inputs["labels"] != -100).sum())
        elif inputs.get("completion_mask") is not None:
            out["label_tokens"] = int(inputs["completion_mask"].sum())
        return out


def _train_only(cfg) -> None:
    """``train.run``'s training phase: data, model, trainer, ``trainer.train()``."""
    import torch

    from vlmfit.train import fastpath, pipeline, runs

    fastpath.set_allocator(cfg.expandable_segments)  # before the first CUDA allocation
    folder = pipeline.prepare_data(cfg, cfg.data, split=cfg.dataset_split, progress=False)
    cfg.data = str(folder / "records.jsonl")
    train_ds = pipeline.load_prepared(folder, preference=cfg.method == "dpo")
    torch.manual_seed(cfg.seed)
    model, processor = pipeline.build_model(cfg)
    out = runs.run_dir(cfg.runs_dir, cfg.run_id)
    out.mkdir(parents=True, exist_ok=True)
    log = runs.MetricsLog(out / "metrics.jsonl")
    trainer = pipeline.build_trainer(
        cfg, model, processor, train_ds, None, out, log, progress=False
    )
    if torch.cuda.is_available():  # the training peak, as train.run measures it
        torch.cuda.reset_peak_memory_stats()
    trainer.train()


def measure(c: dict[str, Any], work: Path, steps: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Train case ``c`` (this process) and return its row: predicted vs measured."""
    import torch

    from vlmfit import train
    from vlmfit.config import resolve
    from vlmfit.models import registry
    from vlmfit.train import fastpath, pipeline

    os.chdir(work)  # preprocessing caches (data/cache) under the work folder
    spec = registry.get(c["model"])
    cfg, origin = resolve(run_config(c, work, steps, warmup))
    cuda = torch.cuda.is_available()
    fastpath.set_allocator(cfg.expandable_segments)  # as train.run: before any allocation
    save_s = None
    if cuda and c["finetune"] == "qlora" and not spec.tiny:
        # 4-bit loading reads random weights written once (models.save_random); write them
        # here and free the bf16 copy, so neither counts in the measured process's peak
        import gc

        from vlmfit import models

        t = time.perf_counter()
        models.save_random(spec, dtype=train._dtype(cfg))
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        save_s = time.perf_counter() - t
    probe = _Probe(spec)
    probe.wrap(pipeline)  # where train.run looks build_model / build_trainer up
    t = time.perf_counter()
    if c["path"] == "run":
        train.run(cfg, origin, progress=False)
    else:
        _train_only(cfg)
    train_s = time.perf_counter() - t
    steady = probe.steps[warmup:] or probe.steps
    measured = max(s["peak_gib"] for s in steady) if steady else None
    reserved = max(s["reserved_gib"] for s in steady) if steady else None
    seen = probe.batches[warmup:] or probe.batches  # the measured steps' batches
    b = max(seen, key=lambda x: x["rows"] * x["seq"]) if seen else {}
    span = image_span(c)
    seq = b.get("seq", span + NOMINAL_TEXT_TOKENS)
    from vlmfit.memory import planner

    levers = planner._cfg_levers(cfg) if hasattr(cfg, "fused_lora") else {"fused_lora": False}
    args = estimate_args(c, max(0, seq - span), **levers)
    e = predict(args)
    return {
        **{k: v for k, v in c.items() if k != "est_s"},
        "predicted_gib": e.peak_gib,
        "measured_gib": measured,
        "reserved_gib": reserved,
        "error_pct": 100 * (e.peak_gib / measured - 1) if measured else None,
        "peak_phase": e.peak_phase,
        "breakdown_gib": {k: round(v, 3) for k, v in e.breakdown.items()},
        "estimate_args": args,
        "estimate_command": estimate_command(args),
        "measured_with_warmup_gib": max(s["peak_gib"] for s in probe.steps)
        if probe.steps
        else None,
        "step_peaks_gib": [round(s["peak_gib"], 3) for s in probe.steps],
        "weights_gib": probe.weights_gib,
        "predicted_weights_gib": e.weights_gib,
        "sequence_tokens": seq,
        "step_sequence_tokens": [x["seq"] for x in probe.batches],
        "batch_rows": b.get("rows"),
        "visual_tokens": b.get("visual"),
        "predicted_visual_tokens": e.visual_tokens,
        "label_tokens": b.get("label_tokens"),
        "text_tokens": args["text_tokens"],
        "steps": len(probe.steps) if cuda else None,
        "load_s": probe.load_s,
        "save_s": save_s,
        "train_s": train_s,
        "levers": probe.levers,
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------ the driver (parent)


def versions() -> dict[str, str | None]:
    """Python and the libraries benchmarks/fastpath.py reports."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fastpath as bench

    return {"python": sys.version.split()[0], **bench.versions()}


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    measured = [r for r in rows if r.get("measured_gib")]
    errs = [r["error_pct"] / 100 for r in measured]
    within = sum(abs(e) <= TOLERANCE for e in errs)
    under = [r["id"] for r in measured if r["error_pct"] / 100 < -TOLERANCE]
    over = [r["id"] for r in measured if r["error_pct"] / 100 > TOLERANCE]
    n = len(measured)
    return {
        "configurations": len(rows),
        "measured": n,
        "failed": [{"id": r["id"], "error": r["error"]} for r in rows if r.get("error")],
        "within_10pct": within,
        "within_10pct_share": within / n if n else None,
        "under_more_than_10pct": under,
        "over_more_than_10pct": over,
        "mean_abs_error_pct": 100 * sum(map(abs, errs)) / n if n else None,
        "worst_under_pct": 100 * min(errs) if errs else None,
        "worst_over_pct": 100 * max(errs) if errs else None,
        "models": sorted({r["model"] for r in measured}),
        "holds": bool(n >= 30 and not under and within >= 0.9 * n),
    }


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown rows; with ``--repredict``'s output, the run's own prediction beside."""
    again = any(r.get("predicted_at_run_gib") is not None for r in rows)
    extra_head, extra_rule = (" at the run GiB (error) |", "---|") if again else ("", "")
    lines = [
        "| model | method | image | mb | ckpt | kind | predicted GiB | measured GiB | "
        "reserved GiB | error |" + extra_head + " tokens |",
        "|---|---|---|---|---|---|---|---|---|---|" + extra_rule + "---|",
    ]
    for r in rows:
        w, h = r["image"]
        image = f"{w}x{h}" + (
            f" (<={r['max_image_tokens']} vt)" if r.get("max_image_tokens") else ""
        )
        kind = r["kind"] + (" (train.run)" if r.get("path") == "run" else "")
        head = (
            f"| {r['model']} | {r['finetune']} | {image} | {r['mb']} | "
            f"{'on' if r['ckpt'] else 'off'} | {kind} | "
        )
        if r.get("error"):
            blank = " |" if again else ""
            lines.append(
                head + f"{_fmt(r.get('predicted_gib'))} | {r['error'][:90]} | | |{blank} |"
            )
            continue
        err = _fmt(r.get("error_pct"), "+.1f") + ("%" if r.get("error_pct") is not None else "")
        tokens = f"{r.get('batch_rows') or '-'} x {r.get('sequence_tokens') or '-'}"
        before = ""
        if again:
            e0 = r.get("error_at_run_pct")
            before = f" {_fmt(r.get('predicted_at_run_gib'))} ({_fmt(e0, '+.1f')}%) |"
        lines.append(
            head + f"{_fmt(r['predicted_gib'])} | {_fmt(r.get('measured_gib'))} | "
            f"{_fmt(r.get('reserved_gib'))} | {err} |{before} {tokens} |"
        )
    return "\n".join(lines)


def summary_text(s: dict[str, Any]) -> str:
    n = s["measured"]
    if not n:
        return f"{s['configurations']} configurations, none measured."
    text = (
        f"{n} configurations measured over {len(s['models'])} models: "
        f"{s['within_10pct']} within 10 % ({100 * s['within_10pct_share']:.0f} %), "
        f"{len(s['under_more_than_10pct'])} more than 10 % under (an OOM risk), "
        f"{len(s['over_more_than_10pct'])} more than 10 % over; mean |error| "
        f"{s['mean_abs_error_pct']:.1f} %, worst under {s['worst_under_pct']:+.1f} %, worst "
        f"over {s['worst_over_pct']:+.1f} %."
    )
    if s["under_more_than_10pct"]:
        text += " Under by more than 10 %: " + ", ".join(s["under_more_than_10pct"]) + "."
    if s["failed"]:
        text += f" {len(s['failed'])} failed: " + ", ".join(f["id"] for f in s["failed"]) + "."
    text += (
        " The issue's bar (30+ configurations, 90 % within 10 %, none more than 10 % under): "
        + ("met." if s["holds"] else "not met.")
    )
    return text


def markdown(doc: dict[str, Any]) -> str:
    """``memory-validation.md``: the versions, the command, the table, the summary."""
    rows = doc["rows"]
    v = doc.get("versions") or {}
    lib = ", ".join(f"{k} {v[k]}" for k in v if v[k])
    g = doc.get("git") or {}
    md = [
        "# Memory: predicted against measured",
        "",
        f"GPU: {doc.get('gpu') or '-'}; {lib}; vlmfit commit {g.get('commit') or '-'}"
        + (" (with uncommitted changes)" if g.get("dirty") else "")
        + f"; {doc.get('started', '-')}.",
        "",
        f"Command: `{doc.get('command', '-')}`",
        "",
        f"Random weights; {doc.get('warmup')} warm-up + {doc.get('steps')} optimizer steps; "
        "each configuration a fresh process on vlmfit's path (`train.build_model` with every "
        "default lever + TRL's SFTTrainer / DPOTrainer from `train.build_trainer`; "
        "`(train.run)`: through `train.run` itself). Measured = the largest per-step "
        "`torch.cuda.max_memory_allocated` after the warm-up; predicted = "
        "`memory.estimate` (each row's `estimate_command` in the JSON) with the batch's "
        "text tokens. Tokens = rows x padded length of the largest batch (DPO: chosen + "
        "rejected rows). Error = predicted / measured - 1.",
    ]
    if doc.get("repredicted"):
        md += ["", f"Predicted again by the estimator as of {doc['repredicted']['at']} "
               f"(`{doc['repredicted']['command']}`); each row keeps the prediction made at "
               "the run (`predicted_at_run_gib`)."]  # fmt: skip
    md += ["", table(rows), "", summary_text(doc["summary"])]
    if doc.get("not_run"):
        md += ["", "Not run (time budget): " + ", ".join(doc["not_run"]) + "."]
    return "\n".join(md) + "\n"


def write_outputs(out: Path, doc: dict[str, Any]) -> None:
    """``out/memory-validation.json`` (atomically) and ``out/memory-validation.md``."""
    tmp = out / ".memory-validation.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.rename(out / "memory-validation.json")
    (out / "memory-validation.md").write_text(markdown(doc))


def repredict(path: Path, out: Path) -> dict[str, Any]:
    """Predict the measured rows of a validation JSON again with the estimator as it is now
    and write ``out/memory-validation.{json,md}``; the source file is left as it is. The
    measurements stay; ``predicted_gib``, ``error_pct``, the breakdown and the command are
    the estimator's now, the run's own prediction is kept as ``predicted_at_run_gib`` /
    ``error_at_run_pct``. Rows from before a lever existed count as without it
    (``predict``: no ``fused_lora`` key = PEFT's LoRA layer)."""
    doc = json.loads(path.read_text())
    for r in doc["rows"]:
        args = r.get("estimate_args")
        r.setdefault("predicted_at_run_gib", r.get("predicted_gib"))
        if not args:  # a row that failed: its prediction at the nominal text tokens
            with contextlib.suppress(Exception):
                r["predicted_gib"] = predict(
                    estimate_args(r, NOMINAL_TEXT_TOKENS, fused_lora=False)
                ).peak_gib
            continue
        r.setdefault("error_at_run_pct", r.get("error_pct"))
        e = predict(args)
        r["predicted_gib"] = e.peak_gib
        r["peak_phase"] = e.peak_phase
        r["breakdown_gib"] = {k: round(v, 3) for k, v in e.breakdown.items()}
        r["predicted_weights_gib"] = e.weights_gib
        r["estimate_command"] = estimate_command({"fused_lora": False, **args})
        if r.get("measured_gib"):
            r["error_pct"] = 100 * (e.peak_gib / r["measured_gib"] - 1)
    doc["summary"] = summarize(doc["rows"])
    doc["repredicted"] = {
        "at": time.strftime("%Y-%m-%d"),
        "command": f"python3 benchmarks/memory_sweep.py --repredict {path} --out {out}",
        "git": git_state(),
    }
    write_outputs(out, doc)
    return doc


class Sweep:
    """The parent: queues, child processes, rows, the summary files (rewritten per row)."""

    def __init__(self, a, cases: list[dict[str, Any]], kept: list[dict[str, Any]]):
        self.a = a
        self.out = Path(a.out)
        self.work = Path(a.work)
        self.cases = cases
        self.rows = list(kept)
        self.not_run: list[str] = []
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.meta = {
            "command": " ".join(["python3", "benchmarks/memory_sweep.py", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
            "git": git_state(),
            "steps": a.steps,
            "warmup": a.warmup,
            "smoke": a.smoke,
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def child(self, c: dict[str, Any], device: str | None, timeout: float) -> dict[str, Any]:
        env = os.environ | {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "lib"), os.environ.get("PYTHONPATH")) if p
        )
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(c)]
        cmd += ["--work", str(self.work), "--steps", str(self.a.steps)]
        cmd += ["--warmup", str(self.a.warmup)]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,  # its own process group: a timeout ends its helpers too
        )  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            stderr += f"\n(killed after {timeout:.0f} s)"
        found = [ln[4:] for ln in stdout.splitlines() if ln.startswith("ROW ")]
        if found:
            row = json.loads(found[-1])
        else:
            last = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            row = {
                **{k: v for k, v in c.items() if k != "est_s"},
                "error": f"exit {proc.returncode}: {last[0][:300]}",
            }
            with contextlib.suppress(Exception):  # at the nominal text tokens
                row["predicted_gib"] = predict(estimate_args(c, NOMINAL_TEXT_TOKENS)).peak_gib
        if row.get("error"):
            with self.lock, open(self.out / "failures.log", "a") as f:
                f.write(f"==== {c['id']}\n{stderr[-6000:]}\n")
        return row

    def worker(self, q: int, queue: list[dict[str, Any]], device: str | None) -> None:
        limit, hard = self.a.limit_s, self.a.hard_s
        for k, c in enumerate(queue):
            now = self.elapsed()
            if limit is not None and now + c["est_s"] > limit:
                with self.lock:
                    self.not_run.append(c["id"])
                print(f"[q{q}] skip {c['id']}: {now:.0f} s + ~{c['est_s']:.0f} s > --limit-s",
                      flush=True)  # fmt: skip
                continue
            timeout = max(240.0, 5 * c["est_s"])
            if hard is not None:
                timeout = min(timeout, max(5.0, hard - now))
            t = time.monotonic()
            row = self.child(c, device, timeout)
            row["wall_s"] = round(time.monotonic() - t, 1)
            row["queue"] = q
            with self.lock:
                self.rows.append(row)
                with open(self.out / "rows.jsonl", "a") as f:  # kept when the run is cut off
                    f.write(json.dumps(row) + "\n")
                self.write()
            if row.get("error"):
                msg = row["error"]
            else:
                msg = (
                    f"predicted {row['predicted_gib']:.2f} GiB, measured "
                    f"{_fmt(row.get('measured_gib'))} ({_fmt(row.get('error_pct'), '+.1f')} %)"
                )
            print(f"[q{q} {k + 1}/{len(queue)} {self.elapsed():.0f} s] {c['id']}: {msg} "
                  f"({row['wall_s']:.0f} s, expected ~{c['est_s']:.0f})", flush=True)  # fmt: skip

    def ordered_rows(self) -> list[dict[str, Any]]:
        pos = {c["id"]: k for k, c in enumerate(self.cases)}
        return sorted(self.rows, key=lambda r: pos.get(r["id"], len(pos)))

    def write(self) -> dict[str, Any]:
        rows = self.ordered_rows()
        s = summarize(rows)
        gpu = next((r["gpu"] for r in rows if r.get("gpu")), None)
        doc = {
            **self.meta,
            "gpu": gpu,
            "elapsed_s": round(self.elapsed(), 1),
            "not_run": list(self.not_run),
            "summary": s,
            "rows": rows,
        }
        write_outputs(self.out, doc)
        return doc

    def run(self, todo: list[dict[str, Any]], devices: list[str]) -> dict[str, Any]:
        queues = assign(todo, len(devices))
        for q, queue in enumerate(queues):
            print(f"queue {q} (device {devices[q]}): {len(queue)} cases, "
                  f"~{sum(c['est_s'] for c in queue):.0f} s", flush=True)  # fmt: skip
        threads = [
            threading.Thread(target=self.worker, args=(q, queue, devices[q]), daemon=True)
            for q, queue in enumerate(queues)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self.lock:
            return self.write()


def prepare(cases: list[dict[str, Any]], work: Path, steps: int, warmup: int) -> None:
    """Data for every image size and each model's local processor folder, built once here
    (children built them at the same time otherwise)."""
    from vlmfit.models import builders as tiny
    from vlmfit.models import registry

    n = max(8, max(c["mb"] for c in cases) * (steps + warmup))
    for size in {tuple(c["image"]) for c in cases}:
        make_data(data_folder(work, size), n, size)
    for model in sorted({c["model"] for c in cases}):
        if registry.get(model).tiny:
            tiny.ensure_tiny(model)
        else:
            tiny.ensure_random(model)


def devices_for(gpus: int, per_gpu: int, smoke: bool) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each queue: queue q runs on GPU q % gpus."""
    if smoke:
        return ["" for _ in range(gpus * per_gpu)]  # CPU, even on a GPU host
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    ids = ids or [str(i) for i in range(gpus)]
    return [ids[(q % gpus) % len(ids)] for q in range(gpus * per_gpu)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=None,
                    help="rows.jsonl, memory-validation.* (default results/memory)")  # fmt: skip
    ap.add_argument("--work", default="/tmp/vlmfit-memory-sweep", help="data, caches, runs")
    ap.add_argument("--gpus", type=int, default=None,
                    help="worker queues, one GPU each (default: torch.cuda.device_count())")  # fmt: skip
    ap.add_argument("--per-gpu", type=int, default=2,
                    help="cases at a time on each GPU (peaks are per process; default 2)")  # fmt: skip
    ap.add_argument("--limit-s", type=float, default=None,
                    help="launch no case expected to end after this many seconds")  # fmt: skip
    ap.add_argument("--hard-s", type=float, default=None,
                    help="kill cases still running at this many seconds (default: limit + 60)")  # fmt: skip
    ap.add_argument("--list", action="store_true", help="print the configurations and exit")
    ap.add_argument("--json", action="store_true", help="with --list: one JSON list")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU: tiny models through the same code path (peaks come out None)")  # fmt: skip
    ap.add_argument("--only", default=None, help="run the cases whose id contains this")
    ap.add_argument("--resume", action="store_true", help="keep OUT/rows.jsonl, run the rest")
    ap.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps before them")
    ap.add_argument("--repredict", metavar="JSON", default=None,
                    help="predict a validation JSON's measured rows again with the estimator "
                    "as it is now: OUT/memory-validation.{json,md}")  # fmt: skip
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    a = ap.parse_args(argv)

    if a.repredict:
        if not a.out:
            print("--repredict needs --out DIR (the source JSON is left as it is)", file=sys.stderr)
            return 2
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = repredict(Path(a.repredict), out)
        print(table(doc["rows"]))
        print()
        print(summary_text(doc["summary"]))
        return 0
    a.out = a.out or "results/memory"

    if a.case:
        c = json.loads(a.case)
        try:
            row = measure(c, Path(a.work), steps=a.steps, warmup=a.warmup)
        except Exception as e:  # noqa: BLE001 - an OOM or a missing package is a row
            import traceback

            traceback.print_exc()
            row = {**{k: v for k, v in c.items() if k != "est_s"}}
            with contextlib.suppress(Exception):
                row["predicted_gib"] = predict(estimate_args(c, NOMINAL_TEXT_TOKENS)).peak_gib
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print("ROW " + json.dumps(row), flush=True)
        return 0

    cases = smoke_cases() if a.smoke else sweep_cases()
    if a.only:
        cases = [c for c in cases if a.only in c["id"]]
    if a.list:
        gpus, per_gpu = a.gpus or 2, max(1, a.per_gpu)
        queues = assign(cases, gpus * per_gpu)
        queue_of = {c["id"]: q for q, qs in enumerate(queues) for c in qs}
        listed = []
        for c in cases:
            e = predict(estimate_args(c, NOMINAL_TEXT_TOKENS))
            listed.append({**c, "queue": queue_of[c["id"]], "predicted_gib": e.peak_gib})
        if a.json:
            print(json.dumps(listed, indent=1))
            return 0
        for c in listed:
            print(f"gpu{c['queue'] % gpus} q{c['queue']}  ~{c['est_s']:3.0f} s  {c['predicted_gib']:6.2f} GiB  {c['id']}"
                  + ("  (extra)" if c["extra"] else ""))  # fmt: skip
        per = {
            m: sum(c["model"] == m for c in cases) for m in dict.fromkeys(c["model"] for c in cases)
        }
        print(f"{len(cases)} configurations: " + ", ".join(f"{m} {k}" for m, k in per.items()))
        loads = ", ".join(
            f"q{q} ~{sum(c['est_s'] for c in qs):.0f} s" for q, qs in enumerate(queues)
        )
        print(f"predicted at {NOMINAL_TEXT_TOKENS} text tokens; {len(queues)} queues "
              f"({per_gpu} per GPU, {gpus} GPUs): {loads}")  # fmt: skip
        return 0

    if a.gpus is not None:
        n = a.gpus
    elif a.smoke:
        n = 1
    else:
        import torch

        n = torch.cuda.device_count()
    if n < 1:
        print("no CUDA device: --smoke runs tiny models on the CPU; --list prints the cases",
              file=sys.stderr)  # fmt: skip
        return 2
    if a.hard_s is None and a.limit_s is not None:
        a.hard_s = a.limit_s + 60
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    kept: list[dict[str, Any]] = []
    rows_file = out / "rows.jsonl"
    if rows_file.exists():
        if a.resume:
            old = [json.loads(ln) for ln in rows_file.read_text().splitlines() if ln.strip()]
            kept = [r for r in old if not r.get("error")]
            rows_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
        else:
            rows_file.rename(out / "rows.jsonl.old")
    (out / "failures.log").unlink(missing_ok=True)
    done = {r["id"] for r in kept}
    todo = [c for c in cases if c["id"] not in done]
    sweep = Sweep(a, cases, kept)
    prepare(todo or cases, work, a.steps, a.warmup)
    devices = devices_for(n, max(1, a.per_gpu), a.smoke)
    print(f"{len(todo)} cases to run ({len(kept)} kept), {len(devices)} queue(s) on {n} "
          f"device(s); prepared in {sweep.elapsed():.0f} s", flush=True)  # fmt: skip
    doc = sweep.run(todo, devices) if todo else sweep.write()
    print()
    print(table(doc["rows"]))
    print()
    print(summary_text(doc["summary"]))
    print(f"\nwrote {out / 'memory-validation.md'}, {out / 'memory-validation.json'}, {rows_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
