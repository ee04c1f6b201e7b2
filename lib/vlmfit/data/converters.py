"""Converters: one raw record of a known layout into turns in the content-parts layout.

Like LLaMA-Factory's ``data/converter.py``: one function per layout, registered in one table,
``PARSERS`` (what a parser returns: the comment above it); :func:`detect_format` picks the
layout. The layouts are described in :mod:`vlmfit.data.formats`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmfit.data.files import type_name as _type
from vlmfit.data.records import text_part

__all__ = [
    "EXPECTED",
    "PARSERS",
    "ROW_FORMATS",
    "RecordError",
    "detect_format",
    "is_pil",
    "media_entries",
    "refuse_unsupported",
]

ROW_FORMATS = (
    "llamafactory",
    "llava",
    "llamafactory_preference",
    "alpaca",
    "alpaca_preference",
    "swift_preference",
    "unsloth",
    "trl",
    "trl_prompt_completion",
    "trl_preference",
    "trl_implicit_preference",
    "cauldron",
)
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
PLACEHOLDER = re.compile(r"<(image|video)(?:_no_(\d+))?>")
SWIFT_REJECTED = ("rejected_response", "rejected_messages", "rejected_images")
EXPECTED = (
    "llamafactory / llava (messages|conversations), llamafactory_preference (+ chosen, "
    "rejected), swift_preference (+ rejected_response|rejected_messages), alpaca (instruction, "
    "output), alpaca_preference (instruction, chosen, rejected), unsloth (text), trl_prompt_"
    "completion (prompt, completion), trl_preference (prompt, chosen, rejected), "
    "trl_implicit_preference (chosen, rejected), cauldron (texts)"
)


class RecordError(ValueError):
    """The reason one record cannot be read; becomes a :class:`Problem`."""


# --------------------------------------------------------------------------- detection


def detect_format(record: Any) -> str | None:
    """The row format of one raw record from its keys, or ``None`` if unrecognisable.

    Usage::

        fmt = detect_format(raw)          # 'alpaca', 'llava', 'swift_preference', ... or None
        draft = PARSERS[fmt](raw)         # draft.messages / draft.chosen / draft.rejected
    """
    if not isinstance(record, dict):
        return None
    conv = next((k for k in ("messages", "conversations") if isinstance(record.get(k), list)), None)
    if conv and any(k in record for k in SWIFT_REJECTED):
        return "swift_preference"
    if record.get("chosen") is not None and record.get("rejected") is not None:
        if "prompt" in record:
            return "trl_preference"
        if conv:
            return "llamafactory_preference"
        return "alpaca_preference" if "instruction" in record else "trl_implicit_preference"
    if "prompt" in record and "completion" in record:
        return "trl_prompt_completion"
    if conv == "messages" and _has_part_lists(record["messages"]):
        return "trl"
    if conv:
        singular = ("image" in record or "video" in record) and "images" not in record
        return "llava" if singular else "llamafactory"
    if isinstance(record.get("texts"), list):
        return "cauldron"
    if isinstance(record.get("instruction"), str):
        return "alpaca"
    if isinstance(record.get("text"), str):
        return "unsloth"
    return None


def _has_part_lists(messages: list[Any]) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages)


# --------------------------------------------------------------------------- messages


def _turns(raw: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise RecordError(f"malformed record: '{where}' must be a list, got {_type(raw)}")
    return [_message(m, f"{where}[{i}]") for i, m in enumerate(raw)]


def _message(raw: Any, where: str, default_role: str | None = None) -> dict[str, Any]:
    """One message (``role``/``content`` or ``from``/``value``) as content parts."""
    if isinstance(raw, str) and default_role:
        return {"role": default_role, "content": _split_text(raw)}
    if not isinstance(raw, dict):
        raise RecordError(f"malformed record: {where} is not an object (got {_type(raw)})")
    role = raw.get("role", raw.get("from"))
    if role is None:
        raise RecordError(f"malformed record: {where} has no 'role' or 'from'")
    if role not in ROLES:
        raise RecordError(
            f"unknown role: {role!r} in {where} (expected one of: {', '.join(ROLES)})"
        )
    content = raw["content"] if "content" in raw else raw.get("value")
    return {"role": ROLES[role], "content": _content(content, where)}


def _content(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return _split_text(content)
    if isinstance(content, list):
        return [_part(p, f"{where}.content[{i}]") for i, p in enumerate(content)]
    raise RecordError(
        f"malformed record: {where} content must be a string or a list of parts, "
        f"got {_type(content)}"
    )


def _part(part: Any, where: str) -> dict[str, Any]:
    """One content part; Arrow fills absent struct fields with None, hence the ``or ""``."""
    if not isinstance(part, dict):
        raise RecordError(f"malformed record: {where} is not an object (got {_type(part)})")
    kind = part.get("type")
    if kind in ("image", "video"):  # the source, if the part carries one (Qwen, Unsloth)
        src = next((part[k] for k in (kind, "path", "url") if part.get(k) is not None), None)
        return {"type": kind, "_n": None, "_src": src}
    if kind in ("image_url", "video_url"):  # OpenAI: {"image_url": {"url": ...}} or a string
        value = part.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str):
            raise RecordError(f"malformed record: {where} has no {kind}.url string")
        return {"type": kind.removesuffix("_url"), "_n": None, "_src": url}
    if kind != "text":
        raise RecordError(
            f"unsupported content part: type {kind!r} in {where} "
            "(expected text, image, video, image_url)"
        )
    text = part.get("text") or ""
    if not isinstance(text, str):
        raise RecordError(f"malformed record: {where} text is {_type(text)}, not a string")
    found = PLACEHOLDER.search(text)
    if found:
        raise RecordError(
            f"placeholder in a text part: {found.group(0)!r} in {where}; content-parts "
            f"messages mark media with {{'type': '{found.group(1)}'}} parts"
        )
    return text_part(text)


def _split_text(text: str) -> list[dict[str, Any]]:
    """Split text on placeholders into ordered parts (media parts keep ``_n`` for binding)."""
    parts: list[dict[str, Any]] = []
    pos = 0
    for m in PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append(text_part(text[pos : m.start()]))
        parts.append({"type": m.group(1), "_n": int(m.group(2)) if m.group(2) else None})
        pos = m.end()
    if pos < len(text):
        parts.append(text_part(text[pos:]))
    return parts


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": _split_text(text)}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": _split_text(text)}


# --------------------------------------------------------------------------- layouts


@dataclass
class _Draft:
    messages: list[dict[str, Any]]
    chosen: list[dict[str, Any]] | None = None
    rejected: list[dict[str, Any]] | None = None


def _not_this(raw: dict[str, Any], fmt: str, why: str) -> RecordError:
    keys = ", ".join(sorted(map(str, raw))) or "none"
    return RecordError(f"record does not match format '{fmt}': {why} (keys found: {keys})")


def _conversation(raw: dict[str, Any], fmt: str) -> list[dict[str, Any]]:
    key = "messages" if "messages" in raw else "conversations" if "conversations" in raw else None
    if key is None:
        raise _not_this(raw, fmt, "no 'messages' or 'conversations'")
    return _with_system(raw, _turns(raw[key], key))


def _with_system(raw: dict[str, Any], turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system = raw.get("system")
    if isinstance(system, str) and system:  # ShareGPT / alpaca optional system prompt field
        return [{"role": "system", "content": [text_part(system)]}, *turns]
    return turns


def _no_preference(raw: dict[str, Any], fmt: str) -> None:
    if raw.get("chosen") is not None or raw.get("rejected") is not None:
        raise _not_this(raw, fmt, "has chosen/rejected (preference data)")


def _answer(raw: Any, where: str) -> list[dict[str, Any]]:
    """A chosen/rejected answer: a string, one message, or a list of messages."""
    if raw is None:
        raise RecordError(f"malformed record: '{where}' is missing")
    if isinstance(raw, list):
        return [_message(m, f"{where}[{i}]", "assistant") for i, m in enumerate(raw)]
    return [_message(raw, where, "assistant")]


def _prompt(prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [_user(prompt)]
    if isinstance(prompt, dict):
        return [_message(prompt, "prompt")]
    return _turns(prompt, "prompt")


def _llamafactory(raw: dict[str, Any]) -> _Draft:
    _no_preference(raw, "llamafactory")
    return _Draft(_conversation(raw, "llamafactory"))


def _llamafactory_preference(raw: dict[str, Any]) -> _Draft:
    fmt = "llamafactory_preference"
    if "chosen" not in raw or "rejected" not in raw:
        raise _not_this(raw, fmt, "no 'chosen' and 'rejected'")
    messages = _conversation(raw, fmt)
    return _Draft(messages, _answer(raw["chosen"], "chosen"), _answer(raw["rejected"], "rejected"))


def _alpaca_prompt(raw: dict[str, Any], fmt: str) -> list[dict[str, Any]]:
    """LLaMA-Factory's alpaca prompt: history pairs, then ``instruction\\ninput``."""
    if not isinstance(raw.get("instruction"), str):
        raise _not_this(raw, fmt, "no 'instruction' string")
    history = raw.get("history") or []
    if not isinstance(history, list):
        raise RecordError(f"malformed record: 'history' must be a list, got {_type(history)}")
    turns: list[dict[str, Any]] = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(map(_is_str, pair))):
            raise RecordError(
                f"malformed record: history[{i}] must be an [instruction, response] pair"
            )
        turns += [_user(pair[0]), _assistant(pair[1])]
    query = [x for x in (raw["instruction"], raw.get("input")) if isinstance(x, str) and x]
    return _with_system(raw, [*turns, _user("\n".join(query))])


