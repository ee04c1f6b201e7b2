"""Which files of a dataset folder hold records, and the raw rows of each.

:func:`find_units` picks a folder's data files of one split (by Hugging Face ``datasets``' rule
for a folder of files); :func:`read_rows` reads the raw rows of one. Files are only read,
never written.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vlmfit.data.records import Problem

__all__ = [
    "DATA_SUFFIXES",
    "FILE",
    "SPLITS",
    "canonical_split",
    "find_units",
    "is_saved_dataset",
    "read_disk",
    "read_rows",
    "type_name",
]

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")
# JSON files of a dataset folder that hold metadata, not records.
METADATA_FILES = frozenset({"dataset_info.json", "dataset_dict.json", "state.json", "meta.json"})
MEDIA_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
    | {".mp4", ".avi", ".mov", ".mkv", ".webm"}
)
SPLITS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
FILE = "-"  # RECORD of a problem about a whole file
_BATCH = 1024

Row = tuple[int | str, Any]  # (RECORD, raw record)


def canonical_split(split: str) -> str:
    """``val`` / ``dev`` -> ``validation``, ``eval`` -> ``test``...; other names unchanged."""
    low = split.lower()
    return next((name for name, words in SPLITS.items() if low in words), split)


def _split_of(rel: Path) -> str | None:
    tokens = set(re.split(r"[^a-z0-9]+", str(rel.with_suffix("")).lower()))
    return next((name for name, words in SPLITS.items() if tokens & set(words)), None)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def _walk(root: Path, skipped: list[str]) -> list[Path]:
    """Data files and saved datasets under ``root``; everything else goes to ``skipped``."""
    found: list[Path] = []
    media: Counter[Path] = Counter()
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            skipped.append(f"{child}: hidden")
        elif is_saved_dataset(child):
            found.append(child)
        elif child.is_dir():
            found += _walk(child, skipped)
        elif child.name in METADATA_FILES:
            skipped.append(f"{child}: metadata, not records")
        elif child.suffix.lower() in MEDIA_SUFFIXES:
            media[child.parent] += 1
        elif child.suffix in DATA_SUFFIXES:
            found.append(child)
        else:
            skipped.append(f"{child}: not a data file ({child.suffix or 'no suffix'})")
    skipped += [
        f"{folder}/: {n} image/video file(s), read only when a record names them"
        for folder, n in media.items()
    ]
    return found


def find_units(root: Path, split: str | None) -> tuple[list[Path], list[str]]:
    """The data files and saved datasets of folder ``root`` in ``split`` (``None``: all),
    and one ``PATH: reason`` line for every file left out.

    Splits follow Hugging Face ``datasets``' rule for a folder of files: a file belongs to the
    split named by a word in its path (``train``/``training``; ``validation``/``valid``/``val``/
    ``dev``; ``test``/``testing``/``eval``/``evaluation``: ``sft_train.json``,
    ``data/train-00000-of-00001.parquet``, ``test/x.jsonl``), and when no file names a split,
    every file is ``train``. A saved ``DatasetDict`` picks its split by name. Usage::

        units, skipped = find_units(Path("peer_data"), split="train")
        skipped   # ['peer_data/notes.md: not a data file (.md)', 'peer_data/test.json: ...']
        rows, problems = read_rows(units[0], str(units[0]))   # [(RECORD, raw record), ...]
    """
    skipped: list[str] = []
    if is_saved_dataset(root):
        return [root], skipped
    found = _walk(root, skipped)
    files = [u for u in found if u.is_file()]
    labels = {u: _split_of(u.relative_to(root)) for u in files}
    if split is None or not any(labels.values()):
        if split is not None and canonical_split(split) != "train":
            skipped += [f"{u}: names no split, so it is 'train'" for u in files]
            files = []
        return [u for u in found if not u.is_file() or u in files], skipped
    want = canonical_split(split)
    keep = []
    for u in found:
        label = labels.get(u, want)  # saved datasets pick their split inside
        if label == want:
            keep.append(u)
        else:
            skipped.append(f"{u}: " + (f"split {label!r}" if label else "names no split"))
    return keep, skipped


# --------------------------------------------------------------------------- readers


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
            Problem(
                source, FILE, f"malformed file: top level must be an array, got {type_name(data)}"
            )
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


READERS = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
    ".arrow": _read_arrow,
}


def read_rows(path: Path, source: str) -> tuple[list[Row], list[Problem]]:
    """The raw rows of one data file (by suffix), or the problem that stopped reading it."""
    return READERS[path.suffix](path, source)


def read_disk(path: Path, split: str | None) -> Iterator[tuple[str, list[Row], list[Problem]]]:
    """(source, rows, problems) per split of a ``save_to_disk`` folder."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # damaged or foreign folder
        yield str(path), [], [Problem(str(path), FILE, f"unreadable saved dataset: {e}")]
        return
    if not isinstance(loaded, datasets.DatasetDict):
        yield str(path), _arrow_rows(loaded.with_format("arrow").iter(batch_size=_BATCH)), []
        return
    for name in [split] if split else list(loaded):
        source = str(path / name)
        if name not in loaded:
            yield source, [], [Problem(source, FILE, f"no split {name!r} (has {list(loaded)})")]
        else:
            yield source, _arrow_rows(loaded[name].with_format("arrow").iter(_BATCH)), []


def type_name(value: Any) -> str:
    """A JSON-ish name of a value's type for messages: "an object", "an array"..."""
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
