"""The training data: the preprocessing cache a run reads, as a ``datasets.Dataset``.

``prepare_data`` preprocesses (or reuses) the cache, ``load_prepared`` loads it in TRL's
VLM layout (images and video frames as lazily decoded file paths), ``video_collator``
wraps a collator for video records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmfit.config import ConfigError, RunConfig
from vlmfit.data.records import Record
from vlmfit.train import runs


def load_training_records(
    path: str, *, preference: bool, split: str | None = "train", model: str | None = None
) -> list[Record]:
    """Read any supported format, validate (fail listing every problem; with ``model``,
    images its processor refuses too)."""
    from vlmfit.data.validate import check_dataset

    report = check_dataset(path, on_error="fail", split=split, model=model)
    records = report.records
    if preference and not all(r.is_preference for r in records):
        n = sum(not r.is_preference for r in records)
        raise ConfigError(
            f"method=dpo needs preference data (prompt/chosen/rejected): {n} of {len(records)} "
            f"records in {path} have no chosen/rejected pair"
        )
    return records


def to_dataset(rows: list[dict[str, Any]]):
    """A ``datasets.Dataset`` with an ``images`` column of PIL images (TRL's VLM layout).

    Built straight from an Arrow table with a fingerprint of our own: ``from_dict`` would
    hash every image's bytes through dill to make one (slow, and it fails on some
    Python 3.12 / pyarrow combinations: "Can't pickle <class 'MonthDayNano'>").
    """
    import hashlib
    import json

    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    cols = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    features = {}
    for k, v in cols.items():
        if k == "images":
            features[k] = datasets.Sequence(datasets.Image())
        else:
            features[k] = datasets.Features.from_arrow_schema(pa.Table.from_pydict({k: v}).schema)[
                k
            ]
    features = datasets.Features(features)
    encoded = features.encode_batch(cols)
    table = pa.Table.from_pydict(encoded, schema=features.arrow_schema)
    # Images as file paths are part of the identity; decoded PIL images are not hashed.
    lazy = all(isinstance(i, dict) for im in cols.get("images", []) for i in im)
    text = json.dumps(
        {k: v for k, v in cols.items() if k != "images" or lazy}, sort_keys=True, default=str
    )
    fp = hashlib.sha256(f"{len(rows)}:{text}".encode()).hexdigest()[:16]
    return datasets.Dataset(
        InMemoryTable(table), info=datasets.DatasetInfo(features=features), fingerprint=fp
    )


def use_preprocessed(cfg: RunConfig, result) -> RunConfig:
    """Train on a preprocessing result: its cached records and its processor settings.

    Idefics3 applies the visual-token budget through the processor (``size``); Qwen's
    pre-resized images are a fixed point of its own resize, with ``max_pixels`` as guard.
    """
    cfg.data = str(result.records_path)
    cfg.processor_kwargs = dict(result.manifest.get("processor_kwargs") or {})
    return cfg


def prepared_folder(path: str | Path) -> Path | None:
    """The preprocessing cache folder ``path`` names (folder or its records.jsonl), else None."""
    p = Path(path)
    folder = p.parent if p.name == "records.jsonl" else p
    if (folder / "manifest.json").is_file() and (folder / "records.jsonl").is_file():
        return folder
    return None


def prepare_data(
    cfg: RunConfig, data: str, *, split: str | None = "train", progress: bool = True
) -> Path:
    """The cache training reads for ``data``: itself when preprocessed, else ``preprocess``'s.

    Preprocessing validated every record and stored each image at its budgeted size, so
    training neither re-validates nor re-decodes the source (a rerun is a cache hit). The
    processor settings of the budget go to ``cfg.processor_kwargs`` when not set yet.
    """
    folder = prepared_folder(data)
    if folder is None:
        from vlmfit import preprocess
        from vlmfit.budget import Budget

        result = preprocess.preprocess(
            data,
            cfg.model,
            weights=cfg.weights,
            budget=Budget(max_image_tokens=cfg.max_image_tokens),
            max_length=cfg.max_length,
            overlength=cfg.overlength,
            split=None if split == "all" else split,
            progress=progress,
        )
        folder, manifest = Path(result.path), result.manifest
    else:
        manifest = runs.read_json(folder / "manifest.json")
    if not cfg.processor_kwargs:
        cfg.processor_kwargs = dict(manifest.get("processor_kwargs") or {})
    return folder


def load_prepared(folder: Path, *, preference: bool):
    """The cache's records as a ``datasets.Dataset`` in TRL's VLM layout.

    Images stay file paths (``datasets.Image`` decodes them lazily, in the DataLoader's
    workers); ``length`` (tokens after the budget) feeds length-grouped batches. A cache
    with videos (SFT, where torchvision imports) adds ``videos``: per record, each video's
    frame files in name order, and ``video_kwargs``: the manifest's video-processor
    settings and sampling rate, which :mod:`vlmfit.train.collate` hands the video processor.
    """
    import json

    rows = [
        json.loads(line)
        for line in (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    kinds = {"preference" if "chosen" in r else "sft" for r in rows}
    want = "preference" if preference else "sft"
    if kinds - {want}:
        n = sum(("chosen" in r) != preference for r in rows)
        raise ConfigError(
            f"method={'dpo' if preference else 'sft'} needs {want} data: {n} of {len(rows)} "
            f"records in {folder} are not (DPO needs prompt/chosen/rejected pairs)"
        )
    video_kwargs = (
        _video_kwargs(folder, rows, preference) if any(r.get("videos") for r in rows) else None
    )
    for r in rows:
        videos = r.pop("videos", None) or []
        r["images"] = [{"path": str(folder / p), "bytes": None} for p in r["images"]]
        if video_kwargs is not None:
            r["videos"] = [_frame_paths(folder, v) for v in videos]
            r["video_kwargs"] = video_kwargs
        r.setdefault("length", 0)
    return to_dataset(rows)


def _video_kwargs(folder: Path, rows: list[dict[str, Any]], preference: bool) -> dict[str, Any]:
    """A video cache's settings for the collator; ConfigError where its videos can't train."""
    n = sum(bool(r.get("videos")) for r in rows)
    if preference:
        raise ConfigError(
            f"{folder}: {n} of {len(rows)} records have videos; video records train with SFT "
            "only (TRL's DPO collator passes images only)"
        )
    why = _torchvision_error()
    if why is not None:
        raise ConfigError(
            f"{folder}: {n} of {len(rows)} records have videos, and transformers' Qwen2-VL video "
            f"processor needs torchvision, which does not import here ({why}). The CPU install "
            "leaves it out: PyPI's torchvision links libtorch_cuda.so / libc10_cuda.so, which "
            "the CPU torch build lacks (README, 'Video needs torchvision'). Train video "
            "records in the GPU container, or drop them"
        )
    manifest = runs.read_json(folder / "manifest.json")
    vkw = manifest.get("video_processor_kwargs") or {}
    if not {"min_pixels", "max_pixels"} <= set(vkw) or not manifest.get("video_fps"):
        raise ConfigError(
            f"{folder}/manifest.json: no video_processor_kwargs / video_fps for its video "
            "records (a cache from an older vlmfit?): preprocess the data again"
        )
    return {
        "min_pixels": int(vkw["min_pixels"]),
        "max_pixels": int(vkw["max_pixels"]),
        "fps": float(manifest["video_fps"]),
    }


def _frame_paths(folder: Path, video: str) -> list[str]:
    """One cached video's frame files (``videos/<n>/000.jpg, 001.jpg, ...``), in name order."""
    d = folder / video
    frames = sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []
    if not frames:
        raise ConfigError(
            f"{folder}: video {video!r} has no frames in {d}: preprocess the data again"
        )
    return [str(p) for p in frames]


def _torchvision_error() -> str | None:
    """Why ``import torchvision`` fails here (None: it imports)."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or RuntimeError from a build for another torch
        return f"{type(e).__name__}: {e}"
    return None


def video_collator(collator, dataset):
    """``collator`` for a dataset of :func:`load_prepared`: wrapped for video records
    (:func:`vlmfit.train.collate.with_videos`) when it has them, else unchanged."""
    if "videos" not in (getattr(dataset, "column_names", None) or []):
        return collator
    from vlmfit.train.collate import with_videos

    return with_videos(collator, dataset)
