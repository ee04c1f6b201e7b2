"""Pick configurations that fit a GPU (``plan``), refuse one that will not (``check_fits``),
explain an out-of-memory error (``explain_oom``)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from vlmfit.budget import Budget, image_tokens
from vlmfit.memory.constants import (
    CUDA_CONTEXT_GIB,
    GIB,
    MB_GAIN,
    OFFLOAD_SPEED,
    OFFLOAD_SPEED_TRL,
    OFFLOAD_WORTH,
    QLORA_UNCERTAINTY,
    SPEED,
)
from vlmfit.memory.estimator import Estimate, _spec, estimate
from vlmfit.models import registry
from vlmfit.models.registry import ModelSpec


def relative_speed(finetune: str, micro_batch: int, gradient_checkpointing: bool) -> float:
    """Tokens/s relative to bf16 LoRA at micro-batch 1 without checkpointing (ranking only)."""
    kind = SPEED.get(finetune, 1.0) if finetune != "lora" else 1.0
    return (
        kind
        * (SPEED["gc"] if gradient_checkpointing else 1.0)
        * (1 + MB_GAIN * (1 - 1 / micro_batch))
    )


def local_gpu_gib() -> float | None:
    """Total memory of CUDA device 0 in GiB, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


@dataclass
class Candidate:
    """One configuration that fits; ``required_gib`` includes the safety margin and context."""

    finetune: str
    micro_batch: int
    max_image_tokens: int | None
    gradient_checkpointing: bool
    vision_no_grad: bool | None
    estimate: Estimate
    required_gib: float
    gpu_gib: float
    score: float  # relative tokens/s (``relative_speed``), for ranking
    effective_batch: int = 16  # samples per optimizer step: micro-batch x accumulation x GPUs
    nproc: int = 1
    engine: str = "ddp"
    fused_lora: bool = True  # RunConfig.fused_lora the estimate assumed
    activation_offloading: bool | None = None  # as asked (None: off unless needed to fit)
    autocast: bool | None = None  # as asked (None: vlmfit's rule, the default)

    @property
    def headroom_gib(self) -> float:
        return self.gpu_gib - self.required_gib

    @property
    def accumulation(self) -> int:
        return max(1, math.ceil(self.effective_batch / (self.micro_batch * self.nproc)))

    def make_args(self) -> str:
        """The configuration as ``make train`` variables (PARAMS: RunConfig field names)."""
        params = [
            f"per_device_train_batch_size={self.micro_batch}",
            f"gradient_accumulation_steps={self.accumulation}",
        ]
        if not self.gradient_checkpointing:
            params.append("gradient_checkpointing=False")
        if not self.fused_lora:  # levers off their RunConfig default: the run must match
            params.append("fused_lora=False")
        if self.activation_offloading is not None:
            params.append(f"activation_offloading={self.activation_offloading}")
        if self.autocast is not None:
            params.append(f"autocast={self.autocast}")
        mit = self.max_image_tokens or 0  # 0: the processor's default
        return f"FINETUNE={self.finetune} MAX_IMAGE_TOKENS={mit} PARAMS='{' '.join(params)}'"

    def make_command(self) -> str:
        gpus = f" NPROC={self.nproc} DIST={self.engine}" if self.nproc > 1 else ""
        return f"make train MODEL={self.estimate.model}{gpus} {self.make_args()}"

    def row(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "finetune": self.finetune,
            "micro_batch": self.micro_batch,
            "max_image_tokens": self.max_image_tokens,
            "visual_tokens": e.visual_tokens,
            "sequence_tokens": e.sequence_tokens,
            "gradient_checkpointing": self.gradient_checkpointing,
            "vision_no_grad": self.estimate.vision_no_grad,
            "peak_gib": round(e.peak_gib, 2),
            "required_gib": round(self.required_gib, 2),
            "headroom_gib": round(self.headroom_gib, 2),
            "score": round(self.score),
            "make": self.make_command(),
        }


class PlanResult(list):
    """``plan``'s answer: a list of ``Candidate`` (best first) with ``reason`` when empty."""

    reason: str = ""
    smallest: Candidate | None = None  # the least demanding configuration tried (fits or not)
    advice: list[str] = []  # what would fit when nothing does


