"""LLaMA-Factory's dataset registry: a ``dataset_dir`` whose ``dataset_info.json`` names datasets.

``load_records("LLaMA-Factory/data", dataset="mllm_demo")``, or the same as
``load_records("LLaMA-Factory/data/mllm_demo")``, reads that entry as LLaMA-Factory reads it,
from local files only. Which keys of an entry are read: docs/data-formats.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfit.data.files import is_saved_dataset

__all__ = ["INFO_FILE", "Declared", "DatasetInfoError", "declared", "find"]

INFO_FILE = "dataset_info.json"
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
COLUMN_DEFAULTS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
}
TAG_DEFAULTS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
}
# LLaMA-Factory column name -> the key vlmfit's alpaca / sharegpt parsers read
ALPACA_KEYS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": "history",
}
SHARED_KEYS = {"images": "images", "videos": "videos", "kto_tag": "kto_tag", "system": "system"}


class DatasetInfoError(ValueError):
    """A dataset_info.json entry that cannot be read; the message is the reason."""


@dataclass(frozen=True)
class Declared:
    """One ``dataset_info.json`` entry, resolved."""

    name: str
    folder: Path  # the dataset_dir: media paths are relative to it
    target: Path  # file_name: a data file or a folder of them
    fmt: str  # vlmfit row format
    formatting: str
    ranking: bool
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def remap(self, raw: Any) -> Any:
        """A raw row renamed to the keys and role names vlmfit's parsers read."""
        if not isinstance(raw, dict):
            return raw
        out: dict[str, Any] = {}
        keys = dict(SHARED_KEYS)
        if self.formatting == "alpaca":
            keys.update(ALPACA_KEYS)
        else:
            keys["messages"] = "conversations"
        for column, key in keys.items():
            if column in self.columns and self.columns[column] in raw:
                value = raw[self.columns[column]]
                out[key] = self._messages(value) if key == "conversations" else value
        if self.ranking:
            for side in ("chosen", "rejected"):
                value = raw.get(self.columns.get(side, side))
                out[side] = self._message(value) if isinstance(value, dict) else value
        return out

    def _messages(self, value: Any) -> Any:
        return [self._message(m) for m in value] if isinstance(value, list) else value

    def _message(self, m: Any) -> Any:
        if not isinstance(m, dict):
            return m
        t = self.tags
        roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["system_tag"]: "system"}
        role = m.get(t["role_tag"])
        return {"role": roles.get(role, role), "content": m.get(t["content_tag"])}


def _entry(info: dict[str, Any], name: str, folder: Path) -> Declared:
    entry = info[name]
    if not isinstance(entry, dict):
        raise DatasetInfoError(f"entry {name!r} is not an object")
    hub = [k for k in HUB_KEYS if entry.get(k)]
    if hub:
        raise DatasetInfoError(
            f"dataset {name!r} is not local ({hub[0]}: {entry[hub[0]]!r}); vlmfit reads local "
            "files only: download it and declare its file_name"
        )
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise DatasetInfoError(f"dataset {name!r} has no file_name")
    target = (folder / file_name).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise DatasetInfoError(f"dataset {name!r}: file_name {file_name!r} is outside {folder}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in COLUMN_DEFAULTS:
        raise DatasetInfoError(
            f"dataset {name!r}: formatting {formatting!r} is not supported (alpaca, sharegpt)"
        )
    ranking = bool(entry.get("ranking", False))
    columns = {**COLUMN_DEFAULTS[formatting], **(entry.get("columns") or {})}
    tags = {**TAG_DEFAULTS, **(entry.get("tags") or {})}
    fmt = {"alpaca": "alpaca", "sharegpt": "llamafactory"}[formatting]
    fmt += "_preference" if ranking else ""
    return Declared(name, folder, target, fmt, formatting, ranking, columns, tags)


def declared(folder: Path, name: str) -> Declared:
    """Entry ``name`` of ``folder/dataset_info.json``; raises :class:`DatasetInfoError`."""
    info_path = folder / INFO_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetInfoError(f"unreadable {INFO_FILE}: {e}") from None
    if not isinstance(info, dict):
        raise DatasetInfoError(f"{INFO_FILE} must be an object of named datasets")
    if name not in info:
        names = ", ".join(sorted(info)) or "none"
        raise DatasetInfoError(f"no dataset {name!r} in {info_path} (it declares: {names})")
    return _entry(info, name, folder)


def find(path: Path, dataset: str | None) -> tuple[Path, str] | None:
    """(dataset_dir, name) when ``path`` names a LLaMA-Factory dataset, else ``None``.

    ``path`` is the dataset_dir or its dataset_info.json with ``dataset`` given, or
    ``DATASET_DIR/NAME`` where no such file exists. A dataset_dir with no name given is
    (dataset_dir, "") so that the caller can ask for one.
    """
    if is_saved_dataset(path if path.is_dir() else path.parent):  # holds one too, of HF's
        return None
    if path.name == INFO_FILE and path.is_file():
        return path.parent, dataset or ""
    if path.is_dir() and (path / INFO_FILE).is_file():
        return path, dataset or ""
    if dataset is None and not path.exists() and (path.parent / INFO_FILE).is_file():
        return path.parent, path.name
    return None


def names(folder: Path) -> list[str]:
    """The dataset names ``folder/dataset_info.json`` declares (empty if unreadable)."""
    try:
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    return sorted(info) if isinstance(info, dict) else []
