"""Validate a dataset: structure of every record and every image / video it points to.

:func:`check_dataset` loads and validates a dataset (``vlmfit check`` is its command line);
:func:`validate_records` checks records already read and lists what is checked.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmfit.data import media
from vlmfit.data.formats import load_records
from vlmfit.data.records import DataError, MediaRef, Problem, Record, count_parts, message_text
from vlmfit.models.registry import ModelSpec

__all__ = ["Report", "check_dataset", "reason_kind", "validate_records"]

DEFAULT_MAX_PIXELS = media.DEFAULT_MAX_PIXELS
# What processors write around or in place of media (Qwen2-VL / Qwen2.5-VL, Idefics3 /
# SmolVLM, and vlmfit's own placeholders): typed as text, the tokenizer turns them into
# image tokens with no image behind them ("Image features and image tokens do not match").
MEDIA_TOKENS = re.compile(
    r"<\|(?:vision_start|vision_end|vision_pad|image_pad|video_pad)\|>"
    r"|<fake_token_around_image>|<global-img>|<row_\d+_col_\d+>|<(?:image|video)(?:_no_\d+)?>"
)
# Grounding markup (Qwen boxes, ms-swift's <ref-object>/<bbox>, InternVL's <ref>/<box>):
# vlmfit does not implement box coordinates, so it never trains on them as literal text.
GROUNDING_TOKENS = re.compile(
    r"<\|(?:box_start|box_end|object_ref_start|object_ref_end|quad_start|quad_end)\|>"
    r"|<bbox>|<ref-object>|</?(?:ref|box|quad)>"
)


@dataclass
class Report:
    """What :func:`check_dataset` found; ``records`` holds the good records only."""

    records: list[Record]
    problems: list[Problem]
    skipped: int  # records (or whole files) left out because of a problem
    counts: dict[str, int]  # good records per format
    n_images: int
    n_videos: int
    image_sizes: list[tuple[int, int]]  # (w, h) of every image use in a good record
    by_reason: dict[str, int]  # problems per kind (see reason_kind)
    fmt: str = ""  # the format load_records reported (container name for tables)
    video_sizes: list[tuple[int, int]] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)  # "PATH: reason", files not read


def reason_kind(reason: str) -> str:
    """The kind of a problem: its reason up to the first ``": "`` (``invalid JSON``...)."""
    return reason.split(": ", 1)[0]


# --------------------------------------------------------------------------- structure


def _order_problem(messages: list[dict[str, Any]]) -> str | None:
    """The first role-order violation: system only first, then user/assistant from user."""
    expected = "user"
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "system":
            if i == 0:
                continue
            return f"roles out of order: system turn at messages[{i}] (only allowed first)"
        if role != expected:
            return f"roles out of order: messages[{i}] is {role!r}, expected {expected!r}"
        expected = "assistant" if role == "user" else "user"
    return None


def _empty_assistant(turns: Iterable[dict[str, Any]], where: str) -> list[str]:
    return [
        f"empty assistant turn: {where}[{i}]"
        for i, m in enumerate(turns)
        if m.get("role") == "assistant" and not message_text(m).strip()
    ]


def _answer_problems(record: Record) -> list[str]:
    out: list[str] = []
    for name in ("chosen", "rejected"):
        turns = getattr(record, name) or []
        roles = [m.get("role") for m in turns]
        if roles != ["assistant"]:
            out.append(f"roles out of order: {name} must be one assistant turn, got {roles}")
        else:
            out += _empty_assistant(turns, name)
    return out


def _media_in_answers(record: Record) -> list[str]:
    out = []
    for name in ("messages", "chosen", "rejected"):
        for i, m in enumerate(getattr(record, name) or []):
            kinds = {p.get("type") for p in m["content"]} & {"image", "video"}
            if m.get("role") == "assistant" and kinds:
                out.append(
                    f"{min(kinds)} placeholder in an assistant turn: {name}[{i}] (media go in "
                    "user turns: the model reads them, it does not write them)"
                )
    return out


def _typed_tokens(record: Record) -> list[str]:
    """Special media tokens and grounding markup typed as text, first one per turn."""
    out = []
    for i, m in enumerate(record.all_turns()):
        text = message_text(m)
        if found := MEDIA_TOKENS.search(text):
            out.append(
                f"special token typed as text: {found.group(0)!r} in turn {i}; the processor "
                "writes image and video tokens itself (mark media with <image> / <video>)"
            )
        if found := GROUNDING_TOKENS.search(text):
            out.append(
                f"grounding not supported: {found.group(0)!r} in turn {i}; vlmfit does not "
                "implement box / reference markup and will not train on it as text"
            )
    return out


def _same_answers(record: Record) -> list[str]:
    def text(turns: list[dict[str, Any]] | None) -> list[str]:
        return [message_text(m).strip() for m in turns or []]

    if record.is_preference and text(record.chosen) == text(record.rejected):
        return ["chosen identical to rejected: the pair teaches nothing"]
    return []


def structure_problems(
    record: Record, *, require_assistant: bool = True, preference: bool | None = None
) -> list[str]:
    """Reasons (no location) why one record's turns cannot be trained on."""
    pref = record.is_preference if preference is None else preference
    if pref and not record.is_preference:
        return ["missing chosen/rejected: preference data needs both"]
    if not pref and (record.chosen is not None or record.rejected is not None):
        return ["unexpected chosen/rejected: a preference record where SFT data is expected"]
    msgs = record.messages
    if not msgs:
        return ["missing messages: the record has no turns"]
    out = [p for p in [_order_problem(msgs)] if p]
    if pref:
        if not out and msgs[-1]["role"] != "user":
            out.append(
                f"roles out of order: the preference prompt ends with {msgs[-1]['role']!r}, "
                "expected 'user'"
            )
        out += _empty_assistant(msgs, "messages") + _answer_problems(record)
    else:
        if require_assistant and not any(m["role"] == "assistant" for m in msgs):
            out.append("missing assistant turn: nothing to train on")
        elif require_assistant and not out and msgs[-1]["role"] != "assistant":
            out.append(
                f"roles out of order: the conversation ends with {msgs[-1]['role']!r}, "
                "expected a final 'assistant' turn"
            )
        out += _empty_assistant(msgs, "messages")
    out += _media_in_answers(record) + _same_answers(record) + _typed_tokens(record)
    turns = record.all_turns()
    for kind, refs in (("image", record.images), ("video", record.videos)):
        n = count_parts(turns, kind)
        if n != len(refs):
            out.append(
                f"placeholder/media mismatch: {n} <{kind}> placeholder{'s' * (n != 1)} "
                f"but {len(refs)} {kind}{'s' * (len(refs) != 1)}"
            )
    return out


