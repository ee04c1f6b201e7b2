"""One Unsloth case of benchmarks/fastpath.py, run by Unsloth's own interpreter (GPU).

    $UNSLOTH_PYTHON benchmarks/unsloth_case.py --case JSON --work DIR
    $UNSLOTH_PYTHON benchmarks/unsloth_case.py --check       # versions only; no GPU, no unsloth import

benchmarks/unsloth_driver.py starts it, one fresh process per case, with PYTHONPATH set to
the unpacked Unsloth carry only (scripts/build_unsloth_carry.sh). It never imports vlmfit:
vlmfit's lock and Unsloth's pins do not meet in one environment.

The case is one of fastpath's (``path``, ``model``, ``finetune``, ``mb``, ``steps``) plus
what the driver prepared with vlmfit's interpreter: ``weights_dir``, a full-size random-weight
folder (``vlmfit.models.save_random``: config, safetensors, processor), and ``data_dir``,
fastpath's ``make_data`` folder (1000x1000 photo-like JPEGs, ~200-word answers). Both
paths: ``FastVisionModel.from_pretrained`` of that folder (bf16, or 4-bit for ``qlora``),
Unsloth gradient checkpointing, LoRA r16 / alpha 16 / dropout 0 on the language model's
attention and MLP linears (``finetune_vision_layers=False``), AdamW.

- ``unsloth-loop``: the first ``mb`` samples through the folder's processor into one
  batch on the GPU, ``model.train()``, forward + backward + AdamW step, median step time
  over 6 steps after 2 warm-up steps (as fastpath.gpu_loop);
- ``unsloth``: as Unsloth's users run it: images decoded up front into a list of chat
  samples, ``UnslothVisionDataCollator`` (``resize="max"``: the processor's own image
  budget, as vlmfit's), TRL's ``SFTTrainer`` with ``skip_prepare_dataset``; tokens/s over
  the steps after the first two (the steady state, as vlmfit's summary measures it).

Prints one line ``ROW {json}`` (an exception is a row with ``error``), the traceback on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0, "bias": "none", "random_state": 0}
MAX_LEN = 4096  # above every sample here (~1,500-1,720 tokens): nothing is truncated
LOOP_STEPS, LOOP_WARMUP = 6, 2
E2E_SKIP = 2  # end to end: steps 1-2 are warm-up (compilation, allocator)
PACKAGES = (
    "unsloth",
    "unsloth_zoo",
    "transformers",
    "trl",
    "torch",
    "peft",
    "accelerate",
    "datasets",
    "bitsandbytes",
)
#: Requirements of unsloth / unsloth_zoo that --check verifies (the ones clashing with vlmfit's lock).
CHECKED = ("transformers", "trl", "datasets", "peft", "torch", "unsloth_zoo", "accelerate")


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def check() -> dict:
    """Versions, and what the environment lacks of unsloth's own Requires-Dist (no import)."""
    import importlib.metadata as md

    found = versions()
    problems = []
    if not found["unsloth"]:
        problems.append("unsloth is not installed for this interpreter (is UNSLOTH_SITE right?)")
    else:
        try:
            from packaging.requirements import Requirement
        except ImportError:  # packaging is on every image that has pip; say so if not
            Requirement = None
            problems.append("packaging is missing: unsloth's requirements not checked")
        for dist in ("unsloth", "unsloth_zoo"):
            if Requirement is None or not found.get(dist):
                continue
            for text in md.requires(dist) or []:
                req = Requirement(text)
                name = req.name.lower().replace("-", "_")
                if name not in CHECKED or (req.marker and not req.marker.evaluate({"extra": ""})):
                    continue
                have = found.get(name)
                if have is None:
                    problems.append(f"{dist} needs {req}; {name} is not installed")
                elif not req.specifier.contains(have.split("+")[0], prereleases=True):
                    problems.append(f"{dist} needs {req}; found {name} {have}")
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "versions": found,
        "problems": sorted(set(problems)),
    }


# ------------------------------------------------------------------------------ data


def load_records(data_dir: str | Path, n: int) -> list[tuple[Path, str, str]]:
    """(image path, prompt, answer) of the first ``n`` samples of make_data's train.json,
    cycling when it holds fewer."""
    data_dir = Path(data_dir)
    recs = json.loads((data_dir / "train.json").read_text())
    if not recs:
        raise ValueError(f"{data_dir / 'train.json'} holds no samples")
    out = []
    for i in range(n):
        r = recs[i % len(recs)]
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        out.append((data_dir / r["images"][0], user.replace("<image>", "").strip(), answer))
    return out


