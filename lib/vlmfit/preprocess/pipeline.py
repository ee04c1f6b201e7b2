"""The preprocessing pipeline: the stages in order, and the cache check between them."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlmfit import budget as B
from vlmfit.budget import Budget
from vlmfit.config import RunConfig
from vlmfit.files import atomic_folder, write_json
from vlmfit.models import registry
from vlmfit.preprocess.cache import cache_inputs, fingerprint, is_complete
from vlmfit.preprocess.costs import probe_media
from vlmfit.preprocess.lengths import count_tokens, recount_decoded
from vlmfit.preprocess.options import Options
from vlmfit.preprocess.output import manifest, write_outputs
from vlmfit.preprocess.read import read_records
from vlmfit.preprocess.result import PreprocessResult, load_result
from vlmfit.preprocess.workers import save_media


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - t


def preprocess(
    data: str | Path,
    model: str,
    *,
    weights: str = RunConfig.weights,
    budget: Budget | None = None,
    max_length: int = RunConfig.max_length,
    overlength: str = RunConfig.overlength,
    on_error: str = "fail",
    cache_dir: str | Path = "data/cache",
    workers: int | None = None,
    progress: bool = True,
    video_fps: float = 2.0,
    video_max_frames: int = 16,
    split: str | None = "train",
) -> PreprocessResult:
    """Validate ``data`` (its ``split``: test rows never reach training; ``None``: all), put
    its media on ``budget`` for ``model``, apply the over-length policy and write the cache
    folder (or find it). See :mod:`vlmfit.preprocess`.

    ``weights``: ``hub`` (the hub processor), ``random`` (``tiny.ensure_random``) or a local
    model folder; only the tokenizer and chat template are read from it, token arithmetic
    uses the registry's published processor settings. ``on_error="fail"`` raises
    :class:`~vlmfit.data.records.DataError` listing every problem; ``"skip"`` leaves bad
    records out and reports them. ``workers=1`` decodes inline; default ``os.cpu_count()``
    processes.
    """
    from vlmfit.models import resolve_source

    started = time.perf_counter()
    timings: dict[str, float] = {}
    opts = Options(
        weights=weights,
        max_length=max_length,
        overlength=overlength,
        on_error=on_error,
        workers=max(1, workers or os.cpu_count() or 1),
        progress=progress,
        video_fps=video_fps,
        video_max_frames=video_max_frames,
        split=split,
    )
    spec = registry.get(model)
    budget = budget or Budget()
    proc_kwargs = B.processor_kwargs(spec, budget)  # ValueError for a budget the model can't do
    data = Path(data)

    loaded, records, problems, n_in = read_records(data, spec, opts)
    timings["load"] = time.perf_counter() - started

    with _timed(timings, "probe"):
        table, records = probe_media(records, problems, opts)

    source, revision = resolve_source(spec, weights)
    media_keys = sorted(f"{m.kind}:{m.key or m.error}" for m in table.values())
    inputs = cache_inputs(
        data, loaded, media_keys, spec, proc_kwargs, source, revision, budget, opts
    )
    fp = fingerprint(inputs)
    out = Path(cache_dir) / fp
    if is_complete(out):
        print(f"cache hit: {out}")
        return load_result(out, started)

    with _timed(timings, "tokens"):
        samples, merges = count_tokens(
            spec, source, revision, records, table, budget, problems, opts
        )
    with atomic_folder(out, keep=is_complete) as tmp:  # theirs, if another run finished first
        with _timed(timings, "media"):
            done = save_media(tmp, spec, samples, budget, merges, opts)
        with _timed(timings, "write"):
            recount_decoded(spec, samples, done, budget, merges, problems, opts)
            result = write_outputs(tmp, samples, done)
        files = sum(r.get("frames", 1) for r in done.values() if not r["error"])
        result["images_per_s"] = files / timings["media"] if timings["media"] > 0 else 0.0
        info = manifest(
            fp, data, loaded, spec, budget, inputs, n_in, result, problems, opts, timings
        )
        timings["total"] = time.perf_counter() - started
        write_json(tmp / "manifest.json", info, indent=1, ensure_ascii=False)  # last: complete
    res = load_result(out, started)
    res.cache_hit = False
    print(f"built: {out} ({res.seconds:.1f} s)")
    return res