def advice(
    spec: ModelSpec,
    gpu_gib: float,
    result: PlanResult,
    *,
    text_tokens: int,
    image_size: tuple[int, int] | None,
) -> list[str]:
    """What would fit when nothing does: QLoRA, a smaller model, more GPUs."""
    tips: list[str] = []
    s = result.smallest
    if s is not None and s.finetune != "qlora":
        tips.append("finetune=qlora (4-bit weights) was not searched: FINETUNE=qlora")
    smaller = []
    for name in registry.names(include_tiny=False):
        other = registry.get(name)
        if other.params_b >= spec.params_b:
            continue
        fits = plan(other, gpu_gib, text_tokens=text_tokens, image_size=image_size,
                    micro_batches=(1,), checkpointing=(True,))  # fmt: skip
        if fits:
            smaller.append(f"MODEL={name} ({fits[0].make_args()})")
    if smaller:
        tips.append("a smaller model: " + ", ".join(smaller[:3]))
    if s is not None and s.nproc == 1:  # weights and optimizer states sharded over GPUs
        for n in (2, 4, 8):
            more = plan(spec, gpu_gib, text_tokens=text_tokens, image_size=image_size,
                        finetune=s.finetune, micro_batches=(1,), nproc=n, engine="fsdp2")  # fmt: skip
            if more:
                tips.append(f"{n} GPUs sharding weights and optimizer states: "
                            f"{more[0].make_command()} (predicted, not validated on GPUs)")  # fmt: skip
                break
    return tips


def _required(e: Estimate, margin: float) -> float:
    extra = QLORA_UNCERTAINTY if e.finetune == "qlora" else 0.0
    return e.peak_gib * (1 + margin + extra) + CUDA_CONTEXT_GIB


def plan(
    spec_or_name: ModelSpec | str,
    gpu_gib: float,
    *,
    text_tokens: int = 256,
    image_size: tuple[int, int] | None = (1000, 1000),
    finetune: str | None = None,
    micro_batches: tuple[int, ...] = (1, 2, 4, 8),
    max_image_tokens: tuple[int | None, ...] = (None, 1280, 1024, 512, 256),
    checkpointing: tuple[bool, ...] = (True, False),
    vision_no_grad: bool | None = None,
    margin: float = 0.10,
    lora_r: int = 16,
    effective_batch: int = 16,
    nproc: int = 1,
    engine: str = "ddp",
    fused_lora: bool = True,
    activation_offloading: bool | None = None,
    autocast: bool | None = None,
) -> PlanResult:
    """Configurations that fit ``gpu_gib`` GiB with ``margin`` to spare, best first.

    Searches finetune (lora and qlora unless given) x micro-batch x visual-token budget x
    gradient checkpointing. A candidate fits when ``peak * (1 + margin) + CUDA context <=
    gpu_gib``. Ranked by image resolution first (the largest visual-token budget that fits),
    then by relative tokens/s (``relative_speed``: measured micro-batch gain, checkpointing
    ~0.75, QLoRA ~0.59), so bf16 LoRA wins over QLoRA whenever both fit. Estimates are of
    vlmfit's default path (``estimate(recipe="vlmfit")``), the one ``make train`` runs.
    """
    spec = _spec(spec_or_name)
    kinds = (finetune,) if finetune else ("lora", "qlora")
    out = PlanResult()
    tried: list[Candidate] = []
    seen: set[tuple] = set()
    for ft in kinds:
        for mit in max_image_tokens:
            try:
                budget = Budget(max_image_tokens=mit) if mit else None
                if budget is not None and image_size is not None:
                    image_tokens(spec, *image_size, budget)
            except ValueError:
                continue  # budget below what the processor can do (e.g. one SmolVLM tile)
            for gc_on in checkpointing:
                for mb in micro_batches:
                    e = estimate(
                        spec,
                        finetune=ft,
                        lora_r=lora_r,
                        micro_batch=mb,
                        text_tokens=text_tokens,
                        image_size=image_size,
                        budget=budget,
                        gradient_checkpointing=gc_on,
                        vision_no_grad=vision_no_grad,
                        nproc=nproc,
                        engine=engine,
                        fused_lora=fused_lora,
                        activation_offloading=activation_offloading,
                        autocast=autocast,
                    )
                    key = (ft, mb, e.visual_tokens, gc_on)
                    if key in seen:  # a budget above the image's cost changes nothing
                        continue
                    seen.add(key)
                    c = Candidate(
                        finetune=ft,
                        micro_batch=mb,
                        max_image_tokens=mit,
                        gradient_checkpointing=gc_on,
                        vision_no_grad=vision_no_grad,
                        estimate=e,
                        required_gib=_required(e, margin),
                        gpu_gib=gpu_gib,
                        score=relative_speed(ft, mb, gc_on),
                        effective_batch=effective_batch,
                        nproc=nproc,
                        engine=engine,
                        fused_lora=fused_lora,
                        activation_offloading=activation_offloading,
                        autocast=autocast,
                    )
                    if (
                        activation_offloading is None and gc_on and (nproc == 1 or engine == "ddp")
                    ):  # what RunConfig.activation_offloading=None does (offload_pays)
                        e_on = estimate(
                            spec, finetune=ft, lora_r=lora_r, micro_batch=mb,
                            text_tokens=text_tokens, image_size=image_size, budget=budget,
                            gradient_checkpointing=gc_on, vision_no_grad=vision_no_grad,
                            nproc=nproc, engine=engine, fused_lora=fused_lora,
                            activation_offloading=True, autocast=autocast,
                        )  # fmt: skip
                        if offload_pays(e, e_on, gpu_gib, nproc, margin):
                            c = dataclasses.replace(
                                c, estimate=e_on, required_gib=_required(e_on, margin),
                                score=c.score * (OFFLOAD_SPEED if nproc == 1 else OFFLOAD_SPEED_TRL),
                                activation_offloading=True,
                            )  # fmt: skip
                    tried.append(c)
                    if c.required_gib <= gpu_gib:
                        out.append(c)
    # Best first: the image at the highest resolution that fits, then the fastest.
    out.sort(
        key=lambda c: (
            -c.estimate.visual_tokens,
            -c.score,
            c.finetune == "qlora",
            c.required_gib,
        )
    )
    if tried:
        out.smallest = min(tried, key=lambda c: c.required_gib)
    if not out:
        s = out.smallest
        out.reason = (
            f"nothing fits {gpu_gib:g} GiB: the least demanding configuration tried "
            f"({s.finetune}, micro-batch {s.micro_batch}, "
            f"{s.estimate.visual_tokens} visual tokens, gradient checkpointing "
            f"{'on' if s.gradient_checkpointing else 'off'}) needs {s.required_gib:.1f} GiB "
            f"(weights alone {s.estimate.weights_gib:.1f} GiB, +{margin:.0%} margin and "
            f"{CUDA_CONTEXT_GIB} GiB CUDA context)"
            if s
            else f"nothing fits {gpu_gib:g} GiB: no configuration could be built"
        )
        out.advice = advice(spec, gpu_gib, out, text_tokens=text_tokens, image_size=image_size)
        if out.advice:
            out.reason += ". What would fit: " + "; ".join(out.advice)
    return out