def _alpaca(raw: dict[str, Any]) -> _Draft:
    _no_preference(raw, "alpaca")
    prompt = _alpaca_prompt(raw, "alpaca")
    if not isinstance(raw.get("output"), str):
        raise _not_this(raw, "alpaca", "no 'output' string")
    return _Draft([*prompt, _assistant(raw["output"])])


def _alpaca_preference(raw: dict[str, Any]) -> _Draft:
    fmt = "alpaca_preference"
    prompt = _alpaca_prompt(raw, fmt)
    for side in ("chosen", "rejected"):
        if not isinstance(raw.get(side), str):
            raise _not_this(raw, fmt, f"'{side}' must be a string")
    return _Draft(prompt, [_assistant(raw["chosen"])], [_assistant(raw["rejected"])])


def _swift_preference(raw: dict[str, Any]) -> _Draft:
    if "rejected_response" not in raw and "rejected_messages" not in raw:
        raise RecordError(
            "unsupported preference: 'rejected_images' without 'rejected_response' or "
            "'rejected_messages' pairs two images, not two answers (vlmfit's DPO compares two "
            "answers to one prompt)"
        )
    key = "messages" if "messages" in raw else "conversations"
    turns = _turns(raw[key], key)
    if not turns or turns[-1]["role"] != "assistant":
        raise RecordError(f"malformed record: '{key}' must end with the chosen assistant turn")
    if "rejected_messages" in raw:
        other = _turns(raw["rejected_messages"], "rejected_messages")
        if other[:-1] != turns[:-1] or not other or other[-1]["role"] != "assistant":
            raise RecordError(
                "unsupported preference: 'rejected_messages' must repeat "
                f"'{key}' up to a different last assistant turn (one prompt, two answers)"
            )
        rejected = other[-1:]
    else:
        rejected = [_message(raw["rejected_response"], "rejected_response", "assistant")]
    if "rejected_images" in raw and media_entries(raw, "rejected_images") != media_entries(
        raw, "images"
    ):
        raise RecordError(
            "unsupported preference: 'rejected_images' differ from 'images'; vlmfit's DPO "
            "shows both answers the same images"
        )
    return _Draft(_with_system(raw, turns[:-1]), turns[-1:], rejected)


