"""vlmfit's fast path against the plain recipe, on the same work, in one run (GPU).

    python benchmarks/fastpath.py --suite smolvlm --out results/     # or qwen7b, qwen7b-qlora, all

The work (as in ../shared/reference/architectures.md): one 1000x1000 photo-like image and
a ~200-word answer per sample, full-size architectures with random weights, LoRA r16 on
the language model's linears, bf16, gradient checkpointing, AdamW. Paths:

- ``plain``: the textbook recipe in train mode (``enable_input_require_grads`` +
  non-reentrant checkpointing, PEFT, ``model(**batch).loss``; QLoRA through
  ``prepare_model_for_kbit_training``), a GPU loop over prebuilt batches;
- ``vlmfit-loop``: ``train.build_model`` (every default lever) and TRL's fused LM head,
  the same GPU loop on the same batches;
- ``vlmfit``: ``train.run`` end to end, as ``make train`` runs it (preprocessed cache,
  DataLoader workers, TRL's trainer);
- ``plain-dpo`` / ``vlmfit-dpo``: TRL's DPOTrainer end to end, plain levers vs defaults;
- ``unsloth`` / ``unsloth-loop``: Unsloth in its own environment when ``UNSLOTH_PYTHON`` is
  set (``benchmarks/unsloth_driver.py``); the rows say "not run" otherwise.

Each case runs in a fresh process (peak memory is the process's own). Prints one table
(peak allocated / reserved GiB, tokens/s, samples/s, MFU, ratios) and writes
``fastpath.json`` and ``fastpath.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

WORDS = [
    "the",
    "red",
    "circle",
    "sits",
    "left",
    "of",
    "a",
    "blue",
    "square",
    "while",
    "two",
    "green",
    "triangles",
    "point",
    "up",
    "toward",
    "the",
    "yellow",
    "sky",
]

# Overrides that turn vlmfit's defaults back into the plain TRL recipe (end to end).
PLAIN = {
    "vision_no_grad": False,
    "vision_attention": "sdpa",
    "fused_lora": False,
    "autocast": True,
    "activation_offloading": False,
    "lora_dropout": 0.05,
    "dataloader_num_workers": 0,
    "train_sampling_strategy": "random",
    "expandable_segments": False,
    "packing": False,
}

SUITES: dict[str, list[dict]] = {
    "smolvlm": [
        {"path": "plain", "model": "smolvlm", "finetune": "lora", "mb": 4},
        {"path": "vlmfit-loop", "model": "smolvlm", "finetune": "lora", "mb": 4},
        {"path": "vlmfit", "model": "smolvlm", "finetune": "lora", "mb": 4, "steps": 40},
        {"path": "plain", "model": "smolvlm", "finetune": "qlora", "mb": 4},
        {"path": "vlmfit", "model": "smolvlm", "finetune": "qlora", "mb": 4, "steps": 40},
        {"path": "plain-dpo", "model": "smolvlm", "finetune": "lora", "mb": 2, "steps": 20},
        {"path": "vlmfit-dpo", "model": "smolvlm", "finetune": "lora", "mb": 2, "steps": 20},
    ],
    "qwen7b": [
        {"path": "plain", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 1},
        {"path": "vlmfit-loop", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 1},
        {"path": "vlmfit-loop", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 4},
        {"path": "vlmfit", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 4, "steps": 14},
        {"path": "plain-dpo", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 1, "steps": 8},
        {"path": "vlmfit-dpo", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 1, "steps": 8},
    ],
    "qwen7b-qlora": [
        {"path": "plain", "model": "qwen2.5-vl-7b", "finetune": "qlora", "mb": 1},
        {"path": "vlmfit-loop", "model": "qwen2.5-vl-7b", "finetune": "qlora", "mb": 1},
        {"path": "vlmfit", "model": "qwen2.5-vl-7b", "finetune": "qlora", "mb": 1, "steps": 14},
        {"path": "vlmfit", "model": "qwen2.5-vl-7b", "finetune": "qlora", "mb": 4, "steps": 10},
    ],
}
# Follow-ups of one session (what the first run left unmeasured)
SUITES["qwen7b-rest"] = [
    {"path": "vlmfit", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 4, "steps": 12},
    {"path": "vlmfit-dpo", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 1, "steps": 8},
    {"path": "plain", "model": "qwen2.5-vl-7b", "finetune": "qlora", "mb": 1},
    {"path": "vlmfit", "model": "qwen2.5-vl-7b", "finetune": "qlora", "mb": 1, "steps": 10},
]
SUITES["smolvlm-rest"] = [
    {"path": "vlmfit", "model": "smolvlm", "finetune": "lora", "mb": 4, "steps": 40},
    {"path": "plain-dpo", "model": "smolvlm", "finetune": "lora", "mb": 2, "steps": 20},
    {"path": "vlmfit-dpo", "model": "smolvlm", "finetune": "lora", "mb": 2, "steps": 20},
    {"path": "vlmfit", "model": "smolvlm", "finetune": "qlora", "mb": 4, "steps": 40},
]
SUITES["final"] = [
    {"path": "vlmfit", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 4, "steps": 16},
    {"path": "vlmfit", "model": "smolvlm", "finetune": "lora", "mb": 4, "steps": 40},
    {"path": "vlmfit-dpo", "model": "smolvlm", "finetune": "lora", "mb": 2, "steps": 20},
]
SUITES["probe"] = [  # one lever, end to end: the Trainer's autocast off on SmolVLM
    {"path": "vlmfit", "model": "smolvlm", "finetune": "lora", "mb": 4, "steps": 30,
     "over": {"autocast": False}},
]  # fmt: skip
# One lever at a time on the 7B GPU loop (mb 4): the ladder of docs/benchmarks.md
_OFF = {"vision_no_grad": False, "vision_attention": "sdpa", "lora_dropout": 0.05,
        "expandable_segments": False, "fused_lora": False}  # fmt: skip
_7B = {"path": "vlmfit-loop", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 4}
SUITES["ladder"] = [
    {**_7B, "path": "plain"},
    {**_7B, "fused": False, "over": _OFF, "step": "plain levers through build_model"},
    {**_7B, "over": _OFF, "step": "+ fused LM head"},
    {**_7B, "over": _OFF | {"lora_dropout": 0.0}, "step": "+ LoRA dropout 0"},
    {**_7B, "over": _OFF | {"lora_dropout": 0.0, "vision_no_grad": True},
     "step": "+ vision tower without autograd"},
    {**_7B, "over": {"expandable_segments": False, "fused_lora": False},
     "step": "+ varlen vision attention"},
    {**_7B, "over": {"expandable_segments": False}, "step": "+ fused LoRA"},
    {**_7B, "step": "+ expandable segments (every default, GPU loop)"},
    {**_7B, "path": "vlmfit", "steps": 14, "over": {"autocast": True, "activation_offloading": False},
     "step": "end to end, with autocast and without offloading"},
    {**_7B, "path": "vlmfit", "steps": 14, "step": "end to end, every default"},
]  # fmt: skip
SUITES["smol-probe"] = [  # SmolVLM end to end: where the time goes besides the GPU loop
    {"path": "vlmfit", "model": "smolvlm", "finetune": "lora", "mb": 4, "steps": 40},
    {"path": "vlmfit", "model": "smolvlm", "finetune": "lora", "mb": 4, "steps": 40,
     "over": {"autocast": False}},
]  # fmt: skip
# Padding-free packing on answers of 20-400 words (end to end, the 7B and SmolVLM)
SUITES["packing"] = [
    {"path": "vlmfit", "model": m, "finetune": "lora", "mb": 4, "steps": s, "vary": True,
     "over": {"packing": p, "train_sampling_strategy": "random"}}
    for m, s in (("qwen2.5-vl-7b", 14), ("smolvlm", 40)) for p in (False, True)
]  # fmt: skip
# Run 6 (one command, two GPUs): the 7B under every new default (fused LoRA, no autocast,
# activation offloading) against the plain recipe; Unsloth's counterparts in the other lane
_Q7 = {"model": "qwen2.5-vl-7b"}
SUITES["run6-7b"] = [
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 14},
    {**_Q7, "path": "plain", "finetune": "lora", "mb": 4},
    {**_Q7, "path": "vlmfit", "finetune": "qlora", "mb": 1, "steps": 14},
    {**_Q7, "path": "vlmfit", "finetune": "qlora", "mb": 4, "steps": 10},
    {**_Q7, "path": "plain", "finetune": "qlora", "mb": 1},
    {**_Q7, "path": "plain-dpo", "finetune": "lora", "mb": 1, "steps": 8},
    {**_Q7, "path": "vlmfit-dpo", "finetune": "lora", "mb": 1, "steps": 8},
    {**_Q7, "path": "vlmfit-loop", "finetune": "lora", "mb": 4},
]  # fmt: skip
_SMOL = {"model": "smolvlm", "path": "vlmfit", "steps": 40}
SUITES["run6-unsloth"] = [  # what unsloth_driver mirrors (end to end only)
    {**_SMOL, "finetune": "lora", "mb": 4},
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 14},
    {**_Q7, "path": "vlmfit", "finetune": "qlora", "mb": 1, "steps": 14},
    {**_SMOL, "finetune": "qlora", "mb": 4},
    {**_Q7, "path": "vlmfit", "finetune": "qlora", "mb": 4, "steps": 10},
]  # fmt: skip
# SmolVLM: the micro-batch (host-bound: the same kernels a step carry more tokens) and
# checkpointing, end to end, under the 2.9 GiB of the #7 target
SUITES["run6-smol"] = [
    {**_SMOL, "finetune": "lora", "mb": 4},
    {**_SMOL, "path": "plain", "finetune": "lora", "mb": 4},
    {**_SMOL, "finetune": "lora", "mb": 8, "steps": 30},
    {**_SMOL, "finetune": "lora", "mb": 16, "steps": 20},
    {**_SMOL, "finetune": "lora", "mb": 4, "over": {"gradient_checkpointing": False}},
    {**_SMOL, "finetune": "qlora", "mb": 4},
    {**_SMOL, "finetune": "qlora", "mb": 8, "steps": 30},
    {**_SMOL, "path": "plain-dpo", "finetune": "lora", "mb": 2, "steps": 20},
    {**_SMOL, "path": "vlmfit-dpo", "finetune": "lora", "mb": 2, "steps": 20},
]  # fmt: skip
# Run 6, second command: the 7B end to end alone on its host (the first command shared it
# with Unsloth's compile workers), offloading on / off, and QLoRA between micro-batch 1 and 4
SUITES["run6-7b-e2e"] = [
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 14},
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 14,
     "over": {"activation_offloading": False}},
    {**_Q7, "path": "vlmfit", "finetune": "qlora", "mb": 2, "steps": 12},
    {**_Q7, "path": "vlmfit", "finetune": "qlora", "mb": 3, "steps": 12},
]  # fmt: skip
SUITES["run6-smol-short"] = [c for c in SUITES["run6-smol"] if c["finetune"] == "lora"][:5]
# Run 6, third command: SmolVLM's frozen tower 32 tiles a pass (vision_chunk, the default)
SUITES["run6-smol-chunk"] = [
    {**_SMOL, "finetune": "lora", "mb": 16, "steps": 20},
    {**_SMOL, "finetune": "lora", "mb": 8, "steps": 30},
    {**_SMOL, "finetune": "qlora", "mb": 16, "steps": 20},
    {**_SMOL, "finetune": "lora", "mb": 4},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 20},
]  # fmt: skip
# Run 7 (one command, four GPUs, one lane each): offloading through vlmfit's own checkpoint
# function and the input embeddings in host memory (``activation_offloading=True``) against
# the defaults, the plain recipe and Unsloth (lane "run7-unsloth", unsloth_driver.py)
_OFF7 = {"activation_offloading": True}
SUITES["run7-7b"] = [
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 20},
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 20, "over": _OFF7},
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 5, "steps": 16, "over": _OFF7},
    {**_Q7, "path": "vlmfit-loop", "finetune": "lora", "mb": 4},
    {**_Q7, "path": "plain", "finetune": "lora", "mb": 4},
]  # fmt: skip
SUITES["run7-7b-q"] = [
    {**_Q7, "path": "vlmfit", "finetune": "qlora", "mb": 4, "steps": 14, "over": _OFF7},
    {**_Q7, "path": "vlmfit", "finetune": "qlora", "mb": 2, "steps": 14, "over": _OFF7},
    {**_Q7, "path": "plain", "finetune": "qlora", "mb": 1},
    {**_Q7, "path": "vlmfit-dpo", "finetune": "lora", "mb": 1, "steps": 10},
    {**_Q7, "path": "plain-dpo", "finetune": "lora", "mb": 1, "steps": 8},
]  # fmt: skip
SUITES["run7-unsloth"] = [  # Unsloth's 7B rows (end to end), what unsloth_driver mirrors
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 20},
    {**_Q7, "path": "vlmfit", "finetune": "qlora", "mb": 1, "steps": 14},
]  # fmt: skip
SUITES["run7-smol"] = [
    {**_SMOL, "finetune": "lora", "mb": 11, "steps": 30},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30, "over": _OFF7},
    {**_SMOL, "finetune": "lora", "mb": 16, "steps": 30, "over": _OFF7},
    {**_SMOL, "finetune": "qlora", "mb": 16, "steps": 30, "over": _OFF7},
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12},
    {**_SMOL, "path": "plain", "finetune": "lora", "mb": 4},
]  # fmt: skip
# Run 7, second command: packing (padding-free rows, varlen attention) on top of offloading,
# and where the Trainer's step spends its time next to the GPU loop's ("profile")
_PACK7 = {**_OFF7, "packing": True}
SUITES["run7b-7b"] = [
    {**_Q7, "path": "vlmfit-loop", "finetune": "lora", "mb": 4, "profile": True},
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 16, "over": _OFF7,
     "profile": True},
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 20, "over": _PACK7},
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 5, "steps": 16, "over": _PACK7},
]  # fmt: skip
SUITES["run7b-smol"] = [
    {**_SMOL, "finetune": "qlora", "mb": 12, "steps": 30, "over": _OFF7},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30, "over": _PACK7},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30, "over": _OFF7, "profile": True},
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12, "profile": True},
]  # fmt: skip
# Run 7, third command: every default (packing on, offloading as the memory check decides:
# on for the 7B, off for SmolVLM) against the plain recipe and Unsloth ("run7-unsloth"),
# one command, one GPU a lane
SUITES["run7-final-7b"] = [
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 20},
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 5, "steps": 16},
    {**_Q7, "path": "vlmfit-loop", "finetune": "lora", "mb": 4},
    {**_Q7, "path": "plain", "finetune": "lora", "mb": 4},
]  # fmt: skip
SUITES["run7-final-q"] = [
    {**_Q7, "path": "vlmfit", "finetune": "qlora", "mb": 4, "steps": 14},
    {**_Q7, "path": "plain", "finetune": "qlora", "mb": 1},
    {**_Q7, "path": "vlmfit-dpo", "finetune": "lora", "mb": 1, "steps": 10},
    {**_Q7, "path": "plain-dpo", "finetune": "lora", "mb": 1, "steps": 8},
]  # fmt: skip
SUITES["run7-final-smol"] = [
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30},
    {**_SMOL, "finetune": "qlora", "mb": 12, "steps": 30},
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12},
    {**_SMOL, "path": "plain", "finetune": "lora", "mb": 4},
]  # fmt: skip
# Run 7, fourth command: DPO and SmolVLM micro-batch 11 under every default
SUITES["run7-final-dpo"] = [
    {**_Q7, "path": "vlmfit-dpo", "finetune": "lora", "mb": 1, "steps": 10},
    {**_Q7, "path": "plain-dpo", "finetune": "lora", "mb": 1, "steps": 8},
]  # fmt: skip
SUITES["run7-final-smol11"] = [
    {**_SMOL, "finetune": "lora", "mb": 11, "steps": 30},
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 11},
]  # fmt: skip
# Run 7, fifth command (one H200, 16 cores): SmolVLM end to end at make train's logging
# interval (5) with the Trainer's NaN filter off (a per-step sync; not kept: no gain shown)
SUITES["run7-smol-host"] = [
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 40, "logging_steps": 5},
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12},
]  # fmt: skip
# Run 8: steps without host-GPU syncs (RunConfig.sync_free), SmolVLM against its GPU loop;
# "trace" rows are diagnoses (kernel timeline, syncs per step), not measurements
_SYNC_OFF = {"sync_free": False}
SUITES["run8-smol"] = [
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30, "over": _SYNC_OFF},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30},
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12},
]  # fmt: skip
SUITES["run8-trace"] = [
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12, "trace": True},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 20, "trace": True},
]  # fmt: skip
# Run 8: what else slows the end-to-end step on the host (one H200, 16 cores)
SUITES["run8-host"] = [
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30, "over": {"dataloader_num_workers": 4}},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30, "env": {"OMP_NUM_THREADS": "2"}},
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12},
]  # fmt: skip
# Run 8, the last command: every default (sync_free on) against the GPU loop, the plain
# recipe and Unsloth ("run8-unsloth"), SmolVLM and the 7B one GPU each
SUITES["run8-final-smol"] = [
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30},
    {**_SMOL, "finetune": "qlora", "mb": 12, "steps": 30},
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30, "over": _SYNC_OFF},
]  # fmt: skip
SUITES["run8-final-7b"] = [
    {**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 20},
    {**_Q7, "path": "vlmfit-loop", "finetune": "lora", "mb": 4},
    {**_Q7, "path": "plain", "finetune": "lora", "mb": 4},
]  # fmt: skip
SUITES["run8-unsloth"] = [{**_Q7, "path": "vlmfit", "finetune": "lora", "mb": 4, "steps": 20}]
# Next (run 9): uint8_pixels end to end on the 16-core host of one H200, and SmolVLM's
# peak with the pixel mask as bool
_U8_OFF = {"uint8_pixels": False}
SUITES["run9-host"] = [
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30},
    {**_SMOL, "finetune": "lora", "mb": 12, "steps": 30, "over": _U8_OFF},
    {**_SMOL, "finetune": "qlora", "mb": 12, "steps": 30},
    {**_SMOL, "path": "vlmfit-loop", "finetune": "lora", "mb": 12},
]  # fmt: skip
SUITES["all"] = [c for k in ("smolvlm", "qwen7b", "qwen7b-qlora") for c in SUITES[k]]


# ------------------------------------------------------------------------------ data


def make_data(
    folder: Path, n: int, side: int = 1000, preference: bool = False, vary: bool = False
) -> Path:
    """``n`` samples of one ``side``-pixel photo-like JPEG and a long answer (LLaMA-Factory)."""
    import numpy as np
    from PIL import Image

    name = ("dpo" if preference else "train") + ("-vary" if vary else "") + ".json"
    out = folder / name
    if out.exists():
        return out
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    recs = []
    for i in range(n):
        img = np.stack([x * 255, y * 255, (x + y) * 127], -1) + rng.normal(0, 20, (side, side, 3))
        path = folder / "img" / f"{i}.jpg"
        if not path.exists():
            Image.fromarray(img.clip(0, 255).astype("uint8")).save(path, quality=90)
        # vary: 20 to 400 words, as real answers are (padding is then what packing removes)
        answer = " ".join(rng.choice(WORDS, int(rng.integers(20, 401)) if vary else 200))
        user = {"role": "user", "content": "<image>Describe this picture in detail."}
        if preference:
            recs.append(
                {
                    "conversations": [{"from": "human", "value": user["content"]}],
                    "chosen": {"from": "gpt", "value": answer},
                    "rejected": {"from": "gpt", "value": " ".join(rng.choice(WORDS, 200))},
                    "images": [f"img/{i}.jpg"],
                }
            )
        else:
            recs.append(
                {
                    "messages": [user, {"role": "assistant", "content": answer}],
                    "images": [f"img/{i}.jpg"],
                }
            )
    out.write_text(json.dumps(recs))
    return out


# ----------------------------------------------------------------------------- cases


def _batch(cfg, processor, data: Path, mb: int):
    """The first ``mb`` samples of vlmfit's prepared cache through TRL's VLM collator."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlmfit import train

    folder = train.prepare_data(cfg, str(data), progress=False)
    ds = train.load_prepared(folder, preference=False)
    return DataCollatorForVisionLanguageModeling(processor)([ds[i] for i in range(mb)])