def chat(image, prompt: str, answer: str) -> list[dict]:
    """One sample as Unsloth's notebooks hold it: the image inside the user's content."""
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def loop_batch(processor, records, nested_images: bool) -> dict:
    """One padded batch through the processor (labels: the tokens, padding ignored).

    ``nested_images``: one list of images per sample (Idefics3 / SmolVLM), else one flat list.
    """
    from PIL import Image

    texts, images = [], []
    for path, prompt, answer in records:
        img = Image.open(path).convert("RGB")
        msgs = chat(None, prompt, answer)
        msgs[0]["content"][0] = {"type": "image"}
        texts.append(processor.apply_chat_template(msgs, tokenize=False))
        images.append([img] if nested_images else img)
    batch = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def steady_rate(ends: list[float], tokens: list[int], skip: int) -> dict:
    """Tokens/s and s/step over steps ``skip+1..N`` from per-step end times and token counts.

    ``ends[i]`` is when step i+1 finished; the window opens at the end of step ``skip``.
    """
    n = min(len(ends), len(tokens))
    if skip < 1 or n < skip + 1:
        raise ValueError(f"{n} timed steps: need more than the {skip} warm-up steps skipped")
    span = ends[n - 1] - ends[skip - 1]
    toks = sum(tokens[skip:n])
    steps = n - skip
    if span <= 0:
        raise ValueError("steady-state window of zero length")
    return {
        "tokens_per_s": toks / span,
        "s_per_step": span / steps,
        "steps_per_s": steps / span,
        "tokens_per_step": toks / steps,
        "measured": f"steps {skip + 1}-{n} of {n} (first {skip} skipped: warm-up)",
    }


def language_params(model, prefixes: list[str]) -> int:
    """Language-model parameters (lm_head included, LoRA not; 4-bit counted unpacked)."""
    total = 0
    for name, p in model.named_parameters():
        clean = name.replace("base_model.model.", "", 1)
        if "lora_" in name or not any(clean.startswith(q) for q in prefixes):
            continue
        state = getattr(p, "quant_state", None)
        total += state.shape.numel() if state is not None else p.numel()
    return total


# ----------------------------------------------------------------------------- model


def load(case: dict):
    """FastVisionModel on the saved random-weight folder, LoRA on the language model."""
    import torch
    from unsloth import FastVisionModel

    folder = case.get("weights_dir")
    if not folder or not (Path(folder) / "config.json").exists():
        raise FileNotFoundError(f"weights_dir {folder!r} has no config.json (save_random's folder)")
    if not any(Path(folder).glob("*.safetensors")):
        raise FileNotFoundError(f"weights_dir {folder!r} has no *.safetensors")
    model, processor = FastVisionModel.from_pretrained(
        str(folder),
        max_seq_length=MAX_LEN,
        dtype=torch.bfloat16,
        load_in_4bit=case["finetune"] == "qlora",
        use_gradient_checkpointing="unsloth",
    )
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=False,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        use_gradient_checkpointing="unsloth",
        **LORA,
    )
    FastVisionModel.for_training(model)
    return model, processor


def gpu_loop(case: dict) -> dict:
    import torch

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, processor = load(case)
    load_s = time.perf_counter() - t0
    nested = getattr(model.config, "model_type", "") == "idefics3"
    batch = loop_batch(processor, load_records(case["data_dir"], case["mb"]), nested)
    batch = {
        k: v.to("cuda", dtype=torch.bfloat16) if v.is_floating_point() else v.to("cuda")
        for k, v in batch.items()
    }
    tokens = int(batch["attention_mask"].sum())
    model.train()  # timed in train mode, where checkpointing is on (as Trainer runs it)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(LOOP_WARMUP + LOOP_STEPS):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= LOOP_WARMUP:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    row = _row(case, model, tokens / step_s, case["mb"] / step_s, tokens / case["mb"])
    row |= {
        "s_per_step": step_s,
        "measured": f"median of {LOOP_STEPS} steps after {LOOP_WARMUP} warm-up",
        "load_s": load_s,
    }
    return row