def _trl(raw: dict[str, Any]) -> _Draft:
    _no_preference(raw, "trl")
    if "messages" not in raw:
        raise _not_this(raw, "trl", "no 'messages'")
    return _Draft(_turns(raw["messages"], "messages"))


def _trl_prompt_completion(raw: dict[str, Any]) -> _Draft:
    _no_preference(raw, "trl_prompt_completion")
    if "prompt" not in raw or "completion" not in raw:
        raise _not_this(raw, "trl_prompt_completion", "no 'prompt' and 'completion'")
    return _Draft(_prompt(raw["prompt"]) + _answer(raw["completion"], "completion"))


def _trl_preference(raw: dict[str, Any]) -> _Draft:
    fmt = "trl_preference"
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in raw]
    if missing:
        raise _not_this(raw, fmt, f"no {', '.join(repr(k) for k in missing)}")
    messages = _prompt(raw["prompt"])
    return _Draft(messages, _answer(raw["chosen"], "chosen"), _answer(raw["rejected"], "rejected"))


def _trl_implicit_preference(raw: dict[str, Any]) -> _Draft:
    """TRL's implicit prompt: the shared beginning of ``chosen`` and ``rejected``."""
    chosen, rejected = raw.get("chosen"), raw.get("rejected")
    if chosen == rejected:
        raise RecordError("chosen identical to rejected: the pair teaches nothing")
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = next(
            i
            for i, (a, b) in enumerate(zip(chosen + "\0", rejected + "\1", strict=False))
            if a != b
        )
        if n and chosen[n - 1] == " ":  # the space belongs to the answers, as in TRL
            n -= 1
        if n == 0:
            raise RecordError(
                "no shared prompt: implicit-prompt chosen and rejected differ at once"
            )
        return _Draft([_user(chosen[:n])], [_assistant(chosen[n:])], [_assistant(rejected[n:])])
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = _turns(chosen, "chosen"), _turns(rejected, "rejected")
        n = next(
            (i for i, (a, b) in enumerate(zip(c, r, strict=False)) if a != b), min(len(c), len(r))
        )
        if n == 0:
            raise RecordError(
                "no shared prompt: implicit-prompt chosen and rejected differ at once"
            )
        return _Draft(c[:n], c[n:], r[n:])
    raise RecordError(
        "malformed record: implicit-prompt 'chosen' and 'rejected' must both be strings or "
        f"both message lists, got {_type(chosen)} and {_type(rejected)}"
    )


