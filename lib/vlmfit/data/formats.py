"""Read peers' multimodal datasets, unchanged, into the canonical
:class:`~vlmfit.data.records.Record`: ``load_records(path)`` detects each file's format,
converts its records (:mod:`vlmfit.data.converters`) and reports the unreadable ones as
``FILE:RECORD: reason`` problems. Formats, placeholders and path rules: docs/data-formats.md.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from vlmfit.data import dataset_info
from vlmfit.data.converters import (
    EXPECTED,
    PARSERS,
    ROW_FORMATS,
    RecordError,
    detect_format,
    is_pil,
    media_entries,
    refuse_unsupported,
)
from vlmfit.data.files import DATA_SUFFIXES, FILE, Row, find_units, read_disk, read_rows
from vlmfit.data.files import type_name as _type
from vlmfit.data.records import MediaRef, Problem, Record

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

CONTAINER_FORMATS = ("hf_disk", "parquet")
FORMATS = ROW_FORMATS + CONTAINER_FORMATS


@dataclass
class LoadResult:
    """What :func:`load_records` read: good records, every problem, formats seen."""

    path: Path
    fmt: str
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # good records per (inner) format
    skipped: list[str] = field(default_factory=list)  # "PATH: reason" per file not read


# --------------------------------------------------------------------------- media


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


def _bound(raw: dict[str, Any], parts: list[dict[str, Any]], kind: str) -> list[Any]:
    """The media of one kind in part order: from the parts themselves, or the column."""
    sources = [p.get("_src") for p in parts]
    column = media_entries(raw, f"{kind}s")
    if not any(s is not None for s in sources):
        return _bind([p["_n"] for p in parts], column, kind)
    if not all(s is not None for s in sources):
        raise RecordError(f"malformed record: some {kind} parts carry a source, others do not")
    if column:
        raise RecordError(f"malformed record: {kind}s given twice, in content parts and '{kind}s'")
    return sources


def resolve_media_path(origin: str, base: Path) -> MediaRef:
    """Resolve a media path written in the data, relative to the data file's folder ``base``.

    Raises :class:`RecordError` for URLs, ``..`` escapes, absolute paths and symlinks that
    resolve outside ``base``; only the path is inspected, the file is never opened.
    """
    if not origin.strip():
        raise RecordError("malformed record: empty media path")
    path = unquote(urlparse(origin).path) if origin.startswith("file://") else origin
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path):
        raise RecordError(f"unsupported media: {origin!r} is a URL (only local files are read)")
    root = base.resolve()
    joined = Path(os.path.normpath(root / path))  # an absolute path replaces root
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


def _data_uri(uri: str, where: str) -> MediaRef:
    """A ``data:[type];base64,...`` URI, decoded in memory."""
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64"):
        raise RecordError(f"unsupported media: {where} is a data URI without ;base64")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RecordError(f"malformed record: {where} data URI is not valid base64 ({e})") from None
    if not data:
        raise RecordError(f"malformed record: {where} data URI is empty")
    return MediaRef(data=data, origin=f"{where} ({header}, {len(data)} bytes)")


def _media_ref(entry: Any, kind: str, k: int, base: Path) -> MediaRef:
    """One media entry: a path, ``file://`` / ``data:`` URI, HF ``{"bytes", "path"}`` dict,
    bytes or a PIL image."""
    where = f"{kind}s[{k}]"
    if isinstance(entry, str):
        if entry.startswith("data:"):
            return _data_uri(entry, where)
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
    if is_pil(entry):
        return MediaRef(data=entry, origin=f"{where} (embedded)")
    if kind == "video" and isinstance(entry, list):
        raise RecordError(f"unsupported media: {where} is a list of frames; give the video file")
    raise RecordError(f"malformed record: {where} is {_type(entry)}, not a path or an image")


# --------------------------------------------------------------------------- one record


def parse_record(raw: Any, fmt: str, *, base: Path, source: str, index: int | str) -> Record:
    """Turn one raw record into a :class:`Record`; raises :class:`RecordError` with a reason."""
    if not isinstance(raw, dict):
        raise RecordError(f"record is not an object: got {_type(raw)}")
    refuse_unsupported(raw)
    draft = PARSERS[fmt](raw)
    turns = draft.messages + (draft.chosen or []) + (draft.rejected or [])
    media: dict[str, list[MediaRef]] = {}
    errors: list[str] = []
    for kind in ("image", "video"):
        parts = [p for m in turns for p in m["content"] if p["type"] == kind]
        media[kind] = []
        for k, entry in enumerate(_bound(raw, parts, kind)):
            try:
                media[kind].append(_media_ref(entry, kind, k, base))
            except RecordError as e:
                errors.append(str(e))
    if errors:
        raise RecordError("; ".join(dict.fromkeys(errors)))
    for part in (p for m in turns for p in m["content"]):
        part.pop("_n", None)
        part.pop("_src", None)
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


# --------------------------------------------------------------------------- entry point


Remap = Callable[[Any], Any] | None


def _parse_rows(
    rows: list[Row], fmt: str | None, base: Path, source: str, result: LoadResult, remap: Remap
) -> str | None:
    """Parse one file's rows into ``result``; returns the row format used.

    Without ``fmt`` the format is detected on the first recognisable record and every
    record is read with it; a record no format recognises is reported as such.
    """
    auto = fmt is None
    if remap:
        rows = [(index, remap(raw)) for index, raw in rows]
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
    unit: Path,
    fmt: str | None,
    split: str | None,
    result: LoadResult,
    base: Path | None = None,
    remap: Remap = None,
) -> str:
    """Read one file or saved dataset; returns its format (container name if any)."""
    row_fmt = fmt if fmt in ROW_FORMATS else None
    if unit.is_dir():
        if fmt not in (None, "hf_disk", *ROW_FORMATS):
            result.problems.append(Problem(str(unit), FILE, f"a saved dataset folder, not {fmt!r}"))
            return "hf_disk"
        for source, rows, problems in read_disk(unit, split):
            result.problems += problems
            _parse_rows(rows, row_fmt, base or unit, source, result, remap)
        return "hf_disk"
    container = {".parquet": "parquet", ".arrow": "hf_disk"}.get(unit.suffix)
    if fmt in CONTAINER_FORMATS and fmt != container:
        result.problems.append(Problem(str(unit), FILE, f"not a {fmt} file ({unit.suffix!r})"))
        return fmt
    rows, problems = read_rows(unit, str(unit))
    result.problems += problems
    used = _parse_rows(rows, row_fmt, base or unit.parent, str(unit), result, remap)
    return container or used or "unknown"


def _load_declared(folder: Path, name: str, split: str | None, result: LoadResult) -> set[str]:
    """A LLaMA-Factory dataset_dir entry (see :mod:`vlmfit.data.dataset_info`)."""
    if not name:
        names = ", ".join(dataset_info.names(folder)) or "none"
        reason = (
            f"a LLaMA-Factory dataset_dir: name one of its datasets ({names}) with "
            f"dataset=NAME / --dataset NAME, or give the path {folder}/NAME"
        )
        result.problems.append(Problem(str(folder), FILE, reason))
        return set()
    try:
        entry = dataset_info.declared(folder, name)
    except dataset_info.DatasetInfoError as e:
        result.problems.append(Problem(str(folder / dataset_info.INFO_FILE), FILE, str(e)))
        return set()
    units = [entry.target]
    if entry.target.is_dir():
        units, result.skipped = find_units(entry.target, split)
    elif not entry.target.is_file():
        reason = f"dataset {name!r}: file_name {entry.target.name!r} does not exist"
        result.problems.append(Problem(str(folder / dataset_info.INFO_FILE), FILE, reason))
        return set()
    for unit in units:
        _load_unit(unit, entry.fmt, split, result, base=folder, remap=entry.remap)
    return {entry.fmt}


def _refuse_mixed(result: LoadResult) -> None:
    """SFT and preference records in one dataset: refuse it whole (one training kind)."""
    sft = [r for r in result.records if not r.is_preference]
    pref = [r for r in result.records if r.is_preference]
    if not (sft and pref):
        return

    def where(records: list[Record]) -> str:
        files = list(dict.fromkeys(r.source for r in records))
        return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")

    reason = (
        f"mixed SFT and preference data: {len(sft)} SFT record(s) in {where(sft)} and "
        f"{len(pref)} preference record(s) in {where(pref)}; train one kind at a time: give "
        "the file (or a folder) holding only SFT records for SFT, only preference pairs for DPO"
    )
    result.problems.append(Problem(str(result.path), FILE, reason))
    result.records = []


def load_records(
    path: str | Path,
    *,
    fmt: str | None = None,
    split: str | None = "train",
    dataset: str | None = None,
) -> LoadResult:
    """Read a dataset file or folder into canonical records (see the module docstring).

    ``fmt`` forces a format (one of :data:`FORMATS`). ``split`` picks the split of a folder
    or saved ``DatasetDict`` (``None``: every split; a single file is read whatever its
    name). ``dataset`` names an entry of a LLaMA-Factory ``dataset_info.json``. Never raises
    for bad data: every problem is in ``LoadResult.problems``.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of: {', '.join(FORMATS)}")
    path = Path(path)
    result = LoadResult(path=path, fmt=fmt or "unknown")
    declared = dataset_info.find(path, dataset)
    if declared is not None:
        seen = _load_declared(*declared, split, result)
    elif dataset is not None:
        reason = f"dataset={dataset!r} needs a folder holding {dataset_info.INFO_FILE}"
        result.problems.append(Problem(str(path), FILE, reason))
        seen = set()
    elif not path.exists():
        result.problems.append(Problem(str(path), FILE, "no such file or folder"))
        return result
    elif path.is_dir():
        units, result.skipped = find_units(path, split)
        if not units:
            reason = f"no data files ({', '.join(DATA_SUFFIXES)}) for split {split!r}"
            result.problems.append(Problem(str(path), FILE, reason))
        seen = {_load_unit(u, fmt, split, result) for u in units}
    elif path.suffix in DATA_SUFFIXES:
        seen = {_load_unit(path, fmt, split, result)}
    else:
        reason = f"unsupported file type {path.suffix!r} (expected {', '.join(DATA_SUFFIXES)})"
        result.problems.append(Problem(str(path), FILE, reason))
        return result
    if fmt is None:
        result.fmt = seen.pop() if len(seen) == 1 else "mixed" if seen else "unknown"
    _refuse_mixed(result)
    result.counts = dict(Counter(r.fmt for r in result.records))
    if seen and not result.records and not result.problems:
        result.problems.append(Problem(str(path), FILE, "no records"))
    return result


# --------------------------------------------------------------------------- helpers


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
