"""``vlmfit preprocess``: the command line of :func:`vlmfit.preprocess.preprocess`."""

from __future__ import annotations

import argparse

from vlmfit.cli.budget import add_budget_arguments, budget_from_args
from vlmfit.cli.common import Parser, command, hub_preflight, models_help
from vlmfit.config import RunConfig


def parser() -> Parser:
    d = RunConfig()
    p = Parser(
        "preprocess",
        "Put DATA's images on MODEL's visual-token budget, count sequence lengths and cache "
        "the result in CACHE_DIR/<fingerprint>/ (records.jsonl for training).",
        epilog=models_help(),
    )
    p.add_argument("data", help="a .json/.jsonl/.parquet/.arrow file or a dataset folder")
    p.add_argument("--model", required=True, help="registry name (vlmfit tokens --help)")
    p.add_argument("--split", default=d.dataset_split,
                   help=f"dataset split to read (default {d.dataset_split}; 'all': every one)")  # fmt: skip
    p.add_argument("--weights", default=d.weights, help="hub | random | a local model folder")
    add_budget_arguments(p)
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"tokens per sample (default {d.max_length})")  # fmt: skip
    p.add_argument("--overlength", choices=["drop", "shrink"], default=d.overlength,
                   help=f"over max-length (default {d.overlength})")  # fmt: skip
    p.add_argument("--skip-bad", action="store_true", help="skip bad records instead of failing")
    # Not RunConfig's: preprocess()'s own defaults apply unless given.
    p.add_argument("--cache-dir", default=argparse.SUPPRESS, help="(default data/cache)")
    p.add_argument("--workers", type=int, default=argparse.SUPPRESS,
                   help="processes (default: CPU count; 1: inline)")  # fmt: skip
    p.add_argument("--video-fps", type=float, default=argparse.SUPPRESS)
    p.add_argument("--video-max-frames", type=int, default=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true")
    return p


@command("preprocess")
def cli_preprocess(argv: list[str]) -> int:
    """``vlmfit preprocess``: 0 with a summary; 1 listing every problem; 2 on a usage error."""
    from vlmfit.data.records import DataError
    from vlmfit.models import registry
    from vlmfit.preprocess.pipeline import preprocess
    from vlmfit.preprocess.result import truncation_risk

    p = parser()
    args = p.parse_args(argv)
    registry.get(args.model)  # an unknown model: exit 2 before the hub is asked
    hub_preflight(args.model, args.weights, None)
    optional = {
        k: getattr(args, k)
        for k in ("cache_dir", "workers", "video_fps", "video_max_frames")
        if hasattr(args, k)
    }
    budget = budget_from_args(args)
    try:
        res = preprocess(
            args.data,
            args.model,
            weights=args.weights,
            budget=budget,
            max_length=args.max_length,
            overlength=args.overlength,
            on_error="skip" if args.skip_bad else "fail",
            progress=not args.no_progress,
            split=None if args.split == "all" else args.split,
            **optional,
        )
    except DataError as e:
        print(e)
        print("nothing was written; fix the data or pass --skip-bad")
        return 1
    except ValueError as e:
        p.error(str(e))
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