def _plain_model(cfg):
    """The textbook recipe: load, checkpointing + input grads, (kbit prep), PEFT LoRA r16."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from vlmfit.models import load_model

    spec = cfg.spec
    model, processor = load_model(
        spec,
        weights="random",
        dtype=torch.bfloat16,
        quantization="nf4" if cfg.finetune == "qlora" else "none",
        device="cuda",
    )
    if cfg.finetune == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=16, lora_alpha=16, target_modules=spec.family.lora_target_regex)
    return get_peft_model(model, lcfg), processor


def loop_setup(case: dict, data: Path):
    """The model of ``case["path"]`` on one prebuilt batch: (model, batch, step, cfg), where
    ``step()`` runs forward, backward and AdamW once. ``case["over"]`` sets RunConfig fields
    (vlmfit's path); ``case["fused"] = False`` scores through the full logits instead."""
    import torch

    from vlmfit import train
    from vlmfit.config import resolve

    over = {
        "model": case["model"],
        "weights": "random",
        "finetune": case["finetune"],
        "per_device_train_batch_size": case["mb"],
        "lora_alpha": 16,
    }
    cfg, _ = resolve(over | case.get("over", {}))
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test with tiny models
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fused = False
    if case["path"] == "plain":
        model, processor = _plain_model(cfg)
    else:
        from vlmfit.train import fastpath

        fastpath.set_allocator(cfg.expandable_segments)
        model, processor = train.build_model(cfg)
        if case.get("fused", True):
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model.get_base_model())
            fused = True
    batch = _batch(cfg, processor, data, case["mb"])
    batch = {
        k: v.to(dev, dtype=next(model.parameters()).dtype) if v.is_floating_point() else v.to(dev)
        for k, v in batch.items()
    }
    model.train()  # as Trainer does: from_pretrained models are in eval mode (no checkpointing)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(mark=lambda name: None):
        loss = model(**batch, fused_lm_head=True).loss if fused else model(**batch).loss
        mark("forward")
        loss.backward()
        mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer step")

    return model, batch, step, cfg


