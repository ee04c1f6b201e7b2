"""``vlmfit preprocess``: the command line of :func:`~vlmfit.preprocess.preprocess`."""

from __future__ import annotations

import argparse
import sys

from vlmfit import budget as B
from vlmfit.data.records import DataError
from vlmfit.models import registry
from vlmfit.preprocess.options import POLICIES
from vlmfit.preprocess.pipeline import preprocess
from vlmfit.preprocess.result import truncation_risk


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmfit preprocess",
        description="Put DATA's images on MODEL's visual-token budget, count sequence lengths "
        "and cache the result in CACHE_DIR/<fingerprint>/ (records.jsonl for training).",
    )
    p.add_argument("data", help="a .json/.jsonl/.parquet/.arrow file or a dataset folder")
    p.add_argument("--model", required=True, help="registry name (python -m vlmfit tokens)")
    p.add_argument(
        "--split", default="train", help="dataset split to read (default train; 'all': every one)"
    )
    p.add_argument("--weights", default="hub", help="hub | random | a local model folder")
    B.add_budget_arguments(p)
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sample")
    p.add_argument("--overlength", choices=POLICIES, default="drop", help="over max-length")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records instead of failing")
    p.add_argument("--cache-dir", default="data/cache")
    p.add_argument("--workers", type=int, help="processes (default: CPU count; 1: inline)")
    p.add_argument("--video-fps", type=float, default=2.0)
    p.add_argument("--video-max-frames", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")
    return p


def cli_preprocess(argv: list[str]) -> int:
    """``vlmfit preprocess``: 0 with a summary; 1 listing every problem; 2 on a usage error."""
    args = _parser().parse_args(argv)
    try:
        budget = B.budget_from_args(args)
        res = preprocess(
            args.data,
            args.model,
            weights=args.weights,
            budget=budget,
            max_length=args.max_length,
            overlength=args.overlength,
            on_error="skip" if args.skip_bad else "fail",
            cache_dir=args.cache_dir,
            workers=args.workers,
            progress=not args.no_progress,
            video_fps=args.video_fps,
            video_max_frames=args.video_max_frames,
            split=None if args.split == "all" else args.split,
        )
    except DataError as e:
        print(e)
        print("nothing was written; fix the data or pass --skip-bad")
        return 1
    except (ValueError, registry.UnknownModelError) as e:
        print(f"vlmfit preprocess: error: {e}", file=sys.stderr)
        return 2
    for problem in res.problems:
        print(f"skipped {problem}")
    for row in res.dropped:
        print(f"dropped {row['where']}: {row['reason']}")
    for row in res.shrunk:
        print(
            f"shrunk {row['where']}: {row['total_budget']} -> {row['total_after']} tokens "
            f"(max_image_tokens {row['max_image_tokens']})"
        )
    risk = truncation_risk(res)
    print(
        f"over max_length {res.max_length}: {risk['over_before']:.1%} at processor defaults, "
        f"{risk['over_budget']:.1%} with {budget.describe()}"
    )
    print(f"records: {res.records_path}")
    return 0 if res.n_out else 1