def offload_pays(
    off: Estimate, on: Estimate, gpu_gib: float, nproc: int = 1, margin=0.0, dpo: bool = False
) -> bool:
    """What ``activation_offloading=None`` decides from the estimates without / with it: on
    where the run fits only with it, and (vlmfit's own, one process, SFT: free of speed
    cost) where it lowers the peak by ``OFFLOAD_WORTH`` or more. DPO pays for it (two
    forwards a step, each with its host lookup: run 7, 2,839 against 3,392 tokens/s on the
    7B), so there it serves only to fit."""
    if _required(off, margin) > gpu_gib:
        return _required(on, margin) <= gpu_gib
    return nproc == 1 and not dpo and on.peak_gib <= (1 - OFFLOAD_WORTH) * off.peak_gib


class WontFitError(ValueError):
    """A configuration predicted (or found) not to fit the GPU, with what would."""


def worst_sample(folder) -> tuple[int, int]:
    """(sequence tokens, visual tokens) of the longest sample of a preprocessing cache."""
    from pathlib import Path

    stats = json.loads((Path(folder) / "stats.json").read_text())
    rows = [r for r in stats["sample_stats"] if r.get("status") in ("kept", "shrunk")]
    if not rows:
        return 0, 0
    worst = max(rows, key=lambda r: r["total_after"])
    return int(worst["total_after"]), int(worst["visual_after"])


def _cfg_estimate(cfg, sequence_tokens: int, visual_tokens: int) -> Estimate:
    from vlmfit.train import distributed, fastpath

    return estimate(
        cfg.spec,
        finetune=cfg.finetune,
        lora_r=cfg.lora_r,
        micro_batch=cfg.per_device_train_batch_size,
        text_tokens=max(0, sequence_tokens - visual_tokens),
        visual_tokens=visual_tokens,
        gradient_checkpointing=cfg.gradient_checkpointing,
        vision_no_grad=fastpath.vision_runs_without_grad(cfg),
        lora_dropout=cfg.lora_dropout > 0,
        kbit_upcast=cfg.qlora_upcast,
        dpo=cfg.method == "dpo",
        qlora_vision_4bit=cfg.qlora_vision_4bit,
        nproc=distributed.world_size(),
        engine=distributed.launch_engine(),
        **_cfg_levers(cfg),
    )


