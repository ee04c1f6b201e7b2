"""Command lines: ``python -m vlmfit estimate``, ``plan`` and ``reference``."""

from __future__ import annotations

import argparse
import json
import sys

from vlmfit.budget import Budget
from vlmfit.memory.constants import ENGINES, RECIPES, VISION_CHUNK_TILES
from vlmfit.memory.estimator import estimate
from vlmfit.memory.planner import local_gpu_gib, plan
from vlmfit.memory.profile import format_rows
from vlmfit.memory.reference import reference_markdown, reference_rows, reference_source
from vlmfit.models import registry


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit 2 with our prefix, never a traceback
        raise _UsageError(message)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise _UsageError(f"--image expects WIDTHxHEIGHT, got {text!r}") from None
    if w < 1 or h < 1:
        raise _UsageError(f"--image sides must be >= 1, got {text!r}")
    return w, h


def _lever_flags(p: argparse.ArgumentParser) -> None:
    """The training-path levers the estimator models (RunConfig fields of the same name)."""
    p.add_argument("--no-fused-lora", action="store_true",
                   help="PEFT's own LoRA layer (fused_lora=False): a bf16 copy of the input "
                   "per adapted linear")  # fmt: skip
    off = p.add_mutually_exclusive_group()
    off.add_argument("--activation-offloading", dest="activation_offloading",
                     action="store_const", const=True, default=None,
                     help="kept activations in pinned CPU memory (default: off; training "
                     "turns it on only where the run fits no other way)")  # fmt: skip
    off.add_argument("--no-activation-offloading", dest="activation_offloading",
                     action="store_const", const=False, help="activation_offloading=False")  # fmt: skip
    p.add_argument("--vision-chunk", type=int, default=None, metavar="TILES",
                   help="a tiled vision tower (SmolVLM) TILES tiles a pass; 0: all at once "
                   f"(default: the recipe's: vlmfit {VISION_CHUNK_TILES}, plain 0)")  # fmt: skip
    p.add_argument("--autocast", choices=["on", "off"], default=None,
                   help="the Trainer's bf16 autocast (default: vlmfit's rule, off with fused "
                   "LoRA)")  # fmt: skip


