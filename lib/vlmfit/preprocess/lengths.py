"""Stage 3: exact sequence lengths (chat template + media costs) and the over-length policy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfit.budget import Budget
from vlmfit.data.records import Problem, Record, count_parts
from vlmfit.models.registry import ModelSpec
from vlmfit.preprocess.costs import MediaTable, Use, cost, record_media
from vlmfit.preprocess.options import Options
from vlmfit.preprocess.read import fail_or_continue

SHRINK_FACTOR = 0.75  # each shrink step keeps at most 3/4 of the per-image token cap


@dataclass
class Sample:
    """One record on its way through the pipeline."""

    record: Record
    text: int  # text tokens after the chat template (placeholders excluded)
    before: list[Use]  # processor defaults
    uses: list[Use]  # at the budget (after shrinking, for shrunk samples)
    status: str = "kept"  # kept | shrunk | dropped | skipped
    reason: str = ""
    cap: int | None = None  # per-image token cap of a shrunk sample
    total_budget: int = 0  # at the global budget, before the policy
    outputs: list[str] = field(default_factory=list)

    def total(self, uses: list[Use]) -> int:
        return self.text + sum(u.seq for u in uses)


def sample_budget(budget: Budget, s: Sample) -> Budget:
    return dataclasses.replace(budget, max_image_tokens=s.cap) if s.cap else budget


def _conversations(r: Record) -> list[list[dict[str, Any]]]:
    if r.is_preference:
        return [r.messages + (r.chosen or []), r.messages + (r.rejected or [])]
    return [r.messages]


def _text_tokens(processor: Any, spec: ModelSpec, records: list[Record]) -> dict[int, Any]:
    """Per record (by position): text tokens after the chat template, placeholders excluded,
    or the reason the template failed. Preference records: the longer of the two answers."""
    tok = processor.tokenizer
    fam = spec.family

    def ph(text: str | None) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0

    ph_img, ph_vid = ph(fam.image_placeholder), ph(fam.video_placeholder)
    texts: list[str] = []
    owners: list[tuple[int, int]] = []  # (record position, placeholder tokens)
    out: dict[int, Any] = {}
    for i, r in enumerate(records):
        for conv in _conversations(r):
            try:
                texts.append(processor.apply_chat_template(conv, tokenize=False))
            except Exception as e:  # a template that cannot render this conversation
                out[i] = f"chat template failed: {type(e).__name__}: {e}"
                break
            n_ph = count_parts(conv, "image") * ph_img + count_parts(conv, "video") * ph_vid
            owners.append((i, n_ph))
    ids = tok(texts)["input_ids"] if texts else []
    for (i, n_ph), seq in zip(owners, ids, strict=True):
        if isinstance(out.get(i), str):
            continue
        out[i] = max(out.get(i, 0), len(seq) - n_ph)
    return out


def _shrink(
    spec: ModelSpec, s: Sample, budget: Budget | None, max_length: int, merges: bool
) -> tuple[list[Use], int] | str:
    """Lower the sample's per-image token cap step by step until it fits, or say why not."""
    if not s.uses:
        return f"text alone is {s.text} tokens > max_length {max_length}"
    if not spec.is_qwen:
        return (
            f"{s.total_budget} tokens > max_length {max_length}; cannot shrink: the "
            f"{spec.family.name} processor rescales every image to size.longest_edge itself"
        )
    cap = max(u.unit for u in s.uses)
    base = budget or Budget()
    while True:
        cap = min(cap - 1, int(cap * SHRINK_FACTOR))
        try:
            if cap < 1:
                raise ValueError("no smaller image is possible")
            b = dataclasses.replace(base, max_image_tokens=cap)
            uses = [cost(spec, u.media, b, merges) for u in s.uses]
        except ValueError as e:
            return (
                f"{s.total_budget} tokens > max_length {max_length}, still over at the "
                f"smallest per-image budget ({e})"
            )
        if s.total(uses) <= max_length:
            return uses, cap


def _apply_policy(
    spec: ModelSpec,
    samples: list[Sample],
    budget: Budget | None,
    max_length: int,
    overlength: str,
    merges: bool,
) -> None:
    for s in samples:
        s.total_budget = s.total(s.uses)
        if s.total_budget <= max_length:
            continue
        shrunk = (
            _shrink(spec, s, budget, max_length, merges)
            if overlength == "shrink"
            else f"{s.total_budget} tokens > max_length {max_length}"
        )
        if isinstance(shrunk, str):
            s.status, s.reason = "dropped", shrunk
        else:
            s.uses, s.cap = shrunk
            s.status = "shrunk"
            s.reason = f"per-image budget lowered to {s.cap} tokens"


def count_tokens(
    spec: ModelSpec,
    source: str | Path,
    revision: str | None,
    records: list[Record],
    table: MediaTable,
    budget: Budget,
    problems: list[Problem],
    opts: Options,
) -> tuple[list[Sample], bool]:
    """Each record's exact length before and after the budget, with the over-length policy
    applied; and whether the tokenizer merges ``\\n\\n`` into one token."""
    from vlmfit.models.processors import load_processor

    processor = load_processor(
        source, spec.family.name, **({"revision": revision} if revision else {})
    )
    tok = processor.tokenizer
    merges = len(tok("\n\n", add_special_tokens=False)["input_ids"]) == 1
    texts = _text_tokens(processor, spec, records)
    samples: list[Sample] = []
    for i, r in enumerate(records):
        text = texts.get(i, 0)
        if isinstance(text, str):
            problems.append(Problem(r.source, r.index, text))
            continue
        ms = record_media(r, table)
        try:
            before = [cost(spec, m, None, merges) for m in ms]
            uses = [cost(spec, m, budget, merges) for m in ms]
        except ValueError as e:
            problems.append(
                Problem(r.source, r.index, f"refused by the {spec.name} processor: {e}")
            )
            continue
        samples.append(Sample(r, text, before, uses))
    fail_or_continue(problems, opts.on_error)
    _apply_policy(spec, samples, budget, opts.max_length, opts.overlength, merges)
    return samples, merges


def recount_decoded(
    spec: ModelSpec,
    samples: list[Sample],
    done: dict[str, dict[str, Any]],
    budget: Budget,
    merges: bool,
    problems: list[Problem],
    opts: Options,
) -> None:
    """After decoding: skip samples whose media failed, and recount (and drop if now over
    ``max_length``) those whose decoded size differs from the header's."""
    max_length = opts.max_length
    for s in samples:
        if s.status == "dropped":
            continue
        errors = list(dict.fromkeys(done[o]["error"] for o in s.outputs if done[o]["error"]))
        if errors:
            s.status = "skipped"
            problems += [Problem(s.record.source, s.record.index, e) for e in errors]
            continue
        for k, (u, o) in enumerate(zip(s.uses, s.outputs, strict=True)):
            size = done[o].get("size")
            if u.media.kind == "image" and size and tuple(size) != u.media.size:
                # the header size was not the decoded size (EXIF after a PNG's pixels)
                m = dataclasses.replace(u.media, size=tuple(size))
                s.before[k] = cost(spec, m, None, merges)
                s.uses[k] = cost(spec, m, sample_budget(budget, s), merges)
        if s.total(s.uses) > max_length:
            s.status = "dropped"
            s.reason = f"{s.total(s.uses)} tokens > max_length {max_length} (decoded size)"
    fail_or_continue(problems, opts.on_error)
