"""What a preprocessing run produced, read back from its cache folder, and report tables."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfit import budget as B
from vlmfit.budget import Budget
from vlmfit.data.records import Problem
from vlmfit.models import registry


@dataclass
class PreprocessResult:
    """What :func:`~vlmfit.preprocess.preprocess` produced (or found in the cache)."""

    path: Path  # the cache folder data/cache/<fingerprint>
    cache_hit: bool
    fingerprint: str
    records_path: Path  # path / "records.jsonl"
    n_in: int  # records in the source (readable or not)
    n_out: int  # records written
    dropped: list[dict[str, Any]]  # {"where", "total_before", "total_after", "reason"}
    shrunk: list[dict[str, Any]]  # {"where", "total_budget", "total_after", "max_image_tokens"}
    problems: list[Problem]
    image_stats: list[dict[str, Any]]  # one row per image / video use
    sample_stats: list[dict[str, Any]]  # one row per sample that passed validation
    counts: dict[str, int]
    seconds: float
    formats: dict[str, int] = field(default_factory=dict)  # good records per source format
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    def summary(self) -> str:
        """One line: where, how many in / out, dropped, shrunk, skipped, cache hit."""
        c = self.counts
        return (
            f"{self.path}: {self.n_out}/{self.n_in} records kept ({c.get('shrunk', 0)} shrunk, "
            f"{c.get('dropped', 0)} dropped over max_length {self.max_length}, "
            f"{c.get('skipped', 0)} skipped for problems); {c.get('images', 0)} images, "
            f"{c.get('videos', 0)} videos; {'cache hit' if self.cache_hit else 'built'} "
            f"in {self.seconds:.1f} s"
        )


def load_result(path: Path, started: float) -> PreprocessResult:
    """The result stored in a complete cache folder (a cache hit)."""
    manifest = json.loads((path / "manifest.json").read_text())
    stats = json.loads((path / "stats.json").read_text())
    return PreprocessResult(
        path=path,
        cache_hit=True,
        fingerprint=manifest["fingerprint"],
        records_path=path / "records.jsonl",
        n_in=manifest["n_in"],
        n_out=manifest["n_out"],
        dropped=manifest["dropped"],
        shrunk=manifest["shrunk"],
        problems=[Problem(**p) for p in manifest["problems"]],
        image_stats=stats["image_stats"],
        sample_stats=stats["sample_stats"],
        counts=manifest["counts"],
        seconds=time.perf_counter() - started,
        formats=manifest["formats"],
        manifest=manifest,
    )


#: Reference photo sizes for the cost table (w, h): VGA, 1000 px square, phone photo.
REFERENCE_SIZES = [(640, 480), (1000, 1000), (1920, 1080), (4032, 3024)]


def truncation_risk(res: PreprocessResult) -> dict[str, float | int]:
    """Fractions of valid samples over ``max_length``: at processor defaults (``before``),
    at the budget before the policy (``budget``), and written (``after``, always 0)."""
    rows = res.sample_stats
    n = max(len(rows), 1)
    limit = res.max_length
    return {
        "samples": len(rows),
        "max_length": limit,
        "over_before": sum(r["total_before"] > limit for r in rows) / n,
        "over_budget": sum(r["total_budget"] > limit for r in rows) / n,
        "over_after": sum(r["total_after"] > limit and r["status"] != "dropped" for r in rows) / n,
        "dropped": sum(r["status"] == "dropped" for r in rows),
        "shrunk": sum(r["status"] == "shrunk" for r in rows),
    }


def problem_rows(res: PreprocessResult) -> list[dict[str, Any]]:
    """The validation table: one row per problem (``where``, ``kind``, ``reason``)."""
    from vlmfit.data.validate import reason_kind

    return [
        {"where": f"{p.source}:{p.index}", "kind": reason_kind(p.reason), "reason": p.reason}
        for p in res.problems
    ]


def pitfall_table(model: str, budget: Budget | None = None) -> list[dict[str, Any]]:
    """Visual tokens of reference photo sizes at processor defaults and at ``budget``, for
    ``model`` and, for contrast, Qwen2-VL at its hub defaults (which never downscale: a
    1000x1000 photo costs 1,296 tokens)."""
    budget = budget or Budget()
    rows = []
    for name in dict.fromkeys([model, "qwen2-vl-2b"]):
        spec = registry.get(name)
        try:
            table = B.cost_table(spec, REFERENCE_SIZES, budget)
        except ValueError as e:  # a budget this model cannot meet
            table = [{"width": w, "height": h, "error": str(e)} for w, h in REFERENCE_SIZES]
        for row in table:
            rows.append({"model": name, "budget": budget.describe(), **row})
    return rows
