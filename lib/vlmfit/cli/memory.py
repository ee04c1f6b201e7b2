"""``vlmfit estimate``, ``vlmfit plan`` and ``vlmfit reference``: training memory.

The stage imports live inside the functions: ``vlmfit.memory`` re-exports these commands.
"""

from __future__ import annotations

import argparse
import json

from vlmfit.cli.common import Parser, command, image_size, models_help
from vlmfit.config import RunConfig

FINETUNES = ["lora", "qlora", "full", "projector"]


def _lever_flags(p: argparse.ArgumentParser) -> None:
    """The training-path levers the estimator models (RunConfig fields of the same name)."""
    from vlmfit.memory.constants import VISION_CHUNK_TILES

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


def estimate_parser() -> Parser:
    from vlmfit.memory.constants import RECIPES

    d = RunConfig()
    p = Parser("estimate", "Predict the peak GPU memory of a training step.", epilog=models_help())
    p.add_argument("--model", required=True, help="registry name")
    p.add_argument("--method", choices=FINETUNES, default=d.finetune,
                   help=f"what trains (FINETUNE; default {d.finetune})")  # fmt: skip
    p.add_argument("--image", type=image_size, default="1000x1000",
                   help="image size WxH, one per sample (default 1000x1000)")  # fmt: skip
    p.add_argument("--text-tokens", type=int, default=256, help="text tokens per sample")
    p.add_argument("--batch", type=int, default=1, help="micro-batch (per_device_train_batch_size)")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help=f"(default {d.lora_r})")
    p.add_argument("--max-image-tokens", type=int, default=None, help="visual-token budget")
    p.add_argument("--no-grad-ckpt", action="store_true", help="without gradient checkpointing")
    p.add_argument("--recipe", choices=list(RECIPES), default="vlmfit",
                   help="vlmfit's default path (default) or the textbook recipe in train mode")  # fmt: skip
    p.add_argument("--dpo", action="store_true", help="DPO (chosen + rejected per sample)")
    _lever_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p


@command("estimate")
def cli_estimate(argv: list[str]) -> int:
    """``vlmfit estimate --model M ...``: predicted peak GiB and its breakdown.

    Exit 0; 2 on a usage error. ``--json``: one object with ``peak_gib`` and ``breakdown``.
    """
    from vlmfit.budget import Budget
    from vlmfit.memory.estimator import estimate
    from vlmfit.models import registry

    p = estimate_parser()
    a = p.parse_args(argv)
    try:
        e = estimate(
            registry.get(a.model),
            finetune=a.method,
            lora_r=a.lora_r,
            micro_batch=a.batch,
            text_tokens=a.text_tokens,
            image_size=a.image,
            budget=Budget(max_image_tokens=a.max_image_tokens) if a.max_image_tokens else None,
            gradient_checkpointing=not a.no_grad_ckpt,
            recipe=a.recipe,
            dpo=a.dpo,
            fused_lora=False if a.no_fused_lora else None,  # None: the recipe's default
            activation_offloading=a.activation_offloading,
            autocast=_autocast_arg(a.autocast),
            vision_chunk=a.vision_chunk,
        )
    except ValueError as err:
        p.error(str(err))
    if a.json:
        print(json.dumps({**e.as_dict(), "recipe": a.recipe, "dpo": a.dpo}))
    else:
        print(e.table())
    return 0


def plan_parser() -> Parser:
    from vlmfit.memory.constants import ENGINES

    d = RunConfig()
    p = Parser("plan", "Predict training memory; list configs that fit.", epilog=models_help())
    p.add_argument("--model", required=True, help="registry name")
    p.add_argument("--gpu-gib", type=float, help="GPU memory, GiB (default: this CUDA device)")
    p.add_argument("--finetune", choices=FINETUNES, default=None,
                   help="restrict the search (default: lora and qlora)")  # fmt: skip
    p.add_argument("--image", type=image_size, default="1000x1000",
                   help="image size WxH (default 1000x1000)")  # fmt: skip
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=1, help="for the estimate shown")
    p.add_argument("--max-image-tokens", type=int, default=None, help="for the estimate shown")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help=f"(default {d.lora_r})")
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
    return p


@command("plan")
def cli_plan(argv: list[str]) -> int:
    """``vlmfit plan --model M [--gpu-gib G] ...``: estimate + fitting configs.

    Exit 0 with a table of candidates; 1 when nothing fits (with the reason); 2 on a usage
    error (unknown model, no --gpu-gib and no CUDA device).
    """
    from vlmfit.budget import Budget
    from vlmfit.memory.estimator import estimate
    from vlmfit.memory.planner import local_gpu_gib, plan
    from vlmfit.memory.profile import format_rows
    from vlmfit.models import registry

    p = plan_parser()
    a = p.parse_args(argv)
    spec = registry.get(a.model)
    gpu = a.gpu_gib if a.gpu_gib is not None else local_gpu_gib()
    if gpu is None:
        p.error("no CUDA device here: pass --gpu-gib (e.g. --gpu-gib 80 for an H100)")
    if gpu <= 0:
        p.error("--gpu-gib must be positive")
    levers = dict(
        nproc=a.nproc,
        engine=a.engine,
        fused_lora=not a.no_fused_lora,
        activation_offloading=a.activation_offloading,
        autocast=_autocast_arg(a.autocast),
    )
    try:
        e = estimate(
            spec,
            finetune=a.finetune or "lora",
            lora_r=a.lora_r,
            micro_batch=a.micro_batch,
            text_tokens=a.text_tokens,
            image_size=a.image,
            budget=Budget(max_image_tokens=a.max_image_tokens) if a.max_image_tokens else None,
            vision_no_grad=True if a.vision_no_grad else None,
            **levers,
        )
    except ValueError as err:
        p.error(str(err))
    result = plan(
        spec,
        gpu,
        text_tokens=a.text_tokens,
        image_size=a.image,
        finetune=a.finetune,
        vision_no_grad=True if a.vision_no_grad else None,
        margin=a.margin,
        lora_r=a.lora_r,
        effective_batch=a.effective_batch,
        **levers,
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


@command("reference")
def cli_reference(argv: list[str]) -> int:
    """``vlmfit reference [--json] [--runs DIR] [--model M] [--validation PATH]``."""
    from vlmfit.memory.reference import reference_markdown, reference_rows, reference_source

    p = Parser(
        "reference",
        "Measured peak GPU memory (model x method x image budget) from the GPU sweep "
        "(docs/memory-validation.json) and the CUDA runs of a runs folder, with the "
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
