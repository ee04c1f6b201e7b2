"""Evaluation by generation on a held-out split: exact match, per question type.

Greedy decoding of the assistant's reply to each held-out prompt; the reply is
compared with the reference answer after normalisation (strip, lower case,
trailing punctuation removed). On the bundled shapes dataset the question type
(colour, shape, position, count) gives per-type accuracy; chance is 1/3 per type.
"""

from __future__ import annotations

import string
from collections import defaultdict
from typing import Any

import torch

from vlmfit.data.records import Record, message_text


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(string.punctuation + " ").strip()


def _prompt_and_answer(r: Record) -> tuple[list[dict[str, Any]], str]:
    """Prompt turns (everything before the last assistant turn) and the reference answer."""
    if r.is_preference:
        return r.messages, message_text(r.chosen[-1])
    last = max(i for i, m in enumerate(r.messages) if m["role"] == "assistant")
    return r.messages[:last], message_text(r.messages[last])


def _question_type(messages: list[dict[str, Any]]) -> str:
    from vlmfit.data import synth

    user = [m for m in messages if m["role"] == "user"]
    return (synth.question_type(message_text(user[-1])) if user else None) or "all"


@torch.no_grad()
def generate(model, processor, prompts, images, max_new_tokens: int) -> list[str]:
    """Greedy replies for a batch of conversations (left padding for generation)."""
    texts = [processor.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    imgs = images if any(images) else None
    enc = processor(text=texts, images=imgs, padding=True, padding_side="left", return_tensors="pt")
    enc = enc.to(model.device)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    new = out[:, enc["input_ids"].shape[1] :]
    return processor.batch_decode(new, skip_special_tokens=True)


def evaluate_generation(
    model, processor, records: list[Record], cfg=None, *, progress: bool = True, **kw
) -> dict[str, Any]:
    """Exact-match accuracy (overall and per question type) and every sample's prediction."""
    from tqdm.auto import tqdm

    from vlmfit.data.media import open_image

    if not records:
        return {"metrics": {}, "samples": []}
    max_new = kw.get("max_new_tokens", getattr(cfg, "eval_max_new_tokens", 16))
    bs = kw.get("batch_size", getattr(cfg, "eval_batch_size", 16))
    was_training = model.training
    model.eval()
    samples: list[dict[str, Any]] = []
    bar = tqdm(total=len(records), desc="evaluate", disable=not progress, leave=False)
    for i in range(0, len(records), bs):
        batch = records[i : i + bs]
        pairs = [_prompt_and_answer(r) for r in batch]
        images = [[open_image(m) for m in r.images] for r in batch]
        preds = generate(model, processor, [p for p, _ in pairs], images, max_new)
        for r, (prompt, ref), pred in zip(batch, pairs, preds, strict=True):
            samples.append(
                {
                    "where": r.where,
                    "question": message_text([m for m in prompt if m["role"] == "user"][-1]),
                    "type": _question_type(prompt),
                    "reference": ref,
                    "prediction": pred.strip(),
                    "correct": normalise(pred) == normalise(ref),
                    "image": r.images[0].path if r.images else None,
                }
            )
        bar.update(len(batch))
    bar.close()
    if was_training:
        model.train()
    by_type: dict[str, list[bool]] = defaultdict(list)
    for s in samples:
        by_type[s["type"]].append(s["correct"])
    metrics = {
        "exact_match": sum(s["correct"] for s in samples) / len(samples),
        "n": len(samples),
        "by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
    }
    return {"metrics": metrics, "samples": samples}