def end_to_end(case: dict, work: Path) -> dict:
    import torch
    from PIL import Image
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from unsloth.trainer import UnslothVisionDataCollator

    t0 = time.perf_counter()
    model, processor = load(case)
    load_s = time.perf_counter() - t0
    mb, steps = case["mb"], case["steps"]
    data = [
        {"messages": chat(Image.open(path).convert("RGB"), prompt, answer)}
        for path, prompt, answer in load_records(case["data_dir"], mb * steps)
    ]
    collator = UnslothVisionDataCollator(model, processor, max_seq_length=MAX_LEN, resize="max")
    seen: list[int] = []  # tokens of each batch, in the order the trainer draws them
    _count_tokens(collator, seen)
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            ends.append(time.perf_counter())

    out_dir = work / "unsloth-trainer" / f"{case['model']}-{case['finetune']}-mb{mb}"
    args = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=2e-4,
        logging_steps=1,
        bf16=True,
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        seed=0,
        remove_unused_columns=False,
        dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=MAX_LEN,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        processing_class=processor,
        data_collator=collator,
        train_dataset=data,
        args=args,
        callbacks=[StepClock()],
    )
    torch.cuda.reset_peak_memory_stats()  # the training peak, without loading
    trainer.train()
    logged = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    if len(logged) == len(ends):  # TRL's cumulative count: what vlmfit's summary reads
        per_step, source = [b - a for a, b in zip([0, *logged], logged, strict=False)], "trl"
    elif len(seen) >= len(ends):
        per_step, source = seen[: len(ends)], "collator"
    else:
        raise RuntimeError(
            f"{len(ends)} steps timed but {len(logged)} num_tokens logs and {len(seen)} batches"
        )
    rate = steady_rate(ends, per_step, E2E_SKIP)
    tokens_per_sample = rate["tokens_per_step"] / mb
    row = _row(case, model, rate["tokens_per_s"], rate["steps_per_s"] * mb, tokens_per_sample)
    row |= {
        "s_per_step": rate["s_per_step"],
        "measured": rate["measured"],
        "tokens_from": source,
        "steps_done": len(ends),
        "load_s": load_s,
    }
    return row


def _count_tokens(collator, sink: list[int]) -> None:
    """Record each batch's attention-mask tokens; the collator keeps its class (a subclass)."""
    base = type(collator)

    def __call__(self, examples):
        batch = base.__call__(self, examples)
        mask = batch.get("attention_mask") if hasattr(batch, "get") else None
        if mask is not None:
            sink.append(int(mask.sum()))
        return batch

    # __slots__ = (): Unsloth's collators have slots, and a subclass with a __dict__ would have
    # another layout (the assignment raises TypeError). A class that refuses it anyway: TRL's
    # num_tokens log still counts.
    with contextlib.suppress(TypeError):
        collator.__class__ = type(base.__name__, (base,), {"__call__": __call__, "__slots__": ()})


def _row(case: dict, model, tps: float, sps: float, per_sample: float) -> dict:
    import torch

    name = torch.cuda.get_device_name()
    setup = case.get("setup") or {}
    n_lang = language_params(model, setup.get("language_modules") or [])
    peak = setup.get("peak_flops")
    row = {k: v for k, v in case.items() if k != "setup"}
    return row | {
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "tokens_per_s": tps,
        "samples_per_s": sps,
        "tokens_per_sample": per_sample,
        "mfu": 6 * n_lang * tps / peak if peak and n_lang else None,
        "gpu": name,
        "versions": versions(),
    }


def run(case: dict, work: Path) -> dict:
    path = case.get("path")
    if path not in ("unsloth", "unsloth-loop"):
        raise ValueError(f"unknown Unsloth path {path!r} (unsloth | unsloth-loop)")
    if path == "unsloth" and not case.get("steps"):
        raise ValueError("an end-to-end Unsloth case needs 'steps'")
    missing = [k for k in ("model", "finetune", "mb", "weights_dir", "data_dir") if k not in case]
    if missing:
        raise ValueError(f"case lacks {missing}")
    import unsloth  # noqa: F401 - first of all: it patches transformers, trl and peft as they load

    return gpu_loop(case) if path == "unsloth-loop" else end_to_end(case, work)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", help="one case as JSON")
    ap.add_argument("--work", default="/tmp/vlmfit-bench", help="trainer output under it")
    ap.add_argument("--check", action="store_true", help="print CHECK {versions, problems}")
    a = ap.parse_args(argv)
    if a.check:
        print("CHECK " + json.dumps(check()), flush=True)
        return 0
    if not a.case:
        ap.error("--case JSON or --check")
    case = json.loads(a.case)
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        row = run(case, Path(a.work))
    except Exception as e:  # noqa: BLE001 - an OOM or a missing package is a row
        traceback.print_exc()
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        row = {k: v for k, v in case.items() if k != "setup"}
        row |= {"error": f"{type(e).__name__}: {msg}", "versions": versions()}
    print("ROW " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
