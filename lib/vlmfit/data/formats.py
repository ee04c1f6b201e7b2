"""Read peers' multimodal datasets, unchanged, into the canonical :class:`~vlmfit.records.Record`.

Usage::

    from vlmfit.data.formats import load_records

    result = load_records("shared/fixtures/llamafactory_mllm_demo/mllm_demo.json")
    result.fmt, result.counts        # ('llamafactory', {'llamafactory': 6})
    result.records[0].messages[0]    # {'role': 'user', 'content': [{'type': 'image'}, ...]}
    result.problems                  # [Problem('x.jsonl', 7, 'invalid JSON: ...'), ...]

``path`` is a ``.json`` / ``.jsonl`` / ``.parquet`` / ``.arrow`` file, a folder written by
``datasets.Dataset.save_to_disk``, or a folder of data files (each read, format detected per
file; ``split="train"`` keeps the files whose name has a ``train`` token). Source files are
only read, never written. A record that cannot be read becomes a :class:`Problem`
(``FILE:RECORD: reason``, RECORD being the 0-based index in a JSON array, the 1-based line in
JSONL, the 0-based row in a table, ``-`` for the whole file) and is left out of ``records``;
the rest still load. What to do about problems is :mod:`vlmfit.data.validate`'s policy.

Formats (detected from the keys of the first recognisable record; ``fmt=`` overrides):

``llamafactory``
    LLaMA-Factory / ShareGPT: ``messages`` (``role``/``content``) or ``conversations``
    (``from``/``value``; ``human``/``gpt``/``system``, also ``user``/``assistant``), optional
    ``system`` string, ``<image>``/``<video>`` placeholders in the text, ``images``/``videos``
    paths relative to the data file.
``llamafactory_preference``
    The same plus ``chosen``/``rejected``, each one assistant message (or a string).
``unsloth``
    ``{"text": "...<image_no_1>...", "images": [...], "videos": [...]}``. ``<image_no_N>`` is
    the N-th (1-based) entry of the record's list, so an entry may be used twice or out of
    list order; MediaRefs follow placeholder order. A text record has no roles, and guessing
    them from markers (``User:``, ``<|im_start|>``, ``###``...) would silently train on the
    wrong tokens, so it is read captioning-style: one user turn holding the media in
    placeholder order (followed by the record's ``question`` / ``instruction`` string, if it
    has one), and one assistant turn holding the text with the placeholders removed (the
    text pieces between placeholders are stripped and joined with one space).
``trl``
    TRL conversational: ``messages`` whose ``content`` is a list of parts (``{"type":
    "image"}``, ``{"type": "text", "text": ...}``) and an ``images`` column of paths, of
    ``{"bytes", "path"}`` dicts as Hugging Face ``Image`` features store them, or PIL images.
``trl_preference``
    TRL preference (RLAIF-V layout): ``prompt`` (messages, or a plain string), ``chosen`` and
    ``rejected`` (one assistant message in a list, a message, or a plain string), ``images``.
``hf_disk`` / ``parquet``
    Containers: the rows are read with Arrow (images stay encoded bytes, decoded later by
    :mod:`vlmfit.data.media`) and interpreted by their columns as one of the formats above;
    ``counts`` names that inner format.

Placeholders: string content is split on ``<image>``, ``<video>``, ``<image_no_N>`` and
``<video_no_N>`` into ordered content parts, and the number of media parts must equal the
number of media (``placeholder/media mismatch: 2 <image> placeholders but 1 image``). No
image is ever inserted where the data has no placeholder (TRL prepends images to a
placeholder-less string prompt; vlmfit rejects it instead of guessing). A literal
``<image>`` inside a text *part* is rejected too: chat templates would turn it into an image
token that has no image. Media paths must stay inside the data file's folder: absolute
paths, ``..`` escapes and symlinks resolving outside are rejected without being opened.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfit.records import MediaRef, Problem, Record, text_part

__all__ = [
    "FORMATS",
    "ROW_FORMATS",
    "LoadResult",
    "RecordError",
    "detect_format",
    "load_records",
    "parse_record",
    "resolve_media_path",
]

ROW_FORMATS = ("llamafactory", "llamafactory_preference", "unsloth", "trl", "trl_preference")
CONTAINER_FORMATS = ("hf_disk", "parquet")
FORMATS = ROW_FORMATS + CONTAINER_FORMATS
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")
# JSON files of a dataset folder that hold metadata, not records.
METADATA_FILES = frozenset({"dataset_info.json", "dataset_dict.json", "state.json", "meta.json"})
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
PLACEHOLDER = re.compile(r"<(image|video)(?:_no_(\d+))?>")
FILE = "-"  # RECORD of a problem about a whole file
_BATCH = 1024
EXPECTED = (
    "llamafactory (messages|conversations), llamafactory_preference (messages|conversations, "
    "chosen, rejected), unsloth (text), trl (messages with content parts), "
    "trl_preference (prompt, chosen, rejected)"
)


class RecordError(ValueError):
    """The reason one record cannot be read; becomes a :class:`Problem`."""


@dataclass
class LoadResult:
    """What :func:`load_records` read: good records, every problem, formats seen."""

    path: Path
    fmt: str
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # good records per (inner) format


# --------------------------------------------------------------------------- detection


def detect_format(record: Any) -> str | None:
    """The row format of one raw record from its keys, or ``None`` if unrecognisable."""
    if not isinstance(record, dict):
        return None
    conv = "messages" if "messages" in record else "conversations"
    if record.get("chosen") is not None and record.get("rejected") is not None:
        if "prompt" in record:
            return "trl_preference"
        if conv in record:
            return "llamafactory_preference"
        return None
    if isinstance(record.get("messages"), list):
        return "trl" if _has_part_lists(record["messages"]) else "llamafactory"
    if isinstance(record.get("conversations"), list):
        return "llamafactory"
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
    if kind in ("image", "video"):
        return {"type": kind, "_n": None}
    if kind != "text":
        raise RecordError(
            f"unsupported content part: type {kind!r} in {where} (expected text, image, video)"
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


# --------------------------------------------------------------------------- formats


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
    turns = _turns(raw[key], key)
    system = raw.get("system")
    if isinstance(system, str) and system:  # ShareGPT's optional system prompt field
        turns.insert(0, {"role": "system", "content": [text_part(system)]})
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


def _llamafactory(raw: dict[str, Any]) -> _Draft:
    _no_preference(raw, "llamafactory")
    return _Draft(_conversation(raw, "llamafactory"))


def _llamafactory_preference(raw: dict[str, Any]) -> _Draft:
    fmt = "llamafactory_preference"
    if "chosen" not in raw or "rejected" not in raw:
        raise _not_this(raw, fmt, "no 'chosen' and 'rejected'")
    messages = _conversation(raw, fmt)
    return _Draft(messages, _answer(raw["chosen"], "chosen"), _answer(raw["rejected"], "rejected"))


def _trl(raw: dict[str, Any]) -> _Draft:
    _no_preference(raw, "trl")
    if "messages" not in raw:
        raise _not_this(raw, "trl", "no 'messages'")
    return _Draft(_turns(raw["messages"], "messages"))


def _trl_preference(raw: dict[str, Any]) -> _Draft:
    fmt = "trl_preference"
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in raw]
    if missing:
        raise _not_this(raw, fmt, f"no {', '.join(repr(k) for k in missing)}")
    prompt = raw["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": _split_text(prompt)}]
    elif isinstance(prompt, dict):
        messages = [_message(prompt, "prompt")]
    else:
        messages = _turns(prompt, "prompt")
    return _Draft(messages, _answer(raw["chosen"], "chosen"), _answer(raw["rejected"], "rejected"))


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


PARSERS: dict[str, Callable[[dict[str, Any]], _Draft]] = {
    "llamafactory": _llamafactory,
    "llamafactory_preference": _llamafactory_preference,
    "unsloth": _unsloth,
    "trl": _trl,
    "trl_preference": _trl_preference,
}


# --------------------------------------------------------------------------- media


def _entries(raw: dict[str, Any], key: str) -> list[Any]:
    value = raw.get(key)
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str | bytes | dict) or _is_pil(value):
        return [value]
    raise RecordError(f"malformed record: '{key}' must be a list, got {_type(value)}")


def _bind(slots: list[int | None], entries: list[Any], kind: str) -> list[Any]:
    """The media entries in placeholder order; raises on a placeholder/media mismatch."""
    numbered = [n for n in slots if n is not None]
    if not numbered:
        if len(slots) != len(entries):
            raise RecordError(
                f"placeholder/media mismatch: {_n(len(slots), f'<{kind}> placeholder')} "
                f"but {_n(len(entries), kind)}"
            )
        return entries
    if len(numbered) != len(slots):
        raise RecordError(
            f"placeholder/media mismatch: mixes <{kind}> and <{kind}_no_N> placeholders"
        )
    for n in numbered:
        if not 1 <= n <= len(entries):
            raise RecordError(
                f"placeholder/media mismatch: <{kind}_no_{n}> but {_n(len(entries), kind)}"
            )
    unused = sorted(set(range(1, len(entries) + 1)) - set(numbered))
    if unused:
        raise RecordError(
            f"placeholder/media mismatch: {kind} {unused[0]} of {len(entries)} is not "
            f"referenced by any <{kind}_no_N> placeholder"
        )
    return [entries[n - 1] for n in numbered]


def resolve_media_path(origin: str, base: Path) -> MediaRef:
    """Resolve a media path written in the data, relative to the data file's folder ``base``.

    Raises :class:`RecordError` for URLs, absolute paths, ``..`` escapes and symlinks that
    resolve outside ``base``; only the path is inspected, the file is never opened.
    """
    if not origin.strip():
        raise RecordError("malformed record: empty media path")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", origin):
        raise RecordError(f"unsupported media: {origin!r} is a URL (only local files are read)")
    root = base.resolve()
    if os.path.isabs(origin) or Path(origin).is_absolute():
        raise RecordError(f"path escapes the dataset folder: {origin!r} is absolute")
    joined = Path(os.path.normpath(root / origin))
    if not joined.is_relative_to(root):
        raise RecordError(
            f"path escapes the dataset folder: {origin!r} resolves outside {str(base)!r}"
        )
    real = joined.resolve()  # follows symlinks (lstat/readlink only)
    if not real.is_relative_to(root):
        raise RecordError(
            f"path escapes the dataset folder: {origin!r} is a symlink to {str(real)!r}"
        )
    return MediaRef(path=str(real), origin=origin)


def _media_ref(entry: Any, kind: str, k: int, base: Path) -> MediaRef:
    """One ``images``/``videos`` entry: a path, an HF ``{"bytes", "path"}`` dict, bytes, PIL."""
    where = f"{kind}s[{k}]"
    if isinstance(entry, str):
        return resolve_media_path(entry, base)
    if isinstance(entry, dict):
        data, path = entry.get("bytes"), entry.get("path")
        if data:
            return MediaRef(data=data, origin=f"{path or where} (embedded)")
        if isinstance(path, str):
            return resolve_media_path(path, base)
        raise RecordError(f"malformed record: {where} has neither bytes nor path")
    if isinstance(entry, bytes | bytearray) and entry:
        return MediaRef(data=bytes(entry), origin=f"{where} (embedded)")
    if _is_pil(entry):
        return MediaRef(data=entry, origin=f"{where} (embedded)")
    raise RecordError(f"malformed record: {where} is {_type(entry)}, not a path or an image")


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(value, Image.Image)


# --------------------------------------------------------------------------- one record


def parse_record(raw: Any, fmt: str, *, base: Path, source: str, index: int | str) -> Record:
    """Turn one raw record into a :class:`Record`; raises :class:`RecordError` with a reason."""
    if not isinstance(raw, dict):
        raise RecordError(f"record is not an object: got {_type(raw)}")
    draft = PARSERS[fmt](raw)
    turns = draft.messages + (draft.chosen or []) + (draft.rejected or [])
    media: dict[str, list[MediaRef]] = {}
    errors: list[str] = []
    for kind in ("image", "video"):
        slots = [p["_n"] for m in turns for p in m["content"] if p["type"] == kind]
        bound = _bind(slots, _entries(raw, f"{kind}s"), kind)
        media[kind] = []
        for k, entry in enumerate(bound):
            try:
                media[kind].append(_media_ref(entry, kind, k, base))
            except RecordError as e:
                errors.append(str(e))
    if errors:
        raise RecordError("; ".join(dict.fromkeys(errors)))
    for part in (p for m in turns for p in m["content"]):
        part.pop("_n", None)
    return Record(
        messages=draft.messages,
        images=media["image"],
        videos=media["video"],
        chosen=draft.chosen,
        rejected=draft.rejected,
        source=source,
        index=index,
        fmt=fmt,
    )


# --------------------------------------------------------------------------- files


Row = tuple[int | str, Any]  # (RECORD, raw record)


def _read_json(path: Path, source: str) -> tuple[list[Row], list[Problem]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        return [], [Problem(source, FILE, f"unreadable file: {e}")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines named .json
            return _read_jsonl_text(text, source)
        return [], [Problem(source, FILE, f"invalid JSON: {e}")]
    if not isinstance(data, list):
        return [], [
            Problem(source, FILE, f"malformed file: top level must be an array, got {_type(data)}")
        ]
    return list(enumerate(data)), []


def _read_jsonl(path: Path, source: str) -> tuple[list[Row], list[Problem]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        return [], [Problem(source, FILE, f"unreadable file: {e}")]
    return _read_jsonl_text(text, source)


def _read_jsonl_text(text: str, source: str) -> tuple[list[Row], list[Problem]]:
    rows: list[Row] = []
    problems: list[Problem] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(Problem(source, line_no, f"invalid JSON: {e.msg} (column {e.colno})"))
    return rows, problems


def _arrow_rows(batches: Iterable[Any]) -> list[Row]:
    """Rows of Arrow record batches as Python dicts; Image features stay {bytes, path}."""
    rows: list[Row] = []
    for batch in batches:
        rows.extend(enumerate(batch.to_pylist(), start=len(rows)))
    return rows


def _read_parquet(path: Path, source: str) -> tuple[list[Row], list[Problem]]:
    import pyarrow.parquet as pq

    try:
        return _arrow_rows(pq.ParquetFile(path).iter_batches(batch_size=_BATCH)), []
    except Exception as e:  # pyarrow raises several types for damaged files
        return [], [Problem(source, FILE, f"unreadable parquet file: {e}")]


def _read_arrow(path: Path, source: str) -> tuple[list[Row], list[Problem]]:
    import datasets

    try:
        ds = datasets.Dataset.from_file(str(path))
        return _arrow_rows(ds.with_format("arrow").iter(batch_size=_BATCH)), []
    except Exception as e:  # pyarrow raises several types for damaged files
        return [], [Problem(source, FILE, f"unreadable arrow file: {e}")]


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def _read_disk(path: Path, split: str | None) -> Iterator[tuple[str, list[Row], list[Problem]]]:
    """(source, rows, problems) per split of a ``save_to_disk`` folder."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # damaged or foreign folder
        yield str(path), [], [Problem(str(path), FILE, f"unreadable saved dataset: {e}")]
        return
    if isinstance(loaded, datasets.DatasetDict):
        names = [split] if split else list(loaded)
        for name in names:
            source = str(path / name)
            if name not in loaded:
                yield source, [], [Problem(source, FILE, f"no split {name!r} (has {list(loaded)})")]
            else:
                yield source, _arrow_rows(loaded[name].with_format("arrow").iter(_BATCH)), []
    else:
        yield str(path), _arrow_rows(loaded.with_format("arrow").iter(batch_size=_BATCH)), []