def _autocast_arg(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def cli_estimate(argv: list[str]) -> int:
    """``python -m vlmfit estimate --model M ...``: predicted peak GiB and its breakdown.

    Exit 0; 2 on a usage error. ``--json``: one object with ``peak_gib`` and ``breakdown``.
    """
    p = _Parser(
        prog="vlmfit estimate", description="Predict the peak GPU memory of a training step."
    )
    p.add_argument("--model", required=True, help="registry name (vlmfit tokens --help lists them)")
    p.add_argument("--method", choices=["lora", "qlora", "full", "projector"], default="lora",
                   help="what trains (FINETUNE)")  # fmt: skip
    p.add_argument("--image", default="1000x1000", help="image size WxH, one per sample")
    p.add_argument("--text-tokens", type=int, default=256, help="text tokens per sample")
    p.add_argument("--batch", type=int, default=1, help="micro-batch (per_device_train_batch_size)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--max-image-tokens", type=int, default=None, help="visual-token budget")
    p.add_argument("--no-grad-ckpt", action="store_true", help="without gradient checkpointing")
    p.add_argument("--recipe", choices=list(RECIPES), default="vlmfit",
                   help="vlmfit's default path (default) or the textbook recipe in train mode")  # fmt: skip
    p.add_argument("--dpo", action="store_true", help="DPO (chosen + rejected per sample)")
    _lever_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    try:
        a = p.parse_args(argv)
        e = estimate(
            registry.get(a.model),
            finetune=a.method,
            lora_r=a.lora_r,
            micro_batch=a.batch,
            text_tokens=a.text_tokens,
            image_size=_parse_size(a.image),
            budget=Budget(max_image_tokens=a.max_image_tokens) if a.max_image_tokens else None,
            gradient_checkpointing=not a.no_grad_ckpt,
            recipe=a.recipe,
            dpo=a.dpo,
            fused_lora=False if a.no_fused_lora else None,  # None: the recipe's default
            activation_offloading=a.activation_offloading,
            autocast=_autocast_arg(a.autocast),
            vision_chunk=a.vision_chunk,
        )
    except (_UsageError, registry.UnknownModelError, ValueError) as err:
        print(f"vlmfit estimate: error: {err}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({**e.as_dict(), "recipe": a.recipe, "dpo": a.dpo}))
    else:
        print(e.table())
    return 0


def cli_plan(argv: list[str]) -> int:
    """``python -m vlmfit plan --model M [--gpu-gib G] ...``: estimate + fitting configs.

    Exit 0 with a table of candidates; 1 when nothing fits (with the reason); 2 on a usage
    error (unknown model, no --gpu-gib and no CUDA device).
    """
    p = _Parser(prog="vlmfit plan", description="Predict training memory; list configs that fit.")
    p.add_argument("--model", required=True, help="registry name (python -m vlmfit tokens)")
    p.add_argument("--gpu-gib", type=float, help="GPU memory, GiB (default: this CUDA device)")
    p.add_argument("--finetune", choices=["lora", "qlora", "full", "projector"], default=None,
                   help="restrict the search (default: lora and qlora)")  # fmt: skip
    p.add_argument("--image", default="1000x1000", help="image size WxH (default 1000x1000)")
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=1, help="for the estimate shown")
    p.add_argument("--max-image-tokens", type=int, default=None, help="for the estimate shown")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--vision-no-grad", action="store_true",
                   help="assume the frozen vision tower runs without autograd")  # fmt: skip
    p.add_argument("--margin", type=float, default=0.10, help="safety margin (fraction)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (make NPROC=)")
    p.add_argument(
        "--engine", choices=list(ENGINES), default="ddp", help="with --nproc > 1 (DIST=)"
    )
    p.add_argument("--effective-batch", type=int, default=16,
                   help="samples per optimizer step: micro-batch x accumulation")  # fmt: skip
    p.add_argument("--top", type=int, default=10, help="candidates to list")
    _lever_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    try:
        a = p.parse_args(argv)
        spec = registry.get(a.model)
        size = _parse_size(a.image)
        gpu = a.gpu_gib if a.gpu_gib is not None else local_gpu_gib()
        if gpu is None:
            raise _UsageError("no CUDA device here: pass --gpu-gib (e.g. --gpu-gib 80 for an H100)")
        if gpu <= 0:
            raise _UsageError("--gpu-gib must be positive")
        ft = a.finetune or "lora"
        budget = Budget(max_image_tokens=a.max_image_tokens) if a.max_image_tokens else None
        e = estimate(
            spec,
            finetune=ft,
            lora_r=a.lora_r,
            micro_batch=a.micro_batch,
            text_tokens=a.text_tokens,
            image_size=size,
            budget=budget,
            vision_no_grad=True if a.vision_no_grad else None,
            nproc=a.nproc,
            engine=a.engine,
            fused_lora=not a.no_fused_lora,
            activation_offloading=a.activation_offloading,
            autocast=_autocast_arg(a.autocast),
        )
    except (_UsageError, registry.UnknownModelError, ValueError) as err:
        print(f"vlmfit plan: error: {err}", file=sys.stderr)
        return 2
    result = plan(
        spec,
        gpu,
        text_tokens=a.text_tokens,
        image_size=size,
        finetune=a.finetune,
        vision_no_grad=True if a.vision_no_grad else None,
        margin=a.margin,
        lora_r=a.lora_r,
        effective_batch=a.effective_batch,
        nproc=a.nproc,
        engine=a.engine,
        fused_lora=not a.no_fused_lora,
        activation_offloading=a.activation_offloading,
        autocast=_autocast_arg(a.autocast),
    )
    if a.json:
        print(
            json.dumps(
                {
                    "model": spec.name,
                    "gpu_gib": gpu,
                    "estimate": e.as_dict(),
                    "candidates": [c.row() for c in result[: a.top]],
                    "fits": bool(result),
                    "reason": result.reason,
                }
            )
        )
        return 0 if result else 1
    print(e.table())
    print(f"\nconfigurations that fit {gpu:g} GiB with {a.margin:.0%} margin (best first):")
    if not result:
        print(f"  none: {result.reason}")
        return 1
    cols = [
        "finetune", "micro_batch", "max_image_tokens", "visual_tokens", "gradient_checkpointing",
        "peak_gib", "required_gib", "headroom_gib", "make",
    ]  # fmt: skip
    print(format_rows([c.row() for c in result[: a.top]], cols))
    return 0


def cli_reference(argv: list[str]) -> int:
    """``python -m vlmfit reference [--json] [--runs DIR] [--model M] [--validation PATH]``."""
    p = argparse.ArgumentParser(
        prog="vlmfit reference",
        description="Measured peak GPU memory (model x method x image budget) from the GPU "
        "sweep (docs/memory-validation.json) and the CUDA runs of a runs folder, with the "
        "estimator's prediction beside each measurement.",
    )
    p.add_argument("--json", action="store_true", help="rows and source as JSON")
    p.add_argument("--runs", default="runs", help="runs folder to add CUDA runs from")
    p.add_argument("--model", help="only this model's rows")
    p.add_argument("--validation", help="the sweep's table (default docs/memory-validation.json)")
    a = p.parse_args(argv)
    rows = reference_rows(a.validation, a.runs, model=a.model)
    source = reference_source(a.validation)
    if a.json:
        print(json.dumps({"source": source, "rows": rows}, indent=1, default=str))
    else:
        print(reference_markdown(rows, source))
    return 0