# --------------------------------------------------------------------------- media

_Result = tuple[tuple[int, int] | None, str | None]  # (size, reason)


def _key(kind: str, ref: MediaRef) -> tuple[str, Any]:
    return (kind, ref.path) if ref.path is not None else (kind, id(ref.data))


def _check_one(kind: str, ref: MediaRef, max_pixels: int | None) -> _Result:
    try:
        if kind == "image":
            return media.check_image(ref, max_pixels=max_pixels), None
        info = media.probe_video(ref)
        return (info.width, info.height), None
    except media.MediaError as e:
        return None, str(e)
    except Exception as e:  # a decoder bug must not hide the other problems
        return None, f"unreadable {kind}: {ref.describe()} ({type(e).__name__}: {e})"


def check_media(
    records: Iterable[Record], *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> dict[tuple[str, Any], _Result]:
    """Check every unique image / video once (threads: decoders release the GIL)."""
    todo: dict[tuple[str, Any], tuple[str, MediaRef]] = {}
    for r in records:
        for kind, refs in (("image", r.images), ("video", r.videos)):
            for ref in refs:
                todo.setdefault(_key(kind, ref), (kind, ref))
    if not todo:
        return {}
    workers = max(1, min(8, os.cpu_count() or 1, len(todo)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda item: _check_one(*item, max_pixels), todo.values())
        return dict(zip(todo, results, strict=True))


def _media_problems(record: Record, results: dict[tuple[str, Any], _Result]) -> list[str]:
    reasons: list[str] = []
    for kind, refs in (("image", record.images), ("video", record.videos)):
        for ref in refs:
            reason = results.get(_key(kind, ref), (None, None))[1]
            if reason:
                reasons.append(reason)
    return list(dict.fromkeys(reasons))  # an image used twice is one problem


def processor_problems(
    record: Record, spec: ModelSpec, results: dict[tuple[str, Any], _Result]
) -> list[str]:
    """Media of ``record`` that ``spec``'s processor refuses (sizes from :func:`check_media`;
    the arithmetic is :mod:`vlmfit.budget`'s, which raises where the processor raises)."""
    from vlmfit import budget

    if record.videos and not spec.family.supports_video:
        return [f"video not supported: {spec.name} ({spec.family.name}) takes images only"]
    out = []
    for kind, refs in (("image", record.images), ("video", record.videos)):
        for ref in refs:
            size = results.get(_key(kind, ref), (None, None))[0]
            if size is None:
                continue
            try:
                if kind == "image":
                    budget.image_tokens(spec, *size)
                else:
                    budget.video_tokens(spec, *size, 2)  # one temporal patch: the shape rule
            except ValueError as e:
                out.append(
                    f"refused by the {spec.name} processor: {kind} {ref.describe()} is "
                    f"{size[0]}x{size[1]} ({e})"
                )
    return list(dict.fromkeys(out))


def _validate(
    records: list[Record],
    *,
    check_media_files: bool,
    max_pixels: int | None,
    require_assistant: bool,
    preference: bool | None,
    spec: ModelSpec | None = None,
) -> tuple[list[Problem], dict[tuple[str, Any], _Result]]:
    results = check_media(records, max_pixels=max_pixels) if check_media_files else {}
    problems: list[Problem] = []
    for r in records:
        reasons = structure_problems(r, require_assistant=require_assistant, preference=preference)
        reasons += _media_problems(r, results)
        reasons += processor_problems(r, spec, results) if spec else []
        problems += [Problem(r.source, r.index, reason) for reason in reasons]
    return problems, results


def validate_records(
    records: Iterable[Record],
    *,
    check_media: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    require_assistant: bool = True,
    preference: bool | None = None,
) -> list[Problem]:
    """Structural and media problems of records, in record order.

    ``preference=None`` takes each record as it is (SFT or preference); ``True`` / ``False``
    demands one kind. ``require_assistant=False`` accepts prompt-only conversations.

    Checks, besides what :mod:`vlmfit.data.formats` rejects while reading: roles in order (a
    system turn only first, then user / assistant alternating from user; SFT conversations end
    with an assistant turn, preference prompts with a user turn and ``chosen`` / ``rejected``
    each one assistant turn), no empty or missing assistant turn, no media in an assistant
    turn, ``chosen`` different from ``rejected``, no model's special image / video tokens and
    no grounding markup typed as text, as many media parts as media, and every image fully
    decoded / every video probed through :mod:`vlmfit.data.media` (once per unique file, in
    threads), with ``max_pixels`` guarding against decompression bombs. Token lengths need a
    tokenizer and are checked by preprocessing, not here.
    """
    problems, _ = _validate(
        list(records),
        check_media_files=check_media,
        max_pixels=max_pixels,
        require_assistant=require_assistant,
        preference=preference,
    )
    return problems


# --------------------------------------------------------------------------- datasets


def _position(p: Problem) -> tuple[str, int]:
    """Sort key: by file, whole-file problems first, then by record."""
    return (p.source, p.index if isinstance(p.index, int) else -1)


def check_dataset(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    on_error: Literal["fail", "skip"] = "fail",
    check_media: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    split: str | None = "train",
    dataset: str | None = None,
    model: str | None = None,
) -> Report:
    """Load and validate a dataset.

    ``on_error="fail"`` raises :class:`~vlmfit.data.records.DataError` listing every problem if
    there is any; ``"skip"`` returns the good records, with the problems and how many
    records (or whole files) were skipped. ``split`` / ``dataset`` go to
    :func:`~vlmfit.data.formats.load_records`; ``model`` (a registry name) also refuses,
    per record, media that model's processor refuses (Qwen refuses aspect ratios over 200;
    Idefics3 takes no video). What is checked: :func:`validate_records`.

    Usage::

        report = check_dataset("data/shapes/sft_train.json")   # raises DataError listing all
        report = check_dataset("peer.jsonl", on_error="skip")   # good records + the problems
        report.records, report.skipped, report.by_reason

    or from the shell (exit 0 with a summary, or 1 with one ``FILE:RECORD: reason`` per line)::

        python -m vlmfit check DATA [--model smolvlm] [--format trl] [--split train]
                                    [--dataset NAME] [--skip-bad]
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    from vlmfit.models import registry

    spec = registry.get(model) if model else None
    loaded = load_records(path, fmt=fmt, split=split, dataset=dataset)
    found, results = _validate(
        loaded.records,
        check_media_files=check_media,
        max_pixels=max_pixels,
        require_assistant=True,
        preference=None,
        spec=spec,
    )
    problems = sorted(loaded.problems + found, key=_position)
    if problems and on_error == "fail":
        raise DataError(problems)
    bad = {(p.source, p.index) for p in found}
    good = [r for r in loaded.records if (r.source, r.index) not in bad]

    def sizes(kind: str) -> list[tuple[int, int]]:
        refs = [(ref, r) for r in good for ref in (r.images if kind == "image" else r.videos)]
        return [s for ref, _r in refs if (s := results.get(_key(kind, ref), (None, None))[0])]

    return Report(
        records=good,
        problems=problems,
        skipped=len({(p.source, p.index) for p in problems}),
        counts=dict(Counter(r.fmt for r in good)),
        n_images=sum(len(r.images) for r in good),
        n_videos=sum(len(r.videos) for r in good),
        image_sizes=sizes("image"),
        by_reason=dict(Counter(reason_kind(p.reason) for p in problems)),
        fmt=loaded.fmt,
        video_sizes=sizes("video"),
        skipped_files=loaded.skipped,
    )