def _cfg_levers(cfg) -> dict[str, Any]:
    """The levers ``cfg``'s run will train with, as the estimator takes them: ``fused_lora``,
    and TRL's offloading and the Trainer's autocast as ``vlmfit.train.fastpath`` resolves them."""
    from vlmfit.train import fastpath

    offloads = getattr(fastpath, "offloads_activations", None)
    uses_autocast = getattr(fastpath, "uses_autocast", None)
    host = getattr(fastpath, "uses_host_embeddings", None)
    return {
        "host_embeddings": bool(host(cfg)) if host else None,
        "fused_lora": bool(getattr(cfg, "fused_lora", True)),
        "activation_offloading": bool(
            offloads(cfg) if offloads else getattr(cfg, "activation_offloading", False)
        ),
        "autocast": bool(uses_autocast(cfg) if uses_autocast else getattr(cfg, "autocast", True)),
        "vision_chunk": int(getattr(cfg, "vision_chunk", 0)),
    }


def _advice_line(cfg, gpu_gib: float, sequence_tokens: int, visual_tokens: int) -> str:
    res = plan(
        cfg.spec,
        gpu_gib,
        text_tokens=max(0, sequence_tokens - visual_tokens),
        fused_lora=bool(getattr(cfg, "fused_lora", True)),
        activation_offloading=getattr(cfg, "activation_offloading", None),
        autocast=getattr(cfg, "autocast", None),
    )
    if res:
        return f"what fits {gpu_gib:.0f} GiB: {res[0].make_command()}"
    return res.reason


def check_fits(cfg, sequence_tokens: int, visual_tokens: int, gpu_gib: float | None = None):
    """Before the model loads: refuse ``cfg`` when its predicted peak (with the planner's
    margin and the CUDA context) exceeds the GPU, saying what would fit. Returns the
    estimate; does nothing without CUDA and no ``gpu_gib``.

    ``activation_offloading=None`` is decided here (``offload_pays``): on where the run
    fits only with it, or where vlmfit's own offloading (one process) lowers the predicted
    peak by ``OFFLOAD_WORTH``; with ``host_embeddings=None`` the input embeddings follow.
    """
    gpu = gpu_gib if gpu_gib is not None else local_gpu_gib()
    if gpu is None:
        return None
    e = _cfg_estimate(cfg, sequence_tokens, visual_tokens)
    need = _required(e, 0.0)
    if getattr(cfg, "activation_offloading", False) is None:
        from vlmfit.train import distributed

        cfg.activation_offloading = False
        if cfg.gradient_checkpointing and not distributed.sharded():
            cfg.activation_offloading = True
            e_on = _cfg_estimate(cfg, sequence_tokens, visual_tokens)
            nproc = distributed.world_size()
            if offload_pays(e, e_on, gpu, nproc, dpo=cfg.method == "dpo"):
                why = "to fit" if need > gpu else f"-{e.peak_gib - e_on.peak_gib:.1f} GiB"
                print(
                    f"activation_offloading: on ({why}: predicted {e.peak_gib:.1f} GiB "
                    f"without it, {e_on.peak_gib:.1f} GiB with it, on a {gpu:.1f} GiB GPU)"
                )
                return e_on
            cfg.activation_offloading = False if need <= gpu else None  # None: advice tries
    if need > gpu:
        raise WontFitError(
            f"{cfg.model} {cfg.finetune}, micro-batch {cfg.per_device_train_batch_size}, "
            f"{sequence_tokens} tokens in the longest sample: predicted peak "
            f"{e.peak_gib:.1f} GiB (+ CUDA context: {need:.1f} GiB) > {gpu:.1f} GiB on this GPU. "
            f"{_advice_line(cfg, gpu, sequence_tokens, visual_tokens)} "
            "(memory_check=False trains anyway)"
        )
    return e


def explain_oom(cfg, step: int, sequence_tokens: int, visual_tokens: int) -> WontFitError:
    """A CUDA out-of-memory error as a one-line message: where, predicted, what fits."""
    gpu = local_gpu_gib() or 0.0
    e = _cfg_estimate(cfg, sequence_tokens, visual_tokens)
    return WontFitError(
        f"CUDA out of memory at step {step} ({cfg.model} {cfg.finetune}, micro-batch "
        f"{cfg.per_device_train_batch_size}; predicted peak {e.peak_gib:.1f} GiB, GPU "
        f"{gpu:.1f} GiB). {_advice_line(cfg, gpu, sequence_tokens, visual_tokens) if gpu else ''}"
    )