READERS = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
    ".arrow": _read_arrow,
}


def _units(root: Path, split: str | None, top: Path | None = None) -> list[Path]:
    """Data files and saved datasets under a folder (saved datasets are not descended).

    With ``split``, a file is kept when its path below ``top`` has ``split`` as a token
    (``sft_train.json``, ``data/train-00000-of-00001.parquet``, ``train/x.jsonl``).
    """
    top = top or root
    if is_saved_dataset(root):
        return [root]
    found: list[Path] = []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            found += _units(child, split, top)
        elif child.suffix in DATA_SUFFIXES and child.name not in METADATA_FILES:
            tokens = re.split(r"[^A-Za-z0-9]+", str(child.relative_to(top).with_suffix("")))
            if split is None or split in tokens:
                found.append(child)
    return found


# --------------------------------------------------------------------------- entry point


def _parse_rows(
    rows: list[Row], fmt: str | None, base: Path, source: str, result: LoadResult
) -> str | None:
    """Parse one file's rows into ``result``; returns the row format used.

    Without ``fmt`` the format is detected on the first recognisable record and every
    record is read with it; a record no format recognises is reported as such.
    """
    auto = fmt is None
    if auto:
        fmt = next((f for _i, raw in rows if (f := detect_format(raw))), None)
    for index, raw in rows:
        try:
            if auto and (fmt is None or detect_format(raw) is None):
                raise RecordError(_unrecognised(raw))
            assert fmt is not None
            record = parse_record(raw, fmt, base=base, source=source, index=index)
        except RecordError as e:
            result.problems.append(Problem(source, index, str(e)))
        else:
            result.records.append(record)
    return fmt