def gpu_loop(case: dict, data: Path, steps: int = 10, warmup: int = 2) -> dict:
    import torch

    model, batch, step, cfg = loop_setup(case, data)
    tokens = int(batch["attention_mask"].sum())
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    row = _row(case, cfg, model, tokens / step_s, case["mb"] / step_s, tokens / case["mb"])
    if case.get("profile"):  # the same phases as end_to_end's, GPU synchronized
        spans: dict[str, list[float]] = {}
        for _ in range(3):
            torch.cuda.synchronize()
            last = [time.perf_counter()]

            def mark(name, spans=spans, last=last):
                torch.cuda.synchronize()
                now = time.perf_counter()
                spans.setdefault(name, []).append(now - last[0])
                last[0] = now

            step(mark)
        row["phases_s"] = {k: sorted(v)[1] for k, v in spans.items()}
    if case.get("trace"):
        row["trace"] = _trace_loop(step)
    row["vision_attention"] = getattr(model, "vlmfit_vision_attention", None)
    return row


def _trace_loop(step, steps: int = 3) -> dict:
    """``case["trace"]``: the loop's kernel timeline over ``steps`` back-to-back steps and
    its host-GPU syncs per step (benchmarks/tracing.py)."""
    import torch
    import tracing
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof, tracing.HostSampler() as host:
        for _ in range(steps):
            host.mark()
            step()
        torch.cuda.synchronize()
    with tracing.SyncLog() as syncs:
        step()
    return tracing.busy(prof, sampler=host) | {"syncs_per_step": syncs.per_step(1)}


