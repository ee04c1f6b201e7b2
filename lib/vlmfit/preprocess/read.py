"""Stage 1: read the records and check their structure (no pixels yet)."""

from __future__ import annotations

from pathlib import Path

from vlmfit.data.formats import LoadResult, load_records
from vlmfit.data.records import DataError, Problem, Record
from vlmfit.data.validate import validate_records
from vlmfit.models.registry import ModelSpec
from vlmfit.preprocess.options import Options


def sort_key(p: Problem) -> tuple[str, int]:
    return (p.source, p.index if isinstance(p.index, int) else -1)


def fail_or_continue(problems: list[Problem], on_error: str) -> None:
    if problems and on_error == "fail":
        raise DataError(sorted(problems, key=sort_key))


def read_records(
    data: Path, spec: ModelSpec, opts: Options
) -> tuple[LoadResult, list[Record], list[Problem], int]:
    """The loaded source, its good records, the problems found, and the source's record count.

    Records with a structural problem, or with video for a family without video, are left
    out (``on_error="skip"``) or raise :class:`~vlmfit.data.records.DataError`.
    """
    loaded = load_records(data, split=opts.split)
    for line in loaded.skipped:
        print(f"skipped file {line}")
    problems = list(loaded.problems)
    problems += validate_records(loaded.records, check_media=False)
    if not spec.family.supports_video:
        problems += [
            Problem(
                r.source,
                r.index,
                f"video not supported: {spec.name} ({spec.family.name}) takes images only; "
                f"this record has {len(r.videos)} video(s)",
            )
            for r in loaded.records
            if r.videos
        ]
    n_in = len(loaded.records) + len(
        {(p.source, p.index) for p in loaded.problems if p.index != "-"}
    )
    fail_or_continue(problems, opts.on_error)
    bad = {(p.source, p.index) for p in problems}
    records = [r for r in loaded.records if (r.source, r.index) not in bad]
    return loaded, records, problems, n_in