def _unrecognised(raw: Any) -> str:
    if not isinstance(raw, dict):
        return f"record is not an object: got {_type(raw)}"
    keys = ", ".join(sorted(map(str, raw))) or "none"
    return f"unrecognised record: keys found: {keys}; expected one of: {EXPECTED}"


def _load_unit(
    unit: Path, shown: str, fmt: str | None, split: str | None, result: LoadResult
) -> str:
    """Read one file or saved dataset; returns its format (container name if any)."""
    row_fmt = fmt if fmt in ROW_FORMATS else None
    if unit.is_dir():
        if fmt not in (None, "hf_disk", *ROW_FORMATS):
            result.problems.append(Problem(shown, FILE, f"a saved dataset folder, not {fmt!r}"))
            return "hf_disk"
        for source, rows, problems in _read_disk(unit, split):
            result.problems += problems
            _parse_rows(rows, row_fmt, unit, source, result)
        return "hf_disk"
    container = {".parquet": "parquet", ".arrow": "hf_disk"}.get(unit.suffix)
    if fmt in CONTAINER_FORMATS and fmt != container:
        result.problems.append(Problem(shown, FILE, f"not a {fmt} file (suffix {unit.suffix!r})"))
        return fmt
    rows, problems = READERS[unit.suffix](unit, shown)
    result.problems += problems
    used = _parse_rows(rows, row_fmt, unit.parent, shown, result)
    return container or used or "unknown"