def end_to_end(case: dict, data: Path) -> dict:
    import torch

    from vlmfit import train
    from vlmfit.config import RunConfig, resolve

    dpo = case["path"].endswith("dpo")
    over = {
        "model": case["model"],
        "weights": "random",
        "finetune": case["finetune"],
        "method": "dpo" if dpo else "sft",
        "data": str(data),
        "eval_data": None,
        "preference_eval_data": None,
        "run": f"bench-{case['path']}-{case['model']}-{case['finetune']}-mb{case['mb']}",
        "runs_dir": str(data.parent / "runs"),
        "per_device_train_batch_size": case["mb"],
        "max_steps": case["steps"],
        "logging_steps": case.get("logging_steps", RunConfig.logging_steps),
        "save_steps": 10_000,
        "overwrite": True,
        "lora_alpha": 16,
    }
    over |= case.get("over", {})
    if case["path"].startswith("plain"):
        over |= PLAIN | ({"qlora_upcast": True} if case["finetune"] == "qlora" else {})
    cfg, _ = resolve(over)
    phases = _time_phases() if case.get("profile") else None
    trace, callbacks = _trace_steps(case["steps"]) if case.get("trace") else (None, ())
    s = train.run(cfg, progress=False, callbacks=callbacks)
    peak = s["train_peak_memory_gib"]
    reserved = torch.cuda.max_memory_reserved() / 2**30
    tps = s["tokens_per_s"]
    per_sample = s.get("tokens_per_sample") or 0
    row = _row(case, cfg, None, tps, None, per_sample, peak=peak, reserved=reserved)
    row["mfu"] = s["mfu"]
    row["data_wait_fraction"] = s["data_wait_fraction"]
    row["levers"] = {k: v for k, v in s["levers"].items() if k != "vision_no_grad_modules"}
    if phases is not None:
        row["phases_s"] = phases()
    if trace is not None:
        row["trace"] = trace
    return row


