"""The cache folder: content hashes, the fingerprint of a run's inputs, completeness."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from vlmfit.budget import Budget
from vlmfit.data.formats import LoadResult
from vlmfit.data.records import MediaRef
from vlmfit.models.registry import ModelSpec
from vlmfit.preprocess.options import Options

#: Bump whenever the output for the same inputs changes (invalidates every cache entry).
PIPELINE_VERSION = 2  # 2: records carry their token count (``length``) for length-grouped batches
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
)
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")

_HASHES: dict[tuple[Any, ...], str] = {}  # (path, size, mtime_ns, ctime_ns, inode) -> sha256


def file_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (streamed), memoised per (path, size, mtime, ctime, inode)."""
    st = os.stat(path)
    key = (os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    digest = _HASHES.get(key)
    if digest is None:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        _HASHES[key] = digest
    return digest


def media_hash(ref: MediaRef) -> str:
    if ref.path is not None:
        return file_hash(ref.path)
    data = ref.data
    if isinstance(data, bytes | bytearray | memoryview):
        return hashlib.sha256(bytes(data)).hexdigest()
    if hasattr(data, "tobytes"):  # an embedded PIL image
        return hashlib.sha256(f"{data.mode}{data.size}".encode() + data.tobytes()).hexdigest()
    raise ValueError(f"cannot hash media {ref.describe()}")


def _data_hashes(data: Path) -> dict[str, str]:
    """Content hash of the data file, or of every data file under a folder."""
    if data.is_file():
        return {data.name: file_hash(data)}
    files = sorted(
        p
        for p in data.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith(".")
    )
    return {str(p.relative_to(data)): file_hash(p) for p in files}


def _processor_identity(source: str | Path, revision: str | None) -> dict[str, Any]:
    """A local processor folder by its files' content; a hub processor by id and revision."""
    path = Path(source)
    if path.is_dir():
        return {n: file_hash(path / n) for n in PROCESSOR_FILES if (path / n).is_file()}
    return {"hub_id": str(source), "revision": revision}


def fingerprint(inputs: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of the canonical JSON of ``inputs``."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_inputs(
    data: Path,
    loaded: LoadResult,
    media_keys: list[str],
    spec: ModelSpec,
    proc_kwargs: dict[str, Any],
    source: str | Path,
    revision: str | None,
    budget: Budget,
    opts: Options,
) -> dict[str, Any]:
    """Everything the output depends on: sources, model + processor, budget, policy, versions."""
    import vlmfit

    return {
        # DATASET_DIR/NAME (a LLaMA-Factory dataset) is no path: hash its dataset_dir
        "data": _data_hashes(data)
        if data.exists()
        else _data_hashes(data.parent)
        if loaded.records
        else {},
        "split": opts.split,
        "media": media_keys,
        "model": {
            "name": spec.name,
            "family": spec.family.name,
            "processor": spec.processor,
            "processor_kwargs": proc_kwargs,
            "tokenizer": _processor_identity(source, revision),
        },
        "budget": dataclasses.asdict(budget),
        "max_length": opts.max_length,
        "overlength": opts.overlength,
        "on_error": opts.on_error,
        "video": {"fps": opts.video_fps, "max_frames": opts.video_max_frames},
        "vlmfit_version": vlmfit.__version__,
        "pipeline_version": PIPELINE_VERSION,
    }


def is_complete(folder: Path) -> bool:
    return (folder / "manifest.json").is_file() and (folder / "records.jsonl").is_file()