def _unsloth(raw: dict[str, Any]) -> _Draft:
    text = raw.get("text")
    if not isinstance(text, str):
        raise _not_this(raw, "unsloth", "no 'text' string")
    _no_preference(raw, "unsloth")
    parts = _split_text(text)
    media = [p for p in parts if p["type"] != "text"]
    answer = " ".join(p["text"].strip() for p in parts if p["type"] == "text" and p["text"].strip())
    question = raw.get("question", raw.get("instruction"))
    user = media + ([text_part(question)] if isinstance(question, str) and question else [])
    assistant = [text_part(answer)] if answer else []
    return _Draft([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])


def _cauldron(raw: dict[str, Any]) -> _Draft:
    texts = raw.get("texts")
    if not isinstance(texts, list):
        raise _not_this(raw, "cauldron", "no 'texts' list")
    turns: list[dict[str, Any]] = []
    for i, t in enumerate(texts):
        if not (isinstance(t, dict) and _is_str(t.get("user")) and _is_str(t.get("assistant"))):
            raise RecordError(f"malformed record: texts[{i}] needs 'user' and 'assistant' strings")
        turns += [_user(t["user"]), _assistant(t["assistant"])]
    has_slots = any(p["type"] != "text" for m in turns for p in m["content"])
    if turns and not has_slots:  # the layout's own rule: the images open the first user turn
        slots = [{"type": "image", "_n": None} for _ in media_entries(raw, "images")]
        turns[0]["content"] = slots + turns[0]["content"]
    return _Draft(turns)


# Layout -> parser of one raw record into a draft (messages / chosen / rejected). Media parts
# keep ``_n`` (the N of ``<image_no_N>``) and ``_src`` (a source carried by the part itself)
# for :func:`vlmfit.data.formats.parse_record`, which binds them to media and removes both.
PARSERS: dict[str, Callable[[dict[str, Any]], _Draft]] = {
    "llamafactory": _llamafactory,
    "llava": _llamafactory,
    "llamafactory_preference": _llamafactory_preference,
    "alpaca": _alpaca,
    "alpaca_preference": _alpaca_preference,
    "swift_preference": _swift_preference,
    "unsloth": _unsloth,
    "trl": _trl,
    "trl_prompt_completion": _trl_prompt_completion,
    "trl_preference": _trl_preference,
    "trl_implicit_preference": _trl_implicit_preference,
    "cauldron": _cauldron,
}


def refuse_unsupported(raw: dict[str, Any]) -> None:
    """Fields of tasks vlmfit does not implement: reading on would train on the wrong thing."""
    if raw.get("objects"):
        raise RecordError(
            "grounding not supported: 'objects' fills ms-swift's <ref-object> / <bbox> "
            "placeholders with boxes, which vlmfit does not implement"
        )
    label = raw.get("label", raw.get("kto_tag"))
    if isinstance(label, bool):
        raise RecordError(
            "unpaired preference not supported: a true/false 'label' / 'kto_tag' marks KTO "
            "data; vlmfit trains SFT and paired DPO"
        )


# --------------------------------------------------------------------------- helpers


def media_entries(raw: dict[str, Any], key: str) -> list[Any]:
    """The media column ``key`` (``images``...), or LLaVA's singular ``image`` / ``video``."""
    value = raw.get(key)
    if value is None and key in ("images", "videos"):
        value = raw.get(key[:-1])
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str | bytes | dict) or is_pil(value):
        return [value]
    raise RecordError(f"malformed record: '{key}' must be a list, got {_type(value)}")


def is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(value, Image.Image)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)