def _trace_steps(steps: int, n: int = 3) -> tuple[dict, tuple]:
    """``case["trace"]``: the Trainer's kernel timeline over ``n`` steps near the end of the
    run, then its host-GPU syncs per step over the next ``n`` (benchmarks/tracing.py). A
    diagnosis: the traced steps run slower, so the case's tokens/s is not a measurement.
    Returns (the result, filled as the run goes; the callback for ``train.run``)."""
    import torch
    import tracing
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    first = steps - 2 * n - 2
    if first < 2:
        raise ValueError(f"a trace case needs at least {2 * n + 4} steps")
    out: dict = {}

    class Trace(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == first:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.host = tracing.HostSampler().__enter__()
            if first <= state.global_step < first + n:
                self.host.mark()
            elif state.global_step == first + n:
                torch.cuda.synchronize()
                self.host.__exit__(None, None, None)
                self.prof.__exit__(None, None, None)
                out.update(tracing.busy(self.prof, sampler=self.host))
                self.syncs = tracing.SyncLog().__enter__()
            elif state.global_step == first + 2 * n:
                self.syncs.__exit__(None, None, None)
                out["syncs_per_step"] = self.syncs.per_step(n)

    return out, (Trace(),)


def _time_phases():
    """Diagnosis (``case["profile"]``): where a Trainer step's time goes, GPU synchronized at
    each boundary (so the step runs a little slower than unprofiled). Returns a function
    giving the median seconds per phase over the steps after the first four."""
    import statistics
    from collections import defaultdict

    import torch
    from transformers import TrainerCallback

    from vlmfit.train import pipeline

    spans: dict[str, list[float]] = defaultdict(list)
    marks: dict[str, float] = {}

    def mark(name: str) -> float:
        torch.cuda.synchronize()
        marks[name] = time.perf_counter()
        return marks[name]

    def timed(obj, attr: str, label: str):
        fn = getattr(obj, attr)

        def run(*a, **k):
            t = mark(label)
            out = fn(*a, **k)
            spans[label].append(mark(label + ".end") - t)
            return out

        setattr(obj, attr, run)

    class Phases(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            now = mark("begin")
            if "end" in marks:
                spans["between steps (data, logging)"].append(now - marks["end"])

        def on_pre_optimizer_step(self, args, state, control, **kw):
            spans["backward to optimizer (clipping)"].append(
                mark("pre") - marks.get("backward.end", marks["pre"])
            )

        def on_optimizer_step(self, args, state, control, **kw):
            spans["optimizer step"].append(mark("opt") - marks["pre"])

        def on_step_end(self, args, state, control, **kw):
            spans["after optimizer (scheduler, zero_grad)"].append(mark("end") - marks["opt"])
            spans["whole step"].append(marks["end"] - marks["begin"])

    original = pipeline.build_trainer

    def build_trainer(*a, **k):
        trainer = original(*a, **k)
        trainer.add_callback(Phases())
        timed(trainer, "compute_loss", "forward (compute_loss)")
        timed(trainer.accelerator, "backward", "backward")
        return trainer

    pipeline.build_trainer = build_trainer
    return lambda: {k: statistics.median(v[4:] or v) for k, v in spans.items()}


def _row(case, cfg, model, tps, sps, per_sample, peak=None, reserved=None) -> dict:
    import torch

    from vlmfit.train import fastpath

    name = torch.cuda.get_device_name()
    n_lang = fastpath.language_params(model, cfg.spec) if model is not None else None
    return {
        **case,
        "peak_gib": peak if peak is not None else torch.cuda.max_memory_allocated() / 2**30,
        "reserved_gib": reserved
        if reserved is not None
        else torch.cuda.max_memory_reserved() / 2**30,
        "tokens_per_s": tps,
        "samples_per_s": sps,
        "tokens_per_sample": per_sample,
        "mfu": fastpath.mfu(tps, n_lang, name) if n_lang else None,
        "gpu": name,
    }


def run_case(case: dict, work: Path) -> dict:
    data = make_data(
        work / "data",
        n=max(64, case["mb"] * (case.get("steps", 8) + 2)),
        vary=case.get("vary", False),
        preference=case["path"].endswith("dpo"),
    )
    if case["path"] in ("plain", "vlmfit-loop"):
        return gpu_loop(case, data)
    return end_to_end(case, data)


# ----------------------------------------------------------------------------- driver


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def table(rows: list[dict]) -> str:
    """Markdown table. "vs plain": tokens/s over the plain row of the same model and method;
    "vs unsloth": a vlmfit row over the Unsloth row of the same model, method, kind (GPU loop
    vs loop, end to end vs end to end) and micro-batch."""
    head = (
        "| model | method | path | mb | peak GiB | reserved GiB | tokens/s | samples/s | MFU "
        "| vs plain | vs unsloth |"
    )
    lines = [head, "|" + "---|" * 11]
    base, unsloth = {}, {}
    for r in rows:
        if r.get("path", "").startswith("plain") and "error" not in r:
            base[(r["model"], r["finetune"], "dpo" in r["path"])] = r
        if r.get("path", "").startswith("unsloth") and "error" not in r:
            unsloth[(r["model"], r["finetune"], r["path"].endswith("-loop"), r["mb"])] = r
    for r in rows:
        method = ("dpo " if "dpo" in r["path"] else "") + r["finetune"]
        if "error" in r:
            lines.append(
                f"| {r['model']} | {method} | {r['path']} | {r['mb']} | {r['error']} |" + " |" * 6
            )
            continue
        b = base.get((r["model"], r["finetune"], "dpo" in r["path"]))
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-"
        u = None
        if r["path"] in ("vlmfit", "vlmfit-loop"):
            u = unsloth.get((r["model"], r["finetune"], r["path"].endswith("-loop"), r["mb"]))
        vs_u = f"{r['tokens_per_s'] / u['tokens_per_s']:.2f}x" if u else "-"
        sps = f"{r['samples_per_s']:.2f}" if r.get("samples_per_s") else "-"
        if not r.get("samples_per_s") and r.get("tokens_per_sample"):
            sps = f"{r['tokens_per_s'] / r['tokens_per_sample']:.2f}"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        lines.append(
            f"| {r['model']} | {method} | {r['path']} | {r['mb']} | {r['peak_gib']:.2f} | "
            f"{r['reserved_gib']:.2f} | {r['tokens_per_s']:,.0f} | {sps} | {mfu} | {ratio} | "
            f"{vs_u} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--suite", default="smolvlm", choices=sorted(SUITES))
    ap.add_argument("--out", default="results/fastpath")
    ap.add_argument("--work", default="/tmp/vlmfit-bench", help="data, caches and runs")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    a = ap.parse_args(argv)
    work = Path(a.work)
    if a.case:
        case = json.loads(a.case)
        try:
            row = run_case(case, work)
        except Exception as e:  # noqa: BLE001 - an OOM or a missing package is a row
            import traceback

            traceback.print_exc()
            row = {**case, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        print("ROW " + json.dumps(row), flush=True)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in SUITES[a.suite]:
        t = time.time()
        proc = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(case), "--work", str(work)],
            capture_output=True,
            text=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"} | case.get("env", {}),
        )
        found = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        row = (
            json.loads(found[-1])
            if found
            else {**case, "error": (proc.stderr or "no output")[-300:]}
        )
        row["wall_s"] = round(time.time() - t, 1)
        rows.append(row)
        with open(out / "rows.jsonl", "a") as f:  # kept even when a later case is cut off
            f.write(json.dumps(row) + "\n")
        if "error" in row:
            print(proc.stderr[-3000:], file=sys.stderr)
        print(json.dumps(row), flush=True)
    # Unsloth runs in its own environment (its pins clash with the lock): UNSLOTH_PYTHON,
    # each case in a fresh process of it (benchmarks/unsloth_driver.py); unset, its rows
    # say "not run".
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import unsloth_driver

    rows += unsloth_driver.run_rows(SUITES[a.suite], work, out)
    result = {
        "suite": a.suite,
        "versions": versions(),
        "rows": rows,
        "command": " ".join([sys.executable, *sys.argv]),
    }
    (out / f"fastpath-{a.suite}.json").write_text(json.dumps(result, indent=1))
    md = table(rows)
    (out / f"fastpath-{a.suite}.md").write_text(md + "\n")
    print(json.dumps(result["versions"]))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