def load_records(
    path: str | Path, *, fmt: str | None = None, split: str | None = None
) -> LoadResult:
    """Read a dataset file or folder into canonical records (see the module docstring).

    ``fmt`` forces a format (one of :data:`FORMATS`); ``split`` picks a split of a saved
    ``DatasetDict`` or the files of a folder whose name has that token (``sft_train.json``).
    Never raises for bad data: every problem is in ``LoadResult.problems``.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of: {', '.join(FORMATS)}")
    path = Path(path)
    result = LoadResult(path=path, fmt=fmt or "unknown")
    if not path.exists():
        result.problems.append(Problem(str(path), FILE, "no such file or folder"))
        return result
    if path.is_dir():
        units = _units(path, split)
        if not units:
            result.problems.append(
                Problem(str(path), FILE, f"no data files ({', '.join(DATA_SUFFIXES)})")
            )
    elif path.suffix in READERS:
        units = [path]
    else:
        reason = f"unsupported file type {path.suffix!r} (expected {', '.join(DATA_SUFFIXES)})"
        result.problems.append(Problem(str(path), FILE, reason))
        units = []
    seen = {_load_unit(u, str(u), fmt, split, result) for u in units}
    if fmt is None:
        result.fmt = seen.pop() if len(seen) == 1 else "mixed" if seen else "unknown"
    result.counts = dict(Counter(r.fmt for r in result.records))
    if units and not result.records and not result.problems:
        result.problems.append(Problem(str(path), FILE, "no records"))
    return result


# --------------------------------------------------------------------------- helpers


def _type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
